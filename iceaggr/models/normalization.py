"""Input normalization: raw IceCube features -> network-scale features, behind one switch.

Every number that enters the network goes through :class:`InputNormalizer`: pulse features,
DOM geometry and the per-DOM summary features alike. Each feature has a row in a table
(:data:`PULSE_TRANSFORMS`, :data:`GEOMETRY_TRANSFORMS`, :data:`SUMMARY_TRANSFORMS`) giving its
unit and its normalized form; the constants are named once below with their origin. With
``normalize=False`` every feature reaches the network in its raw units (time ~1e4 ns, charge up
to thousands of p.e.). That is not the original failure:
:class:`~iceaggr.models.model.IceAggrModel`'s pre-LN blocks normalize each token before attention
and largely absorb raw scales. The stability table was measured on the original project's first
network, whose post-LN DOM layers take raw scales straight into attention; it lives in
:mod:`iceaggr.models.original` with its own table of transforms (``model.arch: original``). The
original project kept one side path outside its normalizer and diverged at step ~700; here no
feature can skip the switch.

Usage::

    norm = InputNormalizer(normalize=True)
    inputs = norm(batch)              # NormalizedInputs: pulses (P, 3), dom_xyz (D, 3), ...
    feats = inputs.as_dict()          # {"pulse_time": (P,), ..., "dom_total_charge": (D,)}
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from iceaggr.data.batch import PULSE_FEATURES, DomBatch

logger = logging.getLogger(__name__)

# --- constants (each named once, with its origin) ----------------------------------------------
TIME_OFFSET_NS = 1.0e4
"""Raw pulse times start around 1e4 ns (Kaggle data: ~5.7e3 to 7.8e4 ns); subtracted first."""
TIME_SCALE_NS = 3.0e4
"""Spread of raw pulse times (~7e4 ns range); after the offset, times land in about [-0.2, 2.3]."""
CHARGE_LOG10_SCALE = 3.0
"""Charge spans 0.025 to ~2.8e3 p.e., i.e. log10 in [-1.6, 3.4]; divided by 3 -> [-0.5, 1.2]."""
CHARGE_FLOOR_PE = 1.0e-3
"""Guard against log10(0) for malformed zero charges (real charges are >= 0.025 p.e.)."""
XYZ_SCALE_M = 500.0
"""IceCube DOMs lie within about +-570 m of the detector centre; /500 m -> about [-1.2, 1.2]."""
PULSE_COUNT_LOG10_SCALE = 3.0
"""A hit DOM holds 1 to ~1e3 pulses (events capped at 3,000 pulses); log10(n) / 3 -> [0, ~1.2]."""
AUX_WEIGHT = 1.0e-3
"""Weight of auxiliary charge in the event's mean time and centre (non-auxiliary counts 1)."""
RELATIVE_TIME_SCALE_NS = 1.0e3
"""Light crosses ~300 m (the scale of a track in the detector) in ~1e3 ns; DOM times relative to
the event's charge-weighted mean time land in about [-3, 3] (asinh beyond). The direction lives
in these differences, which the absolute-time scale (3e4 ns) squeezes to ~0.03."""

Transform = Callable[[torch.Tensor], torch.Tensor]


def normalize_time(t_ns: torch.Tensor) -> torch.Tensor:
    """Pulse time (ns) -> ``(t - 1e4) / 3e4``."""
    return (t_ns - TIME_OFFSET_NS) / TIME_SCALE_NS


def normalize_charge(q_pe: torch.Tensor) -> torch.Tensor:
    """Charge (p.e.) -> ``log10(q) / 3``."""
    return torch.log10(q_pe.clamp_min(CHARGE_FLOOR_PE)) / CHARGE_LOG10_SCALE


def normalize_xyz(xyz_m: torch.Tensor) -> torch.Tensor:
    """DOM coordinate (m) -> ``xyz / 500``."""
    return xyz_m / XYZ_SCALE_M


def normalize_relative_time(dt_ns: torch.Tensor) -> torch.Tensor:
    """Time relative to the event (ns) -> ``asinh(dt / 1e3)``: linear within a few µs, and
    noise hits tens of µs away stay below ~5 instead of reaching ~50."""
    return torch.asinh(dt_ns / RELATIVE_TIME_SCALE_NS)


def normalize_moment(m_m_ns: torch.Tensor) -> torch.Tensor:
    """Position-time moment (m ns) -> ``asinh((x / 500) * (dt / 1e3))``: averaged over an
    event's DOMs it is (up to the asinh) the covariance a line fit divides by the time variance."""
    return torch.asinh(m_m_ns / (XYZ_SCALE_M * RELATIVE_TIME_SCALE_NS))


