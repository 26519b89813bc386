"""The learning-rate sweep: the stability table and an Optuna search, on Ray Tune.

``python tune/lr_sweep.py`` (see ``--help``) calls :func:`main`. It

1. starts a local Ray (or joins ``--address`` / ``RAY_ADDRESS``);
2. makes the synthetic dataset on first use (cached in ``--data``);
3. opens the sweep's MLflow parent run (``sqlite:///mlflow.db`` unless
   ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` says otherwise);
4. runs the **stability table**: 5 learning rates x normalization off/on under the
   original protocol (20 steps, batch 256, AdamW, clip 1.0, angular loss), each
   cell a Tune trial; prints it and saves Markdown + JSON + MLflow artifacts;
5. runs the **Optuna search** (TPE) over learning rate and dropout of the
   normalized model, warm-started with the table's best learning rate, with ASHA
   stopping poor trials early; reports the best configuration.

``--resume`` continues an interrupted sweep: Tune restores finished trials from
its experiment state instead of running them again, and the MLflow runs are found
again by their ``trial_id`` tags, never duplicated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iceaggr.config import ExperimentConfig, baseline_config, debug_config, load_config, to_dict
from iceaggr.probe import PROBE_LRS, Cell, classify, write_table
from iceaggr.tracking import DEFAULT_WAIT_S, RunLogger, absolute_tracking_uri, sync_spool
from iceaggr_tune.cluster import check_cluster_storage, check_ray_auth, remote_path
from iceaggr_tune.early_stop import create_board
from iceaggr_tune.mlflow_watch import MlflowWatch
from iceaggr_tune.plots import loss_histories, plot_loss_curves, plot_stability_table

log = logging.getLogger(__name__)

SWEEP_STATE = "sweep.json"
OPTUNA_STUDY = "search"
SPOOL_DIR = "mlflow-spool"
"""Folder of a sweep where trials keep MLflow records not sent yet (folder storage)."""
NODE_SPOOL_DIR = f"~/.cache/iceaggr/{SPOOL_DIR}"
ASHA_REDUCTION_FACTOR = 2
"""At each rung only the best half of the trials recorded so far continue."""


def optuna_storage_url(sweep_dir: Path) -> str:
    """The sweep's Optuna study: ``optuna.load_study(study_name="search", storage=<this>)``."""
    return f"sqlite:///{sweep_dir / 'optuna.db'}"


