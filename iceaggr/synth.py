"""Physics-based synthetic IceCube events, written in the Kaggle "Neutrinos in Deep Ice" layout.

The real competition data (132M events) cannot be downloaded here, so the project's default
dataset is made by this module. It is a small detector simulation, not noise: the direction of
every event is encoded in the pulses the way IceCube encodes it (Cherenkov timing along a track,
light falling with distance, scattering delays), blurred the way real data is blurred
(scattering, dark noise, cascades, short tracks, coincident muons), with raw feature scales of the
real files (time ~1e4 ns, charge up to thousands of p.e.) so that unnormalized training breaks as
it did on the real data.

Usage::

    from iceaggr.synth import write_synthetic_dataset
    write_synthetic_dataset("data/synthetic", n_events=50_000)   # or: iceaggr synth --out ...

    rng = np.random.default_rng(0)                               # one chunk in memory (tests)
    pulses, meta = generate_events(rng, make_geometry(), 1000, first_event_id=0)

The output folder holds ``sensor_geometry.csv`` (from :func:`iceaggr.geometry.make_geometry`),
``train_meta.parquet`` and ``train/batch_<k>.parquet`` exactly as described in DESIGN.md
section 3. It is written into a hidden ``.<name>.partial-*`` sibling folder and renamed into place
at the end, so an interrupted run never leaves a folder that looks complete.

Physics (all constants are defined once, below, with their source)
------------------------------------------------------------------
Directions and topologies
    The neutrino direction is isotropic (cos zenith uniform in [-1, 1], azimuth uniform), like
    the roughly isotropic zenith distribution of the competition's simulation. The label
    ``v = (cos az sin zen, sin az sin zen, cos zen)`` points to where the neutrino came from; every
    particle of the event travels along ``d = -v``. Each event is one of (``TOPOLOGY_FRACTIONS``):
    a *through-going* muon (an infinite track passing within ``THROUGH_IMPACT_RADIUS_M`` of the
    centre), a *starting* track (an interaction vertex inside the detector: a hadronic cascade
    carrying a fraction y of the energy plus a muon of finite range), a *stopping* muon (a
    minimum-ionizing track that ends inside) or a *cascade* (point-like: nu_e CC, NC).
    A fraction ``COINCIDENT_MUON_FRACTION`` of events also holds an unrelated down-going
    atmospheric muon within +-``COINCIDENT_MUON_DT_NS``, as real events do.
Energy
    E follows a power law E^-``SPECTRAL_INDEX`` between ``ENERGY_MIN_GEV`` and
    ``ENERGY_MAX_GEV``, so the brightest events have thousands of pulses. A muon's light per metre
    is that of ``MUON_MIP_LIGHT_GEV_PER_M`` of cascade energy plus its stochastic losses
    ``MUON_LOSS_B_PER_M * E``; its range is ``ln(1 + E b / a) / b`` with the standard ice
    energy-loss constants a = ``MUON_LOSS_A_GEV_PER_M``, b = ``MUON_LOSS_B_PER_M``.
Light yield (diffusion approximation)
    With an effective attenuation length lambda (``ICE_LAYERS``: upper ice, the dust layer at
    z ~ -100 m, the clear deep ice), a point source of energy E gives a DOM at distance r an
    expected ``PE_PER_GEV_AT_1M * E * exp(-r / lambda) / r`` photoelectrons (times
    ``1 + CASCADE_ANISOTROPY * cos(angle to d)``, as cascade light is forward-peaked). A line
    source depositing epsilon GeV/m gives ``PE_PER_GEV_AT_1M * sqrt(2 pi lambda) * epsilon *
    exp(-rho' / lambda) / sqrt(rho')`` (the large-distance form of the K0 solution of the
    diffusion equation), with rho' the Cherenkov photon path rho / sin(theta_c). A finite track
    whose Cherenkov emission point lies beyond its end illuminates the DOM from the end point,
    suppressed by ``exp(-offset / ENDPOINT_FALLOFF_M)``. DeepCore DOMs have
    ``DEEPCORE_QE_RATIO`` times the efficiency. Photon counts are Poisson.
Timing
    The unscattered (geometric) arrival time for a track is
    ``t0 + s_e / c + rho' * n_g / c``, where s_e = s - rho cot(theta_c) is the Cherenkov emission
    point (``CHERENKOV_ANGLE_DEG``, group index ``GROUP_INDEX``); for a cascade ``t0 + r n_g / c``.
    Each photon is delayed by scattering following the Pandel function, a Gamma distribution
    with shape r / ``PANDEL_LAMBDA_M`` and rate 1 / ``PANDEL_TAU_NS`` + c_ice /
    ``PANDEL_ABSORPTION_M`` (AMANDA, Ahrens et al., NIM A 524 (2004) 169), so delays grow from
    a few ns near the track to microseconds far away, plus the PMT's transit-time jitter
    ``PMT_JITTER_NS``.
Pulses and charge
    Photons of a DOM closer than ``PULSE_RESOLUTION_NS`` to the previous one merge into one pulse
    (the pulse-unfolding resolution); a DOM with more than ``MAX_PHOTONS_PER_DOM`` photons is
    simulated with that many "macro-photons" sharing its charge, which bounds the pulses per DOM
    as the unfolding does. A photoelectron's charge is Gaussian (``SPE_MEAN_PE``,
    ``SPE_SIGMA_PE``) with an exponential low-charge component (``SPE_LOW_FRACTION``,
    ``SPE_LOW_MEAN_PE``); pulse charges saturate softly at ``SATURATION_PE`` and are stored in
    steps of ``CHARGE_QUANTUM_PE``, as in the Kaggle files (min 0.025 p.e.).
Noise, coincidences and the trigger
    Dark noise arrives at ``DARK_RATE_HZ`` per DOM, uniformly over the readout window. A DOM
    launch is a hard local coincidence (HLC, ``auxiliary = False``) when a neighbour within
    ``HLC_SPAN_DOMS`` DOMs on the same string fires within ``HLC_WINDOW_NS``; otherwise its pulses
    are soft (``auxiliary = True``), which makes noise auxiliary-heavy. An event is kept when it
    has at least ``SMT_MULTIPLICITY`` HLC DOMs (the simple multiplicity trigger, SMT8); the others
    are dropped, leaving gaps in the event ids as in the real files. The readout window runs from
    ``READOUT_PRE_TRIGGER_NS`` before the first HLC launch to ``READOUT_POST_TRIGGER_NS`` after
    the last one; raw times put the first HLC launch at ``TRIGGER_TIME_NS``.
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

from iceaggr.geometry import DOMS_PER_STRING, NUM_STANDARD_STRINGS, make_geometry

log = logging.getLogger(__name__)

# --- Event mix ---------------------------------------------------------------------------------
TOPOLOGY_FRACTIONS: dict[str, float] = {
    "through": 0.45,  # nu_mu CC outside the detector: a muon crossing it
    "starting": 0.15,  # nu_mu CC inside: vertex cascade + finite muon
    "stopping": 0.10,  # low-energy muon ranging out inside
    "cascade": 0.30,  # nu_e / nu_tau CC and all-flavour NC: point-like
}
"""Share of each event topology among generated events (before the trigger)."""
THROUGH_IMPACT_RADIUS_M = 700.0
"""Through-going tracks pass the centre at an impact parameter uniform over a disk this large."""
VERTEX_CYLINDER_RADIUS_M = 600.0
"""Vertices (starting tracks, cascades, stopping points) are uniform in this cylinder..."""
VERTEX_CYLINDER_HALF_HEIGHT_M = 550.0
"""...of this half height: slightly larger than the instrumented volume."""
COINCIDENT_MUON_FRACTION = 0.05
"""Events that also hold an unrelated atmospheric muon."""
COINCIDENT_MUON_DT_NS = 10_000.0
"""The coincident muon passes at a time uniform within +- this of the neutrino event."""
COINCIDENT_MUON_MIN_COS_ZENITH = 0.2
"""Atmospheric muons are down-going: the direction they come from has cos(zenith) above this."""

# --- Energy and light ----------------------------------------------------------------------------
SPECTRAL_INDEX = 2.0
"""dN/dE ~ E^-SPECTRAL_INDEX (a neutrino-like hard spectrum; sets the tail of pulses per event)."""
ENERGY_MIN_GEV = 100.0
ENERGY_MAX_GEV = 1e8
COINCIDENT_MUON_SPECTRAL_INDEX = 3.7
"""Atmospheric muons at depth: a steep spectrum (mostly minimum-ionizing)."""
MUON_LOSS_A_GEV_PER_M = 0.24
"""Continuous (ionization) muon energy loss in ice, the 'a' of dE/dx = a + bE."""
MUON_LOSS_B_PER_M = 3.3e-4
"""Stochastic (radiative) muon energy loss coefficient in ice, the 'b' of dE/dx = a + bE."""
MUON_MIP_LIGHT_GEV_PER_M = 0.13
"""Light of a minimum-ionizing muon (own Cherenkov light + delta rays) as cascade-equivalent GeV/m."""
INELASTICITY_POWER = 2.0
"""Bjorken y of starting tracks is U^INELASTICITY_POWER (mean 1/3): the vertex cascade's share."""
PE_PER_GEV_AT_1M = 6.0
"""DOM photoelectrons per GeV of cascade energy at 1 m, before attenuation (tuned so that the
pulse counts per event resemble the real data)."""
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
MIN_EXPECTED_PE = 1e-3
"""DOMs where a source's expected charge is below this are not simulated (search radius)."""

