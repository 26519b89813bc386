"""Physics-based synthetic IceCube events, written in the Kaggle "Neutrinos in Deep Ice" layout.

The real competition data (132M events) cannot be downloaded here, so the project's default
dataset is made by this module. It is a small detector simulation, not noise: the direction of
every event is encoded in the pulses the way IceCube encodes it (Cherenkov timing along a track,
light falling with distance, scattering delays), blurred the way real data is blurred
(scattering, dark noise, cascades, short tracks, coincident muons), with raw feature scales of the
real files (time ~1e4 ns, charge up to thousands of p.e.) so that unnormalized training breaks as
it did on the real data.

Usage::

    from iceaggr.data.synth import write_synthetic_dataset
    write_synthetic_dataset("data/synthetic", n_events=50_000)   # or: iceaggr synth --out ...

    rng = np.random.default_rng(0)                               # one chunk in memory (tests)
    pulses, meta = generate_events(rng, make_geometry(), 1000, first_event_id=0)

The output folder holds ``sensor_geometry.csv`` (from :func:`iceaggr.geometry.make_geometry`),
``train_meta.parquet`` and ``train/batch_<k>.parquet`` exactly as described in DESIGN.md
section 3. It is written into a hidden ``.<name>.partial-*`` sibling folder and renamed into place
at the end, so an interrupted run never leaves a folder that looks complete.

Physics (every constant is defined once, below, with its meaning and source)
---------------------------------------------------------------------------
Directions
    Isotropic: cos(zenith) uniform in [-1, 1], azimuth uniform, like the roughly isotropic
    neutrino directions of the competition's simulation. The label
    ``v = (cos az sin zen, sin az sin zen, cos zen)`` points to where the neutrino came from; every
    particle of the event travels along ``d = -v``.
Topologies
    A share ``NUMU_CC_FRACTION`` of events are nu_mu charged-current: a muon of energy (1 - y) E
    and range ``ln(1 + E b / a) / b`` (ice: a = ``MUON_LOSS_A_GEV_PER_M``, b =
    ``MUON_LOSS_B_PER_M``) plus a hadronic cascade y E at the vertex (y = U^``INELASTICITY_POWER``).
    The muon's line passes the centre within ``IMPACT_RADIUS_M`` and the vertex is uniform along
    it, from one muon range upstream to ``VERTEX_SPAN_BEYOND_M`` beyond the centre, so
    through-going, starting and stopping tracks (finite length) appear in their natural,
    energy-dependent mix. The others are point-like cascades (nu_e / nu_tau CC with all of E
    visible, and neutral-current ones, share ``NC_FRACTION_OF_CASCADES``, with only y E visible)
    uniform in a cylinder (``VERTEX_CYLINDER_*``) slightly larger than the detector. Unrelated
    down-going atmospheric muons arrive at ``COINCIDENT_MUON_RATE_HZ`` (Poisson) at times uniform
    within +-``COINCIDENCE_WINDOW_NS`` of the neutrino; their light is simulated like the
    neutrino's and lands in the event where it falls inside a readout window.
Energy
    A mix of a steep bulk E^-``SPECTRAL_INDEX`` (most events close to the trigger threshold) and a
    share ``HARD_FRACTION`` of a hard E^-``HARD_SPECTRAL_INDEX`` component, between
    ``ENERGY_MIN_GEV`` and ``ENERGY_MAX_GEV``: the tail gives events with thousands to ~1e5
    pulses and pulse charges of thousands of p.e. A muon's light per metre is that of
    ``MUON_MIP_LIGHT_GEV_PER_M`` of cascade energy plus its radiative losses b E (E taken where it
    passes closest to the centre).
Light yield (diffusion approximation)
    With an effective attenuation length lambda (``ICE_LAYERS``: upper ice, the dust layer at
    z ~ -100 m, the clear deep ice; taken at the DOM's depth) a point source of energy E gives a
    DOM at distance r ``PE_PER_GEV_AT_1M * E * exp(-r / lambda) / r`` expected photoelectrons,
    times ``1 + CASCADE_ANISOTROPY * cos(angle to d)`` (cascade light is forward-peaked). A line
    source of epsilon GeV/m gives ``PE_PER_GEV_AT_1M * sqrt(2 pi lambda) * epsilon *
    exp(-r / lambda) / sqrt(r)`` (the large-distance form of the K0 solution of the diffusion
    equation), r = rho / sin(theta_c) being the Cherenkov photon's path from the track at
    distance rho. Where the Cherenkov emission point lies beyond a finite track's end, the light
    comes from the end point, suppressed by ``exp(-offset / ENDPOINT_FALLOFF_M)``. DeepCore DOMs
    have ``DEEPCORE_QE_RATIO`` times the efficiency. Photoelectron counts are Poisson. DOMs
    expecting less than ``MIN_EXPECTED_PE`` from an emitter are skipped (a closed-form search
    per string), which drops ~0.4 expected photoelectrons per event (0.2% of the light), all of
    it far from the event.
Timing
    The unscattered arrival time from a track is ``t0 + s_e / c + r * n_g / c``, with
    s_e = s - rho cot(theta_c) the Cherenkov emission point (``CHERENKOV_ANGLE_DEG``, group index
    ``GROUP_INDEX``); from a cascade ``t0 + r * n_g / c``. Every photon is delayed by scattering
    following the Pandel function, a Gamma distribution of shape r / ``PANDEL_LAMBDA_M`` and rate
    1 / ``PANDEL_TAU_NS`` + (c / n_g) / ``PANDEL_ABSORPTION_M`` (AMANDA, Ahrens et al., NIM A 524
    (2004) 169): delays grow from a few ns near the source to microseconds far away. The PMT adds
    a Gaussian jitter ``PMT_JITTER_NS`` and afterpulses: ``AFTERPULSE_PROBABILITY`` per
    photoelectron, single photoelectrons delayed by ~0.6, 2 or 8 us (``AFTERPULSE_GROUPS``) after
    the DOM's light, so bright DOMs carry late pulses microseconds after their first one.
Pulses and charge
    Photons of a DOM merge into one pulse per digitizer bin counted from the DOM's launch, as the
    pulse unfolding resolves them: ``ATWD_RESOLUTION_NS`` within ``ATWD_WINDOW_NS``, then
    ``FADC_RESOLUTION_NS``. So dim DOMs mostly carry one pulse and bright ones dozens. A DOM with
    more than ``MAX_PHOTONS_PER_DOM`` photoelectrons is simulated with that many macro-photons
    sharing its charge. A photoelectron's charge is Gaussian (``SPE_MEAN_PE``, ``SPE_SIGMA_PE``)
    with an exponential low-charge part (``SPE_LOW_FRACTION``, ``SPE_LOW_MEAN_PE``), summed per
    pulse; pulse charges saturate softly at ``SATURATION_PE`` and are stored in steps of
    ``CHARGE_QUANTUM_PE`` like the Kaggle files (min 0.025 p.e.).
Launches, local coincidence, trigger, readout
    A DOM's pulses belong to launches: its first pulse opens one, and a pulse more than
    ``LAUNCH_WINDOW_NS`` after the latest launch opens the next. A launch is a hard local
    coincidence (HLC, ``auxiliary = False`` for all its pulses) when a DOM up to ``HLC_SPAN_DOMS``
    away on its string launched within ``HLC_WINDOW_NS`` of it; otherwise its pulses are
    soft-local-coincidence ones (``auxiliary = True``), which makes noise and late afterpulses
    auxiliary-heavy. A trigger (IceCube's SMT8) is a run of ``SMT_MULTIPLICITY`` HLC launches
    within ``SMT_WINDOW_NS``. A candidate is kept when the neutrino's own light triggers;
    candidates that fail are dropped, leaving gaps in the event ids as in the real files. Each
    trigger is read out from ``READOUT_PRE_TRIGGER_NS`` before its first HLC launch to
    ``READOUT_POST_TRIGGER_NS`` after its last; overlapping readouts merge, and the event holds
    the readout windows of every trigger of its coincidence window (a coincident muon that
    triggers tens of microseconds away adds a window of its own). Dark noise arrives at
    ``DARK_RATE_HZ`` per DOM, uniformly over the readout windows. Raw times put the event's first
    trigger at ``TRIGGER_TIME_NS`` (the ~1e4 ns offset), so the neutrino's own light starts later
    where a coincident muon triggered first.

Simplifications: strings are vertical lines; the ice is uniform within each layer and isotropic
(no tilt, no anisotropy); the attenuation length is taken at the DOM's depth; the trigger uses
the light before dark noise is added; dark noise is uncorrelated (no bursts).

The constants marked "tuned" were adjusted so that the pulse statistics resemble the real data
(DESIGN.md section 3; ``python benchmarks/fidelity.py`` prints the comparison). On this data the
improved line fit scores ~1.24 rad (real data: ~1.18-1.21). Raw times run from 5,700 ns to a
largest value of ~6-7.5e4 ns in 24,000 events (real: ~5.7e3 to 7.8e4); ~1% of the events, all
with a coincident muon, last beyond 40,000 ns. Generation runs in vectorized rounds of
``_MAX_CANDIDATES_PER_ROUND`` candidate events: 24,000 events in ~5 s on one busy core.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from iceaggr.data.geometry import DOMS_PER_STRING, NUM_STANDARD_STRINGS, make_geometry

log = logging.getLogger(__name__)

# --- Event mix -----------------------------------------------------------------------------------
NUMU_CC_FRACTION = 0.3
"""Share of generated events with a muon track (nu_mu CC and the ~17% of nu_tau CC that give a
muon); the rest are point-like cascades (nu_e and nu_tau CC, all-flavour NC). For equal flavours
and sigma_NC / sigma_CC ~ 0.35 that share is ~0.3."""
NC_FRACTION_OF_CASCADES = 0.36
"""Share of the cascades that are neutral-current: only the hadronic part y E is visible (the
outgoing neutrino carries the rest)."""
IMPACT_RADIUS_M = 700.0
"""nu_mu CC: the muon's line passes the detector centre at an impact parameter uniform over a disk
this large (the detector's radius is ~600 m)."""
VERTEX_SPAN_BEYOND_M = 600.0
"""nu_mu CC: the vertex is uniform along the line from one muon range upstream of the centre to
this far downstream, so through-going, starting and stopping tracks arise in their natural mix."""
VERTEX_CYLINDER_RADIUS_M = 600.0
"""Cascade vertices are uniform in this cylinder..."""
VERTEX_CYLINDER_HALF_HEIGHT_M = 550.0
"""...of this half height: slightly larger than the instrumented volume."""
COINCIDENT_MUON_RATE_HZ = 2_500.0
"""Rate of the unrelated atmospheric muons sampled around each neutrino (down-going, through the
``IMPACT_RADIUS_M`` disk, spectrum ``COINCIDENT_MUON_SPECTRAL_INDEX`` above ``ENERGY_MIN_GEV``):
IceCube's in-ice trigger rate, dominated by atmospheric muons, is ~2-3 kHz. With
``COINCIDENCE_WINDOW_NS`` that is 0.15 muons per event; ~7% of the kept events hold pulses of
one (the label stays the neutrino's: a coincident muon is direction noise)."""
COINCIDENCE_WINDOW_NS = 30_000.0
"""Coincident muons pass at a time uniform within +- this of the neutrino interaction, and every
trigger in that window is read out into the event (see ``READOUT_*``). Times count from the
event's first trigger, so the largest raw times come from two triggering muons at the two ends
of the window: ``TRIGGER_TIME_NS`` + 60 us + ``READOUT_POST_TRIGGER_NS`` + the last trigger's
length, ~7.8e4 ns; the half-width is chosen so that this bound is the real files' maximum. One
muon near an end of the window adds up to ~30 us to an event."""
COINCIDENT_MUON_MIN_COS_ZENITH = 0.2
"""Atmospheric muons are down-going: the direction they come from has cos(zenith) above this."""

# --- Energy and light ----------------------------------------------------------------------------
SPECTRAL_INDEX = 3.2
"""(tuned) Bulk of the events: dN/dE ~ E^-SPECTRAL_INDEX (atmospheric-neutrino-like, most events
close to the trigger threshold)..."""
HARD_FRACTION = 0.05
"""(tuned) ...plus this share from a hard component E^-HARD_SPECTRAL_INDEX (astrophysical-like)
that makes the tail: the brightest events with thousands of pulses."""
HARD_SPECTRAL_INDEX = 1.5
"""(tuned)"""
ENERGY_MIN_GEV = 100.0
ENERGY_MAX_GEV = 1e8
COINCIDENT_MUON_SPECTRAL_INDEX = 3.7
"""Atmospheric muons at depth: a steep spectrum (mostly minimum-ionizing)."""
MUON_LOSS_A_GEV_PER_M = 0.24
"""Continuous (ionization) muon energy loss in ice, the 'a' of dE/dx = a + bE."""
MUON_LOSS_B_PER_M = 3.3e-4
"""Stochastic (radiative) muon energy loss coefficient in ice, the 'b' of dE/dx = a + bE."""
MUON_MIP_LIGHT_GEV_PER_M = 0.22
"""Light of a minimum-ionizing muon as cascade-equivalent GeV/m: its own Cherenkov light
(~2.5e4 photons/m) over an EM cascade's ~1.3e5 photons/GeV, plus ~15% from delta rays."""
INELASTICITY_POWER = 2.0
"""Bjorken y of starting tracks is U^INELASTICITY_POWER (mean 1/3): the vertex cascade's share."""
PE_PER_GEV_AT_1M = 1.9
"""(tuned) DOM photoelectrons per GeV of cascade energy at 1 m, before attenuation."""
CASCADE_ANISOTROPY = 0.5
"""Forward peaking of cascade light seen at a DOM: yield * (1 + A cos(angle to d))."""
ENDPOINT_FALLOFF_M = 50.0
"""Light from beyond a track end (no direct Cherenkov cone) falls by e per this offset."""
DEEPCORE_QE_RATIO = 1.35
"""DeepCore high-quantum-efficiency PMTs relative to standard ones."""
ICE_LAYERS: tuple[tuple[float, float], ...] = (
    (-50.0, 28.0),  # above z = -50 m: upper ice, lambda_a ~ 100 m, lambda_e ~ 25 m
    (-150.0, 10.0),  # z in [-150, -50] m: the dust layer (depth ~2000-2100 m)
    (-np.inf, 55.0),  # below: the clear deep ice, lambda_a ~ 200 m, lambda_e ~ 45 m
)
"""(z of the layer's bottom, effective attenuation length sqrt(lambda_a lambda_e / 3) in m), from
the top down; applied at the DOM's depth."""
MIN_DISTANCE_M = 1.0
"""Distances are clamped to this (m) in the yield and delay formulas (no singularity at 0)."""
MIN_EXPECTED_PE = 1e-2
"""DOMs expecting less than this from an emitter are not simulated (sets the search radius)."""

# --- Propagation and timing ----------------------------------------------------------------------
SPEED_OF_LIGHT_M_PER_NS = 0.299792458
GROUP_INDEX = 1.32
"""Group refractive index of ice: photons travel at c / 1.32."""
CHERENKOV_ANGLE_DEG = 41.0
"""Cherenkov angle in ice (phase index ~1.31)."""
PANDEL_LAMBDA_M = 33.3
"""Pandel function: distance per unit of Gamma shape (AMANDA fit, Ahrens et al. 2004)."""
PANDEL_TAU_NS = 557.0
"""Pandel function: time scale (same fit)."""
PANDEL_ABSORPTION_M = 98.0
"""Pandel function: absorption length (same fit)."""
PMT_JITTER_NS = 2.0
"""PMT transit-time spread (Gaussian sigma)."""

# --- Pulses --------------------------------------------------------------------------------------
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

# --- Noise, local coincidence, trigger, readout --------------------------------------------------
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

# --- Generation ----------------------------------------------------------------------------------
CHUNK_EVENTS = 10_000
"""Events generated per vectorized chunk (bounds memory; a batch file is written chunk by chunk)."""
_MAX_CANDIDATES_PER_ROUND = 2048
"""Candidates simulated per vectorized round: small enough for the arrays to stay in cache."""
_EXPECTED_TRIGGER_EFFICIENCY = 0.3
"""First guess of the share of generated events passing the trigger (refined as it runs)."""

_C = SPEED_OF_LIGHT_M_PER_NS
_SIN_C = float(np.sin(np.deg2rad(CHERENKOV_ANGLE_DEG)))
_COT_C = float(1.0 / np.tan(np.deg2rad(CHERENKOV_ANGLE_DEG)))
_PANDEL_SCALE_NS = 1.0 / (1.0 / PANDEL_TAU_NS + (_C / GROUP_INDEX) / PANDEL_ABSORPTION_M)
_GRID_STEP_M = 2.0  # bin height of the per-string DOM lookup grid (m)
_SEARCH_MARGIN_M = 2.0  # DOMs may sit slightly off their string's mean axis (real geometry)
_INF_S = 1e5  # stand-in for an infinite track end in z-range arithmetic (m)
_TIME_KEY_OFFSET_NS = 2.0**17  # sort keys hold times in [-2^17, 2^17) ns at 1/64 ns
_SENSOR_KEY_SPAN = 2**13  # > number of sensors (5160)
_EVENT_TIME_SPAN_NS = 2.0**20  # float keys event * span + time separate events (|t| < 2^19 ns)
_F32_MIN_DIST = np.float32(MIN_DISTANCE_M)


# =================================================================================================
# Detector
# =================================================================================================
@dataclass(frozen=True)
class _Detector:
    """Sensor tables in the order of a search key: strings ascending, z descending on a string.

    Strings are treated as vertical lines at their mean (x, y) (exact for :func:`make_geometry`,
    within ~1 m for the real detector).
    """

    num_sensors: int
    string: np.ndarray  # (N,) int64 0-based string, by sensor_id
    dom: np.ndarray  # (N,) int64 0-based position on the string, by sensor_id
    string_xy: np.ndarray  # (n_str, 2) float64 m, mean axis of each string
    string_efficiency: np.ndarray  # (n_str,) relative quantum efficiency x PE_PER_GEV_AT_1M
    order: np.ndarray  # (N,) int64 sensor ids sorted by (string, descending z)
    z_sorted: np.ndarray  # (N,) float64 m, z of ``order``
    z_sorted32: np.ndarray  # (N,) float32 m, the same
    string_start: np.ndarray  # (n_str,) int64 position of each string's first DOM in ``order``
    grid_top: float  # m, z of the top of the DOM lookup grid
    grid_step: float  # m, bin height of the grid (less than the smallest DOM spacing)
    above: np.ndarray  # (n_str, n_bins) int64 DOMs of the string above each bin
    bin_z: np.ndarray  # (n_str, n_bins) float64 z of the DOM inside each bin, -inf if none


def _detector(geometry: pd.DataFrame) -> _Detector:
    missing = [c for c in ("sensor_id", "x", "y", "z") if c not in geometry.columns]
    if missing:
        raise ValueError(
            f"geometry is missing column(s) {missing}; pass make_geometry() or a DataFrame with "
            "sensor_id, x, y, z (metres)"
        )
    sid = geometry["sensor_id"].to_numpy(np.int64)
    if not np.array_equal(sid, np.arange(sid.shape[0])):
        raise ValueError("geometry sensor_id must be 0..N-1 in order, as in sensor_geometry.csv")
    xyz = geometry[["x", "y", "z"]].to_numpy(np.float64)
    string = sid // DOMS_PER_STRING
    n_strings = int(string.max()) + 1
    counts = np.bincount(string, minlength=n_strings)
    string_xy = np.stack(
        [np.bincount(string, xyz[:, i], minlength=n_strings) / counts for i in range(2)], axis=1
    )
    deepcore = np.arange(n_strings) >= NUM_STANDARD_STRINGS
    order = np.lexsort((-xyz[:, 2], string))
    z_sorted = xyz[order, 2]
    string_start = np.searchsorted(string[order], np.arange(n_strings))

    # A z grid per string, finer than the DOM spacing so that a bin holds at most one DOM: the
    # DOMs of a string above a height are then found with two lookups instead of a search.
    same_string = string[order][1:] == string[order][:-1]
    min_gap = float(np.min(-np.diff(z_sorted)[same_string])) if same_string.any() else 1.0
    if min_gap <= 0:
        bad = int(string[order][1:][same_string][np.argmin(-np.diff(z_sorted)[same_string])])
        raise ValueError(
            f"geometry has two DOMs at the same z on string {bad + 1} (sensor_id // "
            f"{DOMS_PER_STRING} = {bad}); each string needs distinct DOM depths"
        )
    step = min(_GRID_STEP_M, min_gap / 2)
    top = float(z_sorted.max()) + step
    n_bins = int(np.ceil((top - float(z_sorted.min())) / step)) + 2
    bins = np.floor((top - z_sorted) / step).astype(np.int64)
    dom_in_string = np.arange(sid.shape[0]) - string_start[string[order]]
    above = np.zeros((n_strings, n_bins), dtype=np.int64)
    bin_z = np.full((n_strings, n_bins), -np.inf)
    bin_z[string[order], bins] = z_sorted
    # DOMs strictly above bin b: those whose bin is < b.
    np.add.at(above, (string[order], bins + 1), 1)
    above = np.cumsum(above, axis=1)
    assert np.all(above[string[order], bins] == dom_in_string), "at most one DOM per grid bin"
    return _Detector(
        num_sensors=int(sid.shape[0]),
        string=string,
        dom=sid % DOMS_PER_STRING,
        string_xy=string_xy,
        string_efficiency=PE_PER_GEV_AT_1M * np.where(deepcore, DEEPCORE_QE_RATIO, 1.0),
        order=order,
        z_sorted=z_sorted,
        z_sorted32=z_sorted.astype(np.float32),
        string_start=string_start,
        grid_top=top,
        grid_step=step,
        above=above,
        bin_z=bin_z,
    )


def _doms_above(det: _Detector, st: np.ndarray, z: np.ndarray, inclusive: bool) -> np.ndarray:
    """Number of DOMs on strings ``st`` with z > ``z`` (``>=`` if ``inclusive``)."""
    n_bins = det.above.shape[1]
    b = np.clip(np.floor((det.grid_top - z) / det.grid_step), 0, n_bins - 1).astype(np.int64)
    z_in = det.bin_z[st, b]
    return det.above[st, b] + ((z_in >= z) if inclusive else (z_in > z))


def _ice_layers() -> list[tuple[float, float, float]]:
    """(z_bottom, z_top, attenuation length) of each layer in ``ICE_LAYERS``."""
    out = []
    top = np.inf
    for bottom, lam in ICE_LAYERS:
        out.append((bottom, top, lam))
        top = bottom
    return out


# =================================================================================================
# Light emitters
# =================================================================================================
@dataclass
class _Tracks:
    """Muon track segments ``p0 + s d`` for ``s in [s_a, s_b]``, at ``p0`` at time ``t0``."""

    event: np.ndarray  # (T,) int64 index of the event in the chunk
    p0: np.ndarray  # (T, 3) m
    d: np.ndarray  # (T, 3) unit direction of travel
    s_a: np.ndarray  # (T,) m, start (-inf: entered from outside)
    s_b: np.ndarray  # (T,) m, end (+inf: leaves the detector)
    gev_per_m: np.ndarray  # (T,) cascade-equivalent light per metre
    t0: np.ndarray  # (T,) ns

    def select(self, mask: np.ndarray) -> _Tracks:
        return _Tracks(**{f: getattr(self, f)[mask] for f in _Tracks.__dataclass_fields__})

    @staticmethod
    def concat(parts: list[_Tracks]) -> _Tracks:
        fields = _Tracks.__dataclass_fields__
        return _Tracks(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})


