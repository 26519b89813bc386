"""What a training run returns: :class:`TrainResult`, written as JSON by :func:`write_result`."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iceaggr.training.guard import DivergenceReport


@dataclass
class TrainResult:
    steps: int
    diverged: DivergenceReport | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    max_grad_norm: float = 0.0
    fixed_batch_loss_initial: float | None = None
    """Mean training loss of the fixed held-out set (``track_fixed_batch``: every event of the
    validation loader, at most ``data.max_val_events``) before the first step."""
    fixed_batch_loss_final: float | None = None
    """The same after the last step (None when the run diverged)."""
    fixed_batch_events: int = 0
    """Events in the fixed held-out set."""
    fixed_batch_initial_shared: bool = False
    """``fixed_batch_loss_initial`` was read from a held-out cache (computed by another run
    from the same initial weights; :mod:`iceaggr.training.held_out`)."""
    fixed_batch_change_stderr: float | None = None
    """Standard error of the final-minus-initial loss change over those events (paired: the
    spread of the per-event changes / sqrt(events)); None after a resume or a divergence."""
    stopped_early: bool = False
    """A hook (e.g. an early-stopping rule) asked the run to stop before ``max_steps``."""
    val_angle: float | None = None
    """Mean angular error (rad) on the validation files: the competition metric."""
    val_collapse: dict[str, float] | None = None
    """Collapse signals of the last validation (:class:`~iceaggr.training.collapse.CollapseStats`: R
    of the predictions, the best constant direction's error on the same events...)."""
    collapsed: bool | None = None
    """The last validation's R >= ``train.collapse_resultant`` (None: never validated)."""
    fixed_collapse_initial: dict[str, float] | None = None
    """Collapse signals of the fixed held-out set before the first step (``track_fixed_batch``)."""
    fixed_collapse_final: dict[str, float] | None = None
    """The same after the last step (None when the run diverged)."""
    input_audit: dict[str, dict[str, float]] = field(default_factory=dict)
    train_seconds: float = 0.0
    """Wall time spent inside training steps (excludes set-up, validation, checkpoints)."""
    events_per_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    max_param_grad_norm: float = 0.0
    """Largest finite pre-clip gradient norm of a single parameter over the run."""
    max_param_grad_name: str | None = None
    """The parameter (``named_parameters`` name) that had it."""
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds of this process outside the training steps: ``setup_s`` (dataset open,
    loaders, model, optimizer, input audit), ``held_out_s`` (the fixed held-out set, read and
    scored before and after), ``validation_s``, ``checkpoint_s`` and ``report_s`` (hooks at
    reports: MLflow, Ray Train reports, early stopping); ``first_step_s``: from the start of
    set-up to the end of the first step (with an ``s3://`` dataset and a cold node cache,
    includes fetching the metadata and the first files)."""

    def add_time(self, key: str, since: float) -> None:
        """Add the ``time.perf_counter()`` seconds elapsed ``since`` to ``timings[key]``."""
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - since

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write_result(result: TrainResult, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result.to_json(), indent=2))
