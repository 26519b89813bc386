"""Whole events: candidates simulated stage by stage, kept when their own light triggers.

:func:`generate_events` returns triggered events in memory, in the columns of the Kaggle
files; :mod:`.writer` streams them to disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from iceaggr.data.synth.detector import _Detector, _detector
from iceaggr.data.synth.photons import _cascade_hits, _track_hits
from iceaggr.data.synth.response import (
    _SENSOR_KEY_SPAN,
    DARK_RATE_HZ,
    READOUT_PRE_TRIGGER_NS,
    TRIGGER_TIME_NS,
    _finish_charge,
    _hlc_pulses,
    _merge_photons,
    _photons,
    _readout,
    _sort_key,
    _spe_charge,
)
from iceaggr.data.synth.sources import _sample_coincident_muons, _sample_events

_MAX_CANDIDATES_PER_ROUND = 2048
"""Candidates simulated per vectorized round: small enough for the arrays to stay in cache."""
_EXPECTED_TRIGGER_EFFICIENCY = 0.3
"""First guess of the share of generated events passing the trigger (refined as it runs)."""


@dataclass
class _Chunk:
    event: np.ndarray  # (P,) int64 index of the candidate event
    sensor: np.ndarray  # (P,) int64
    time: np.ndarray  # (P,) int64 ns, raw
    charge: np.ndarray  # (P,) float64 p.e.
    auxiliary: np.ndarray  # (P,) bool
    coincident: np.ndarray  # (P,) bool light of a coincident atmospheric muon (not written out)
    kept: np.ndarray  # (n_kept,) int64 candidate indices that passed the trigger, ascending
    azimuth: np.ndarray  # (n_kept,) rad
    zenith: np.ndarray  # (n_kept,) rad


def _simulate_candidates(rng: np.random.Generator, det: _Detector, n: int) -> _Chunk:
    """Simulate ``n`` candidate events; keep those whose neutrino light triggers."""
    az, zen, tracks, cascades = _sample_events(rng, n)
    hits = _track_hits(rng, det, tracks) + _cascade_hits(rng, det, cascades)
    hits += _track_hits(rng, det, _sample_coincident_muons(rng, n), coincident=True)
    ev, sid, t, q, co = _merge_photons(*_photons(rng, hits))
    readout = _readout(det, ev, sid, t, co)
    sel = readout.contains(ev, t)
    ev, sid, t, q, co = ev[sel], sid[sel], t[sel], q[sel], co[sel]

    # Dark noise, uniform over each readout window.
    span = readout.hi - readout.lo
    n_noise = rng.poisson(DARK_RATE_HZ * 1e-9 * det.num_sensors * span)
    noise_ev = np.repeat(readout.event, n_noise)
    m = noise_ev.shape[0]
    noise_t = np.repeat(readout.lo, n_noise) + rng.random(m) * np.repeat(span, n_noise)
    ev = np.concatenate([ev, noise_ev])
    sid = np.concatenate([sid, rng.integers(0, det.num_sensors, m)])
    q = np.concatenate([q, _spe_charge(rng, m)])
    co = np.concatenate([co, np.zeros(m, dtype=bool)])
    # Times after the event's first trigger (its first window opens READOUT_PRE_TRIGGER_NS early).
    first_window = np.ones(readout.event.shape[0], dtype=bool)
    first_window[1:] = readout.event[1:] != readout.event[:-1]
    t_trigger = np.zeros(n)
    t_trigger[readout.event[first_window]] = readout.lo[first_window] + READOUT_PRE_TRIGGER_NS
    t = np.concatenate([t, noise_t]) - t_trigger[ev]

    order = np.argsort(_sort_key(ev, sid, t), kind="quicksort")
    ev, sid, t, q, co = ev[order], sid[order], t[order], q[order], co[order]
    aux = ~_hlc_pulses(det, ev, sid, t)
    raw = np.rint(TRIGGER_TIME_NS + t).astype(np.int64)

    # Grouped by event, time-ordered (ties by sensor).
    order = np.argsort((ev * 2**20 + raw) * _SENSOR_KEY_SPAN + sid, kind="quicksort")
    return _Chunk(
        event=ev[order],
        sensor=sid[order],
        time=raw[order],
        charge=_finish_charge(q[order]),
        auxiliary=aux[order],
        coincident=co[order],
        kept=readout.kept,
        azimuth=az[readout.kept],
        zenith=zen[readout.kept],
    )


def generate_events(
    rng: np.random.Generator,
    geometry: pd.DataFrame,
    n_events: int,
    first_event_id: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate ``n_events`` triggered events in memory.

    Candidates are simulated in vectorized rounds until ``n_events`` pass the trigger; candidate
    ``i`` (counting from ``first_event_id``) gets ``event_id = first_event_id + i``, so the ids of
    the events kept are strictly increasing with gaps where candidates did not trigger.

    Args:
        rng: the random generator (the result is a pure function of its state).
        geometry: ``sensor_id, x, y, z`` as from :func:`iceaggr.data.geometry.make_geometry`.
        n_events: number of events to return (>= 1).
        first_event_id: id of the first candidate.

    Returns:
        ``(pulses, meta)``: ``pulses`` indexed by ``event_id`` (int64) with columns ``sensor_id``
        (int16), ``time`` (int64 ns), ``charge`` (float64 p.e.), ``auxiliary`` (bool), grouped by
        event and time-ordered; ``meta`` with columns ``event_id`` (int64), ``azimuth``,
        ``zenith`` (float64 rad) and ``n_pulses`` (int64), one row per event in id order.
    """
    if n_events < 1:
        raise ValueError(f"n_events must be >= 1, got {n_events}")
    det = _detector(geometry)
    parts: list[tuple[np.ndarray, ...]] = []
    metas: list[tuple[np.ndarray, ...]] = []
    need = n_events
    next_id = int(first_event_id)
    efficiency = _EXPECTED_TRIGGER_EFFICIENCY
    while need > 0:
        n_cand = min(max(int(np.ceil(need / efficiency * 1.05)), 16), _MAX_CANDIDATES_PER_ROUND)
        chunk = _simulate_candidates(rng, det, n_cand)
        kept = chunk.kept[:need]
        if chunk.kept.shape[0] > 0:
            efficiency = max(chunk.kept.shape[0] / n_cand, 0.01)
        if kept.shape[0] == 0:
            next_id += n_cand
            continue
        last = int(kept[-1])
        sel = chunk.event <= last  # events beyond the ones needed are dropped
        ids = next_id + chunk.event[sel]
        parts.append(
            (ids, chunk.sensor[sel], chunk.time[sel], chunk.charge[sel], chunk.auxiliary[sel])
        )
        counts = np.bincount(chunk.event[sel], minlength=last + 1)[kept]
        k = kept.shape[0]
        metas.append((next_id + kept, chunk.azimuth[:k], chunk.zenith[:k], counts))
        need -= k
        next_id += last + 1

    ids, sensor, time, charge, aux = (np.concatenate(c) for c in zip(*parts, strict=True))
    pulses = pd.DataFrame(
        {
            "sensor_id": sensor.astype(np.int16),
            "time": time.astype(np.int64),
            "charge": charge.astype(np.float64),
            "auxiliary": aux.astype(bool),
        },
        index=pd.Index(ids.astype(np.int64), name="event_id"),
    )
    ev_id, az, zen, n_p = (np.concatenate(c) for c in zip(*metas, strict=True))
    meta = pd.DataFrame(
        {
            "event_id": ev_id.astype(np.int64),
            "azimuth": az.astype(np.float64),
            "zenith": zen.astype(np.float64),
            "n_pulses": n_p.astype(np.int64),
        }
    )
    return pulses, meta
