"""The light emitters of an event: the neutrino's direction, energy and topology.

Isotropic directions; muon tracks (nu_mu CC) with a vertex cascade, or point-like cascades;
energies from a steep bulk spectrum with a hard tail; unrelated down-going atmospheric muons in
the coincidence window (see "Directions", "Topologies" and "Energy" in :mod:`iceaggr.data.synth`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
SPEED_OF_LIGHT_M_PER_NS = 0.299792458
_C = SPEED_OF_LIGHT_M_PER_NS


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