# --- Propagation and timing -----------------------------------------------------------------------
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

# --- Pulses ----------------------------------------------------------------------------------------
PULSE_RESOLUTION_NS = 6.0
"""Photons closer than this to the previous photon of the DOM merge into its pulse."""
MAX_PHOTONS_PER_DOM = 48
"""Bright DOMs are simulated with this many macro-photons sharing the charge."""
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

# --- Noise, local coincidence, trigger, readout -----------------------------------------------------
DARK_RATE_HZ = 400.0
"""Dark-noise rate per DOM (IceCube in-ice DOMs: a few hundred Hz)."""
HLC_SPAN_DOMS = 2
"""Hard local coincidence: a neighbour up to this many DOMs away on the same string..."""
HLC_WINDOW_NS = 1_000.0
"""...fires within this time (IceCube: +-1 us)."""
SMT_MULTIPLICITY = 8
"""Simple multiplicity trigger: at least this many HLC DOMs (SMT8)."""
READOUT_PRE_TRIGGER_NS = 4_300.0
"""The readout starts this long before the first HLC launch (IceCube: 4 us before the trigger
window; 4.3 us reproduces the real minimum raw time of ~5.7e3 ns)."""
READOUT_POST_TRIGGER_NS = 6_000.0
"""The readout ends this long after the last HLC launch (IceCube: 6 us)."""
TRIGGER_TIME_NS = 10_000.0
"""Raw time of the first HLC launch: the ~1e4 ns offset of the real files."""

