"""One part of the sweep (the table or the search) as one Tune experiment, and where its
trials' time went.

:func:`fit_part` builds the Tuner (or restores it on ``--resume``, so finished trials are not
run again) around :func:`iceaggr_tune.trial.trial_driver` with the part's
:class:`~iceaggr_tune.trial.TrialSettings`; :func:`trial_overhead` sums what the trials
reported about their time outside the training steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iceaggr.training.config import ExperimentConfig, to_dict
from iceaggr_tune.cluster import ray_storage, remote_path
from iceaggr_tune.options import ResourceOptions, SweepOptions

log = logging.getLogger(__name__)

SPOOL_DIR = "mlflow-spool"
"""Folder of a sweep where trials keep MLflow records not sent yet (folder storage)."""
NODE_SPOOL_DIR = f"~/.cache/iceaggr/{SPOOL_DIR}"
HELD_OUT_DIR = "held-out-initial"
"""Folder of a sweep where table cells share the untrained model's held-out score."""
NODE_HELD_OUT_DIR = f"~/.cache/iceaggr/{HELD_OUT_DIR}"


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
