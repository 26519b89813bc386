"""The learning-rate sweep: the stability table and an Optuna search, on Ray Tune.

``python tune/lr_sweep.py`` (see ``--help``) calls :func:`run_sweep` with the
:class:`~iceaggr_tune.options.SweepOptions` its flags give. It

1. starts a local Ray (or joins ``--address`` / ``RAY_ADDRESS``);
2. makes the synthetic dataset on first use (cached in ``--data``);
3. opens the sweep's MLflow parent run (``sqlite:///mlflow.db`` unless
   ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` says otherwise);
4. runs the **stability table**: 5 learning rates x columns (the original network
   before/after normalization, this project's model raw, and normalized in the JSON
   on GPUs or with ``--table-hidden-columns``) x seeds under the original protocol
   (20 steps, batch 256, AdamW, clip 1.0, angular loss), each cell a Tune trial;
   prints it and saves Markdown + JSON + PNG + MLflow artifacts;
5. runs the **Optuna search** (TPE) over learning rate and dropout of this
   project's normalized model, warm-started with the best learning rates of its
   table column when that ran, with ASHA stopping poor trials early; reports the
   best configuration, the search's trials and where the trials' time went.

Defaults that depend on where trials train (search steps and batch, report
interval, table seeds and columns) come from
:func:`~iceaggr_tune.options.preset_for` (CPU or GPU) unless a flag sets them.

``--resume`` continues an interrupted sweep: Tune restores finished trials from
its experiment state instead of running them again, and the MLflow runs are found
again by their ``trial_id`` tags, never duplicated.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iceaggr.config import (
    ExperimentConfig,
    apply_overrides,
    baseline_config,
    debug_config,
    from_dict,
    load_config,
    to_dict,
)
from iceaggr.probe import CELL_METRIC, COLUMNS, Cell, Column
from iceaggr.remote import is_uri
from iceaggr.stability_table import write_table
from iceaggr.tracking import (
    RunLogger,
    absolute_tracking_uri,
    flatten,
    redact_params,
    redact_uri,
    sync_spool,
)
from iceaggr_tune.cluster import check_cluster_storage, check_ray_auth, ray_storage, remote_path
from iceaggr_tune.early_stop import create_board, rung_reports
from iceaggr_tune.mlflow_runs import TAG_BEST_DROPOUT, TAG_BEST_LR
from iceaggr_tune.mlflow_watch import MlflowWatch
from iceaggr_tune.options import (
    DataOptions,
    EarlyStopOptions,
    ResourceOptions,
    SearchOptions,
    SweepOptions,
)
from iceaggr_tune.plots import (
    loss_histories,
    plot_loss_curves,
    plot_search_landscape,
    plot_stability_table,
)

__all__ = ["SweepError", "SweepOptions", "SweepResult", "run_sweep"]

log = logging.getLogger(__name__)

SWEEP_STATE = "sweep.json"
OPTUNA_STUDY = "search"
SPOOL_DIR = "mlflow-spool"
"""Folder of a sweep where trials keep MLflow records not sent yet (folder storage)."""
NODE_SPOOL_DIR = f"~/.cache/iceaggr/{SPOOL_DIR}"
HELD_OUT_DIR = "held-out-initial"
"""Folder of a sweep where table cells share the untrained model's held-out score."""
NODE_HELD_OUT_DIR = f"~/.cache/iceaggr/{HELD_OUT_DIR}"
REDACTED_USER = "://***@"
"""What :func:`~iceaggr.tracking.redact_uri` leaves where a URI had credentials."""


class SweepError(ValueError):
    """A sweep that cannot start or resume as asked; the message says what to do."""


