"""The detector's response: photoelectrons to pulses, launches, local coincidence, trigger and
readout.

Scattering delays, PMT jitter and afterpulses per photoelectron, pulses per digitizer bin with
their charges, HLC/SLC launches, the SMT8 trigger and its readout windows (see "Timing",
"Pulses and charge" and "Launches, local coincidence, trigger, readout" in
:mod:`iceaggr.data.synth`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iceaggr.data.geometry import DOMS_PER_STRING
from iceaggr.data.synth.detector import _Detector
from iceaggr.data.synth.photons import _PANDEL_SCALE_NS, PANDEL_LAMBDA_M, _Hits

PMT_JITTER_NS = 2.0
"""PMT transit-time spread (Gaussian sigma)."""
ATWD_WINDOW_NS = 427.0
"""The DOM's fast digitizer (ATWD, 3.3 ns samples) covers this long after the launch..."""
ATWD_RESOLUTION_NS = 6.0
"""...where the unfolding resolves one pulse per this much time (photons in one such bin, counted
from the launch, merge into one pulse)."""
FADC_RESOLUTION_NS = 25.0
"""After the ATWD window only the slow digitizer (fADC, 25 ns samples, broad pulse shape) is
left: one pulse per this much time."""
MAX_PHOTONS_PER_DOM = 100
"""Bright DOMs are simulated with this many macro-photons sharing the charge."""
AFTERPULSE_PROBABILITY = 0.06
"""PMT afterpulses per photoelectron (Hamamatsu R7081 in IceCube: ~0.06)."""
AFTERPULSE_GROUPS: tuple[tuple[float, float, float], ...] = (
    (0.2, 600.0, 100.0),
    (0.5, 2_000.0, 300.0),
    (0.3, 8_000.0, 1_000.0),
)
"""(share, mean delay ns, sigma ns) of the afterpulse groups (peaks at ~0.6, 2 and 8 us)."""
SPE_MEAN_PE = 1.0
SPE_SIGMA_PE = 0.3
"""Single-photoelectron charge: Gaussian part (mean, sigma), truncated at CHARGE_QUANTUM_PE."""
SPE_LOW_FRACTION = 0.15
SPE_LOW_MEAN_PE = 0.25
"""Single-photoelectron charge: share and mean of the exponential low-charge component."""
SATURATION_PE = 3_000.0
"""Soft saturation of a pulse's charge: q -> q / (1 + q / SATURATION_PE)."""
CHARGE_QUANTUM_PE = 0.025
"""Charges are stored as multiples of this, as in the Kaggle files."""
DARK_RATE_HZ = 370.0
"""(tuned) Dark-noise rate per DOM (IceCube in-ice DOMs: several hundred Hz)."""
HLC_SPAN_DOMS = 2
"""Hard local coincidence: a neighbour up to this many DOMs away on the same string..."""
HLC_WINDOW_NS = 1_000.0
"""...launches within this time of it (IceCube: +-1 us)."""
LAUNCH_WINDOW_NS = 6_400.0
"""A DOM launch digitizes this long (the fADC's 256 samples of 25 ns): later pulses of the DOM
belong to a new launch, with its own local-coincidence status."""
SMT_MULTIPLICITY = 8
"""Simple multiplicity trigger: at least this many HLC launches..."""
SMT_WINDOW_NS = 5_000.0
"""...within this sliding time window (IceCube's SMT8: 8 HLC launches in 5 us)."""
READOUT_PRE_TRIGGER_NS = 4_300.0
"""A trigger's readout starts this long before its first HLC launch (IceCube: 4 us before the
trigger window; 4.3 us reproduces the real minimum raw time of ~5.7e3 ns)."""
READOUT_POST_TRIGGER_NS = 6_000.0
"""A trigger's readout ends this long after its last HLC launch (IceCube: 6 us). Overlapping
readouts merge into one window; an event holds the readout windows of every trigger of its
``COINCIDENCE_WINDOW_NS``."""
TRIGGER_TIME_NS = 10_000.0
"""Raw time of the event's first trigger (its first HLC launch): the ~1e4 ns offset of the real
files. The neutrino's own light comes later where a coincident muon triggered first."""
_TIME_KEY_OFFSET_NS = 2.0**17  # sort keys hold times in [-2^17, 2^17) ns at 1/64 ns
_SENSOR_KEY_SPAN = 2**13  # > number of sensors (5160)
_EVENT_TIME_SPAN_NS = 2.0**20  # float keys event * span + time separate events (|t| < 2^19 ns)


