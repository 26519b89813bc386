"""The sweep's Optuna search over learning rate and dropout of this project's normalized model.

TPE in a sqlite study next to the sweep (:func:`optuna_searcher`), warm-started from the
stability table's column of the searched network (:func:`warm_start`); each trial trains
:func:`search_config` of the base config with its sampled values and is stopped early in-trial
at ASHA rungs (:func:`early_stop_board`, :mod:`iceaggr_tune.early_stop`); :func:`best_trial`
picks the result.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from iceaggr.training.config import ExperimentConfig
from iceaggr.training.probe import Cell
from iceaggr_tune.early_stop import create_board, rung_reports
from iceaggr_tune.fit import _settings, fit_part
from iceaggr_tune.options import EarlyStopOptions, SearchOptions, SweepOptions

OPTUNA_STUDY = "search"


def optuna_storage_url(sweep_dir: Path) -> str:
    """The sweep's Optuna study: ``optuna.load_study(study_name="search", storage=<this>)``."""
    return f"sqlite:///{sweep_dir / 'optuna.db'}"


def search_config(base: ExperimentConfig, search: SearchOptions, early: EarlyStopOptions):
    """``base`` as every search trial trains it (before its sampled lr and dropout)."""
    cfg = copy.deepcopy(base)
    cfg.model.normalize = True
    cfg.train.batch_size = search.batch_size
    cfg.train.max_steps = search.steps
    cfg.train.warmup_steps = max(1, search.steps // 10)
    # The trainer reports (validation, checkpoint, early-stopping rung) only at its logging
    # steps: the logging interval must divide the report interval (25 -> 5, 20 -> 10).
    every = early.report_every
    divisors = [d for d in range(1, every // 2 + 1) if every % d == 0]
    cfg.train.log_every = max(divisors) if divisors else 1
    # Validation (~6 s of a core per 1,000 events for this project's model) where a decision
    # reads it: the early-stopping rungs and the last step (Optuna's value); every report with
    # --validate-every-report.
    n_reports = max(1, search.steps // every)
    rungs = rung_reports(min(early.grace_reports, n_reports), early.reduction_factor, n_reports)
    cfg.train.eval_every = every if early.validate_every_report else 0
    cfg.train.eval_steps = tuple(r * every for r in rungs)
    cfg.train.checkpoint_every = early.report_every
    cfg.data.max_val_events = search.val_events
    return cfg


def warm_start(table: list[Cell] | None, search: SearchOptions, arch: str):
    """Optuna's first points: the two best learning rates of the table's normalized column of
    the searched network ``arch`` (the original network's cells say nothing about ours);
    exploded ones are told to Optuna as penalized points so TPE avoids their region from the
    start."""
    from iceaggr_tune.trial import DIVERGED_PENALTY

    points: list[dict[str, float]] = []
    evaluated: list[dict[str, float]] = []
    norm = [
        c
        for c in table or []
        if c.model == arch and c.normalize and search.lr_min <= c.lr <= search.lr_max
    ]
    # Cells that learned first (they beat the best constant direction), best margin first;
    # then those whose held-out loss fell.
    good = sorted(
        (c for c in norm if c.status in ("ok", "warn")),
        key=lambda c: (not c.learned, c.vs_const if c.vs_const is not None else c.loss_change),
    )
    for c in good[:2]:
        points.append({"lr": c.lr, "dropout": search.dropout_min})
    for c in norm:
        if c.status == "explodes":
            evaluated.append({"lr": c.lr, "dropout": search.dropout_min})
    return points, evaluated, [DIVERGED_PENALTY] * len(evaluated)


def optuna_searcher(opts: SweepOptions, sweep_dir: Path, table: list[Cell] | None, arch: str):
    """TPE in a sqlite study next to the sweep (inspect it with optuna-dashboard or
    ``optuna.load_study``; it survives a restored Tuner), warm-started from the table."""
    import optuna

    from iceaggr_tune.searcher import ValidatedOptunaSearch
    from iceaggr_tune.trial import METRIC, MODE

    points, evaluated, rewards = warm_start(table, opts.search, arch)
    return ValidatedOptunaSearch(
        metric=METRIC,
        mode=MODE,
        study_name=OPTUNA_STUDY,
        storage=optuna.storages.RDBStorage(optuna_storage_url(sweep_dir)),
        sampler=optuna.samplers.TPESampler(seed=opts.seed, n_startup_trials=max(2, len(points))),
        points_to_evaluate=(evaluated + points) or None,
        evaluated_rewards=rewards or None,
    )


@contextmanager
def early_stop_board(name: str, early: EarlyStopOptions, n_reports: int) -> Iterator[str]:
    """The search's detached ASHA board actor, killed when the search ends however it ends
    (it would outlive the driver on a persistent cluster)."""
    import ray

    board = create_board(
        name, min(early.grace_reports, n_reports), early.reduction_factor, n_reports
    )
    try:
        yield name
    finally:
        ray.kill(board)


def run_search(
    opts: SweepOptions,
    base: ExperimentConfig,
    parent: str,
    tune_root: str,
    sweep_dir: Path,
    table: list[Cell] | None,
):
    """The Optuna search, its trials stopped early in-trial (see iceaggr_tune.early_stop for
    why Tune's own ASHAScheduler, which kills trials, is not used with Ray Train V2)."""
    from ray import tune

    from iceaggr_tune.searcher import sparse_metric_reports

    cfg = search_config(base, opts.search, opts.early_stop)
    settings = _settings(opts, cfg, "search", parent, tune_root)
    n_reports = max(1, opts.search.steps // opts.early_stop.report_every)
    settings.board = f"asha-{sweep_dir.name}-{uuid.uuid4().hex[:8]}"
    with early_stop_board(settings.board, opts.early_stop, n_reports):
        searcher = optuna_searcher(opts, sweep_dir, table, cfg.model.arch)
        space = {
            "lr": tune.loguniform(opts.search.lr_min, opts.search.lr_max),
            "dropout": tune.uniform(opts.search.dropout_min, opts.search.dropout_max),
        }
        with sparse_metric_reports():  # reports between validations carry no val_angle
            results = fit_part(
                "search",
                settings,
                opts,
                tune_root,
                space,
                search_alg=searcher,
                num_samples=opts.search.trials,
            )
    return best_trial(results), results, searcher


def best_trial(results: Any) -> dict[str, Any] | None:
    """The finished, not diverged search trial with the lowest validation metric."""
    from iceaggr_tune.summary import finite_or_none
    from iceaggr_tune.trial import METRIC

    candidates = [
        r
        for r in results
        if r.error is None
        and r.metrics
        and not r.metrics.get("diverged")
        and finite_or_none(r.metrics.get(METRIC)) is not None
    ]
    if not candidates:
        return None
    r = min(candidates, key=lambda r: r.metrics[METRIC])
    return {
        "lr": float(r.config["lr"]),
        "dropout": float(r.config["dropout"]),
        METRIC: float(r.metrics[METRIC]),
        "steps": int(r.metrics.get("step", 0)),
        "trial_id": r.metrics.get("trial_id"),
        "stopped_early": bool(r.metrics.get("stopped_early")),
    }
