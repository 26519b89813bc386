"""The learning-rate stability probe and its table (DESIGN.md sections 1, 6 and 7).

Protocol of the original probe: for each learning rate in 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, a
fresh model (same seed) trains for 20 steps with AdamW at a constant learning rate, gradient
clipping at 1.0 (after the gradient norms are recorded), batch 256 and the angular-distance
loss. Every cell of a seed sees the same batches.

The table's columns (:data:`COLUMNS`) run the **original project's network**
(``model.arch: original``, :mod:`iceaggr.models.original`) with raw and with normalized inputs, as
the original table did, and this project's model with raw inputs beside them (and normalized,
in the JSON only).

A cell's "Loss" is the change of the angular loss on a fixed held-out set (the first
``eval_events`` validation events, 1,024 by default) from before the first step to after the
last: evaluating both ends on the same events removes the batch-to-batch sampling noise
(~0.05 rad for 256 events) that dominates the original's number, the last minus the first
training-batch loss, which every cell records too (``train_loss_change``), with the standard
error of the held-out change (``loss_change_stderr``).

Status of a cell (:func:`classify`, the one place the rule is written):

* ``❌ EXPLODES``: a non-finite loss, prediction or gradient appeared, or the held-out loss
  before the first or after the last step is not finite;
* ``❌ Loss +x``: the held-out loss did not fall;
* ``⚠️ Loss -x``: it fell, but the largest pre-clip gradient norm of a single parameter
  crossed ``train.grad_norm_warn`` (the original's evidence: per-parameter norms of ~110 at
  lr 3e-4 and 4.3e8 at 1e-3 on the raw first layer, ~1 once inputs were normalized);
* ``✅ Loss -x``: it fell with tame gradients.

With several seeds (``seeds``; each a fresh initialisation and its own batch order) a table
cell shows the worst status over its seeds and how many seeds had it (``⚠️ Loss -0.049
(2/3 seeds)``); the JSON keeps every seed.

Run it in one process with ``iceaggr probe``; ``python tune/lr_sweep.py`` runs each cell as a
Ray Tune trial. Both build a cell's config with :func:`probe_config` and classify it once,
where it trained, with :func:`cell_from_result`; a Tune trial sends the :class:`Cell` back in
its last report (:meth:`Cell.to_metrics`, :meth:`Cell.from_metrics`).
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

from iceaggr.training.collapse import learned
from iceaggr.training.config import ExperimentConfig
from iceaggr.training.results import TrainResult
from iceaggr.training.trainer import train

log = logging.getLogger(__name__)

PROBE_LRS: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
"""The learning rates of the original table."""
PROBE_STEPS = 20
PROBE_BATCH_SIZE = 256
PROBE_EVAL_EVENTS = 1024
"""Held-out events the "Loss" is measured on (the same events before and after)."""


@dataclass(frozen=True)
class Column:
    """One column of the table: a network (``model.arch``) and its input normalization."""

    arch: Literal["original", "iceaggr"]
    normalize: bool
    title: str
    shown: bool = True
    """Printed in the Markdown table (all columns are in the JSON)."""

    @property
    def key(self) -> str:
        """``original-raw``, ``original-norm``, ``iceaggr-raw``, ``iceaggr-norm``."""
        return f"{self.arch}-{'norm' if self.normalize else 'raw'}"

    @classmethod
    def by_key(cls, key: str) -> Column:
        for col in COLUMNS:
            if col.key == key:
                return col
        raise ValueError(f"unknown table column {key!r}; choose from {[c.key for c in COLUMNS]}")


COLUMNS: tuple[Column, ...] = (
    Column("original", False, "Before Normalization"),
    Column("original", True, "After Normalization"),
    Column("iceaggr", False, "This project's model, raw inputs"),
    Column("iceaggr", True, "This project's model, normalized", shown=False),
)
"""The original network before and after the fix (the original table's two columns), then
this project's pre-LN model (raw inputs shown, normalized in the JSON)."""
STATUS_ORDER: tuple[str, ...] = ("ok", "warn", "no_decrease", "explodes")
"""From best to worst: a table cell over several seeds shows the worst."""

Status = Literal["ok", "warn", "no_decrease", "explodes"]
SYMBOL = {"ok": "✅", "warn": "⚠️", "no_decrease": "❌", "explodes": "❌"}
CELL_METRIC = "cell"
"""Key of the cell (as JSON) in the last report of a table trial to Tune."""


@dataclass
class Cell:
    """One probe run: one learning rate, column (network and normalization) and seed."""

    lr: float
    normalize: bool
    status: Status
    loss_change: float | None
    """Final minus initial loss on the fixed held-out set (rad); None when it exploded."""
    loss_initial: float | None
    """Held-out loss before the first step (rad); None when not measured or not finite."""
    loss_final: float | None
    """Held-out loss after the last step (rad); None when not measured or not finite."""
    max_grad_norm: float
    """Largest finite pre-clip global gradient norm over the probe."""
    diverged_at_step: int | None = None
    divergence_reason: str | None = None
    """What made the cell explode (the divergence report, or the non-finite held-out loss)."""
    max_abs_input: float | None = None
    """Largest absolute model input (any feature) seen during the probe."""
    model: str = "iceaggr"
    """The network (``model.arch``): ``original`` or ``iceaggr``."""
    seed: int = 0
    """Training seed: initial weights and batch order."""
    train_loss_change: float | None = None
    """The original's number: last minus first training-batch loss (rad)."""
    loss_change_stderr: float | None = None
    """Standard error of ``loss_change`` over the held-out events (paired)."""
    eval_events: int = 0
    """Held-out events the loss change is measured on."""
    max_param_grad_norm: float = 0.0
    """Largest finite pre-clip gradient norm of a single parameter (the ⚠️ evidence)."""
    max_param_grad_name: str | None = None
    """The parameter that had it (``named_parameters`` name)."""
    original_status: Status | None = None
    """The original's rule applied to the original's number (``train_loss_change``): the
    status the published table would have given this cell."""
    resultant_initial: float | None = None
    """Mean resultant length R of the held-out predictions before the first step (1: one
    direction for every event; :mod:`iceaggr.training.collapse`)."""
    resultant_final: float | None = None
    """The same after the last step (None when the cell exploded)."""
    target_resultant: float | None = None
    """R of the held-out events' true directions (what a perfect model would show)."""
    const_loss: float | None = None
    """Mean angular error of the best constant direction on the held-out events (rad)."""
    vs_const: float | None = None
    """Held-out angular error after the last step minus ``const_loss`` (below zero: the model
    beats every constant direction)."""
    vs_const_stderr: float | None = None
    """Paired standard error of ``vs_const`` over the held-out events."""
    stable: bool = False
    """Finite throughout, and no parameter's pre-clip gradient norm above the ⚠️ threshold."""
    learned: bool = False
    """The held-out error after the last step is below the best constant direction's on the
    same events by more than two paired standard errors
    (:func:`iceaggr.training.collapse.learned`): the predictions carry information about each
    event's direction. A collapsed network that
    turns toward the held-out events' mean direction fails it."""
    improved: bool = False
    """The held-out error fell over the steps by more than two paired standard errors. This
    project's model starts from each event's line fit (``model.prior_direction``), so it
    beats the constant before its first step: for it, this says what the steps added."""
    collapsed: bool = False
    """R after the last step >= ``train.collapse_resultant``."""

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
    max_param_grad_norm: float,
    grad_norm_warn: float,
) -> tuple[Status, float | None]:
    """Status and loss change of one cell from what the run measured (a missing or
    non-finite held-out loss at either end counts as an explosion)."""
    if diverged or not _finite(loss_initial) or not _finite(loss_final):
        return "explodes", None
    assert loss_initial is not None and loss_final is not None  # _finite said so
    change = loss_final - loss_initial
    if change >= 0:
        return "no_decrease", change
    if max_param_grad_norm > grad_norm_warn:
        return "warn", change
    return "ok", change


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def cell_from_result(cfg: ExperimentConfig, result: TrainResult) -> Cell:
    """The table cell of one probe run of ``cfg`` (a :func:`probe_config`): classified here,
    where the run trained, and only here."""
    initial, final = result.fixed_batch_loss_initial, result.fixed_batch_loss_final
    diverged = result.diverged
    status, change = classify(
        diverged=diverged is not None,
        loss_initial=initial,
        loss_final=final,
        max_param_grad_norm=result.max_param_grad_norm,
        grad_norm_warn=cfg.train.grad_norm_warn,
    )
    reason = diverged.summary() if diverged else None
    if reason is None and status == "explodes":
        reason = f"held-out loss not finite: {initial} before the first step, {final} after"
    inputs = (
        diverged.max_abs_input
        if diverged
        else {k: v["absmax"] for k, v in result.input_audit.items()}
    )
    first, last = result.first_loss, result.last_loss
    original_status, _ = classify(
        diverged=diverged is not None,
        loss_initial=first,
        loss_final=last,
        max_param_grad_norm=result.max_param_grad_norm,
        grad_norm_warn=cfg.train.grad_norm_warn,
    )
    before = result.fixed_collapse_initial or {}
    after = result.fixed_collapse_final or {}
    resultant_final = after.get("resultant") if status != "explodes" else None
    vs_const = after.get("margin") if status != "explodes" else None
    return Cell(
        lr=cfg.train.lr,
        normalize=cfg.model.normalize,
        status=status,
        loss_change=change,
        loss_initial=initial if _finite(initial) else None,
        loss_final=final if _finite(final) else None,
        max_grad_norm=diverged.max_grad_norm if diverged else result.max_grad_norm,
        diverged_at_step=diverged.step if diverged else None,
        divergence_reason=reason,
        max_abs_input=max(inputs.values(), default=None),
        model=cfg.model.arch,
        seed=cfg.train.seed,
        train_loss_change=last - first if _finite(first) and _finite(last) else None,
        loss_change_stderr=result.fixed_batch_change_stderr,
        eval_events=result.fixed_batch_events,
        max_param_grad_norm=result.max_param_grad_norm,
        max_param_grad_name=result.max_param_grad_name,
        original_status=original_status,
        resultant_initial=before.get("resultant"),
        resultant_final=resultant_final,
        target_resultant=before.get("target_resultant"),
        const_loss=before.get("const_angle"),
        vs_const=vs_const,
        vs_const_stderr=after.get("margin_stderr") if vs_const is not None else None,
        stable=status != "explodes" and result.max_param_grad_norm <= cfg.train.grad_norm_warn,
        learned=learned(vs_const, after.get("margin_stderr")),
        improved=learned(change, result.fixed_batch_change_stderr),
        collapsed=resultant_final is not None and resultant_final >= cfg.train.collapse_resultant,
    )