# --- Generation ------------------------------------------------------------------------------------
CHUNK_EVENTS = 10_000
"""Events generated per vectorized chunk (bounds memory; a batch file is written chunk by chunk)."""
_EXPECTED_TRIGGER_EFFICIENCY = 0.5
"""First guess of the share of generated events passing the trigger (refined as it runs)."""

_C = SPEED_OF_LIGHT_M_PER_NS
_SIN_C = float(np.sin(np.deg2rad(CHERENKOV_ANGLE_DEG)))
_COT_C = float(1.0 / np.tan(np.deg2rad(CHERENKOV_ANGLE_DEG)))
_PANDEL_SCALE_NS = 1.0 / (1.0 / PANDEL_TAU_NS + (_C / GROUP_INDEX) / PANDEL_ABSORPTION_M)
_MAX_LAMBDA_M = max(lam for _, lam in ICE_LAYERS)
_Z_KEY_OFFSET = 4096.0  # turns (string, descending z) into one ascending search key
_SEARCH_MARGIN_M = 2.0  # DOMs may sit slightly off their string's mean axis (real geometry)
_INF_S = 1e5  # stand-in for an infinite track end in z-range arithmetic (m)


# ===================================================================================================
# Detector
# ===================================================================================================
@dataclass(frozen=True)
class _Detector:
    xyz: np.ndarray  # (N, 3) float64 m, by sensor_id
    efficiency: np.ndarray  # (N,) float64 relative quantum efficiency
    attenuation: np.ndarray  # (N,) float64 m, effective attenuation length at the DOM
    string: np.ndarray  # (N,) int64 0-based string of each sensor
    dom: np.ndarray  # (N,) int64 0-based position on the string
    string_xy: np.ndarray  # (S, 2) float64 m, mean axis of each string
    order: np.ndarray  # (N,) int64: sensors sorted by (string, descending z)
    key: np.ndarray  # (N,) float64 ascending search key of ``order``

    @property
    def num_sensors(self) -> int:
        return int(self.xyz.shape[0])


