"""The two guards of a training run.

* **input audit** (:func:`audit_inputs`): before the first step, the magnitudes of every model
  input feature are measured on the first batches; a feature larger than
  ``train.input_audit_threshold`` (100) was not normalized and is reported loudly.
* **divergence guard** (:class:`DivergenceGuard`): the first non-finite loss, prediction or
  gradient ends the run with a :class:`DivergenceReport` (step, first parameter whose gradient
  went non-finite, largest pre-clip gradient norm so far, largest absolute model input per
  feature). The checks stay on the device and are read every step on CPU, every
  ``log_every`` steps on CUDA (the flags remember the *first* bad step, so the report is
  exact; at most ``log_every - 1`` wasted steps follow it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from iceaggr.data.batch import DomBatch

log = logging.getLogger(__name__)

DIVERGENCE_KINDS = {1: "non-finite loss", 2: "non-finite prediction", 3: "non-finite gradient"}
"""What the guard found at the first bad step (the first that applies, in this order)."""


@dataclass
class DivergenceReport:
    step: int
    """1-based optimizer step at which the first non-finite value appeared."""
    reason: str
    """``non-finite loss``, ``non-finite prediction`` or ``non-finite gradient``."""
    first_bad_parameter: str | None
    """First parameter (in ``named_parameters`` order) whose gradient was non-finite (if the
    per-parameter norms were finite and only their total overflowed: the largest one)."""
    max_grad_norm: float
    """Largest finite pre-clip global gradient norm seen before divergence."""
    max_abs_input: dict[str, float]
    """Largest absolute value of every model input feature seen so far."""
    last_finite_loss: float | None

    def summary(self) -> str:
        worst = max(self.max_abs_input.items(), key=lambda kv: kv[1], default=("-", 0.0))
        return (
            f"diverged at step {self.step}: {self.reason}"
            + (f" (first in {self.first_bad_parameter})" if self.first_bad_parameter else "")
            + f"; max pre-clip grad norm {self.max_grad_norm:.3g}; largest input "
            f"{worst[0]}={worst[1]:.3g}"
        )


@dataclass
class StepOutput:
    """What one optimizer step measured; every tensor stays on the device (no host sync)."""

    loss: torch.Tensor
    """() training loss of the batch."""
    grad_norm: torch.Tensor
    """() global gradient norm before clipping."""
    param_grad_norms: torch.Tensor
    """(n_params,) per-parameter gradient norms before clipping, in ``Trainer.param_names``
    order (a parameter without a gradient counts as zero)."""
    prediction: torch.Tensor
    """(B, 3) predicted directions."""
    input_absmax: dict[str, torch.Tensor]
    """() largest absolute value of each model input feature in the batch."""
    lr: float
    """The learning rate the step used."""
    events: int
    """Events in the batch."""


class DivergenceGuard:
    """Device-side watch for the first non-finite loss, prediction or gradient.

    :meth:`observe` updates flags on the device after every step (no host sync); they keep
    the *first* bad step, its kind and its first bad parameter, so :meth:`report`, which reads
    them (a sync), is exact however rarely it is called. The guard also keeps the largest
    finite pre-clip global and per-parameter gradient norms and the largest absolute model
    input per feature.
    """

    def __init__(
        self,
        param_names: list[str],
        device: torch.device,
        *,
        max_grad_norm: float = 0.0,
        max_param_grad_norm: float = 0.0,
        max_param_grad_name: str | None = None,
    ) -> None:
        self.param_names = param_names
        self.last_finite_loss: float | None = None
        """The loss of the latest step :meth:`report` saw finite (host float)."""
        self._last_loss: torch.Tensor | None = None
        # -1 / 0: nothing bad yet; kinds are the keys of DIVERGENCE_KINDS.
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._first_bad_kind = torch.zeros((), dtype=torch.long, device=device)
        self._first_bad_param = torch.full((), -1, dtype=torch.long, device=device)
        self._max_norm = torch.full((), max_grad_norm, dtype=torch.float32, device=device)
        self._max_param_norm = torch.full(
            (), max_param_grad_norm, dtype=torch.float32, device=device
        )
        index = param_names.index(max_param_grad_name) if max_param_grad_name else -1
        self._max_param_index = torch.full((), index, dtype=torch.long, device=device)
        self._input_absmax: dict[str, torch.Tensor] = {}

    def observe(self, out: StepOutput, step: int) -> None:
        """Take in optimizer step ``step`` (1-based); device work only."""
        self._last_loss = out.loss
        for name, m in out.input_absmax.items():
            seen = self._input_absmax.get(name)
            self._input_absmax[name] = m if seen is None else torch.maximum(seen, m)
        bad_loss = ~torch.isfinite(out.loss)
        bad_pred = ~torch.isfinite(out.prediction).all()
        bad_grad = ~torch.isfinite(out.grad_norm)
        newly = (bad_loss | bad_pred | bad_grad) & (self._first_bad_step < 0)
        at_step = torch.full_like(self._first_bad_step, step)
        self._first_bad_step = torch.where(newly, at_step, self._first_bad_step)
        kind = torch.where(bad_loss, 1, torch.where(bad_pred, 2, 3))
        self._first_bad_kind = torch.where(newly, kind, self._first_bad_kind)
        # First parameter with a non-finite gradient norm; when every per-parameter norm is
        # finite but their total overflowed, the one with the largest norm (argmax: first max).
        norms = out.param_grad_norms
        bad_idx = torch.argmax(torch.nan_to_num(norms, nan=math.inf, posinf=math.inf))
        self._first_bad_param = torch.where(newly & bad_grad, bad_idx, self._first_bad_param)
        total = out.grad_norm
        finite_total = torch.maximum(self._max_norm, total.float())
        self._max_norm = torch.where(torch.isfinite(total), finite_total, self._max_norm)
        finite = torch.where(torch.isfinite(norms), norms, -1.0)  # (n_params,)
        larger = finite.amax() > self._max_param_norm
        self._max_param_norm = torch.where(larger, finite.amax(), self._max_param_norm)
        self._max_param_index = torch.where(larger, finite.argmax(), self._max_param_index)

    def report(self) -> DivergenceReport | None:
        """Reads the flags (a host sync): the divergence, or None while every step was finite
        (then the latest observed loss becomes :attr:`last_finite_loss`)."""
        bad_step = int(self._first_bad_step)
        if bad_step < 0:
            if self._last_loss is not None:
                self.last_finite_loss = float(self._last_loss)
            return None
        pidx = int(self._first_bad_param)
        return DivergenceReport(
            step=bad_step,
            reason=DIVERGENCE_KINDS[int(self._first_bad_kind)],
            first_bad_parameter=self.param_names[pidx] if pidx >= 0 else None,
            max_grad_norm=self.max_grad_norm,
            max_abs_input={k: float(v) for k, v in self._input_absmax.items()},
            last_finite_loss=self.last_finite_loss,
        )

    @property
    def max_grad_norm(self) -> float:
        """Largest finite pre-clip global gradient norm so far (a host sync)."""
        return float(self._max_norm)

    @property
    def max_param_grad(self) -> tuple[float, str | None]:
        """Largest finite pre-clip per-parameter gradient norm so far and its parameter."""
        index = int(self._max_param_index)
        return float(self._max_param_norm), self.param_names[index] if index >= 0 else None


def audit_inputs(
    model: nn.Module, batches: list[DomBatch], threshold: float
) -> dict[str, dict[str, float]]:
    """Per-feature min/max/mean/absmax of what enters the network; warns above ``threshold``."""
    stats: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for b in batches:
            for name, t in model.input_features(b).items():
                t = t.float()
                s = stats.setdefault(
                    name, {"min": math.inf, "max": -math.inf, "sum": 0.0, "n": 0.0}
                )
                s["min"] = min(s["min"], t.min().item())
                s["max"] = max(s["max"], t.max().item())
                s["sum"] += t.sum().item()
                s["n"] += t.numel()
    out = {}
    for name, s in stats.items():
        absmax = max(abs(s["min"]), abs(s["max"]))
        out[name] = {
            "min": s["min"],
            "max": s["max"],
            "mean": s["sum"] / max(1.0, s["n"]),
            "absmax": absmax,
        }
        if absmax > threshold:
            log.warning(
                "INPUT AUDIT: model input feature '%s' reaches %.4g (threshold %g): it is not "
                "normalized. Raw-scale inputs like this made the original run sit at ~1.5 rad "
                "and die with NaN; set model.normalize=true.",
                name,
                absmax,
                threshold,
            )
    return out