def probe_config(
    base: ExperimentConfig,
    lr: float,
    normalize: bool,
    steps: int,
    batch_size: int,
    *,
    arch: str | None = None,
    seed: int | None = None,
    eval_events: int = PROBE_EVAL_EVENTS,
) -> ExperimentConfig:
    """``base`` turned into one table cell, the only place the protocol is written (``iceaggr
    probe`` and the sweep's table trials both call it): network ``arch`` (default: the
    base's) with inputs normalized or not, seed ``seed`` (default: the base's), learning rate
    ``lr`` held constant (no warm-up, no decay), ``steps`` steps of ``batch_size`` events, the
    angular loss logged every step, no validation or checkpoints, and a held-out set of
    ``eval_events`` validation events. Model size, optimizer, gradient clipping and dropout
    stay what ``base`` says (the sweep's default base: dropout 0)."""
    cfg = copy.deepcopy(base)
    if arch is not None:
        cfg.model.arch = arch  # type: ignore[assignment]
    cfg.model.normalize = normalize
    t = cfg.train
    if seed is not None:
        t.seed = seed
    cfg.name = f"probe-{cfg.model.arch}-lr{lr:.0e}-{'norm' if normalize else 'raw'}-seed{t.seed}"
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
    cfg.data.max_val_events = eval_events  # only the fixed held-out set is needed
    return cfg