def optuna_storage_url(sweep_dir: Path) -> str:
    """The sweep's Optuna study: ``optuna.load_study(study_name="search", storage=<this>)``."""
    return f"sqlite:///{sweep_dir / 'optuna.db'}"


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    table: list[Cell] | None = None
    table_markdown: str | None = None
    """The table as printed and saved (``stability_table.md``), with its footnote."""
    links: dict[str, str] = field(default_factory=dict)
    """MLflow UI pages of the sweep (:func:`iceaggr_tune.mlflow_runs.ui_links`)."""
    best: dict[str, Any] | None = None
    search_trials: list[dict[str, Any]] = field(default_factory=list)
    """One row per search trial (:func:`iceaggr_tune.summary.search_rows`)."""
    references: dict[str, float] = field(default_factory=dict)
    """Line fit and random guessing on the search's validation events (rad)."""
    interrupted: bool = False
    wall_seconds: float = 0.0
    part_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each part (``table``, ``search``) from its start to its summary."""
    overhead: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- set-up


def base_experiment(opts: SweepOptions) -> ExperimentConfig:
    """The sweep's base config: ``--config`` (default: the baseline, with ``--smoke-test`` the
    debug config) with the ``--set`` overrides, then the sweep's data and seed."""
    if opts.config:
        cfg = load_config(opts.config, opts.model_overrides)
    else:
        preset = debug_config() if opts.smoke_test else baseline_config()
        data = apply_overrides(to_dict(preset), opts.model_overrides)
        cfg = from_dict(ExperimentConfig, data, "--set")
    data = opts.data
    cfg.data.path = data.path if is_uri(data.path) else str(Path(data.path).resolve())
    cfg.data.cache_dir, cfg.data.cache_gb = data.cache_dir, data.cache_gb
    cfg.data.val_files = 1
    cfg.data.prefetch = 0  # one CPU per worker: no loader thread competing with the step
    cfg.train.seed = opts.seed
    cfg.train.device = "auto"
    return cfg


def ensure_data(data: DataOptions) -> Path | str:
    """The dataset folder, generated from physics on first use, then checked (every batch
    file's footer, columns and row count) before anything starts on Ray, so a cut-off or
    mismatched file stops the sweep at once with its name instead of failing every trial.
    An ``s3://`` dataset is checked where it is (footers by ranged reads), never made."""
    from iceaggr.cache import FileCache
    from iceaggr.dataset import KaggleDataset

    if is_uri(data.path):
        KaggleDataset(data.path, cache=FileCache(data.cache_dir, data.cache_gb)).preflight()
        return data.path
    path = Path(data.path)
    if not (path / "train_meta.parquet").exists():
        from iceaggr.synth import write_synthetic_dataset

        log.info("making %d synthetic events in %s (first use)", data.events, path)
        write_synthetic_dataset(
            path, n_events=data.events, batch_size=data.events_per_file, seed=data.seed
        )
    KaggleDataset(path).preflight()
    return path


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # One extra logical CPU for the trial drivers: they only wait on their TorchTrainer.
    # The dashboard stays on: Ray Train's PlacementGroupCleaner needs its State API to free
    # the worker placement group of a trial that Tune stopped early (ASHA).
    ray.init(num_cpus=(os.cpu_count() or 1) + 1)


def next_sweep_name(storage: Path) -> str:
    i = 1
    while (storage / f"sweep-{i}").exists():
        i += 1
    return f"sweep-{i}"


def latest_sweep_name(storage: Path) -> str | None:
    found = sorted(
        (p for p in storage.glob("sweep-*") if (p / SWEEP_STATE).exists()),
        key=lambda p: (p / SWEEP_STATE).stat().st_mtime,
    )
    return found[-1].name if found else None


def sweep_place(opts: SweepOptions) -> tuple[str, Path, str]:
    """The sweep's name, its local folder and its Tune storage root (checked for --resume)."""
    remote = remote_path(opts.storage_path)
    storage = Path(opts.local_dir if remote else opts.storage_path).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    if opts.resume:
        name = opts.name or latest_sweep_name(storage)
        if name is None or not (storage / name / SWEEP_STATE).exists():
            raise SweepError(
                f"--resume: no sweep {'named ' + opts.name if opts.name else ''} under {storage} "
                f"to resume; run without --resume to start one."
            )
    else:
        name = opts.name or next_sweep_name(storage)
        if (storage / name / SWEEP_STATE).exists():
            raise SweepError(
                f"sweep {name!r} already exists under {storage}; pass --resume to continue it "
                f"or choose another --name."
            )
    sweep_dir = storage / name
    tune_root = f"{opts.storage_path.rstrip('/')}/{name}" if remote else str(sweep_dir)
    return name, sweep_dir, tune_root