@dataclass(kw_only=True)
class SweepOptions:
    name: str | None = None
    """Sweep name (Tune experiment folder and MLflow parent run); default: next free ``sweep-N``."""
    config: str | None = None
    """Base experiment YAML; default: the baseline config (d_model 128, 4+4 layers)."""
    data: str = "data/synthetic"
    """Kaggle-layout dataset; made synthetically on first use when missing."""
    events: int = 24_000
    """Synthetic events made on first use."""
    events_per_file: int = 8_000
    """Synthetic events per batch file (the last file validates)."""
    data_seed: int = 0
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "iceaggr-lr-sweep"
    storage_path: str = "runs/sweeps"
    """Tune/Train results and checkpoints; an s3:// or shared path on multi-node clusters."""
    local_dir: str = "runs/sweeps"
    """The driver's own records (sweep.json, tables, Optuna study) when storage is remote."""
    address: str | None = None
    """Ray cluster to join (``auto``, ``ray://...``); None starts a local Ray."""
    table: bool = True
    search: bool = True
    table_lrs: tuple[float, ...] = PROBE_LRS
    table_steps: int = 20
    table_batch_size: int = 256
    trials: int = 8
    search_steps: int = 60
    search_batch_size: int = 64
    lr_min: float = 1e-5
    lr_max: float = 1e-3
    dropout_min: float = 0.0
    dropout_max: float = 0.3
    report_every: int = 10
    """Steps between reports to Tune (each waits for Ray Train's poll)."""
    val_events: int = 1000
    """Validation events scored at each search report (ASHA and Optuna read them)."""
    grace_reports: int = 2
    """ASHA lets every trial report this many times before stopping it."""
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    """0: CPU training; 0.25 puts four one-worker trials on each GPU."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each training worker needs, e.g. ``{"trainer": 1}``."""
    max_concurrent: int | None = None
    """Trials at once; default: what the cluster's CPUs/GPUs allow."""
    max_failures: int = 1
    """Worker-group restarts of a trial (from its last checkpoint) before it errors."""
    mlflow_wait_s: float = DEFAULT_WAIT_S
    """How long MLflow bookkeeping waits for an unreachable tracking server (training goes on
    meanwhile; its records are held and sent when the server is back)."""
    allow_unauthenticated_ray: bool = False
    """Run on a Ray cluster without token authentication (refused by default)."""
    seed: int = 0
    resume: bool = False
    smoke_test: bool = False
    model_overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (self.table or self.search):
            raise ValueError("nothing to run: both the table and the search are disabled")
        if not 0 < self.lr_min < self.lr_max:
            raise ValueError(f"need 0 < lr_min < lr_max, got {self.lr_min}, {self.lr_max}")
        if not 0 <= self.dropout_min <= self.dropout_max < 1:
            raise ValueError(
                "need 0 <= dropout_min <= dropout_max < 1, "
                f"got {self.dropout_min}, {self.dropout_max}"
            )
        for name in ("trials", "search_steps", "table_steps", "report_every", "workers_per_trial"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")

    @classmethod
    def smoke(cls, **kw: Any) -> SweepOptions:
        """The whole path at toy size (a few minutes on 2 CPUs)."""
        defaults: dict[str, Any] = dict(
            smoke_test=True,
            data="data/synthetic-smoke",
            events=1_500,
            events_per_file=500,
            table_lrs=(1e-4, 1e-3),
            table_steps=4,
            table_batch_size=32,
            trials=2,
            search_steps=6,
            search_batch_size=32,
            report_every=3,
            val_events=64,
            grace_reports=1,
        )
        defaults.update(kw)
        return cls(**defaults)


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    table: list[Cell] | None = None
    best: dict[str, Any] | None = None
    interrupted: bool = False
    wall_seconds: float = 0.0
    overhead: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- set-up


def base_experiment(opts: SweepOptions) -> ExperimentConfig:
    if opts.config:
        cfg = load_config(opts.config, opts.model_overrides)
    elif opts.smoke_test:
        cfg = debug_config()
    else:
        cfg = baseline_config()
    cfg.data.path = str(Path(opts.data).resolve())
    cfg.data.val_files = 1
    cfg.data.prefetch = 0  # one CPU per worker: no loader thread competing with the step
    cfg.train.seed = opts.seed
    cfg.train.device = "auto"
    return cfg


def ensure_data(opts: SweepOptions) -> Path:
    """The dataset folder, generated from physics on first use, then checked (every batch
    file's footer, columns and row count) before anything starts on Ray, so a cut-off or
    mismatched file stops the sweep at once with its name instead of failing every trial."""
    from iceaggr.dataset import KaggleDataset

    path = Path(opts.data)
    if not (path / "train_meta.parquet").exists():
        from iceaggr.synth import write_synthetic_dataset

        log.info("making %d synthetic events in %s (first use)", opts.events, path)
        write_synthetic_dataset(
            path, n_events=opts.events, batch_size=opts.events_per_file, seed=opts.data_seed
        )
    KaggleDataset(path).preflight()
    return path


def init_ray(opts: SweepOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    address = opts.address or os.environ.get("RAY_ADDRESS")
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


def max_concurrent_trials(opts: SweepOptions) -> int:
    if opts.max_concurrent:
        return opts.max_concurrent
    import ray

    res = ray.cluster_resources()
    by_cpu = int((res.get("CPU", 1) - 1) // (opts.cpus_per_worker * opts.workers_per_trial))
    limit = max(1, by_cpu)
    per_trial = {
        name: amount * opts.workers_per_trial for name, amount in opts.worker_resources.items()
    }
    if opts.gpus_per_worker > 0:
        per_trial["GPU"] = opts.gpus_per_worker * opts.workers_per_trial
    for name, amount in per_trial.items():
        limit = min(limit, max(1, int(res.get(name, 0) // amount)))
    return limit


# ---------------------------------------------------------------- the two parts


def _settings(opts: SweepOptions, base: ExperimentConfig, part: str, parent: str, tune_root: str):
    from iceaggr_tune.trial import TrialSettings

    return TrialSettings(
        base=to_dict(base),
        part=part,
        tracking_uri=opts.tracking_uri,
        parent_run_id=parent,
        storage_path=f"{tune_root}/train",
        num_workers=opts.workers_per_trial,
        use_gpu=opts.gpus_per_worker > 0,
        cpus_per_worker=opts.cpus_per_worker,
        gpus_per_worker=opts.gpus_per_worker,
        report_every=opts.report_every,
        max_failures=opts.max_failures,
        worker_resources=dict(opts.worker_resources),
        mlflow_wait_s=opts.mlflow_wait_s,
        # Shared with the sweep driver (which sends what dead trials left) when storage is a
        # folder; with s3:// storage, a folder on each training node (`iceaggr mlflow-sync`).
        mlflow_spool_dir=NODE_SPOOL_DIR if remote_path(tune_root) else f"{tune_root}/{SPOOL_DIR}",
    )


def _trainable(settings: Any):
    from ray import tune

    from iceaggr_tune.trial import trial_driver

    return tune.with_resources(tune.with_parameters(trial_driver, settings=settings), {"CPU": 0.01})


def _run_tuner(
    exp_dir: str,
    trainable: Any,
    make_tuner: Any,
    resume: bool,
):
    from ray import tune

    if resume and tune.Tuner.can_restore(exp_dir):
        log.info("resuming %s", exp_dir)
        tuner = tune.Tuner.restore(
            exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = make_tuner()
    return tuner.fit()


def _unfinished(results: Any, expected: int) -> int:
    """Trials an interrupted Tuner left to do (never started, or not in a final state)."""
    trials = results._experiment_analysis.trials  # statuses are only on the Trial objects
    open_ = sum(1 for t in trials if t.status not in ("TERMINATED", "ERROR"))
    return open_ + max(0, expected - len(trials))


def run_table(opts: SweepOptions, base: ExperimentConfig, parent: str, tune_root: str):
    from ray import tune

    cfg = base
    cfg.train.batch_size = opts.table_batch_size
    cfg.train.max_steps = opts.table_steps
    cfg.train.warmup_steps = 0
    cfg.train.min_lr_ratio = 1.0
    cfg.train.loss = "angular"
    cfg.train.log_every = 1
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 0
    cfg.model.dropout = 0.0
    cfg.data.max_val_events = opts.table_batch_size
    settings = _settings(opts, cfg, "table", parent, tune_root)
    trainable = _trainable(settings)
    exp_dir = f"{tune_root}/table"

    def make():
        return tune.Tuner(
            trainable,
            param_space={
                "lr": tune.grid_search(list(opts.table_lrs)),
                "normalize": tune.grid_search([False, True]),
            },
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent_trials(opts),
                trial_name_creator=table_trial_name,
                trial_dirname_creator=table_trial_name,
            ),
            run_config=tune.RunConfig(
                name="table",
                storage_path=tune_root,
                verbose=1,
                progress_reporter=_reporter(["lr", "normalize"]),
            ),
        )

    results = _run_tuner(exp_dir, trainable, make, opts.resume)
    cells = []
    for r in results:
        m = r.metrics or {}
        lr, normalize = float(r.config["lr"]), bool(r.config["normalize"])
        if r.error is not None or not m.get("completed"):
            continue
        loss_i = _finite_or_none(m.get("cell_loss_initial"))
        loss_f = _finite_or_none(m.get("cell_loss_final"))
        status, change = classify(
            diverged=bool(m.get("diverged")),
            loss_initial=loss_i,
            loss_final=loss_f,
            max_grad_norm=float(m.get("max_grad_norm", 0.0)),
            grad_norm_warn=cfg.train.grad_norm_warn,
        )
        cells.append(
            Cell(
                lr=lr,
                normalize=normalize,
                status=status,
                loss_change=change,
                loss_initial=loss_i,
                loss_final=loss_f,
                max_grad_norm=float(m.get("max_grad_norm", 0.0)),
                diverged_at_step=int(m["diverged_at_step"]) if m.get("diverged") else None,
                max_abs_input=_finite_or_none(m.get("cell_max_abs_input")),
            )
        )
    return cells, results


def run_search(
    opts: SweepOptions,
    base: ExperimentConfig,
    parent: str,
    tune_root: str,
    sweep_dir: Path,
    table: list[Cell] | None,
):
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from iceaggr_tune.trial import DIVERGED_PENALTY, METRIC, MODE

    cfg = base
    cfg.model.normalize = True
    cfg.train.batch_size = opts.search_batch_size
    cfg.train.max_steps = opts.search_steps
    cfg.train.warmup_steps = max(1, opts.search_steps // 10)
    cfg.train.log_every = max(1, opts.report_every // 2)
    cfg.train.eval_every = opts.report_every
    cfg.train.checkpoint_every = opts.report_every
    cfg.data.max_val_events = opts.val_events
    settings = _settings(opts, cfg, "search", parent, tune_root)
    n_reports = max(1, opts.search_steps // opts.report_every)
    # Early stopping decided inside the trials (see iceaggr_tune.early_stop for why Tune's own
    # ASHAScheduler, which kills trials, is not used with Ray Train V2).
    settings.board = f"asha-{sweep_dir.name}-{uuid.uuid4().hex[:8]}"
    board = create_board(
        settings.board, min(opts.grace_reports, n_reports), ASHA_REDUCTION_FACTOR, n_reports
    )
    trainable = _trainable(settings)

    # Warm start: the table's normalized learning rates, best first; exploded ones are
    # told to Optuna as penalized points so TPE avoids their region from the start.
    points, evaluated, rewards = [], [], []
    if table:
        norm = [c for c in table if c.normalize and opts.lr_min <= c.lr <= opts.lr_max]
        good = sorted((c for c in norm if c.status in ("ok", "warn")), key=lambda c: c.loss_change)
        for c in good[:2]:
            points.append({"lr": c.lr, "dropout": opts.dropout_min})
        for c in norm:
            if c.status == "explodes":
                evaluated.append({"lr": c.lr, "dropout": opts.dropout_min})
                rewards.append(DIVERGED_PENALTY)
    # The study lives in sqlite next to the sweep, so it can be inspected (optuna-dashboard,
    # optuna.load_study) and survives a restored Tuner.
    searcher = OptunaSearch(
        metric=METRIC,
        mode=MODE,
        study_name=OPTUNA_STUDY,
        storage=optuna.storages.RDBStorage(optuna_storage_url(sweep_dir)),
        sampler=optuna.samplers.TPESampler(seed=opts.seed, n_startup_trials=max(2, len(points))),
        points_to_evaluate=(evaluated + points) or None,
        evaluated_rewards=rewards or None,
    )
    exp_dir = f"{tune_root}/search"

    def make():
        return tune.Tuner(
            trainable,
            param_space={
                "lr": tune.loguniform(opts.lr_min, opts.lr_max),
                "dropout": tune.uniform(opts.dropout_min, opts.dropout_max),
            },
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=opts.trials,
                max_concurrent_trials=max_concurrent_trials(opts),
                trial_name_creator=search_trial_name,
                trial_dirname_creator=search_trial_name,
            ),
            run_config=tune.RunConfig(
                name="search",
                storage_path=tune_root,
                verbose=1,
                progress_reporter=_reporter(["lr", "dropout"]),
            ),
        )

    results = _run_tuner(exp_dir, trainable, make, opts.resume)
    import ray

    ray.kill(board)
    best = None
    candidates = [
        r
        for r in results
        if r.error is None
        and r.metrics
        and not r.metrics.get("diverged")
        and _finite_or_none(r.metrics.get(METRIC)) is not None
    ]
    if candidates:
        r = min(candidates, key=lambda r: r.metrics[METRIC])
        best = {
            "lr": float(r.config["lr"]),
            "dropout": float(r.config["dropout"]),
            METRIC: float(r.metrics[METRIC]),
            "steps": int(r.metrics.get("step", 0)),
            "trial_id": r.metrics.get("trial_id"),
            "stopped_early": bool(r.metrics.get("stopped_early")),
        }
    return best, results, searcher


def table_trial_name(trial: Any) -> str:
    return f"table_{trial.trial_id}"


def search_trial_name(trial: Any) -> str:
    return f"search_{trial.trial_id}"


def _reporter(params: list[str]):
    from ray import tune

    return tune.CLIReporter(
        parameter_columns=params,
        metric_columns=["step", "loss", "val_angle", "max_grad_norm", "diverged", "stopped_early"],
        max_report_frequency=30,
    )


def _finite_or_none(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def trial_overhead(results: Any) -> dict[str, float]:
    """Per-trial wall time minus time inside training steps (Ray + set-up overhead)."""
    walls, trains = [], []
    for r in results:
        m = r.metrics or {}
        if m.get("completed") and "time_total_s" in m and "train_seconds" in m:
            walls.append(float(m["time_total_s"]))
            trains.append(float(m["train_seconds"]))
    if not walls:
        return {}
    over = [w - t for w, t in zip(walls, trains, strict=True)]
    return {
        "trials": float(len(walls)),
        "mean_trial_wall_s": sum(walls) / len(walls),
        "mean_train_step_s": sum(trains) / len(trains),
        "mean_overhead_s": sum(over) / len(over),
    }


# ---------------------------------------------------------------- entry point


def run_sweep(opts: SweepOptions) -> SweepResult:
    from iceaggr_tune import mlflow_runs

    t0 = time.time()
    opts.tracking_uri = absolute_tracking_uri(opts.tracking_uri)
    remote = remote_path(opts.storage_path)
    storage = Path(opts.local_dir if remote else opts.storage_path).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    if opts.resume:
        name = opts.name or latest_sweep_name(storage)
        if name is None or not (storage / name / SWEEP_STATE).exists():
            raise ValueError(
                f"--resume: no sweep {'named ' + opts.name if opts.name else ''} under {storage} "
                f"to resume; run without --resume to start one."
            )
    else:
        name = opts.name or next_sweep_name(storage)
        if (storage / name / SWEEP_STATE).exists():
            raise ValueError(
                f"sweep {name!r} already exists under {storage}; pass --resume to continue it "
                f"or choose another --name."
            )
    sweep_dir = storage / name
    tune_root = f"{opts.storage_path.rstrip('/')}/{name}" if remote else str(sweep_dir)
    ensure_data(opts)
    base = base_experiment(opts)
    init_ray(opts)
    check_ray_auth(opts.allow_unauthenticated_ray)  # before anything runs on the cluster
    check_cluster_storage(opts.tracking_uri, opts.storage_path)  # before any trial starts
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if opts.resume:
        state = json.loads((sweep_dir / SWEEP_STATE).read_text())
        parent = state["parent_run_id"]
        opts.tracking_uri = state["tracking_uri"]
        mlflow_runs.client_for(opts.tracking_uri).update_run(parent, status="RUNNING")
    else:
        parent = mlflow_runs.find_or_create_parent(opts.tracking_uri, opts.experiment, name)
        (sweep_dir / SWEEP_STATE).write_text(
            json.dumps(
                {
                    "parent_run_id": parent,
                    "tracking_uri": opts.tracking_uri,
                    "experiment": opts.experiment,
                    "options": asdict(opts),
                },
                indent=2,
                default=str,
            )
        )
    plog = RunLogger(opts.tracking_uri, run_id=parent, wait_s=opts.mlflow_wait_s)
    plog.log_params({"sweep": {k: v for k, v in asdict(opts).items() if k not in ("resume",)}})
    spool_dir = None if remote else sweep_dir / SPOOL_DIR
    watch = MlflowWatch(opts.tracking_uri)
    watch.start()
    result = SweepResult(name=name, parent_run_id=parent)
    status = "FAILED"
    try:
        if opts.table:
            import copy

            cells, table_results = run_table(opts, copy.deepcopy(base), parent, tune_root)
            result.interrupted |= _unfinished(table_results, 2 * len(opts.table_lrs)) > 0
            result.table = cells
            result.overhead["table"] = trial_overhead(table_results)  # type: ignore[assignment]
            md, js = write_table(
                cells,
                sweep_dir,
                meta={
                    "steps": opts.table_steps,
                    "batch_size": opts.table_batch_size,
                    "data": opts.data,
                    "sweep": name,
                },
            )
            png = plot_stability_table(
                cells, sweep_dir / "stability_table.png", {"steps": opts.table_steps, "sweep": name}
            )
            for path in (md, js, png):
                plog.log_artifact(path)
        if opts.search and not result.interrupted:
            import copy

            best, search_results, _ = run_search(
                opts, copy.deepcopy(base), parent, tune_root, sweep_dir, result.table
            )
            result.interrupted |= _unfinished(search_results, opts.trials) > 0
            result.best = best
            result.overhead["search"] = trial_overhead(search_results)  # type: ignore[assignment]
            if best is not None:
                path = sweep_dir / "best_config.json"
                path.write_text(json.dumps(best, indent=2))
                plog.log_artifact(path)
                plog.log_metrics({"best_val_angle": best["val_angle"]}, step=0)
                plog.set_tags(
                    {"best_lr": f"{best['lr']:.3g}", "best_dropout": f"{best['dropout']:.3f}"}
                )
        status = "KILLED" if result.interrupted else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        result.interrupted = True
        raise
    finally:
        if spool_dir is not None:
            _sync_left_over_records(spool_dir, opts.tracking_uri)
        mlflow_runs.close_running(opts.tracking_uri, parent, "KILLED")
        _log_loss_curves(opts.tracking_uri, parent, plog, sweep_dir, name)
        plog.terminate(status)
        watch.stop()
        result.wall_seconds = time.time() - t0
    return result


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
