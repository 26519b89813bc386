"""One Tune trial: a function trainable that launches a Ray Train ``TorchTrainer``.

``trial_driver`` runs as the Tune trial. It turns the sampled hyperparameters into
a validated :class:`~iceaggr.training.config.ExperimentConfig` (so a bad value fails before
a worker group is booked), finds or makes the trial's MLflow child run, and fits a
``TorchTrainer`` whose workers run :func:`train_fn_per_worker`, i.e. the trainer
from :mod:`iceaggr.training.trainer` with rank, world size and device from Ray Train.

Workers report to Tune through ``TuneReportCallback`` every ``report_every`` steps
(each report waits for the controller's poll), with a checkpoint so a trial (or a
restarted worker group) resumes from it. A diverged run reports the penalty
``val_angle = pi`` (worse than random guessing, pi/2) with ``diverged = 1``, so the
trial ends at once, Tune shows it, Optuna records a bad value for that region
(a NaN would leave the Optuna trial RUNNING), and the MLflow run ends FAILED with
``diverged`` tags.
"""

# ruff: noqa: E402  (the imports below are timed: worker start-up parts)
from __future__ import annotations

import time

_IMPORT_START = time.time()  # the worker's start-up parts (iceaggr_tune.worker_start)

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from iceaggr.tracking.run_logger import RunLogger
from iceaggr.training.checkpoint import CHECKPOINT_NAME
from iceaggr.training.collapse import CollapseStats
from iceaggr.training.config import ExperimentConfig, from_dict, to_dict
from iceaggr.training.guard import DivergenceReport
from iceaggr.training.hooks import Hook
from iceaggr.training.mlflow_hook import TAG_DIVERGED, MlflowHook
from iceaggr.training.probe import Column, cell_from_result, probe_config
from iceaggr.training.trainer import train
from iceaggr_tune import mlflow_runs
from iceaggr_tune.early_stop import get_board
from iceaggr_tune.options import ResourceOptions, TableOptions, TrackingOptions
from iceaggr_tune.worker_start import TimedTorchConfig, mark, start_parts

mark("import_start", _IMPORT_START)
mark("import_end")
log = logging.getLogger(__name__)

DIVERGED_PENALTY = math.pi
"""Metric value of a diverged trial: the worst possible angular error (random is pi/2)."""
METRIC = "val_angle"
MODE = "min"


@dataclass(kw_only=True)
class TrialSettings:
    """What every trial of a sweep shares (passed with ``tune.with_parameters``); the option
    groups are the sweep's own :mod:`iceaggr_tune.options` objects."""

    base: dict[str, Any]
    """The base experiment config as a dict (``iceaggr.training.config.to_dict``)."""
    part: Literal["table", "search"]
    parent_run_id: str
    storage_path: str
    """Where Ray Train writes checkpoints; every node must reach it on a cluster."""
    storage_filesystem: Any = None
    """The ``pyarrow.fs`` filesystem of an ``s3://`` storage_path (then ``bucket/prefix``
    without the scheme), as Ray's ``RunConfig(storage_filesystem=...)`` takes it."""
    tracking: TrackingOptions
    resources: ResourceOptions
    report_every: int = 5
    """Steps between ``ray.train.report`` calls (MLflow gets every ``log_every`` step)."""
    table: TableOptions | None = None
    """Steps and batch of a table cell (part ``table``: the probe protocol)."""
    board: str | None = None
    """Name of the sweep's early-stopping :class:`~iceaggr_tune.early_stop.RungBoard` actor."""
    mlflow_spool_dir: str | None = None
    """Shared folder for MLflow records a worker could not send yet (None: per checkpoint)."""
    held_out_cache: str | None = None
    """Folder where table cells share the untrained model's held-out score
    (:mod:`iceaggr.training.held_out`); None: every cell scores it itself."""


def trial_experiment(settings: TrialSettings, hp: dict[str, Any]) -> ExperimentConfig:
    """The trial's typed config: base config + sampled hyperparameters, validated. A table
    trial's config is the probe's cell config (:func:`iceaggr.training.probe.probe_config`)."""
    cfg = from_dict(ExperimentConfig, settings.base, "base config")
    if settings.part == "table":
        if settings.table is None:
            raise ValueError("a table trial needs TrialSettings.table (steps and batch size)")
        t, col = settings.table, Column.by_key(str(hp["column"]))
        cfg = probe_config(
            cfg, float(hp["lr"]), col.normalize, t.steps, t.batch_size,
            arch=col.arch, seed=cfg.train.seed + int(hp["seed"]),
            eval_events=t.eval_events,
        )  # fmt: skip
    else:
        cfg.train.lr = float(hp["lr"])
        cfg.model.dropout = float(hp.get("dropout", cfg.model.dropout))
        cfg.model.normalize = bool(hp.get("normalize", cfg.model.normalize))
    # Round trip through the validating constructor with the new values.
    return from_dict(ExperimentConfig, to_dict(cfg), "trial config")


