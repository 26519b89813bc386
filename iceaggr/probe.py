"""The learning-rate stability probe and its table (DESIGN.md sections 1 and 6).

Protocol of the original probe: for each learning rate in 1e-5, 3e-5, 1e-4,
3e-4, 1e-3 and normalization off/on, a fresh model (same seed) trains for 20
steps with AdamW at a constant learning rate, gradient clipping at 1.0, batch
256 and the angular-distance loss. Every cell sees the same batches.

A cell's "Loss" is the change of the angular loss on one fixed held-out batch
(the first validation batch) from before the first step to after the last:
evaluating both ends on the same events removes batch-to-batch sampling noise
(~0.045 rad for 256 events) from a number that is itself ~0.05.

Status of a cell:

* ``❌ EXPLODES``: a non-finite loss, prediction or gradient appeared, or the fixed-batch
  loss before the first or after the last step is not finite;
* ``❌ Loss +x``: the loss did not fall;
* ``⚠️ Loss -x``: it fell, but the largest pre-clip gradient norm crossed
  ``grad_norm_warn``;
* ``✅ Loss -x``: it fell with tame gradients.

Run it in one process with ``iceaggr probe``; ``python tune/lr_sweep.py`` runs
each cell as a Ray Tune trial. Both build a cell's config with :func:`probe_config` and
classify it once, where it trained, with :func:`cell_from_result`; a Tune trial sends the
:class:`Cell` back in its last report (:meth:`Cell.to_metrics`, :meth:`Cell.from_metrics`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from iceaggr.config import ExperimentConfig
from iceaggr.train import TrainResult, train

log = logging.getLogger(__name__)

PROBE_LRS: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
"""The learning rates of the original table."""
PROBE_STEPS = 20
PROBE_BATCH_SIZE = 256

Status = Literal["ok", "warn", "no_decrease", "explodes"]
SYMBOL = {"ok": "✅", "warn": "⚠️", "no_decrease": "❌", "explodes": "❌"}
CELL_METRIC = "cell"
"""Key of the cell (as JSON) in the last report of a table trial to Tune."""


@dataclass
class Cell:
    lr: float
    normalize: bool
    status: Status
    loss_change: float | None
    """Final minus initial loss on the fixed batch (rad); None when it exploded."""
    loss_initial: float | None
    """Fixed-batch loss before the first step (rad); None when not measured or not finite."""
    loss_final: float | None
    """Fixed-batch loss after the last step (rad); None when not measured or not finite."""
    max_grad_norm: float
    """Largest finite pre-clip global gradient norm over the probe."""
    diverged_at_step: int | None = None
    divergence_reason: str | None = None
    """What made the cell explode (the divergence report, or the non-finite fixed-batch loss)."""
    max_abs_input: float | None = None
    """Largest absolute model input (any feature) seen during the probe."""

    @property
    def text(self) -> str:
        if self.status == "explodes":
            return "❌ EXPLODES"
        return f"{SYMBOL[self.status]} Loss {self.loss_change:+.3f}"

    def to_metrics(self) -> dict[str, str]:
        """The cell as one Tune metric: ``{"cell": <JSON>}`` (Tune keeps a string metric as
        it is, through Ray Train's ``TuneReportCallback``, the ``ResultGrid`` and a restore)."""
        return {CELL_METRIC: json.dumps(asdict(self))}

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> Cell:
        """The cell a table trial reported with :meth:`to_metrics`, exactly as it was measured."""
        if CELL_METRIC not in metrics:
            raise ValueError(
                f"no {CELL_METRIC!r} in the trial's metrics {sorted(metrics)}: "
                "not the last report of a table trial"
            )
        return cls(**json.loads(metrics[CELL_METRIC]))


def classify(
    *,
    diverged: bool,
    loss_initial: float | None,
    loss_final: float | None,
    max_grad_norm: float,
    grad_norm_warn: float,
) -> tuple[Status, float | None]:
    """Status and loss change of one cell from what the run measured (a missing or
    non-finite fixed-batch loss at either end counts as an explosion)."""
    if diverged or not _finite(loss_initial) or not _finite(loss_final):
        return "explodes", None
    assert loss_initial is not None and loss_final is not None  # _finite said so
    change = loss_final - loss_initial
    if change >= 0:
        return "no_decrease", change
    if max_grad_norm > grad_norm_warn:
        return "warn", change
    return "ok", change


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def cell_from_result(
    lr: float, normalize: bool, result: TrainResult, grad_norm_warn: float
) -> Cell:
    """The table cell of one probe run: classified here, where the run trained, and only here."""
    initial, final = result.fixed_batch_loss_initial, result.fixed_batch_loss_final
    status, change = classify(
        diverged=result.diverged is not None,
        loss_initial=initial,
        loss_final=final,
        max_grad_norm=result.max_grad_norm,
        grad_norm_warn=grad_norm_warn,
    )
    reason = result.diverged.summary() if result.diverged else None
    if reason is None and status == "explodes":
        reason = f"fixed-batch loss not finite: {initial} before the first step, {final} after"
    inputs = (
        result.diverged.max_abs_input
        if result.diverged
        else {k: v["absmax"] for k, v in result.input_audit.items()}
    )
    return Cell(
        lr=lr,
        normalize=normalize,
        status=status,
        loss_change=change,
        loss_initial=initial if _finite(initial) else None,
        loss_final=final if _finite(final) else None,
        max_grad_norm=result.diverged.max_grad_norm if result.diverged else result.max_grad_norm,
        diverged_at_step=result.diverged.step if result.diverged else None,
        divergence_reason=reason,
        max_abs_input=max(inputs.values(), default=None),
    )


def probe_config(
    base: ExperimentConfig, lr: float, normalize: bool, steps: int, batch_size: int
) -> ExperimentConfig:
    """``base`` turned into one table cell, the only place the protocol is written (``iceaggr
    probe`` and the sweep's table trials both call it): learning rate ``lr`` held constant (no
    warm-up, no decay), ``steps`` steps of ``batch_size`` events, the angular loss logged every
    step, no validation or checkpoints, and a validation set of just the fixed batch. Seed,
    optimizer, gradient clipping and dropout stay what ``base`` says (the sweep's default base:
    dropout 0; ``--set model.dropout=0.1`` changes it for every cell)."""
    cfg = copy.deepcopy(base)
    cfg.name = f"probe-lr{lr:.0e}-{'norm' if normalize else 'raw'}"
    cfg.model.normalize = normalize
    t = cfg.train
    t.lr = lr
    t.max_steps = steps
    t.batch_size = batch_size
    t.warmup_steps = 0
    t.min_lr_ratio = 1.0  # constant learning rate
    t.loss = "angular"
    t.log_every = 1
    t.eval_every = 0
    t.checkpoint_every = 0
    t.mlflow_tracking_uri = None
    cfg.data.max_val_events = batch_size  # only the fixed batch is needed
    return cfg


def run_probe(
    base: ExperimentConfig,
    *,
    lrs: tuple[float, ...] = PROBE_LRS,
    steps: int = PROBE_STEPS,
    batch_size: int = PROBE_BATCH_SIZE,
    progress: bool = True,
) -> list[Cell]:
    """All cells in this process, normalization off then on for each learning rate."""
    cells = []
    with tempfile.TemporaryDirectory(prefix="iceaggr-probe-") as tmp:
        for lr in lrs:
            for normalize in (False, True):
                cfg = probe_config(base, lr, normalize, steps, batch_size)
                cfg.train.out_dir = str(Path(tmp) / cfg.name)
                result = train(cfg, track_fixed_batch=True, progress=progress)
                cell = cell_from_result(lr, normalize, result, base.train.grad_norm_warn)
                log.info("%s: %s (max grad norm %.3g)", cfg.name, cell.text, cell.max_grad_norm)
                cells.append(cell)
    return cells


def format_table(cells: list[Cell]) -> str:
    """Markdown table in the layout of DESIGN.md section 6."""
    by_key = {(c.lr, c.normalize): c for c in cells}
    lrs = sorted({c.lr for c in cells})
    lines = [
        "| Learning Rate | Before Normalization | After Normalization |",
        "|---------------|---------------------|---------------------|",
    ]
    for lr in lrs:
        raw = by_key.get((lr, False))
        norm = by_key.get((lr, True))
        lines.append(
            f"| {lr_label(lr)} | {raw.text if raw else '—'} | {norm.text if norm else '—'} |"
        )
    return "\n".join(lines)


def lr_label(lr: float) -> str:
    """``1e-5``, ``3e-4``, ``1.5e-4``: the table's row label, exact for any learning rate."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def table_json(cells: list[Cell], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"meta": meta or {}, "cells": [asdict(c) | {"text": c.text} for c in cells]}


def write_table(cells: list[Cell], out_dir: str | Path, meta: dict[str, Any] | None = None):
    """Write ``stability_table.md`` and ``stability_table.json``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "stability_table.md"
    js = out / "stability_table.json"
    md.write_text(format_table(cells) + "\n")
    js.write_text(json.dumps(table_json(cells, meta), indent=2))
    return md, js
