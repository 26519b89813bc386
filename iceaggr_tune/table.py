"""The sweep's stability table: one Tune trial per (learning rate, column, seed) cell.

A column is a network and its input normalization (:data:`iceaggr.training.probe.COLUMNS`);
each cell trains under the original protocol (:func:`iceaggr.training.probe.probe_config`) in
its trial and is classified where it trained; :func:`table_cells` collects the cells the trials
reported.
"""

from __future__ import annotations

import logging
from typing import Any

from iceaggr.training.config import ExperimentConfig
from iceaggr.training.probe import CELL_METRIC, COLUMNS, Cell, Column
from iceaggr_tune.fit import _settings, fit_part
from iceaggr_tune.options import SweepOptions

log = logging.getLogger(__name__)


def run_table(opts: SweepOptions, base: ExperimentConfig, parent: str, tune_root: str):
    """The stability table: one trial per (learning rate, column, seed) cell, a column being a
    network and its normalization, each built by :func:`iceaggr.training.probe.probe_config` in the
    trial and classified where it trained."""
    from ray import tune

    settings = _settings(opts, base, "table", parent, tune_root)
    space = {
        "lr": tune.grid_search(list(opts.table.lrs)),
        "column": tune.grid_search([c.key for c in table_columns(opts)]),
        "seed": tune.grid_search(list(range(table_seeds(opts)))),
    }
    results = fit_part("table", settings, opts, tune_root, space)
    return table_cells(results), results


def table_seeds(opts: SweepOptions) -> int:
    seeds = opts.resolved().table.seeds
    assert seeds is not None  # resolved() fills every resource-dependent default
    return seeds


def table_columns(opts: SweepOptions) -> list[Column]:
    """The table's columns for ``opts``: those of its networks (default: the original's on
    CPUs, both on GPUs), the JSON-only ones when ``table.hidden_columns`` (default: on
    GPUs)."""
    t = opts.resolved().table
    return [c for c in COLUMNS if c.arch in (t.models or ()) and (c.shown or t.hidden_columns)]


def table_trials(opts: SweepOptions) -> int:
    """Trials of the table: learning rates x columns x seeds."""
    return len(opts.table.lrs) * len(table_columns(opts)) * table_seeds(opts)


def table_cells(results: Any) -> list[Cell]:
    """The cells the table trials reported (:meth:`iceaggr.training.probe.Cell.to_metrics`)."""
    cells = []
    for r in results:
        metrics = r.metrics or {}
        if r.error is None and CELL_METRIC in metrics:
            cells.append(Cell.from_metrics(metrics))
        elif r.error is None and metrics.get("completed"):
            log.warning("table trial %s ended without a cell in its last report", r.path)
    return cells