def normalize_count(n: torch.Tensor) -> torch.Tensor:
    """Pulse count (>= 1) -> ``log10(n) / 3``."""
    return torch.log10(n.clamp_min(1.0)) / PULSE_COUNT_LOG10_SCALE


def identity(x: torch.Tensor) -> torch.Tensor:
    """Already O(1) (flags and fractions in [0, 1])."""
    return x


@dataclass(frozen=True)
class FeatureTransform:
    """One row of a normalization table: a feature, its raw unit and its normalized form."""

    name: str
    unit: str
    normalized: Transform


PULSE_TRANSFORMS: tuple[FeatureTransform, ...] = (
    FeatureTransform("pulse_time", "ns", normalize_time),
    FeatureTransform("pulse_charge", "p.e.", normalize_charge),
    FeatureTransform("pulse_auxiliary", "0/1", identity),
)
"""Columns of ``DomBatch.pulses`` in PULSE_FEATURES order."""

GEOMETRY_TRANSFORMS: tuple[FeatureTransform, ...] = (
    FeatureTransform("dom_x", "m", normalize_xyz),
    FeatureTransform("dom_y", "m", normalize_xyz),
    FeatureTransform("dom_z", "m", normalize_xyz),
)

SUMMARY_TRANSFORMS: tuple[FeatureTransform, ...] = (
    FeatureTransform("dom_first_time", "ns", normalize_time),
    FeatureTransform("dom_mean_time", "ns (charge-weighted)", normalize_time),
    FeatureTransform("dom_total_charge", "p.e.", normalize_charge),
    FeatureTransform("dom_num_pulses", "count", normalize_count),
    FeatureTransform("dom_aux_fraction", "fraction", identity),
    FeatureTransform("dom_rel_time", "ns (vs event mean)", normalize_relative_time),
    FeatureTransform("dom_rel_x", "m (vs event centre)", normalize_xyz),
    FeatureTransform("dom_rel_y", "m (vs event centre)", normalize_xyz),
    FeatureTransform("dom_rel_z", "m (vs event centre)", normalize_xyz),
    FeatureTransform("dom_moment_x", "m ns (rel x * rel time)", normalize_moment),
    FeatureTransform("dom_moment_y", "m ns (rel y * rel time)", normalize_moment),
    FeatureTransform("dom_moment_z", "m ns (rel z * rel time)", normalize_moment),
)
"""Per-DOM summaries computed from the DOM's pulses by :func:`dom_summaries_raw`."""

NUM_SUMMARY_FEATURES = len(SUMMARY_TRANSFORMS)
assert len(PULSE_TRANSFORMS) == len(PULSE_FEATURES)


def pulse_dom_index(batch: DomBatch) -> torch.Tensor:
    """(P,) int64: the DOM each pulse belongs to (vectorized, no host sync)."""
    return torch.repeat_interleave(
        torch.arange(batch.num_doms, device=batch.pulses.device),
        batch.dom_lengths(),
        output_size=batch.num_pulses,
    )


