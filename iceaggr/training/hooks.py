"""What a training run tells the outside world: the :class:`Hook` protocol and two plain hooks.

A :class:`~iceaggr.training.trainer.Trainer` calls every hook, in the order given, at these points:

* ``on_start(trainer)``: once, before the first step (the trainer is built, resumed and
  its input audit done: ``trainer.result.input_audit``, ``trainer.start_step``);
* ``on_step(step)``: after every optimizer step (no metrics: reading them would sync the
  device);
* ``on_report(metrics, step, checkpoint_dir)``: every ``train.log_every`` steps and at the
  last step, with the averaged metrics and the checkpoint folder when a checkpoint was just
  written (else None); a true return value asks the run to stop early;
* ``on_diverged(report, metrics, step)``: once, when the divergence guard finds a
  non-finite loss, prediction or gradient (``metrics`` holds the loss and gradient norm of
  ``step``, the step at which it was found; ``report.step`` is the first bad one);
* ``on_end(result)``: once, with the finished :class:`~iceaggr.training.results.TrainResult`.

Hooks must not change ``metrics`` in place (every hook gets the same dict). The MLflow hook
lives in :mod:`iceaggr.tracking`, the Ray Tune one in ``iceaggr_tune.trial``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from iceaggr.training.guard import DivergenceReport
    from iceaggr.training.results import TrainResult
    from iceaggr.training.trainer import Trainer

ReportFn = Callable[[dict[str, float], int, "Path | None"], "bool | None"]
"""``report(metrics, step, checkpoint_dir_or_None)``, called every ``log_every`` steps; a true
return value asks the run to stop early (e.g. an early-stopping rule said so)."""


class Hook:
    """Base class: every method does nothing; override the ones you need."""

    def on_start(self, trainer: Trainer) -> None:
        """Before the first step."""

    def on_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""

    def on_report(
        self, metrics: dict[str, float], step: int, checkpoint_dir: Path | None
    ) -> bool | None:
        """Every ``log_every`` steps; return True to stop the run early."""
        return None

    def on_diverged(self, report: DivergenceReport, metrics: dict[str, float], step: int) -> None:
        """The run diverged; it ends after the hooks return."""

    def on_end(self, result: TrainResult) -> None:
        """The run ended (finished, stopped early or diverged)."""


class CallbackHook(Hook):
    """A plain :data:`ReportFn` as a hook (what ``train(cfg, report=fn)`` passes).

    The function gets every report and, once, the divergence with ``diverged = 1`` and
    ``diverged_at_step`` in the metrics and no checkpoint.
    """

    def __init__(self, fn: ReportFn) -> None:
        self.fn = fn

    def on_report(
        self, metrics: dict[str, float], step: int, checkpoint_dir: Path | None
    ) -> bool | None:
        return self.fn(metrics, step, checkpoint_dir)

    def on_diverged(self, report: DivergenceReport, metrics: dict[str, float], step: int) -> None:
        self.fn(metrics | {"diverged_at_step": float(report.step)}, step, None)


class ProgressHook(Hook):
    """A tqdm bar over the run's steps, with the last reported loss and gradient norm."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        total = trainer.cfg.train.max_steps
        self.bar = tqdm(
            total=total, initial=trainer.start_step, desc=trainer.cfg.name, unit="step", leave=False
        )

    def on_step(self, step: int) -> None:
        self.bar.update(1)

    def on_report(self, metrics: dict[str, float], step: int, checkpoint_dir: Path | None) -> None:
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", gnorm=f"{metrics['grad_norm']:.3g}")

    def on_end(self, result: TrainResult) -> None:
        self.bar.close()
