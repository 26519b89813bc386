"""The improved line fit on a packed batch, in torch: a seed direction for the network.

The same fit as :func:`iceaggr.data.linefit.line_fit` after
:func:`iceaggr.data.linefit.select_hits` (the baseline printed beside every sweep): per event,
the first pulse of each DOM, only HLC (non-auxiliary) ones when the event has at least
``MIN_HLC_HITS`` of them, a least-squares fit of position against time, then Huber-reweighted
refits; the direction is ``-v``. Here it runs on :class:`~iceaggr.data.batch.DomBatch`, on the
batch's device, in float64 and without gradients, so a model can start from it and learn a
correction, as IceCube's seeded reconstructions start from a line fit.

On an event that the loader truncated (more pulses or DOMs than ``data.truncation`` keeps),
the fit sees only the kept pulses, so it can differ from the baseline's fit of the whole event.
Constants are repeated from :mod:`iceaggr.data.linefit` rather than imported: the models layer
reads only the batch from the data layer, and ``tests/test_model.py`` checks both fits agree.
"""

from __future__ import annotations

import torch

from iceaggr.data.batch import DomBatch

HUBER_RADIUS_M = 150.0
"""As ``iceaggr.data.linefit.HUBER_RADIUS_M``."""
HUBER_ITERATIONS = 5
"""As ``iceaggr.data.linefit.HUBER_ITERATIONS``."""
MIN_HLC_HITS = 3
"""As ``iceaggr.data.linefit.MIN_HLC_HITS``."""
_MIN_TIME_VARIANCE_NS2 = 1e-6
FALLBACK = (0.0, 0.0, 1.0)
"""Direction of a degenerate event (one DOM, or all first hits at one time): straight up, the
line fit's ``FALLBACK_DIRECTION``."""


@torch.no_grad()
def line_fit_direction(
    batch: DomBatch,
    huber_radius_m: float = HUBER_RADIUS_M,
    iterations: int = HUBER_ITERATIONS,
) -> torch.Tensor:
    """(B, 3) float32 unit vectors: where each event's particle came from, by the line fit.

    Uses the raw batch (times in ns, positions in m): the fit is scale-aware, so it must not
    see normalized inputs.
    """
    device = batch.pulses.device
    n_events = batch.cu_doms.numel() - 1
    ev = torch.repeat_interleave(
        torch.arange(n_events, device=device), batch.cu_doms[1:] - batch.cu_doms[:-1]
    )  # (D,) event of each DOM
    # The earliest pulse of each DOM (found, not assumed at the DOM's start: the model's
    # prediction does not depend on the order of pulses within a DOM, and neither does this).
    n_doms = batch.cu_pulses.numel() - 1
    dom = torch.repeat_interleave(torch.arange(n_doms, device=device), batch.dom_lengths())
    time = batch.pulses[:, 0]
    t_min = torch.full((n_doms,), torch.inf, dtype=time.dtype, device=device)
    t_min = t_min.scatter_reduce(0, dom, time, "amin")
    index = torch.arange(time.numel(), device=device)
    at_min = torch.where(time == t_min[dom], index, time.numel())
    first = torch.full((n_doms,), time.numel(), device=device).scatter_reduce(
        0, dom, at_min, "amin"
    )  # (D,) the earliest pulse; of equal times, the first in the batch's order
    t = t_min.double()
    x = batch.dom_xyz.double()
    hlc = batch.pulses[first, 2] == 0

    def per_event(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((n_events, *v.shape[1:]), dtype=torch.float64, device=device)
        return out.index_add_(0, ev, v)

    n_hlc = per_event(hlc.double())
    w0 = (hlc | (n_hlc[ev] < MIN_HLC_HITS)).double()
    w = w0
    for it in range(iterations + 1):
        sw = per_event(w)
        sw_safe = torch.where(sw > 0, sw, torch.ones_like(sw))
        dt = t - (per_event(w * t) / sw_safe)[ev]
        var_t = per_event(w * dt * dt) / sw_safe
        dx = x - (per_event(w[:, None] * x) / sw_safe[:, None])[ev]
        cov = per_event((w * dt)[:, None] * dx) / sw_safe[:, None]
        ok = (sw > 0) & (var_t > _MIN_TIME_VARIANCE_NS2)
        v = torch.where(
            ok[:, None], cov / torch.where(ok, var_t, torch.ones_like(var_t))[:, None], 0.0
        )
        if it == iterations:
            break
        resid = torch.linalg.vector_norm(dx - v[ev] * dt[:, None], dim=1)
        w = w0 * torch.where(
            resid > huber_radius_m, huber_radius_m / resid.clamp_min(1e-12), torch.ones_like(resid)
        )
    speed = torch.linalg.vector_norm(v, dim=1)
    ok = ok & (speed > 0)
    direction = -v / torch.where(ok, speed, torch.ones_like(speed))[:, None]
    fallback = torch.tensor(FALLBACK, dtype=torch.float64, device=device)
    return torch.where(ok[:, None], direction, fallback).float()
