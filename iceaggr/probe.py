"""The learning-rate stability probe and its table (DESIGN.md sections 1, 6 and 7).

Protocol of the original probe: for each learning rate in 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, a
fresh model (same seed) trains for 20 steps with AdamW at a constant learning rate, gradient
clipping at 1.0 (after the gradient norms are recorded), batch 256 and the angular-distance
loss. Every cell of a seed sees the same batches.

The table's columns (:data:`COLUMNS`) run the **original project's network**
(``model.arch: original``, :mod:`iceaggr.original`) with raw and with normalized inputs, as
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

from iceaggr.config import ExperimentConfig
from iceaggr.train import TrainResult, train

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


def warn_rule(grad_norm_warn: float) -> str:
    """The table's footnote: what each symbol means, with the threshold in force."""
    return (
        f"✅ the held-out loss fell and no parameter's pre-clip gradient norm exceeded "
        f"{grad_norm_warn:g}; ⚠️ it fell, but some parameter's did (the original's warning "
        f"sign); ❌ Loss: it did not fall; ❌ EXPLODES: a loss, prediction or gradient went "
        f"non-finite."
    )


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
    (:mod:`iceaggr.held_out`)."""
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


@dataclass
class TableCell:
    """What the table shows for one learning rate and column: the worst status over seeds."""

    status: Status
    text: str
    seeds_with_status: int
    seeds: int


def table_cell(seed_cells: list[Cell]) -> TableCell:
    """Worst status over the seeds; "Loss" is the mean change over the seeds with that status;
    ``(k/n seeds)`` when there is more than one seed."""
    worst = max((c.status for c in seed_cells), key=STATUS_ORDER.index)
    with_it = [c for c in seed_cells if c.status == worst]
    if worst == "explodes":
        text = "❌ EXPLODES"
    else:
        mean = sum(c.loss_change for c in with_it) / len(with_it)  # type: ignore[misc]
        text = f"{SYMBOL[worst]} Loss {mean:+.3f}"
    if len(seed_cells) > 1:
        text += f" ({len(with_it)}/{len(seed_cells)} seeds)"
    return TableCell(worst, text, len(with_it), len(seed_cells))


def column_of(cell: Cell) -> Column | None:
    return next(
        (c for c in COLUMNS if c.arch == cell.model and c.normalize == cell.normalize), None
    )


def seeds_by_cell(cells: list[Cell]) -> dict[tuple[float, Column], list[Cell]]:
    """The seeds of each table cell, keyed by (learning rate, column), in seed order."""
    groups: dict[tuple[float, Column], list[Cell]] = {}
    for cell in cells:
        col = column_of(cell)
        if col is not None:
            groups.setdefault((cell.lr, col), []).append(cell)
    return {key: sorted(g, key=lambda c: c.seed) for key, g in groups.items()}


def table_cells(cells: list[Cell]) -> dict[tuple[float, Column], TableCell]:
    """Seeds grouped into table cells, keyed by (learning rate, column)."""
    return {key: table_cell(g) for key, g in seeds_by_cell(cells).items()}


def format_table(
    cells: list[Cell], grad_norm_warn: float | None = None, original_measure: bool = False
) -> str:
    """Markdown table in the layout of DESIGN.md section 6, one column more (this project's
    model, raw inputs); the ⚠️ rule as a footnote when ``grad_norm_warn`` is given; with
    ``original_measure``, a second table under it: the original's own number per cell."""
    grouped = table_cells(cells)
    shown = [c for c in COLUMNS if c.shown and any(k[1] == c for k in grouped)]
    lines = _markdown_rows(grouped, shown, lambda tc: tc.text)
    if grad_norm_warn is not None:
        lines += ["", warn_rule(grad_norm_warn)]
    if original_measure:
        lines += ["", ORIGINAL_MEASURE_TITLE, ""]
        lines += _markdown_rows(seeds_by_cell(cells), shown, _mean_train_change)
    return "\n".join(lines)


ORIGINAL_MEASURE_TITLE = (
    "The original's own number, last minus first training-batch loss (rad; mean over seeds, "
    "— where every seed exploded): it mixes learning with which events the two batches hold."
)


def _mean_train_change(seed_cells: list[Cell]) -> str:
    values = [c.train_loss_change for c in seed_cells if c.status != "explodes"]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return f"{sum(finite) / len(finite):+.3f}" if finite else "—"


def _markdown_rows(grouped: dict, shown: list[Column], text: Any) -> list[str]:
    """Header and one row per learning rate; ``text(value)`` for each present cell."""
    lines = [
        "| Learning Rate | " + " | ".join(c.title for c in shown) + " |",
        "|---------------|" + "|".join("-" * 21 for _ in shown) + "|",  # DESIGN.md's widths
    ]
    for lr in sorted({lr for lr, _ in grouped}):
        texts = [text(grouped[(lr, c)]) if (lr, c) in grouped else "—" for c in shown]
        lines.append(f"| {lr_label(lr)} | " + " | ".join(texts) + " |")
    return lines


def lr_label(lr: float) -> str:
    """``1e-5``, ``3e-4``, ``1.5e-4``: the table's row label, exact for any learning rate."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def table_json(cells: list[Cell], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every seed of every cell, and the table as shown (worst status over seeds)."""
    grouped = table_cells(cells)
    return {
        "meta": meta or {},
        "columns": [asdict(c) for c in COLUMNS],
        "cells": [asdict(c) | {"text": c.text} for c in cells],
        "table": [
            {"lr": lr, "model": col.arch, "normalize": col.normalize, "column": col.title}
            | asdict(tc)
            for (lr, col), tc in sorted(
                grouped.items(), key=lambda kv: (kv[0][0], COLUMNS.index(kv[0][1]))
            )
        ],
    }


def write_table(cells: list[Cell], out_dir: str | Path, meta: dict[str, Any] | None = None):
    """Write ``stability_table.md`` (with the ⚠️ rule when ``meta`` has ``grad_norm_warn``)
    and ``stability_table.json``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "stability_table.md"
    js = out / "stability_table.json"
    md.write_text(
        format_table(cells, (meta or {}).get("grad_norm_warn"), original_measure=True) + "\n"
    )
    js.write_text(json.dumps(table_json(cells, meta), indent=2))
    return md, js