def _attenuation_length(z: np.ndarray) -> np.ndarray:
    """Effective attenuation length (m) at depth z (m), from ``ICE_LAYERS``."""
    out = np.empty_like(z)
    top = np.inf
    for bottom, lam in ICE_LAYERS:
        out[(z < top) & (z >= bottom)] = lam
        top = bottom
    return out


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
    dom = sid % DOMS_PER_STRING
    efficiency = np.where(string >= NUM_STANDARD_STRINGS, DEEPCORE_QE_RATIO, 1.0)
    n_strings = int(string.max()) + 1
    counts = np.bincount(string, minlength=n_strings)
    string_xy = np.stack(
        [np.bincount(string, xyz[:, i], minlength=n_strings) / counts for i in range(2)], axis=1
    )
    order = np.lexsort((-xyz[:, 2], string))
    key = string[order] * _Z_KEY_OFFSET + (_Z_KEY_OFFSET / 2 - xyz[order, 2])
    return _Detector(
        xyz=xyz,
        efficiency=efficiency,
        attenuation=_attenuation_length(xyz[:, 2]),
        string=string,
        dom=dom,
        string_xy=string_xy,
        order=order,
        key=key,
    )


# ===================================================================================================
# Sources of light
# ===================================================================================================
@dataclass
class _Sources:
    """Light sources: a track segment ``p0 + s d, s in [s_a, s_b]`` and/or a cascade at ``p0``."""

    event: np.ndarray  # (S,) int64 index of the event in the chunk
    p0: np.ndarray  # (S, 3) m
    d: np.ndarray  # (S, 3) unit direction of travel
    s_a: np.ndarray  # (S,) m, track start (-inf allowed)
    s_b: np.ndarray  # (S,) m, track end (+inf allowed); s_a == s_b: no track
    track_gev_per_m: np.ndarray  # (S,) cascade-equivalent light per metre of track
    cascade_gev: np.ndarray  # (S,) cascade energy at p0
    t0: np.ndarray  # (S,) ns, time at p0

    @staticmethod
    def concat(parts: list[_Sources]) -> _Sources:
        return _Sources(
            **{
                f: np.concatenate([getattr(p, f) for p in parts])
                for f in _Sources.__dataclass_fields__
            }
        )


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


def _sample_events(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, _Sources]:
    """Labels (azimuth, zenith) of ``n`` neutrino events and their light sources."""
    az = 2 * np.pi * rng.random(n)
    zen = np.arccos(1.0 - 2.0 * rng.random(n))
    d = -_unit_vectors(az, zen)  # direction of travel
    energy = _power_law(rng, n, SPECTRAL_INDEX, ENERGY_MIN_GEV, ENERGY_MAX_GEV)
    names = list(TOPOLOGY_FRACTIONS)
    probs = np.array([TOPOLOGY_FRACTIONS[k] for k in names])
    topo = rng.choice(len(names), size=n, p=probs / probs.sum())
    is_through = topo == names.index("through")
    is_starting = topo == names.index("starting")
    is_stopping = topo == names.index("stopping")
    y = rng.random(n) ** INELASTICITY_POWER

    p0 = np.where(
        is_through[:, None], _disk_point(rng, d, THROUGH_IMPACT_RADIUS_M), _cylinder_point(rng, n)
    )
    muon_energy = np.where(is_starting, (1.0 - y) * energy, np.where(is_through, energy, 0.0))
    s_a = np.where(is_through | is_stopping, -np.inf, 0.0)
    s_b = np.where(is_through, np.inf, np.where(is_starting, _muon_range_m(muon_energy), 0.0))
    has_track = is_through | is_starting | is_stopping
    track = np.where(has_track, MUON_MIP_LIGHT_GEV_PER_M + MUON_LOSS_B_PER_M * muon_energy, 0.0)
    cascade = np.where(is_starting, y * energy, np.where(has_track, 0.0, energy))
    sources = _Sources(
        event=np.arange(n, dtype=np.int64),
        p0=p0,
        d=d,
        s_a=s_a,
        s_b=s_b,
        track_gev_per_m=track,
        cascade_gev=cascade,
        t0=np.zeros(n),
    )
    return az, zen, sources