def dom_summaries_raw(batch: DomBatch, dom_index: torch.Tensor | None = None) -> torch.Tensor:
    """(D, 12) raw per-DOM summaries in SUMMARY_TRANSFORMS order and units.

    The last four place the DOM within its event: first-pulse time minus the event's
    charge-weighted mean first-pulse time, and position minus the event's charge-weighted
    centre (the quantities a line fit regresses), and their products (whose event mean is the
    position-time covariance of a line fit).

    All are invariant under permutation of a DOM's pulses (first time is a minimum, not the first
    row). The charge-weighted mean time is accumulated relative to the first time so that float32
    sums of ``q * t`` (up to ~1e8 p.e. ns) do not lose the sub-ns digits.
    """
    if dom_index is None:
        dom_index = pulse_dom_index(batch)
    pulses = batch.pulses.float()
    t, q, aux = pulses.unbind(-1)  # each (P,)
    n_doms = batch.num_doms
    zeros = pulses.new_zeros(n_doms)
    first = pulses.new_full((n_doms,), float("inf")).scatter_reduce(
        0, dom_index, t, reduce="amin", include_self=True
    )  # (D,)
    total_q = zeros.index_add(0, dom_index, q)  # (D,)
    dt_q = zeros.index_add(0, dom_index, q * (t - first[dom_index]))  # (D,)
    mean_time = first + dt_q / total_q.clamp_min(CHARGE_FLOOR_PE)  # (D,)
    count = batch.dom_lengths().to(pulses.dtype)  # (D,)
    aux_frac = zeros.index_add(0, dom_index, aux) / count.clamp_min(1.0)  # (D,)
    # Event context from the DOMs' non-auxiliary charge: auxiliary (not fully digitised) pulses
    # are mostly dark noise at random times, and ~60% of hit DOMs carry nothing else. A small
    # share of the total charge keeps events made only of auxiliary pulses defined.
    n_events = batch.num_events
    dom_event = torch.repeat_interleave(
        torch.arange(n_events, device=pulses.device), batch.event_lengths(), output_size=n_doms
    )  # (D,)
    clean_q = zeros.index_add(0, dom_index, q * (1.0 - aux))  # (D,)
    weight = clean_q + AUX_WEIGHT * total_q  # (D,)
    ev_q = pulses.new_zeros(n_events).index_add(0, dom_event, weight)  # (B,)
    ev_q = ev_q.clamp_min(CHARGE_FLOOR_PE)
    # Times are made relative to the event's earliest DOM before weighting (float32 sums).
    ev_t0 = pulses.new_full((n_events,), float("inf")).scatter_reduce(
        0, dom_event, first, reduce="amin", include_self=True
    )  # (B,)
    dt = first - ev_t0[dom_event]  # (D,)
    ev_dt = pulses.new_zeros(n_events).index_add(0, dom_event, weight * dt) / ev_q  # (B,)
    rel_time = dt - ev_dt[dom_event]  # (D,)
    xyz = batch.dom_xyz.float()  # (D, 3)
    ev_xyz = xyz.new_zeros(n_events, 3).index_add(0, dom_event, weight[:, None] * xyz)
    rel_xyz = xyz - (ev_xyz / ev_q[:, None])[dom_event]  # (D, 3)
    moment = (1.0 - aux_frac)[:, None] * rel_xyz * rel_time[:, None]  # (D, 3), noise DOMs ~0
    return torch.cat(
        [
            torch.stack([first, mean_time, total_q, count, aux_frac, rel_time], dim=-1),
            rel_xyz,
            moment,
        ],
        dim=-1,
    )  # (D, 12)


def _apply(table: tuple[FeatureTransform, ...], x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Apply a table column-wise to ``x`` (N, len(table)); identity when ``normalize`` is off."""
    if not normalize:
        return x
    return torch.stack(
        [row.normalized(col) for row, col in zip(table, x.unbind(-1), strict=True)], dim=-1
    )


@dataclass
class NormalizedInputs:
    """Exactly the tensors the network sees (normalized or raw, depending on the switch)."""

    pulses: torch.Tensor
    """(P, 3) time, charge, auxiliary."""
    dom_xyz: torch.Tensor
    """(D, 3) DOM position."""
    dom_summary: torch.Tensor
    """(D, 12) per-DOM summaries, SUMMARY_TRANSFORMS order."""
    dom_index: torch.Tensor
    """(P,) int64 DOM of each pulse (bookkeeping, not a network input)."""

    def as_dict(self) -> dict[str, torch.Tensor]:
        """One 1-D tensor per feature name, e.g. ``{"pulse_time": (P,), "dom_x": (D,), ...}``."""
        out: dict[str, torch.Tensor] = {}
        for table, x in (
            (PULSE_TRANSFORMS, self.pulses),
            (GEOMETRY_TRANSFORMS, self.dom_xyz),
            (SUMMARY_TRANSFORMS, self.dom_summary),
        ):
            for row, col in zip(table, x.unbind(-1), strict=True):
                out[row.name] = col
        return out


class InputNormalizer(nn.Module):
    """Parameter-free module mapping a raw :class:`DomBatch` to the network's inputs.

    ``normalize`` can be flipped at any time (``model.normalizer.normalize = False``).
    """

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, batch: DomBatch) -> NormalizedInputs:
        dom_index = pulse_dom_index(batch)  # (P,)
        pulses = batch.pulses.float()  # (P, 3)
        return NormalizedInputs(
            pulses=_apply(PULSE_TRANSFORMS, pulses, self.normalize),
            dom_xyz=_apply(GEOMETRY_TRANSFORMS, batch.dom_xyz.float(), self.normalize),
            dom_summary=_apply(
                SUMMARY_TRANSFORMS, dom_summaries_raw(batch, dom_index), self.normalize
            ),
            dom_index=dom_index,
        )

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"