class TuneReportHook(Hook):
    """Reports a worker's training to Ray Train (and so to Tune) and asks the sweep's
    early-stopping board whether to stop.

    A report goes out every ``report_every`` steps, with every checkpoint (rank 0 attaches
    it), at the last step and at a divergence, which reports ``val_angle = pi``
    (:data:`DIVERGED_PENALTY`) so that ASHA and Optuna read a number.
    """

    def __init__(
        self, *, rank: int, max_steps: int, report_every: int, board: Any, trial_id: str | None
    ) -> None:
        self.rank, self.max_steps, self.report_every = rank, max_steps, report_every
        self.board, self.trial_id = board, trial_id
        self.reports = 0

    def on_report(self, metrics: dict[str, float], step: int, checkpoint_dir: Path | None) -> bool:
        final = step >= self.max_steps
        if not (step % self.report_every == 0 or checkpoint_dir is not None or final):
            return False
        return self._send(metrics, step, checkpoint_dir)

    def on_diverged(self, report: DivergenceReport, metrics: dict[str, float], step: int) -> None:
        diverged = {"diverged_at_step": float(report.step), METRIC: DIVERGED_PENALTY}
        self._send(metrics | diverged, step, None)

    def _send(self, metrics: dict[str, float], step: int, checkpoint_dir: Path | None) -> bool:
        checkpoint = None
        if checkpoint_dir is not None and self.rank == 0:
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)
        self.reports += 1
        if self.board is None or METRIC not in metrics or step >= self.max_steps:
            return False
        # Every rank asks with the same key and gets the same answer, so all stop together.
        stop = self.board.should_stop.remote(self.trial_id, self.reports, metrics[METRIC])
        return bool(ray.get(stop))


