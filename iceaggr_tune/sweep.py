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

The parts live beside this driver: :mod:`iceaggr_tune.table` (the stability table),
:mod:`iceaggr_tune.search` (the Optuna search), :mod:`iceaggr_tune.fit` (a part as one Tune
experiment) and :mod:`iceaggr_tune.mlflow_runs` (the sweep's MLflow runs).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iceaggr.data.remote import is_uri
from iceaggr.tracking.client import absolute_tracking_uri, flatten, redact_params, redact_uri
from iceaggr.tracking.run_logger import RunLogger
from iceaggr.training.config import (
    ExperimentConfig,
    apply_overrides,
    baseline_config,
    debug_config,
    from_dict,
    load_config,
    to_dict,
)
from iceaggr.training.probe import Cell
from iceaggr.training.stability_table import write_table
from iceaggr_tune.cluster import check_cluster_storage, check_ray_auth, remote_path
from iceaggr_tune.fit import SPOOL_DIR, _unfinished, trial_overhead
from iceaggr_tune.mlflow_runs import TAG_BEST_DROPOUT, TAG_BEST_LR
from iceaggr_tune.options import DataOptions, SweepOptions
from iceaggr_tune.plots import (
    loss_histories,
    plot_loss_curves,
    plot_search_landscape,
    plot_stability_table,
)
from iceaggr_tune.search import run_search
from iceaggr_tune.table import run_table, table_seeds, table_trials

__all__ = ["SweepError", "SweepOptions", "SweepResult", "run_sweep"]

log = logging.getLogger(__name__)

SWEEP_STATE = "sweep.json"
REDACTED_USER = "://***@"
"""What :func:`~iceaggr.tracking.client.redact_uri` leaves where a URI had credentials."""


class SweepError(ValueError):
    """A sweep that cannot start or resume as asked; the message says what to do."""


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
    from iceaggr.data.cache import FileCache
    from iceaggr.data.dataset import KaggleDataset

    if is_uri(data.path):
        KaggleDataset(data.path, cache=FileCache(data.cache_dir, data.cache_gb)).preflight()
        return data.path
    path = Path(data.path)
    if not (path / "train_meta.parquet").exists():
        from iceaggr.data.synth import write_synthetic_dataset

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
    watch = mlflow_runs.MlflowWatch(uri)
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
            mlflow_runs.sync_left_over_records(spool_dir, uri)
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
    from iceaggr.data.dataset import split_batch_ids
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