def _sample_coincident_muons(rng: np.random.Generator, n: int) -> _Sources:
    """Unrelated down-going atmospheric muons for a random subset of the ``n`` events."""
    event = np.flatnonzero(rng.random(n) < COINCIDENT_MUON_FRACTION)
    m = event.shape[0]
    az = 2 * np.pi * rng.random(m)
    zen = np.arccos(COINCIDENT_MUON_MIN_COS_ZENITH + (1 - COINCIDENT_MUON_MIN_COS_ZENITH) * rng.random(m))
    d = -_unit_vectors(az, zen)
    energy = _power_law(rng, m, COINCIDENT_MUON_SPECTRAL_INDEX, ENERGY_MIN_GEV, ENERGY_MAX_GEV)
    return _Sources(
        event=event.astype(np.int64),
        p0=_disk_point(rng, d, THROUGH_IMPACT_RADIUS_M),
        d=d,
        s_a=np.full(m, -np.inf),
        s_b=np.full(m, np.inf),
        track_gev_per_m=MUON_MIP_LIGHT_GEV_PER_M + MUON_LOSS_B_PER_M * energy,
        cascade_gev=np.zeros(m),
        t0=COINCIDENT_MUON_DT_NS * (2 * rng.random(m) - 1),
    )


# ===================================================================================================
# Which DOMs can see a source
# ===================================================================================================
def _search_radius(src: _Sources) -> np.ndarray:
    """(S,) m: beyond this distance every DOM expects less than ``MIN_EXPECTED_PE``."""
    lam = _MAX_LAMBDA_M
    peak = DEEPCORE_QE_RATIO * PE_PER_GEV_AT_1M
    a_trk = peak * np.sqrt(2 * np.pi * lam) * src.track_gev_per_m / MIN_EXPECTED_PE
    a_cas = peak * (1 + CASCADE_ANISOTROPY) * src.cascade_gev / MIN_EXPECTED_PE
    # Solve a * exp(-r / lam) / r**p = 1 by fixed-point iteration on r = lam * ln(a / r**p).
    r_trk = np.full(a_trk.shape, 50.0)
    r_cas = np.full(a_cas.shape, 50.0)
    with np.errstate(divide="ignore"):
        for _ in range(6):
            r_trk = np.maximum(lam * np.log(a_trk / np.sqrt(r_trk)), MIN_DISTANCE_M)
            r_cas = np.maximum(lam * np.log(a_cas / r_cas), MIN_DISTANCE_M)
    r_trk = np.where(a_trk > 0, r_trk, 0.0)
    r_cas = np.where(a_cas > 0, r_cas, 0.0)
    # rho' = rho / sin(theta_c) >= rho: searching rho < r is conservative.
    return np.maximum(r_trk, r_cas) + _SEARCH_MARGIN_M


def _candidates(det: _Detector, src: _Sources) -> tuple[np.ndarray, np.ndarray]:
    """(source index, sensor id) of every DOM within the search radius of a source.

    Per (source, string) pair the z interval where the string is close enough is solved in
    closed form (a quadratic in z), then the DOMs in it are found by binary search.
    """
    radius = _search_radius(src)[:, None]  # (S, 1)
    ux = det.string_xy[None, :, 0] - src.p0[:, 0:1]  # (S, n_str)
    uy = det.string_xy[None, :, 1] - src.p0[:, 1:2]
    dx, dy, dz = (src.d[:, i : i + 1] for i in range(3))
    u2 = ux * ux + uy * uy
    has_track = (src.s_b > src.s_a)[:, None]
    # Track line: rho^2(zeta) = (1 - dz^2) zeta^2 - 2 a dz zeta + |u|^2 - a^2, zeta = z - p0z.
    a = ux * dx + uy * dy
    qa = np.broadcast_to(1.0 - dz * dz, a.shape)
    qb = -2.0 * a * dz
    qc = u2 - a * a - radius * radius
    vertical = qa < 1e-9
    disc = qb * qb - 4 * qa * qc
    with np.errstate(invalid="ignore", divide="ignore"):
        sq = np.sqrt(np.maximum(disc, 0.0))
        lo_line = np.where(vertical, -np.inf, (-qb - sq) / (2 * qa))
        hi_line = np.where(vertical, np.inf, (-qb + sq) / (2 * qa))
    line_ok = np.where(vertical, qc <= 0, disc >= 0)
    # ... intersected with the segment's z extent (+- radius).
    sa = np.clip(src.s_a, -_INF_S, _INF_S)[:, None]
    sb = np.clip(src.s_b, -_INF_S, _INF_S)[:, None]
    seg_lo = np.minimum(sa * dz, sb * dz) - radius
    seg_hi = np.maximum(sa * dz, sb * dz) + radius
    lo_line = np.maximum(lo_line, seg_lo)
    hi_line = np.minimum(hi_line, seg_hi)
    # Cascade only: the sphere |w| < radius.
    half = np.sqrt(np.maximum(radius * radius - u2, 0.0))
    lo = np.where(has_track, lo_line, -half) + src.p0[:, 2:3]
    hi = np.where(has_track, hi_line, half) + src.p0[:, 2:3]
    ok = np.where(has_track, line_ok, u2 <= radius * radius) & (hi >= lo)

    s_idx, str_idx = np.nonzero(ok)
    base = str_idx * _Z_KEY_OFFSET + _Z_KEY_OFFSET / 2
    first = np.searchsorted(det.key, base - hi[s_idx, str_idx], side="left")
    last = np.searchsorted(det.key, base - lo[s_idx, str_idx], side="right")
    count = last - first
    keep = count > 0
    s_idx, first, count = s_idx[keep], first[keep], count[keep]
    total = int(count.sum())
    pair = np.repeat(np.arange(count.shape[0]), count)
    within = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    sensor = det.order[first[pair] + within]
    return s_idx[pair], sensor