@dataclass
class _Cascades:
    """Point-like showers at ``p0`` and time ``t0``, moving along ``d``."""

    event: np.ndarray  # (C,) int64
    p0: np.ndarray  # (C, 3) m
    d: np.ndarray  # (C, 3)
    gev: np.ndarray  # (C,) energy
    t0: np.ndarray  # (C,) ns


def _power_law(rng: np.random.Generator, n: int, index: float, lo: float, hi: float) -> np.ndarray:
    """Samples of dN/dE ~ E^-index on [lo, hi] (index != 1)."""
    u = rng.random(n)
    g = 1.0 - index
    return (lo**g + u * (hi**g - lo**g)) ** (1.0 / g)


def _unit_vectors(az: np.ndarray, zen: np.ndarray) -> np.ndarray:
    """(n, 3): (cos az sin zen, sin az sin zen, cos zen)."""
    s = np.sin(zen)
    return np.stack([np.cos(az) * s, np.sin(az) * s, np.cos(zen)], axis=1)


def _disk_point(rng: np.random.Generator, d: np.ndarray, radius: float) -> np.ndarray:
    """Points uniform on a disk of ``radius`` through the origin, perpendicular to ``d``."""
    n = d.shape[0]
    helper = np.where(np.abs(d[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    e1 = np.cross(d, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(d, e1)
    r = radius * np.sqrt(rng.random(n))
    phi = 2 * np.pi * rng.random(n)
    return (r * np.cos(phi))[:, None] * e1 + (r * np.sin(phi))[:, None] * e2


def _cylinder_point(rng: np.random.Generator, n: int) -> np.ndarray:
    r = VERTEX_CYLINDER_RADIUS_M * np.sqrt(rng.random(n))
    phi = 2 * np.pi * rng.random(n)
    z = VERTEX_CYLINDER_HALF_HEIGHT_M * (2 * rng.random(n) - 1)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _muon_range_m(energy_gev: np.ndarray) -> np.ndarray:
    b = MUON_LOSS_B_PER_M
    return np.log1p(energy_gev * b / MUON_LOSS_A_GEV_PER_M) / b


def _muon_energy_after(energy_gev: np.ndarray, path_m: np.ndarray) -> np.ndarray:
    """Energy (GeV) of a muon of ``energy_gev`` after ``path_m`` of ice (dE/dx = -(a + bE))."""
    ratio = MUON_LOSS_A_GEV_PER_M / MUON_LOSS_B_PER_M
    return np.maximum((energy_gev + ratio) * np.exp(-MUON_LOSS_B_PER_M * path_m) - ratio, 0.0)


def _sample_events(
    rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray, _Tracks, _Cascades]:
    """Labels (azimuth, zenith) of ``n`` neutrino events and their light emitters."""
    az = 2 * np.pi * rng.random(n)
    zen = np.arccos(1.0 - 2.0 * rng.random(n))
    d = -_unit_vectors(az, zen)  # direction of travel
    energy = np.where(
        rng.random(n) < HARD_FRACTION,
        _power_law(rng, n, HARD_SPECTRAL_INDEX, ENERGY_MIN_GEV, ENERGY_MAX_GEV),
        _power_law(rng, n, SPECTRAL_INDEX, ENERGY_MIN_GEV, ENERGY_MAX_GEV),
    )
    event = np.arange(n, dtype=np.int64)
    is_track = rng.random(n) < NUMU_CC_FRACTION
    is_nc = ~is_track & (rng.random(n) < NC_FRACTION_OF_CASCADES)
    y = rng.random(n) ** INELASTICITY_POWER

    # nu_mu CC: vertex at s_v on a line through the impact point; muon on [s_v, s_v + range].
    muon_energy = (1.0 - y) * energy
    muon_range = _muon_range_m(muon_energy)
    s_v = -muon_range + (muon_range + VERTEX_SPAN_BEYOND_M) * rng.random(n)
    impact = _disk_point(rng, d, IMPACT_RADIUS_M)
    vertex = np.where(is_track[:, None], impact + s_v[:, None] * d, _cylinder_point(rng, n))
    # Light per metre: the muon's energy where it passes closest to the centre (s = 0).
    e_mid = _muon_energy_after(muon_energy, np.clip(-s_v, 0.0, muon_range))
    t_vertex = np.where(is_track, s_v / _C, 0.0)  # the muon passes closest to the centre at t = 0
    tracks = _Tracks(
        event=event,
        p0=vertex,
        d=d,
        s_a=np.zeros(n),
        s_b=muon_range,
        gev_per_m=MUON_MIP_LIGHT_GEV_PER_M + MUON_LOSS_B_PER_M * e_mid,
        t0=t_vertex,
    ).select(is_track)
    cascades = _Cascades(
        event=event,
        p0=vertex,
        d=d,
        gev=np.where(is_track | is_nc, y * energy, energy),  # hadronic part only / all of it
        t0=t_vertex,
    )
    return az, zen, tracks, cascades


def _sample_coincident_muons(rng: np.random.Generator, n: int) -> _Tracks:
    """Unrelated down-going atmospheric muons around each of the ``n`` events: a Poisson number
    (mean ``COINCIDENT_MUON_RATE_HZ`` x the coincidence window) at uniform times in it."""
    mean = COINCIDENT_MUON_RATE_HZ * 1e-9 * 2 * COINCIDENCE_WINDOW_NS
    event = np.repeat(np.arange(n, dtype=np.int64), rng.poisson(mean, n))
    m = event.shape[0]
    az = 2 * np.pi * rng.random(m)
    cos_zen = COINCIDENT_MUON_MIN_COS_ZENITH + (1 - COINCIDENT_MUON_MIN_COS_ZENITH) * rng.random(m)
    d = -_unit_vectors(az, np.arccos(cos_zen))
    energy = _power_law(rng, m, COINCIDENT_MUON_SPECTRAL_INDEX, ENERGY_MIN_GEV, ENERGY_MAX_GEV)
    return _Tracks(
        event=event,
        p0=_disk_point(rng, d, IMPACT_RADIUS_M),
        d=d,
        s_a=np.full(m, -np.inf),
        s_b=np.full(m, np.inf),
        gev_per_m=MUON_MIP_LIGHT_GEV_PER_M + MUON_LOSS_B_PER_M * energy,
        t0=COINCIDENCE_WINDOW_NS * (2 * rng.random(m) - 1),
    )


# =================================================================================================
# Expected light at the DOMs that can see an emitter
# =================================================================================================
def _search_radius(amplitude: np.ndarray, lam: float, power: float) -> np.ndarray:
    """Distance (m) beyond which ``amplitude * exp(-r / lam) / r**power < MIN_EXPECTED_PE``."""
    a = amplitude / MIN_EXPECTED_PE
    r = np.full(a.shape, 50.0)
    with np.errstate(divide="ignore"):
        for _ in range(6):  # fixed point of r = lam * ln(a / r**power)
            r = np.maximum(lam * np.log(a / r**power), MIN_DISTANCE_M)
    return np.where(a > 1.0, r + _SEARCH_MARGIN_M, 0.0)


def _track_search_length(lam: float) -> float:
    """Length L such that a track's expectation at distance rho is <= A exp(-rho / L) / sqrt(rho).

    The photon path r and the end-point offset o satisfy r >= rho (so 1 / sqrt(r) <=
    1 / sqrt(rho)) and r / lam + o / F >= rho * g, where g = 1 / (lam sin theta_c) on the
    Cherenkov cone (o = 0) and, minimizing over o when the light comes from a track end,
    g = sqrt(1 - k^2) / lam + cot(theta_c) / F with k = lam / F <= cos(theta_c).
    """
    g = 1.0 / (lam * _SIN_C)
    k = lam / ENDPOINT_FALLOFF_M
    if k <= np.cos(np.deg2rad(CHERENKOV_ANGLE_DEG)):
        g = min(g, np.sqrt(1.0 - k * k) / lam + _COT_C / ENDPOINT_FALLOFF_M)
    return float(1.0 / g)


def _expand(
    det: _Detector, e: np.ndarray, st: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DOMs of the (emitter ``e``, string ``st``) pairs whose z lies in [lo, hi].

    Returns (pair_index, dom_pair, sorted_pos): the pairs with at least one DOM, and for each DOM
    the pair (an index into those) and its position in ``det.order``.
    """
    first = det.string_start[st] + _doms_above(det, st, hi, inclusive=False)
    count = np.maximum(_doms_above(det, st, lo, inclusive=True) - (first - det.string_start[st]), 0)
    pair_index = np.flatnonzero(count)
    first, count = first[pair_index], count[pair_index]
    dom_pair = np.repeat(np.arange(count.shape[0]), count)
    sorted_pos = np.arange(dom_pair.shape[0]) - np.repeat(np.cumsum(count) - count - first, count)
    return pair_index, dom_pair, sorted_pos


def _poisson_nonzero(rng: np.random.Generator, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Poisson draws for expectations ``mu``, returned sparsely: (indices with n > 0, n there).

    Exact, and cheaper than ``rng.poisson`` on many small expectations: one uniform u per entry,
    n = max{k : u < P(N >= k)}, iterated only over the (few) entries that are hit; bright ones
    (mu > 5) are drawn from the Poisson law conditioned on n >= 1 instead.
    """
    u = rng.random(mu.shape[0])
    hit = np.flatnonzero(u < -np.expm1(-mu.astype(np.float64)))
    m = mu[hit].astype(np.float64)
    uh = u[hit]
    n = np.ones(hit.shape[0], dtype=np.int64)
    dim = np.flatnonzero(m <= 5.0)
    p = m[dim] * np.exp(-m[dim])  # P(N = k), k = 1
    tail = -np.expm1(-m[dim]) - p  # P(N >= k + 1)
    active = np.flatnonzero(uh[dim] < tail)
    k = 1
    while active.shape[0] > 0:
        idx = dim[active]
        n[idx] += 1
        k += 1
        p = p[active] * m[idx] / k
        tail = tail[active] - p
        dim = idx
        active = np.flatnonzero(uh[dim] < tail)
    bright = np.flatnonzero(m > 5.0)
    draw = rng.poisson(m[bright])
    while np.any(draw == 0):  # condition on n >= 1 (rarely needed: P(0) < 0.7%)
        zero = draw == 0
        draw[zero] = rng.poisson(m[bright][zero])
    n[bright] = draw
    return hit, n


@dataclass
class _Hits:
    """DOMs that received photoelectrons from one emitter kind in one ice layer."""

    event: np.ndarray  # (H,) int64
    sensor: np.ndarray  # (H,) int64
    n_pe: np.ndarray  # (H,) int64 photoelectrons (>= 1)
    time: np.ndarray  # (H,) ns, unscattered arrival time
    dist: np.ndarray  # (H,) m, photon path length (sets the scattering delay)
    coincident: bool = False  # light of a coincident atmospheric muon, not of the neutrino


def _track_hits(
    rng: np.random.Generator, det: _Detector, trk: _Tracks, coincident: bool = False
) -> list[_Hits]:
    """Poisson photoelectrons and Cherenkov times at the DOMs near each track segment
    (``coincident``: the tracks are coincident atmospheric muons)."""
    out: list[_Hits] = []
    if trk.event.shape[0] == 0:
        return out
    layers = _ice_layers()
    amp_max = np.sqrt(2 * np.pi * max(lam for *_, lam in layers)) * det.string_efficiency.max()
    radius_max = _search_radius(
        amp_max * trk.gev_per_m, max(_track_search_length(lam) for *_, lam in layers), 0.5
    )
    # Closest approach of each string (a vertical line) to each track line, squared:
    # |u x d|_z^2 / (1 - dz^2) for horizontal offset u (vertical tracks: |u|^2).
    ux = det.string_xy[None, :, 0] - trk.p0[:, 0:1]  # (T, n_str)
    uy = det.string_xy[None, :, 1] - trk.p0[:, 1:2]
    dx, dy, dz = trk.d[:, 0:1], trk.d[:, 1:2], trk.d[:, 2:3]
    cross = ux * dy - uy * dx
    horiz = np.maximum(1.0 - dz * dz, 1e-12)
    closest2 = np.where(horiz > 1e-9, cross * cross / horiz, ux * ux + uy * uy)
    e, st = np.nonzero(closest2 < radius_max[:, None] ** 2)  # candidate pairs, flat from here
    ux, uy = ux[e, st], uy[e, st]
    dz = trk.d[e, 2]
    a = ux * trk.d[e, 0] + uy * trk.d[e, 1]  # along-track offset of the string at z = p0z
    u2 = ux * ux + uy * uy
    # rho^2(zeta) = qa zeta^2 + qb zeta + perp2 with zeta = z - p0z; solve rho < radius.
    qa = 1.0 - dz * dz
    qb = -2.0 * a * dz
    perp2 = u2 - a * a
    vertical = qa < 1e-9
    seg_a = np.clip(trk.s_a[e], -_INF_S, _INF_S) * dz
    seg_b = np.clip(trk.s_b[e], -_INF_S, _INF_S) * dz
    p0z = trk.p0[e, 2]
    for z_bottom, z_top, lam in layers:
        amp = np.sqrt(2 * np.pi * lam) * det.string_efficiency.max() * trk.gev_per_m
        radius = _search_radius(amp, _track_search_length(lam), 0.5)[e]  # bound on rho
        reach = _search_radius(amp, lam, 0.5)[e]  # bound on r, the distance to the segment
        qc = perp2 - radius * radius
        disc = qb * qb - 4 * qa * qc
        with np.errstate(invalid="ignore", divide="ignore"):
            sq = np.sqrt(np.maximum(disc, 0.0))
            lo = np.where(vertical, -np.inf, (-qb - sq) / (2 * qa))
            hi = np.where(vertical, np.inf, (-qb + sq) / (2 * qa))
        ok = np.where(vertical, qc <= 0, disc >= 0) & (radius > 0)
        # ... within the segment's z extent (+- reach) and the layer.
        lo = np.maximum(np.maximum(lo, np.minimum(seg_a, seg_b) - reach), z_bottom - p0z)
        hi = np.minimum(np.minimum(hi, np.maximum(seg_a, seg_b) + reach), z_top - 1e-6 - p0z)
        hi = np.where(ok, hi, lo - 1.0)  # empty interval
        pi, pair, pos = _expand(det, e, st, lo + p0z, hi + p0z)
        ep = e[pi]  # emitter of each surviving pair
        # Per DOM: along-track position s, distance rho, Cherenkov emission point s_e, clipped
        # to the segment (s_x), and the photon path r from there.
        zeta = det.z_sorted[pos] - p0z[pi][pair]
        s = a[pi][pair] + dz[pi][pair] * zeta
        rho2 = np.maximum(u2[pi][pair] + zeta * zeta - s * s, 0.0)
        s_e = s - np.sqrt(rho2) * _COT_C
        s_x = np.minimum(np.maximum(s_e, trk.s_a[ep][pair]), trk.s_b[ep][pair])
        r = np.maximum(np.sqrt(rho2 + (s - s_x) ** 2), MIN_DISTANCE_M)
        amp_pair = np.sqrt(2 * np.pi * lam) * det.string_efficiency[st[pi]] * trk.gev_per_m[ep]
        mu = amp_pair[pair] * np.exp(-r / lam - np.abs(s_e - s_x) / ENDPOINT_FALLOFF_M) / np.sqrt(r)
        hit, n_pe = _poisson_nonzero(rng, mu)
        eh = ep[pair[hit]]
        time = trk.t0[eh] + s_x[hit] / _C + r[hit] * (GROUP_INDEX / _C)
        out.append(_Hits(trk.event[eh], det.order[pos[hit]], n_pe, time, r[hit], coincident))
    return out


def _cascade_hits(rng: np.random.Generator, det: _Detector, cas: _Cascades) -> list[_Hits]:
    """Poisson photoelectrons and arrival times at the DOMs near each cascade."""
    out: list[_Hits] = []
    if cas.event.shape[0] == 0:
        return out
    layers = _ice_layers()
    amp = (1 + CASCADE_ANISOTROPY) * det.string_efficiency.max() * cas.gev
    radius_max = _search_radius(amp, max(lam for *_, lam in layers), 1.0)
    ux = det.string_xy[None, :, 0] - cas.p0[:, 0:1]  # (C, n_str)
    uy = det.string_xy[None, :, 1] - cas.p0[:, 1:2]
    u2 = ux * ux + uy * uy
    e, st = np.nonzero(u2 < radius_max[:, None] ** 2)  # candidate pairs, flat from here
    u2 = u2[e, st]
    a = ux[e, st] * cas.d[e, 0] + uy[e, st] * cas.d[e, 1]
    dz = cas.d[e, 2]
    p0z = cas.p0[e, 2]
    for z_bottom, z_top, lam in layers:
        radius = _search_radius(amp, lam, 1.0)[e]
        half = np.sqrt(np.maximum(radius * radius - u2, 0.0))
        lo = np.maximum(-half, z_bottom - p0z)
        hi = np.where(u2 < radius * radius, np.minimum(half, z_top - 1e-6 - p0z), lo - 1.0)
        pi, pair, pos = _expand(det, e, st, lo + p0z, hi + p0z)
        ep = e[pi]
        # Per DOM, in float32 (metres and expectations need no more; twice as fast).
        zeta = det.z_sorted32[pos] - p0z[pi].astype(np.float32)[pair]
        r = np.maximum(np.sqrt(u2[pi].astype(np.float32)[pair] + zeta * zeta), _F32_MIN_DIST)
        cos_a = (a[pi].astype(np.float32)[pair] + dz[pi].astype(np.float32)[pair] * zeta) / r
        amp_pair = (det.string_efficiency[st[pi]] * cas.gev[ep]).astype(np.float32)
        mu = amp_pair[pair] * (1 + np.float32(CASCADE_ANISOTROPY) * cos_a)
        mu *= np.exp(r * np.float32(-1.0 / lam)) / r
        hit, n_pe = _poisson_nonzero(rng, mu)
        eh = ep[pair[hit]]
        r_hit = r[hit].astype(np.float64)
        time = cas.t0[eh] + r_hit * (GROUP_INDEX / _C)
        out.append(_Hits(cas.event[eh], det.order[pos[hit]], n_pe, time, r_hit))
    return out


# =================================================================================================
# Photons -> pulses
# =================================================================================================
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


# =================================================================================================
# Events
# =================================================================================================
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
        geometry: ``sensor_id, x, y, z`` as from :func:`iceaggr.geometry.make_geometry`.
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


# =================================================================================================
# Writing a dataset
# =================================================================================================
META_COLUMNS: tuple[str, ...] = (
    "batch_id",
    "event_id",
    "first_pulse_index",
    "last_pulse_index",
    "azimuth",
    "zenith",
)


def _chunk_rng(seed: int, batch: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, batch, chunk]))


def write_synthetic_dataset(
    out_dir: str | Path,
    n_events: int,
    batch_size: int = 200_000,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a synthetic dataset in the Kaggle layout and return its folder.

    Writes ``sensor_geometry.csv``, ``train/batch_<k>.parquet`` (k = 1, 2, ...; ``batch_size``
    events each, the last one possibly fewer) and ``train_meta.parquet``. Batches are generated in
    chunks of ``CHUNK_EVENTS`` and streamed to disk, so memory does not grow with ``n_events``.
    The result depends only on ``(n_events, batch_size, seed)``. Everything is written into a
    hidden sibling folder that is renamed to ``out_dir`` at the end.

    Raises:
        ValueError: ``n_events`` or ``batch_size`` < 1, or ``out_dir`` exists and is not an empty
            folder.
    """
    if n_events < 1:
        raise ValueError(f"n_events must be >= 1, got {n_events}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"out_dir {out} already exists and is not an empty folder; refusing to overwrite it. "
            "Pass a new or empty folder, or delete this one first."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_into(tmp, n_events, batch_size, seed, progress)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d synthetic events to %s", n_events, out)
    return out


def _batch_meta(meta: pd.DataFrame, batch_id: int, first_row: int) -> pd.DataFrame:
    """``train_meta`` rows of one chunk whose pulses start at row ``first_row`` of the batch."""
    n_pulses = meta["n_pulses"].to_numpy(np.int64)
    first = first_row + np.cumsum(n_pulses) - n_pulses  # inclusive row positions
    out = pd.DataFrame(
        {
            "batch_id": np.full(n_pulses.shape[0], batch_id, dtype=np.int64),
            "event_id": meta["event_id"].to_numpy(np.int64),
            "first_pulse_index": first,
            "last_pulse_index": first + n_pulses - 1,
            "azimuth": meta["azimuth"].to_numpy(np.float64),
            "zenith": meta["zenith"].to_numpy(np.float64),
        }
    )
    return out[list(META_COLUMNS)]


def _write_into(tmp: Path, n_events: int, batch_size: int, seed: int, progress: bool) -> None:
    geometry = make_geometry()
    geometry.to_csv(tmp / "sensor_geometry.csv", index=False, float_format="%.2f")
    (tmp / "train").mkdir()
    metas: list[pd.DataFrame] = []
    n_batches = -(-n_events // batch_size)
    next_id = 0
    with tqdm(total=n_events, unit="ev", desc="synthetic events", disable=not progress) as bar:
        for b in range(n_batches):
            batch_id = b + 1  # Kaggle numbering starts at 1
            n_b = min(batch_size, n_events - b * batch_size)
            path = tmp / "train" / f"batch_{batch_id}.parquet"
            writer: pq.ParquetWriter | None = None
            row = 0
            try:
                for c, start in enumerate(range(0, n_b, CHUNK_EVENTS)):
                    n_c = min(CHUNK_EVENTS, n_b - start)
                    rng = _chunk_rng(seed, b, c)
                    pulses, meta = generate_events(rng, geometry, n_c, first_event_id=next_id)
                    table = pa.Table.from_pandas(pulses, preserve_index=True)
                    if writer is None:
                        writer = pq.ParquetWriter(path, table.schema)
                    writer.write_table(table)  # one row group per chunk: memory stays bounded
                    metas.append(_batch_meta(meta, batch_id, row))
                    row += table.num_rows
                    next_id = int(meta["event_id"].iloc[-1]) + 1
                    bar.update(n_c)
            finally:
                if writer is not None:
                    writer.close()
            log.debug("batch %d: %d events, %d pulses", batch_id, n_b, row)
    pd.concat(metas, ignore_index=True).to_parquet(tmp / "train_meta.parquet", index=False)
