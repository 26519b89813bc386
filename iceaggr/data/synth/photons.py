"""Light at the DOMs: expected photoelectrons from every emitter and their unscattered times.

Diffusion-approximation light yield in layered ice for tracks (line sources) and cascades (point
sources), a closed-form search for the DOMs that can see an emitter, and a sparse Poisson draw
of the hit DOMs (see "Light yield" and "Timing" in :mod:`iceaggr.data.synth`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iceaggr.data.synth.detector import _Detector, _doms_above
from iceaggr.data.synth.sources import _C, _Cascades, _Tracks

CASCADE_ANISOTROPY = 0.5
"""Forward peaking of cascade light seen at a DOM: yield * (1 + A cos(angle to d))."""
ENDPOINT_FALLOFF_M = 50.0
"""Light from beyond a track end (no direct Cherenkov cone) falls by e per this offset."""
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
_SIN_C = float(np.sin(np.deg2rad(CHERENKOV_ANGLE_DEG)))
_COT_C = float(1.0 / np.tan(np.deg2rad(CHERENKOV_ANGLE_DEG)))
_PANDEL_SCALE_NS = 1.0 / (1.0 / PANDEL_TAU_NS + (_C / GROUP_INDEX) / PANDEL_ABSORPTION_M)
_SEARCH_MARGIN_M = 2.0  # DOMs may sit slightly off their string's mean axis (real geometry)
_INF_S = 1e5  # stand-in for an infinite track end in z-range arithmetic (m)
_F32_MIN_DIST = np.float32(MIN_DISTANCE_M)


def _ice_layers() -> list[tuple[float, float, float]]:
    """(z_bottom, z_top, attenuation length) of each layer in ``ICE_LAYERS``."""
    out = []
    top = np.inf
    for bottom, lam in ICE_LAYERS:
        out.append((bottom, top, lam))
        top = bottom
    return out


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
