"""Is a direction model learning, or has it collapsed onto one direction?

A network whose predictions all point the same way (a *collapsed* model) still "improves" its
held-out loss whenever the held-out directions lean one way: it only has to turn its one
direction toward their mean. So a falling loss is evidence of learning only when it beats the
**best constant direction** on the same events. Two numbers say which case a validation is in:

* :func:`resultant_length` R of the unit predictions: the length of their mean vector; 1 when
  every event gets the same direction, ~0 for directions spread over the sphere. A model that
  learns follows the targets, whose own R is small on an isotropic sample (~0.02-0.08 for
  1,000 synthetic events).
* :func:`best_constant` the constant direction with the lowest mean angular error on the same
  events (the spherical median of the targets) and that error: the bar a model has to clear.

:func:`collapse_stats` computes both for one validation; :func:`learned` is the rule the
stability table and the sweep use: the model's per-event errors are below the best constant's by
more than :data:`LEARNED_Z` paired standard errors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from iceaggr.models.losses import angular_distance

COLLAPSE_RESULTANT = 0.9
"""R at or above which a model's predictions count as collapsed onto one direction.

Measured on the synthetic data (1,024 held-out events; README, "Collapse"): the original
network, normalized, has R 0.995 at initialisation and 0.99999 after 20 or 1,500 steps, while a
model that learns has R near the targets' own (0.02-0.08) once it beats the line fit. 0.9 sits
far from both."""
LEARNED_Z = 2.0
"""A model has *learned* when its mean per-event error is below the best constant direction's
by more than this many paired standard errors (about 97.7% one-sided)."""
_GRID = 2048
"""Candidate directions (a Fibonacci sphere) searched before the refinement; their spacing,
~4.5 degrees, leaves the refinement well inside the basin of the optimum."""


def unit(v: torch.Tensor) -> torch.Tensor:
    """(N, 3) rows of ``v`` scaled to unit length (a zero row stays zero)."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def resultant_length(directions: torch.Tensor) -> float:
    """Mean resultant length R in [0, 1] of (N, 3) directions (made unit first): the length of
    their mean unit vector. 1 when all point the same way; 0 for exactly opposite pairs."""
    if directions.ndim != 2 or directions.shape[-1] != 3 or directions.shape[0] == 0:
        raise ValueError(
            f"expected (N, 3) directions with N >= 1, got shape {tuple(directions.shape)}"
        )
    return float(unit(directions.double()).mean(0).norm())


def fibonacci_sphere(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, 3) nearly uniform unit vectors (the golden-angle spiral)."""
    i = torch.arange(n, dtype=dtype) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    r = (1.0 - z * z).clamp_min(0.0).sqrt()
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1)


def best_constant(targets: torch.Tensor, iterations: int = 100) -> tuple[torch.Tensor, float]:
    """(direction (3,), mean angular error in rad) of the constant prediction with the lowest
    mean angular error on unit ``targets`` (N, 3): the spherical median.

    The best of a 2,048-direction grid and the mean direction, refined by the spherical
    Weiszfeld iteration ``v <- normalize(sum_i u_i / sin(theta_i))`` (the fixed point of the
    gradient of ``sum_i theta_i``), keeping the best point seen, in float64.
    """
    u = unit(targets.detach().double().cpu())  # (N, 3)
    if u.ndim != 2 or u.shape[-1] != 3 or u.shape[0] == 0:
        raise ValueError(f"expected (N, 3) targets with N >= 1, got shape {tuple(targets.shape)}")
    candidates = torch.cat([fibonacci_sphere(_GRID), unit(u.mean(0, keepdim=True))])  # (G+1, 3)
    errors = torch.arccos((candidates @ u.T).clamp(-1.0, 1.0)).mean(1)  # (G+1,)
    best = int(errors.argmin())
    v, best_err = candidates[best], float(errors[best])
    best_v = v
    for _ in range(iterations):
        cos = (u @ v).clamp(-1.0, 1.0)  # (N,)
        sin = (1.0 - cos * cos).clamp_min(0.0).sqrt().clamp_min(1e-9)
        nxt = unit((u / sin[:, None]).sum(0, keepdim=True))[0]  # (3,)
        err = float(torch.arccos((u @ nxt).clamp(-1.0, 1.0)).mean())
        if err < best_err - 1e-15:
            best_v, best_err = nxt, err
        if float((nxt - v).norm()) < 1e-12:
            break
        v = nxt
    return best_v, best_err


@dataclass(frozen=True)
class CollapseStats:
    """One validation's collapse signals (every angle in rad)."""

    resultant: float
    """R of the unit predictions (1 = one direction for every event)."""
    target_resultant: float
    """R of the true directions of the same events (what a perfect model would have)."""
    angle: float
    """Mean angular error of the predictions."""
    const_angle: float
    """Mean angular error of the best constant direction on the same events."""
    margin_stderr: float
    """Paired standard error of ``angle - const_angle`` over the events."""
    events: int

    @property
    def margin(self) -> float:
        """``angle - const_angle``: below zero when the model beats every constant."""
        return self.angle - self.const_angle

    @property
    def learned(self) -> bool:
        return learned(self.margin, self.margin_stderr)

    def collapsed(self, threshold: float = COLLAPSE_RESULTANT) -> bool:
        return self.resultant >= threshold

    def to_dict(self) -> dict[str, float]:
        """The fields and ``margin`` (what a :class:`TrainResult` keeps as JSON)."""
        return asdict(self) | {"margin": self.margin}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CollapseStats:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        """``{prefix}_resultant``, ``{prefix}_target_resultant``, ``{prefix}_const_angle``,
        ``{prefix}_vs_const`` (the margin) for MLflow and Tune."""
        return {
            f"{prefix}_resultant": self.resultant,
            f"{prefix}_target_resultant": self.target_resultant,
            f"{prefix}_const_angle": self.const_angle,
            f"{prefix}_vs_const": self.margin,
        }


def learned(margin: float | None, stderr: float | None, z: float = LEARNED_Z) -> bool:
    """The model beats the best constant direction: ``margin + z * stderr < 0``."""
    if margin is None or not math.isfinite(margin):
        return False
    return margin + z * (stderr if stderr is not None and math.isfinite(stderr) else 0.0) < 0.0


def collapse_stats(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    const: tuple[torch.Tensor, float] | None = None,
) -> CollapseStats:
    """Collapse signals of (N, 3) ``predictions`` against unit ``targets`` (N, 3); ``const`` is
    :func:`best_constant` of the targets when already known (it depends on the targets only)."""
    pred = predictions.detach().double().cpu()
    tgt = targets.detach().double().cpu()
    direction, _ = const if const is not None else best_constant(tgt)
    errors = angular_distance(pred, tgt)  # (N,) rad
    const_errors = torch.arccos((unit(tgt) @ direction.double()).clamp(-1.0, 1.0))  # (N,)
    diff = errors - const_errors  # (N,) paired
    n = int(tgt.shape[0])
    stderr = float(diff.std() / math.sqrt(n)) if n > 1 else float("inf")
    return CollapseStats(
        resultant=resultant_length(pred),
        target_resultant=resultant_length(tgt),
        angle=float(errors.mean()),
        const_angle=float(const_errors.mean()),
        margin_stderr=stderr,
        events=n,
    )