# ===================================================================================================
# Photons -> pulses
# ===================================================================================================
def _spe_charge(rng: np.random.Generator, n: int) -> np.ndarray:
    """Charges (p.e.) of ``n`` single photoelectrons."""
    gauss = rng.normal(SPE_MEAN_PE, SPE_SIGMA_PE, n)
    low = rng.exponential(SPE_LOW_MEAN_PE, n)
    q = np.where(rng.random(n) < SPE_LOW_FRACTION, low, gauss)
    return np.maximum(q, CHARGE_QUANTUM_PE)


def _signal_photons(
    rng: np.random.Generator, det: _Detector, src: _Sources
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Detected photons of all sources: (event, sensor, time ns, charge p.e.), unsorted."""
    c_idx, sensor = _candidates(det, src)
    pos = det.xyz[sensor]  # (K, 3)
    lam = det.attenuation[sensor]
    eff = det.efficiency[sensor] * PE_PER_GEV_AT_1M
    w = pos - src.p0[c_idx]
    d = src.d[c_idx]
    s = np.einsum("ij,ij->i", w, d)
    w2 = np.einsum("ij,ij->i", w, w)
    rho = np.sqrt(np.maximum(w2 - s * s, 0.0))

    # Track: Cherenkov emission point s_e, clipped to the segment.
    s_e = s - rho * _COT_C
    s_x = np.clip(s_e, src.s_a[c_idx], src.s_b[c_idx])
    offset = np.abs(s_e - s_x)
    r_trk = np.maximum(np.sqrt(rho * rho + (s - s_x) ** 2), MIN_DISTANCE_M)
    eps = src.track_gev_per_m[c_idx]
    mu_trk = (
        eff
        * np.sqrt(2 * np.pi * lam)
        * eps
        * np.exp(-r_trk / lam - offset / ENDPOINT_FALLOFF_M)
        / np.sqrt(r_trk)
    )
    mu_trk = np.where(eps > 0, mu_trk, 0.0)
    t_trk = src.t0[c_idx] + s_x / _C + r_trk * GROUP_INDEX / _C

    # Cascade at p0.
    r_cas = np.maximum(np.sqrt(w2), MIN_DISTANCE_M)
    cos_a = s / r_cas
    mu_cas = (
        eff * src.cascade_gev[c_idx] * (1 + CASCADE_ANISOTROPY * cos_a) * np.exp(-r_cas / lam) / r_cas
    )
    t_cas = src.t0[c_idx] + r_cas * GROUP_INDEX / _C

    mu = mu_trk + mu_cas
    n_pe = rng.poisson(mu)
    hit = np.flatnonzero(n_pe > 0)
    n_pe = n_pe[hit]
    n_ph = np.minimum(n_pe, MAX_PHOTONS_PER_DOM)
    weight = n_pe / n_ph  # photoelectrons carried by each (macro-)photon

    ph = np.repeat(hit, n_ph)  # candidate row of each photon
    from_track = rng.random(ph.shape[0]) * mu[ph] < mu_trk[ph]
    t_geo = np.where(from_track, t_trk[ph], t_cas[ph])
    dist = np.where(from_track, r_trk[ph], r_cas[ph])
    delay = rng.gamma(dist / PANDEL_LAMBDA_M, _PANDEL_SCALE_NS)
    time = t_geo + delay + rng.normal(0.0, PMT_JITTER_NS, ph.shape[0])
    charge = np.repeat(weight, n_ph) * _spe_charge(rng, ph.shape[0])
    return src.event[c_idx[ph]], sensor[ph], time, charge


def _merge_photons(
    event: np.ndarray, sensor: np.ndarray, time: np.ndarray, charge: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Photons -> pulses, sorted by (event, sensor, time)."""
    order = np.lexsort((time, sensor, event))
    event, sensor, time, charge = event[order], sensor[order], time[order], charge[order]
    new = np.ones(time.shape[0], dtype=bool)
    new[1:] = (
        (event[1:] != event[:-1])
        | (sensor[1:] != sensor[:-1])
        | (time[1:] - time[:-1] > PULSE_RESOLUTION_NS)
    )
    start = np.flatnonzero(new)
    if start.shape[0] == 0:
        return event, sensor, time, charge
    return event[start], sensor[start], time[start], np.add.reduceat(charge, start)


def _local_coincidence(
    det: _Detector, event: np.ndarray, sensor: np.ndarray, time: np.ndarray
) -> np.ndarray:
    """HLC flag per pulse; pulses must be sorted by (event, sensor, time).

    A DOM is HLC when its first pulse and the first pulse of a DOM up to ``HLC_SPAN_DOMS`` away on
    the same string are within ``HLC_WINDOW_NS``; all pulses of an HLC DOM are HLC.
    """
    n = event.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    new = np.ones(n, dtype=bool)
    new[1:] = (event[1:] != event[:-1]) | (sensor[1:] != sensor[:-1])
    start = np.flatnonzero(new)
    ev, sid, t = event[start], sensor[start], time[start]
    string, dom = det.string[sid], det.dom[sid]
    hlc = np.zeros(start.shape[0], dtype=bool)
    for k in range(1, HLC_SPAN_DOMS + 1):
        pair = (
            (ev[k:] == ev[:-k])
            & (string[k:] == string[:-k])
            & (dom[k:] - dom[:-k] <= HLC_SPAN_DOMS)
            & (np.abs(t[k:] - t[:-k]) <= HLC_WINDOW_NS)
        )
        hlc[k:] |= pair
        hlc[:-k] |= pair
    return np.repeat(hlc, np.diff(np.append(start, n)))


def _finish_charge(charge: np.ndarray) -> np.ndarray:
    q = charge / (1.0 + charge / SATURATION_PE)
    return np.maximum(np.round(q / CHARGE_QUANTUM_PE), 1.0) * CHARGE_QUANTUM_PE


# ===================================================================================================
# Events
# ===================================================================================================
@dataclass
class _Chunk:
    event: np.ndarray  # (P,) int64 index of the candidate event
    sensor: np.ndarray  # (P,) int64
    time: np.ndarray  # (P,) int64 ns, raw
    charge: np.ndarray  # (P,) float64 p.e.
    auxiliary: np.ndarray  # (P,) bool
    kept: np.ndarray  # (n_kept,) int64 candidate indices that passed the trigger, ascending
    azimuth: np.ndarray  # (n_kept,) rad
    zenith: np.ndarray  # (n_kept,) rad


def _simulate_candidates(rng: np.random.Generator, det: _Detector, n: int) -> _Chunk:
    """Simulate ``n`` candidate events; keep those passing the trigger."""
    az, zen, primary = _sample_events(rng, n)
    src = _Sources.concat([primary, _sample_coincident_muons(rng, n)])
    ev, sid, t, q = _merge_photons(*_signal_photons(rng, det, src))

    # Trigger on HLC DOMs of the signal.
    hlc = _local_coincidence(det, ev, sid, t)
    first_of_dom = np.ones(ev.shape[0], dtype=bool)
    first_of_dom[1:] = (ev[1:] != ev[:-1]) | (sid[1:] != sid[:-1])
    n_hlc = np.bincount(ev[hlc & first_of_dom], minlength=n)
    kept = np.flatnonzero(n_hlc >= SMT_MULTIPLICITY)
    t_first = np.full(n, np.inf)
    t_last = np.full(n, -np.inf)
    np.minimum.at(t_first, ev[hlc], t[hlc])
    np.maximum.at(t_last, ev[hlc], t[hlc])
    win_lo = t_first - READOUT_PRE_TRIGGER_NS
    win_hi = t_last + READOUT_POST_TRIGGER_NS

    is_kept = np.zeros(n, dtype=bool)
    is_kept[kept] = True
    sel = is_kept[ev] & (t >= win_lo[ev]) & (t <= win_hi[ev])
    ev, sid, t, q = ev[sel], sid[sel], t[sel], q[sel]

    # Dark noise, uniform over each kept event's readout window.
    span = win_hi[kept] - win_lo[kept]
    n_noise = rng.poisson(DARK_RATE_HZ * 1e-9 * det.num_sensors * span)
    noise_ev = np.repeat(kept, n_noise)
    m = noise_ev.shape[0]
    noise_t = win_lo[noise_ev] + rng.random(m) * np.repeat(span, n_noise)
    noise_sid = rng.integers(0, det.num_sensors, m)
    ev = np.concatenate([ev, noise_ev])
    sid = np.concatenate([sid, noise_sid])
    t = np.concatenate([t, noise_t])
    q = np.concatenate([q, _spe_charge(rng, m)])

    order = np.lexsort((t, sid, ev))
    ev, sid, t, q = ev[order], sid[order], t[order], q[order]
    aux = ~_local_coincidence(det, ev, sid, t)
    raw = np.rint(TRIGGER_TIME_NS + t - t_first[ev]).astype(np.int64)

    order = np.lexsort((sid, raw, ev))  # grouped by event, time-ordered
    return _Chunk(
        event=ev[order],
        sensor=sid[order],
        time=raw[order],
        charge=_finish_charge(q[order]),
        auxiliary=aux[order],
        kept=kept,
        azimuth=az[kept],
        zenith=zen[kept],
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
        n_cand = max(int(np.ceil(need / efficiency * 1.05)), 16)
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
        parts.append((ids, chunk.sensor[sel], chunk.time[sel], chunk.charge[sel], chunk.auxiliary[sel]))
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


# ===================================================================================================
# Writing a dataset
# ===================================================================================================
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


def _write_into(tmp: Path, n_events: int, batch_size: int, seed: int, progress: bool) -> None:
    geometry = make_geometry()
    geometry.to_csv(tmp / "sensor_geometry.csv", index=False, float_format="%.2f")
    (tmp / "train").mkdir()
    metas: list[pd.DataFrame] = []
    n_batches = -(-n_events // batch_size)
    next_id = 0
    with tqdm(total=n_events, unit="ev", desc="synthetic events", disable=not progress) as bar:
        for b in range(n_batches):
            batch_id = b + 1
            n_b = min(batch_size, n_events - b * batch_size)
            writer: pq.ParquetWriter | None = None
            row = 0
            try:
                for c, start in enumerate(range(0, n_b, CHUNK_EVENTS)):
                    n_c = min(CHUNK_EVENTS, n_b - start)
                    pulses, meta = generate_events(
                        _chunk_rng(seed, b, c), geometry, n_c, first_event_id=next_id
                    )
                    table = pa.Table.from_pandas(pulses, preserve_index=True)
                    if writer is None:
                        writer = pq.ParquetWriter(
                            tmp / "train" / f"batch_{batch_id}.parquet", table.schema
                        )
                    writer.write_table(table)
                    first = row + np.cumsum(meta["n_pulses"].to_numpy()) - meta["n_pulses"].to_numpy()
                    row += int(meta["n_pulses"].sum())
                    metas.append(
                        pd.DataFrame(
                            {
                                "batch_id": np.full(n_c, batch_id, dtype=np.int64),
                                "event_id": meta["event_id"].to_numpy(np.int64),
                                "first_pulse_index": first.astype(np.int64),
                                "last_pulse_index": (first + meta["n_pulses"].to_numpy() - 1).astype(
                                    np.int64
                                ),
                                "azimuth": meta["azimuth"].to_numpy(np.float64),
                                "zenith": meta["zenith"].to_numpy(np.float64),
                            }
                        )
                    )
                    next_id = int(meta["event_id"].iloc[-1]) + 1
                    bar.update(n_c)
            finally:
                if writer is not None:
                    writer.close()
            log.debug("batch %d: %d events, %d pulses", batch_id, n_b, row)
    meta_all = pd.concat(metas, ignore_index=True)
    meta_all.to_parquet(tmp / "train_meta.parquet", index=False)