def peak_memory_mb(device: torch.device) -> float:
    """This worker's peak memory (MiB): ``torch.cuda.max_memory_allocated`` on CUDA, else the
    process's peak resident set size (``getrusage``; the whole process, Ray included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the iceaggr trainer with Ray's rank, device and checkpoints."""
    t_worker = time.time()
    started = start_parts(float(config.get("fit_start", t_worker)), t_worker)
    cfg = from_dict(ExperimentConfig, config["experiment"], "trial config")
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.get("cpu_threads"):
        # One torch thread per booked CPU (Ray's OMP_NUM_THREADS says the same for whole CPUs):
        # on CPUs the sweep runs as many one-thread trials as there are cores, which trains
        # more events per second than fewer trials with more threads (benchmarks/concurrency.py).
        torch.set_num_threads(int(config["cpu_threads"]))
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    work = Path(tempfile.mkdtemp(prefix=f"iceaggr-rank{rank}-"))
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        resume = Path(ckpt.to_directory(str(work / "restored"))) / CHECKPOINT_NAME
        log.info("rank %d resumes from %s", rank, ckpt.path)
    hooks: list[Hook] = []
    if rank == 0 and cfg.train.mlflow_tracking_uri:
        # Which node trained this trial (drivers and workers may sit on different nodes).
        node = {mlflow_runs.TAG_WORKER_NODE: ray.get_runtime_context().get_node_id()}
        hooks.append(MlflowHook.for_config(cfg, run_id=config.get("mlflow_run_id"), tags=node))
    hooks.append(
        TuneReportHook(
            rank=rank,
            max_steps=cfg.train.max_steps,
            report_every=int(config["report_every"]),
            board=get_board(config["board"]) if config.get("board") else None,
            trial_id=config.get("trial_id"),
        )
    )
    try:
        result = train(
            cfg,
            rank=rank,
            world_size=world,
            device=device,
            hooks=hooks,
            resume_from=resume,
            checkpoint_dir=work / "ckpt",
            track_fixed_batch=bool(config.get("track_fixed_batch")),
            progress=False,
            held_out_cache=config.get("held_out_cache"),
        )
        summary: dict[str, float | str] = {
            "step": float(result.steps),
            "train_seconds": result.train_seconds,
            "max_grad_norm": result.max_grad_norm,
            "completed": 1.0,
            "held_out_initial_shared": float(result.fixed_batch_initial_shared),
            "stopped_early": float(result.stopped_early),
            # Where the trial's time went (seconds; see TrainResult.timings and trial_driver).
            "t_driver_setup_s": float(config.get("driver_setup_s", 0.0)),
            "t_worker_start_s": t_worker - float(config.get("fit_start", t_worker)),
            **started,
            **{f"t_{k}": v for k, v in result.timings.items()},
            "t_worker_s": time.time() - t_worker,
            "torch_threads": float(torch.get_num_threads()),
            "peak_memory_mb": peak_memory_mb(device),
        }
        if result.diverged is not None:
            summary |= {
                "diverged": 1.0,
                "diverged_at_step": float(result.diverged.step),
                METRIC: DIVERGED_PENALTY,
            }
        else:
            summary |= {"diverged": 0.0}
            if result.val_angle is not None:
                summary[METRIC] = result.val_angle
            if result.val_collapse is not None:  # the last validation's collapse signals
                summary |= CollapseStats.from_dict(result.val_collapse).metrics()
                summary["collapsed"] = float(bool(result.collapsed))
        if config.get("track_fixed_batch"):  # a table cell, classified here only
            cell = cell_from_result(cfg, result)
            summary |= cell.to_metrics()
        ray.train.report(summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_name(trial_id: str, hp: dict[str, Any]) -> str:
    if "column" in hp:  # a table cell
        col = Column.by_key(str(hp["column"]))
        norm = "norm" if col.normalize else "raw"
        return f"{trial_id}-{col.arch}-lr{float(hp['lr']):.0e}-{norm}-seed{int(hp['seed'])}"
    norm = "" if "normalize" not in hp else ("-norm" if hp["normalize"] else "-raw")
    return f"{trial_id}-lr{float(hp['lr']):.1e}-do{float(hp.get('dropout', 0.0)):.2f}{norm}"


def trial_driver(hp: dict[str, Any], settings: TrialSettings) -> None:
    """The Tune function trainable of one trial."""
    t_trial = time.time()
    cfg = trial_experiment(settings, hp)  # fails here, before any worker starts
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    trial_id = ray.tune.get_context().get_trial_id()
    run_id = mlflow_runs.find_or_create_child(
        settings.tracking.uri,
        settings.parent_run_id,
        trial_id,
        run_name(trial_id, hp),
        tags={
            mlflow_runs.TAG_SWEEP_PART: settings.part,
            mlflow_runs.TAG_NODE: ray.util.get_node_ip_address(),
            mlflow_runs.TAG_DRIVER_NODE: ray.get_runtime_context().get_node_id(),
        },
        wait_s=settings.tracking.wait_s,
    )
    mlog = RunLogger(settings.tracking.uri, run_id=run_id, wait_s=settings.tracking.wait_s)
    mlog.log_params(
        {
            "lr": cfg.train.lr,
            "dropout": cfg.model.dropout,
            "normalize": cfg.model.normalize,
            "arch": cfg.model.arch,
            "seed": cfg.train.seed,
            "num_workers": settings.resources.workers_per_trial,
            "use_gpu": settings.resources.use_gpu,
            "gpus_per_worker": settings.resources.gpus_per_worker,
        }
    )
    cfg.train.mlflow_tracking_uri = settings.tracking.uri
    cfg.train.mlflow_wait_s = settings.tracking.wait_s
    cfg.train.mlflow_spool_dir = settings.mlflow_spool_dir
    res = settings.resources
    resources: dict[str, float] = {"CPU": res.cpus_per_worker, **res.worker_resources}
    if res.use_gpu:
        resources["GPU"] = res.gpus_per_worker
    fit_start = time.time()  # workers measure their start-up from here (same clock on one node)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "driver_setup_s": fit_start - t_trial,
            "fit_start": fit_start,
            "experiment": to_dict(cfg),
            "mlflow_run_id": run_id,
            "report_every": settings.report_every,
            "cpu_threads": max(1, int(res.cpus_per_worker)),
            "track_fixed_batch": settings.part == "table",
            "held_out_cache": settings.held_out_cache if settings.part == "table" else None,
            "board": settings.board,
            "trial_id": trial_id,
        },
        torch_config=TimedTorchConfig(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers_per_trial, use_gpu=res.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=settings.storage_path,
            storage_filesystem=settings.storage_filesystem,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException as err:
        try:
            mlog.set_tags({mlflow_runs.TAG_ERROR: f"{type(err).__name__}: {err}"[:5000]})
            mlog.terminate("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        except Exception as mlflow_err:  # keep the training error, not the bookkeeping one
            log.error("could not mark MLflow run %s ended: %s", run_id, mlflow_err)
        raise
    del result  # Train V2 keeps only checkpointed metrics there; the run's tags say it all
    # Rank 0 tagged the run when its divergence guard fired.
    diverged = mlog.client.get_run(run_id).data.tags.get(TAG_DIVERGED) == "true"
    mlog.terminate("FAILED" if diverged else "FINISHED")