def run_probe(
    base: ExperimentConfig,
    *,
    lrs: tuple[float, ...] = PROBE_LRS,
    steps: int = PROBE_STEPS,
    batch_size: int = PROBE_BATCH_SIZE,
    seeds: int = 1,
    columns: tuple[Column, ...] = COLUMNS,
    eval_events: int = PROBE_EVAL_EVENTS,
    progress: bool = True,
) -> list[Cell]:
    """Every cell in this process: for each learning rate, each column, each seed (the base
    seed, +1, ...); the cells of a column and seed share the untrained model's held-out score
    (:mod:`iceaggr.training.held_out`)."""
    cells = []
    with tempfile.TemporaryDirectory(prefix="iceaggr-probe-") as tmp:
        for lr in lrs:
            for col in columns:
                for k in range(seeds):
                    cfg = probe_config(
                        base, lr, col.normalize, steps, batch_size, arch=col.arch,
                        seed=base.train.seed + k, eval_events=eval_events,
                    )  # fmt: skip
                    cfg.train.out_dir = str(Path(tmp) / cfg.name)
                    cell = cell_from_result(
                        cfg,
                        train(
                            cfg, track_fixed_batch=True, progress=progress,
                            held_out_cache=Path(tmp) / "held-out-initial",
                        ),
                    )  # fmt: skip
                    log.info(
                        "%s: %s (max grad norm %.3g; largest per parameter %.3g in %s)",
                        cfg.name, cell.text, cell.max_grad_norm, cell.max_param_grad_norm,
                        cell.max_param_grad_name,
                    )  # fmt: skip
                    cells.append(cell)
    return cells
