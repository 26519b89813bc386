"""Direction losses and the competition metric, all in torch and on the tensors' device.

- :func:`angular_distance` / :func:`angular_distance_loss`: the angle (rad) between predicted
  and true directions; the stability table's loss.
- :func:`vmf_nll` / :func:`vmf_loss`: von Mises-Fisher negative log-likelihood on the sphere
  (closed form for 3-D), stable from kappa 1e-4 to 1e5.
- :func:`training_loss`: the loss a run trains on, chosen by ``train.loss`` (``angular`` or
  ``vmf``).
- :func:`angles_to_vector`, :func:`vector_to_angles`: Kaggle (azimuth, zenith) <-> unit vector
  ``(cos az sin zen, sin az sin zen, cos zen)``.
- :func:`competition_metric`: the Kaggle score, ``mean(arccos(clip(v_true . v_pred, -1, 1)))``.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

LossKind = Literal["angular", "vmf"]
LOSS_KINDS: tuple[LossKind, ...] = ("angular", "vmf")

LOG_2PI = math.log(2.0 * math.pi)
TWO_PI = 2.0 * math.pi


def _safe_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last axis with a zero (not NaN) gradient at the zero vector."""
    sq = (x * x).sum(-1)
    nonzero = sq > 0
    return torch.where(nonzero, torch.where(nonzero, sq, 1.0).sqrt(), 0.0)


def angular_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) angle in rad, in [0, pi], between ``pred`` (B, 3) and ``target`` (B, 3).

    ``pred`` need not be unit length (it must be nonzero). Computed as ``atan2(|a x b|, a . b)``,
    which is accurate near 0 and pi where ``acos`` of a dot product loses precision and has an
    infinite derivative. At exactly parallel or antiparallel vectors the gradient is finite (zero:
    the subgradient of the cone |angle| at its tip).
    """
    cross = torch.linalg.cross(pred, target, dim=-1)  # (B, 3)
    dot = (pred * target).sum(-1)  # (B,)
    return torch.atan2(_safe_norm(cross), dot)


def angular_distance_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scalar mean angular distance (rad); random guessing gives pi/2."""
    return angular_distance(pred, target).mean()


def vmf_nll(direction: torch.Tensor, kappa: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) von Mises-Fisher negative log-likelihood of unit ``target`` (B, 3).

    ``direction`` (B, 3) is the unit mean direction mu, ``kappa`` (B,) > 0 the concentration.
    The 3-D density is ``kappa / (4 pi sinh kappa) exp(kappa mu . x)``; its negative log, with
    ``sinh`` rewritten so that neither large nor small kappa overflows or cancels, is
    ``kappa (1 - mu . x) - log kappa + log(-expm1(-2 kappa)) + log(2 pi)``.
    """
    dot = (direction * target).sum(-1)  # (B,)
    return kappa * (1.0 - dot) - torch.log(kappa) + torch.log(-torch.expm1(-2.0 * kappa)) + LOG_2PI


def vmf_loss(direction: torch.Tensor, kappa: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scalar mean of :func:`vmf_nll`."""
    return vmf_nll(direction, kappa, target).mean()


def training_loss(
    kind: LossKind, direction: torch.Tensor, kappa: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Scalar training loss of ``kind``: :func:`angular_distance_loss` (``angular``, the
    stability table's) or :func:`vmf_loss` (``vmf``) of ``direction`` (B, 3), ``kappa`` (B,)
    and unit ``target`` (B, 3)."""
    if kind == "angular":
        return angular_distance_loss(direction, target)
    if kind == "vmf":
        return vmf_loss(direction, kappa, target)
    raise ValueError(f"unknown loss {kind!r}; use one of {list(LOSS_KINDS)}")


def angles_to_vector(azimuth: torch.Tensor, zenith: torch.Tensor) -> torch.Tensor:
    """(..., 3) unit vector ``(cos az sin zen, sin az sin zen, cos zen)`` from angles in rad."""
    sin_zen = torch.sin(zenith)
    return torch.stack(
        [torch.cos(azimuth) * sin_zen, torch.sin(azimuth) * sin_zen, torch.cos(zenith)], dim=-1
    )


def vector_to_angles(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(azimuth in [0, 2 pi), zenith in [0, pi]) in rad from (..., 3) vectors of any length."""
    x, y, z = v.unbind(-1)
    azimuth = torch.remainder(torch.atan2(y, x), TWO_PI)
    azimuth = torch.where(azimuth >= TWO_PI, azimuth - TWO_PI, azimuth)  # rounding of -tiny
    zenith = torch.atan2(torch.hypot(x, y), z)
    return azimuth, zenith


def competition_metric(
    az_true: torch.Tensor | np.ndarray,
    zen_true: torch.Tensor | np.ndarray,
    az_pred: torch.Tensor | np.ndarray,
    zen_pred: torch.Tensor | np.ndarray,
) -> float:
    """The Kaggle score in rad: ``mean(arccos(clip(v_true . v_pred, -1, 1)))``, in float64."""
    args = [torch.as_tensor(a, dtype=torch.float64) for a in (az_true, zen_true, az_pred, zen_pred)]
    v_true = angles_to_vector(args[0], args[1])  # (B, 3)
    v_pred = angles_to_vector(args[2], args[3])  # (B, 3)
    dot = (v_true * v_pred).sum(-1).clamp(-1.0, 1.0)  # (B,)
    return float(torch.arccos(dot).mean())