def max_concurrent_trials(resources: ResourceOptions) -> int:
    if resources.max_concurrent:
        return resources.max_concurrent
    import ray

    res = ray.cluster_resources()
    workers = resources.workers_per_trial
    limit = max(1, int((res.get("CPU", 1) - 1) // (resources.cpus_per_worker * workers)))
    per_trial = {name: amount * workers for name, amount in resources.worker_resources.items()}
    if resources.use_gpu:
        per_trial["GPU"] = resources.gpus_per_worker * workers
    for name, amount in per_trial.items():
        limit = min(limit, max(1, int(res.get(name, 0) // amount)))
    return limit


# ---------------------------------------------------------------- sweep.json


def write_sweep_state(sweep_dir: Path, parent_run_id: str, opts: SweepOptions) -> Path:
    """``sweep.json``: the parent run and the options, without credentials (as the params)."""
    path = sweep_dir / SWEEP_STATE
    state = {
        "parent_run_id": parent_run_id,
        "tracking_uri": redact_uri(opts.tracking.uri),
        "experiment": opts.tracking.experiment,
        "options": redact_params(flatten(asdict(opts))),
    }
    path.write_text(json.dumps(state, indent=2, default=str))
    return path


def read_sweep_state(sweep_dir: Path, given_uri: str) -> tuple[str, str]:
    """Parent run id and tracking URI of the sweep to resume. The URI is the one the sweep
    started with; ``sweep.json`` keeps it without credentials, so a URI that had some is
    taken from ``given_uri`` (``--tracking-uri`` / ``MLFLOW_TRACKING_URI``) when that is it."""
    path = sweep_dir / SWEEP_STATE
    state = json.loads(path.read_text())
    recorded = state["tracking_uri"]
    if redact_uri(given_uri) == recorded:
        return state["parent_run_id"], given_uri
    if REDACTED_USER in recorded:
        raise SweepError(
            f"{path}: the sweep logs to {recorded}, whose credentials are not stored; pass the "
            "full URI with --tracking-uri (or MLFLOW_TRACKING_URI) to resume it."
        )
    return state["parent_run_id"], recorded


def open_parent_run(opts: SweepOptions, name: str, sweep_dir: Path) -> str:
    """The sweep's MLflow parent run: a new one (``sweep.json`` written), or on --resume the
    recorded one, RUNNING again (``opts.tracking.uri`` set to the sweep's store)."""
    from iceaggr_tune import mlflow_runs

    if opts.resume:
        parent, opts.tracking.uri = read_sweep_state(sweep_dir, opts.tracking.uri)
        mlflow_runs.client_for(opts.tracking.uri).update_run(parent, status="RUNNING")
        return parent
    parent = mlflow_runs.find_or_create_parent(opts.tracking.uri, opts.tracking.experiment, name)
    write_sweep_state(sweep_dir, parent, opts)
    return parent


# ---------------------------------------------------------------- the two parts


def _settings(opts: SweepOptions, base: ExperimentConfig, part: str, parent: str, tune_root: str):
    from iceaggr_tune.trial import TrialSettings

    root, fs = ray_storage(tune_root)
    return TrialSettings(
        base=to_dict(base),
        part=part,
        parent_run_id=parent,
        storage_path=f"{root}/train",
        storage_filesystem=fs,
        tracking=opts.tracking,
        resources=opts.resources,
        report_every=opts.early_stop.report_every,
        table=opts.table if part == "table" else None,
        # Shared with the sweep driver (which sends what dead trials left) when storage is a
        # folder; with s3:// storage, a folder on each training node (`iceaggr mlflow-sync`).
        mlflow_spool_dir=NODE_SPOOL_DIR if remote_path(tune_root) else f"{tune_root}/{SPOOL_DIR}",
        # The untrained score of a table column, shared by its cells (per node on a cluster
        # with remote storage: each node scores each column once).
        held_out_cache=(
            f"{NODE_HELD_OUT_DIR}/{Path(tune_root).name}"
            if remote_path(tune_root)
            else f"{tune_root}/{HELD_OUT_DIR}"
        ),
    )


def _trainable(settings: Any):
    from ray import tune

    from iceaggr_tune.trial import trial_driver

    return tune.with_resources(tune.with_parameters(trial_driver, settings=settings), {"CPU": 0.01})


@dataclass(frozen=True)
class TrialName:
    """``<part>_<trial id>``: a trial's name and folder (a class, so Tune can pickle it)."""

    part: str

    def __call__(self, trial: Any) -> str:
        return f"{self.part}_{trial.trial_id}"


def fit_part(
    part: str,
    settings: Any,
    opts: SweepOptions,
    tune_root: str,
    param_space: dict[str, Any],
    **tune_config: Any,
):
    """Tune experiment ``part`` under ``tune_root``: restored with --resume where Tune saved
    it (finished trials are not run again), else built here; returns its ``ResultGrid``."""
    from ray import tune

    trainable = _trainable(settings)
    root, fs = ray_storage(tune_root)  # s3:// with AWS_ENDPOINT_URL: Ray gets the filesystem
    exp_dir = f"{root}/{part}"
    if opts.resume and tune.Tuner.can_restore(exp_dir, storage_filesystem=fs):
        log.info("resuming %s/%s", tune_root, part)
        tuner = tune.Tuner.restore(
            exp_dir,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
        return tuner.fit()
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent_trials(opts.resources),
            # A finished trial's driver process (torch, Ray Train and MLflow imported) runs the
            # next trial instead of a new process starting and importing them again.
            reuse_actors=True,
            trial_name_creator=TrialName(part),
            trial_dirname_creator=TrialName(part),
            **tune_config,
        ),
        run_config=tune.RunConfig(
            name=part,
            storage_path=root,
            storage_filesystem=fs,
            verbose=1,
            progress_reporter=_reporter(list(param_space)),
        ),
    )
    return tuner.fit()


def _unfinished(results: Any, expected: int) -> int:
    """Trials an interrupted Tuner left to do (never started, or not in a final state)."""
    trials = results._experiment_analysis.trials  # statuses are only on the Trial objects
    open_ = sum(1 for t in trials if t.status not in ("TERMINATED", "ERROR"))
    return open_ + max(0, expected - len(trials))


def run_table(opts: SweepOptions, base: ExperimentConfig, parent: str, tune_root: str):
    """The stability table: one trial per (learning rate, column, seed) cell, a column being a
    network and its normalization, each built by :func:`iceaggr.probe.probe_config` in the
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
    """The cells the table trials reported (:meth:`iceaggr.probe.Cell.to_metrics`)."""
    cells = []
    for r in results:
        metrics = r.metrics or {}
        if r.error is None and CELL_METRIC in metrics:
            cells.append(Cell.from_metrics(metrics))
        elif r.error is None and metrics.get("completed"):
            log.warning("table trial %s ended without a cell in its last report", r.path)
    return cells


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


def _reporter(params: list[str]):
    from ray import tune

    return tune.CLIReporter(
        parameter_columns=params,
        metric_columns=["step", "loss", "val_angle", "max_grad_norm", "diverged", "stopped_early"],
        max_report_frequency=30,
    )


OVERHEAD_PARTS: dict[str, str] = {
    "t_driver_setup_s": "MLflow run and config",
    "t_worker_start_s": "Ray worker-group start",
    "t_setup_s": "data, model, optimizer",
    "t_held_out_s": "held-out set",
    "t_validation_s": "validation",
    "t_checkpoint_s": "checkpoints",
    "t_report_s": "reports (MLflow, Ray, early stop)",
}
"""Where a trial's time outside the training steps goes: the metrics its last report carries
(:func:`iceaggr_tune.trial.train_fn_per_worker`) and their labels."""
WORKER_START_PARTS: dict[str, str] = {
    "t_ray_schedule_s": "controller, placement, process ready",
    "t_ray_process_s": "worker process start-up",
    "t_ray_imports_s": "imports (torch, Ray Train, ours)",
    "t_ray_dist_init_s": "torch.distributed set-up",
    "t_ray_other_s": "other (Ray Train context)",
}
"""The parts of ``t_worker_start_s`` (:func:`iceaggr_tune.worker_start.start_parts`)."""


def trial_overhead(results: Any) -> dict[str, float]:
    """Per-trial wall time (Tune's ``time_total_s``) minus time inside training steps, with the
    mean of each part of :data:`OVERHEAD_PARTS` (and of :data:`WORKER_START_PARTS`, inside
    the worker-group start); ``rest_s`` is what none of them holds (Ray Train's controller and
    worker shutdown, Tune's bookkeeping, the last report's wait); ``peak_memory_mb`` (mean) and
    ``peak_memory_mb_max`` what the workers reported."""
    rows = [
        r.metrics
        for r in results
        if r.metrics
        and r.metrics.get("completed")
        and "time_total_s" in r.metrics
        and "train_seconds" in r.metrics
    ]
    if not rows:
        return {}

    def mean(key: str) -> float:
        return sum(float(m.get(key, 0.0)) for m in rows) / len(rows)

    wall, train = mean("time_total_s"), mean("train_seconds")
    out = {
        "trials": float(len(rows)),
        "mean_trial_wall_s": wall,
        "mean_train_step_s": train,
        "mean_overhead_s": wall - train,
    }
    parts = {key: mean(key) for key in OVERHEAD_PARTS}
    out |= parts
    out |= {key: mean(key) for key in WORKER_START_PARTS if any(key in m for m in rows)}
    if any("peak_memory_mb" in m for m in rows):
        out["peak_memory_mb_max"] = max(float(m.get("peak_memory_mb", 0.0)) for m in rows)
        out["peak_memory_mb"] = mean("peak_memory_mb")
    # The worker's own time outside steps and the parts above are disjoint by construction.
    inside_worker = (
        mean("t_worker_s")
        - train
        - sum(v for k, v in parts.items() if k not in ("t_driver_setup_s", "t_worker_start_s"))
    )
    out["t_worker_other_s"] = inside_worker
    started = parts["t_driver_setup_s"] + parts["t_worker_start_s"]
    out["rest_s"] = wall - started - mean("t_worker_s")
    return out


# ---------------------------------------------------------------- entry point


def run_sweep(opts: SweepOptions) -> SweepResult:
    """The sweep ``opts`` describe: the table, then the search (see the module doc)."""
    from iceaggr_tune import mlflow_runs

    t0 = time.time()
    opts = opts.resolved()  # CPU or GPU defaults (search steps and batch, reports, seeds)
    opts.tracking.uri = absolute_tracking_uri(opts.tracking.uri)
    name, sweep_dir, tune_root = sweep_place(opts)
    base = base_experiment(opts)  # a bad --config or --set fails here, before data and Ray
    ensure_data(opts.data)
    init_ray(opts.address)
    check_ray_auth(opts.allow_unauthenticated_ray)  # before anything runs on the cluster
    check_cluster_storage(opts.tracking.uri, opts.storage_path)  # before any trial starts
    sweep_dir.mkdir(parents=True, exist_ok=True)
    parent = open_parent_run(opts, name, sweep_dir)
    uri = opts.tracking.uri
    plog = RunLogger(uri, run_id=parent, wait_s=opts.tracking.wait_s)
    plog.log_params({"sweep": {k: v for k, v in asdict(opts).items() if k != "resume"}})
    spool_dir = None if remote_path(opts.storage_path) else sweep_dir / SPOOL_DIR
    watch = MlflowWatch(uri)
    watch.start()
    result = SweepResult(name=name, parent_run_id=parent)
    status = "FAILED"
    try:
        run = _Run(opts, base, tune_root, sweep_dir, plog, result)
        if opts.run_table:
            t_part = time.time()
            _table_part(run)
            result.part_seconds["table"] = time.time() - t_part
        if opts.run_search and not result.interrupted:
            t_part = time.time()
            _search_part(run)
            result.part_seconds["search"] = time.time() - t_part
        status = "KILLED" if result.interrupted else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        result.interrupted = True
        raise
    finally:
        if spool_dir is not None:
            _sync_left_over_records(spool_dir, uri)
        mlflow_runs.close_running(uri, parent, "KILLED")
        _log_loss_curves(uri, parent, plog, sweep_dir, name)
        plog.terminate(status)
        try:
            result.links = mlflow_runs.sweep_links(uri, parent)
        except Exception as err:  # the links are a convenience; the sweep's records stand
            log.warning("could not make the MLflow UI links: %s", err)
        watch.stop()
        result.wall_seconds = time.time() - t0
    return result


@dataclass
class _Run:
    """What the two parts of one running sweep share."""

    opts: SweepOptions
    base: ExperimentConfig
    tune_root: str
    sweep_dir: Path
    plog: RunLogger
    result: SweepResult


def _table_part(run: _Run) -> None:
    """Run the table; record it in the result and as Markdown, JSON and PNG artifacts."""
    opts, result = run.opts, run.result
    cells, results = run_table(opts, copy.deepcopy(run.base), result.parent_run_id, run.tune_root)
    result.interrupted |= _unfinished(results, table_trials(opts)) > 0
    result.table = cells
    result.overhead["table"] = trial_overhead(results)  # type: ignore[assignment]
    t = opts.table
    meta = {
        "steps": t.steps,
        "batch_size": t.batch_size,
        "seeds": table_seeds(opts),
        "eval_events": t.eval_events,
        "grad_norm_warn": run.base.train.grad_norm_warn,
        "data": opts.data.path,
    }
    md, js = write_table(cells, run.sweep_dir, meta={**meta, "sweep": result.name})
    result.table_markdown = md.read_text()
    png = plot_stability_table(
        cells, run.sweep_dir / "stability_table.png", {**meta, "sweep": result.name}
    )
    for path in (md, js, png):
        run.plog.log_artifact(path)


def _search_part(run: _Run) -> None:
    """Run the search; record the best trial in the result, best_config.json and tags."""
    opts, result = run.opts, run.result
    best, results, _ = run_search(
        opts,
        copy.deepcopy(run.base),
        result.parent_run_id,
        run.tune_root,
        run.sweep_dir,
        result.table,
    )
    result.interrupted |= _unfinished(results, opts.search.trials) > 0
    result.best = best
    result.overhead["search"] = trial_overhead(results)  # type: ignore[assignment]
    _record_search_landscape(run, results)
    if best is None:
        return
    path = run.sweep_dir / "best_config.json"
    path.write_text(json.dumps(best, indent=2))
    run.plog.log_artifact(path)
    run.plog.log_metrics({"best_val_angle": best["val_angle"]}, step=0)
    run.plog.set_tags(
        {TAG_BEST_LR: f"{best['lr']:.3g}", TAG_BEST_DROPOUT: f"{best['dropout']:.3f}"}
    )


def _record_search_landscape(run: _Run, results: Any) -> None:
    """The search's rows, the line fit and random on the same validation events, as
    ``search_trials.json`` and ``search_landscape.png`` (sweep folder and parent run)."""
    from iceaggr.dataset import split_batch_ids
    from iceaggr_tune.summary import reference_errors, search_rows

    result = run.result
    result.search_trials = search_rows(results)
    try:
        dataset = run.base.data.open()  # an s3:// one reads through the node's data cache
        _, val_ids = split_batch_ids(dataset.batch_ids, 1)
        result.references = reference_errors(
            run.base.data.path, val_ids, run.opts.search.val_events, cache=dataset.cache
        )
    except Exception as err:  # the summary is still useful without the reference lines
        log.warning("could not score the line fit on the validation events: %s", err)
    path = run.sweep_dir / "search_trials.json"
    path.write_text(
        json.dumps({"trials": result.search_trials, "references": result.references}, indent=2)
    )
    png = plot_search_landscape(
        result.search_trials,
        run.sweep_dir / "search_landscape.png",
        f"sweep {result.name}: search (validation on {run.opts.search.val_events} events)",
        result.references,
    )
    for artifact in (path, png):
        run.plog.log_artifact(artifact)


def _sync_left_over_records(spool_dir: Path, uri: str) -> None:
    """Send records that trial processes which died could not deliver to MLflow."""
    if not spool_dir.exists():
        return
    try:
        sent = sync_spool(spool_dir, uri)
    except Exception as err:
        log.error("could not send MLflow records left in %s: %s", spool_dir, err)
        return
    if sent:
        log.warning(
            "sent MLflow records that ended trial processes had left in %s: %s", spool_dir, sent
        )


def _log_loss_curves(uri: str, parent: str, plog: RunLogger, sweep_dir: Path, name: str) -> None:
    """``loss_curves.png`` of every trial on the parent run (a failure here only warns)."""
    from iceaggr_tune import mlflow_runs

    try:
        curves = loss_histories(plog.client, mlflow_runs.child_runs(uri, parent))
        if not curves:
            return
        png = plot_loss_curves(curves, sweep_dir / "loss_curves.png", f"sweep {name}: loss curves")
        plog.log_artifact(png)
    except Exception as err:
        log.warning("could not draw or log loss_curves.png: %s", err)