def _spe_charge(rng: np.random.Generator, n: int) -> np.ndarray:
    """Charges (p.e.) of ``n`` single photoelectrons."""
    gauss = rng.normal(SPE_MEAN_PE, SPE_SIGMA_PE, n)
    low = rng.exponential(SPE_LOW_MEAN_PE, n)
    q = np.where(rng.random(n) < SPE_LOW_FRACTION, low, gauss)
    return np.maximum(q, CHARGE_QUANTUM_PE)


def _photons(
    rng: np.random.Generator, hits: list[_Hits]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hit DOMs -> photoelectrons and afterpulses, unsorted.

    Returns (event, sensor, time ns, charge p.e., coincident): ``coincident`` marks the light of
    coincident atmospheric muons (afterpulses inherit it from their parent DOM hit).
    """
    event = np.concatenate([h.event for h in hits])
    sensor = np.concatenate([h.sensor for h in hits])
    n_pe = np.concatenate([h.n_pe for h in hits])
    t_geo = np.concatenate([h.time for h in hits])
    dist = np.concatenate([h.dist for h in hits])
    coincident = np.concatenate([np.full(h.event.shape[0], h.coincident) for h in hits])
    n_hit = event.shape[0]
    n_ph = np.minimum(n_pe, MAX_PHOTONS_PER_DOM)
    ph = np.repeat(np.arange(n_hit), n_ph)
    m = ph.shape[0]
    delay = rng.gamma(dist[ph] / PANDEL_LAMBDA_M, _PANDEL_SCALE_NS)
    time = t_geo[ph] + delay + rng.normal(0.0, PMT_JITTER_NS, m)
    charge = (n_pe / n_ph)[ph] * _spe_charge(rng, m)  # macro-photons share a bright DOM's charge

    # PMT afterpulses: late single photoelectrons, more for brighter DOMs.
    n_ap = np.minimum(rng.poisson(AFTERPULSE_PROBABILITY * n_pe), MAX_PHOTONS_PER_DOM)
    ap = np.repeat(np.arange(n_hit), n_ap)
    k = ap.shape[0]
    group = rng.choice(len(AFTERPULSE_GROUPS), size=k, p=[g[0] for g in AFTERPULSE_GROUPS])
    mean = np.array([g[1] for g in AFTERPULSE_GROUPS])[group]
    sigma = np.array([g[2] for g in AFTERPULSE_GROUPS])[group]
    ap_time = t_geo[ap] + np.maximum(rng.normal(mean, sigma), 0.0)
    return (
        np.concatenate([event[ph], event[ap]]),
        np.concatenate([sensor[ph], sensor[ap]]),
        np.concatenate([time, ap_time]),
        np.concatenate([charge, _spe_charge(rng, k)]),
        np.concatenate([coincident[ph], coincident[ap]]),
    )


def _sort_key(event: np.ndarray, sensor: np.ndarray, time: np.ndarray) -> np.ndarray:
    """int64 key ordering by (event, sensor, time) (time at 1/64 ns within +-2^17 ns)."""
    t = np.clip(np.rint((time + _TIME_KEY_OFFSET_NS) * 64.0), 0, 2**24 - 1).astype(np.int64)
    return (event * _SENSOR_KEY_SPAN + sensor) * 2**24 + t


def _launch_starts(event: np.ndarray, sensor: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Which pulses (or photons) open a DOM launch; input sorted by (event, sensor, time).

    A DOM's first pulse opens a launch; a pulse more than ``LAUNCH_WINDOW_NS`` after the latest
    launch of its DOM opens the next one.
    """
    n = time.shape[0]
    start = np.ones(n, dtype=bool)
    start[1:] = (event[1:] != event[:-1]) | (sensor[1:] != sensor[:-1])
    dom_first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    cand = np.flatnonzero(time - time[dom_first] > LAUNCH_WINDOW_NS)  # may open a later launch
    cur = dom_first[cand]  # the latest launch before each candidate
    while cand.shape[0] > 0:
        late = time[cand] - time[cur] > LAUNCH_WINDOW_NS
        cand, cur = cand[late], cur[late]
        if cand.shape[0] == 0:
            break
        # The first late pulse after each launch opens the next one (candidates are sorted).
        new = np.ones(cand.shape[0], dtype=bool)
        new[1:] = cur[1:] != cur[:-1]
        start[cand[new]] = True
        cur = np.maximum(cur, np.maximum.accumulate(np.where(new, cand, -1)))
        cand, cur = cand[~new], cur[~new]
    return start


def _merge_photons(
    event: np.ndarray,
    sensor: np.ndarray,
    time: np.ndarray,
    charge: np.ndarray,
    coincident: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Photons -> pulses, sorted by (event, sensor, time); a pulse is coincident-muon light when
    its first photon is."""
    order = np.argsort(_sort_key(event, sensor, time), kind="quicksort")
    event, sensor, time = event[order], sensor[order], time[order]
    charge, coincident = charge[order], coincident[order]
    n = time.shape[0]
    if n == 0:
        return event, sensor, time, charge, coincident
    launch = _launch_starts(event, sensor, time)
    since_launch = time - time[np.maximum.accumulate(np.where(launch, np.arange(n), 0))]
    # Unfolding resolves one pulse per digitizer bin: fine in the ATWD window, coarse after.
    atwd_bins = np.floor(since_launch / ATWD_RESOLUTION_NS)
    fadc_bins = np.ceil(ATWD_WINDOW_NS / ATWD_RESOLUTION_NS) + np.floor(
        (since_launch - ATWD_WINDOW_NS) / FADC_RESOLUTION_NS
    )
    time_bin = np.where(since_launch < ATWD_WINDOW_NS, atwd_bins, fadc_bins)
    new = launch.copy()
    new[1:] |= time_bin[1:] != time_bin[:-1]
    start = np.flatnonzero(new)
    pulse_charge = np.add.reduceat(charge, start)
    return event[start], sensor[start], time[start], pulse_charge, coincident[start]


def _hlc_launches(
    det: _Detector, event: np.ndarray, sensor: np.ndarray, time: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """DOM launches and their hard-local-coincidence flags; pulses sorted by ``_sort_key``.

    A launch is HLC when a DOM up to ``HLC_SPAN_DOMS`` away on the same string launched within
    ``HLC_WINDOW_NS`` of it. Returns (index of each launch's first pulse, HLC flag per launch).
    """
    first = np.flatnonzero(_launch_starts(event, sensor, time))
    n = first.shape[0]
    hlc = np.zeros(n, dtype=bool)
    if n == 0:
        return first, hlc
    ev, sid, t = event[first], sensor[first], time[first]
    key = _sort_key(ev, sid, t)  # ascending, as the pulses are
    dom = det.dom[sid]
    for offset in range(-HLC_SPAN_DOMS, HLC_SPAN_DOMS + 1):
        if offset == 0:
            continue
        on_string = (dom + offset >= 0) & (dom + offset < DOMS_PER_STRING)
        lo = _sort_key(ev, sid + offset, t - HLC_WINDOW_NS)
        hi = _sort_key(ev, sid + offset, t + HLC_WINDOW_NS)
        j = np.minimum(np.searchsorted(key, lo), n - 1)  # first launch of the neighbour >= lo
        hlc |= on_string & (key[j] >= lo) & (key[j] <= hi)
    return first, hlc


def _hlc_pulses(
    det: _Detector, event: np.ndarray, sensor: np.ndarray, time: np.ndarray
) -> np.ndarray:
    """HLC flag per pulse (that of its launch); pulses sorted by ``_sort_key``."""
    first, hlc = _hlc_launches(det, event, sensor, time)
    return np.repeat(hlc, np.diff(np.append(first, event.shape[0])))


def _smt_trigger(event: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Which HLC launches (sorted by event, then time) take part in an SMT trigger: a run of
    ``SMT_MULTIPLICITY`` launches of one event within ``SMT_WINDOW_NS``."""
    n = event.shape[0]
    k = SMT_MULTIPLICITY - 1
    fires = np.zeros(n, dtype=bool)
    if n > k:
        fires[: n - k] = (event[k:] == event[: n - k]) & (time[k:] - time[: n - k] <= SMT_WINDOW_NS)
    first = np.flatnonzero(fires)
    cover = np.zeros(n + 1, dtype=np.int64)
    cover[first] += 1
    cover[first + SMT_MULTIPLICITY] -= 1
    return np.cumsum(cover[:n]) > 0


@dataclass
class _Readout:
    """Readout windows of the kept events, sorted by (event, start)."""

    kept: np.ndarray  # (K,) int64 candidate events whose neutrino light triggered, ascending
    event: np.ndarray  # (W,) int64 event of each window
    lo: np.ndarray  # (W,) ns, start
    hi: np.ndarray  # (W,) ns, end

    def contains(self, event: np.ndarray, time: np.ndarray) -> np.ndarray:
        """Whether each (event, time) lies inside one of that event's windows."""
        key = self.event * _EVENT_TIME_SPAN_NS + self.lo
        j = np.searchsorted(key, event * _EVENT_TIME_SPAN_NS + time, side="right") - 1
        jc = np.maximum(j, 0)
        if key.shape[0] == 0:
            return np.zeros(event.shape[0], dtype=bool)
        return (j >= 0) & (self.event[jc] == event) & (time <= self.hi[jc])


def _readout(
    det: _Detector, event: np.ndarray, sensor: np.ndarray, time: np.ndarray, coincident: np.ndarray
) -> _Readout:
    """Trigger and readout windows; pulses sorted by ``_sort_key``.

    An event is kept when its neutrino's own HLC launches make an SMT trigger. Its readout is
    the union of [first - ``READOUT_PRE_TRIGGER_NS``, last + ``READOUT_POST_TRIGGER_NS``] over
    the HLC launches of every trigger in it (coincident muons' triggers included): triggers whose
    windows overlap merge, others stay separate windows of the same event.
    """
    first, hlc = _hlc_launches(det, event, sensor, time)
    h = first[hlc]
    h = h[np.lexsort((time[h], event[h]))]
    ev, t = event[h], time[h]
    own = ~coincident[h]
    kept = np.unique(ev[own][_smt_trigger(ev[own], t[own])])
    trig = _smt_trigger(ev, t) & np.isin(ev, kept)
    ev, t = ev[trig], t[trig]
    new = np.ones(ev.shape[0], dtype=bool)
    new[1:] = (ev[1:] != ev[:-1]) | (
        t[1:] - t[:-1] > READOUT_PRE_TRIGGER_NS + READOUT_POST_TRIGGER_NS
    )
    start = np.flatnonzero(new)
    last = np.maximum.reduceat(t, start) if start.shape[0] else t[start]
    return _Readout(
        kept=kept,
        event=ev[start],
        lo=t[start] - READOUT_PRE_TRIGGER_NS,
        hi=last + READOUT_POST_TRIGGER_NS,
    )


def _finish_charge(charge: np.ndarray) -> np.ndarray:
    q = charge / (1.0 + charge / SATURATION_PE)
    return np.maximum(np.round(q / CHARGE_QUANTUM_PE), 1.0) * CHARGE_QUANTUM_PE
