"""Faults injected into real sweeps: a training worker killed, the sweep driver killed, the
MLflow server down for a while.

Everything is real: a local Ray with token authentication (one per module), Ray Train
workers that are SIGKILLed by their process id, a sweep driver SIGKILLed as a subprocess,
and a real ``mlflow server`` killed and restarted on the same port and store. Each test
then reads the MLflow records back and checks that nothing was lost or duplicated: one run
per trial, every trial finished, and each metric history holds each logged step exactly
once, with no gaps.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pytest
from conftest import lr_sweep_command, sweep_tracking_uri
from mlflow.tracking import MlflowClient

from iceaggr_tune.mlflow_runs import TAG_TRIAL_ID, child_runs
from iceaggr_tune.search import OPTUNA_STUDY, optuna_storage_url
from iceaggr_tune.sweep import SweepOptions, run_sweep

if TYPE_CHECKING:
    from conftest import MlflowServer

pytestmark = pytest.mark.slow

STEPS = 120
REPORT_EVERY = 6  # -> a report (and a checkpoint) every 6 steps, MLflow every 3 steps
LOG_EVERY = REPORT_EVERY // 2
OUTAGE_STEPS = 600
OUTAGE_S = 15.0


def _options(tmp: Path, data: Path, uri: str, name: str, **changes: Any) -> SweepOptions:
    """Smoke options for one search trial; ``changes`` by dotted option path."""
    defaults: dict[str, Any] = {
        "data.path": str(data),
        "storage_path": str(tmp / "sweeps"),
        "tracking.uri": uri,
        "name": name,
        "run_table": False,
        "search.trials": 1,
        "search.steps": STEPS,
        "early_stop.report_every": REPORT_EVERY,
        "resources.max_concurrent": 1,
    }
    return SweepOptions.smoke().changed({**defaults, **changes})


def _expected_steps(last: int = STEPS) -> list[int]:
    return list(range(LOG_EVERY, last + 1, LOG_EVERY))


def _logged_steps(uri: str) -> list[int]:
    """Steps of the ``loss`` curves logged to MLflow so far, over all child runs."""
    client = MlflowClient(tracking_uri=uri)
    try:
        exps = client.search_experiments()
        runs = client.search_runs([e.experiment_id for e in exps], max_results=100)
        return [
            m.step
            for r in runs
            if "mlflow.parentRunId" in r.data.tags
            for m in client.get_metric_history(r.info.run_id, "loss")
        ]
    except Exception:  # the store is being created
        return []


def _wait_for(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _assert_history_complete(client: MlflowClient, run: Any, last: int = STEPS) -> None:
    for key in ("loss", "grad_norm", "lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == _expected_steps(last), (
            f"{run.info.run_name}: {key} steps {sorted(steps)}"
        )


class Fault(threading.Thread):
    """Runs ``action`` in the background while the sweep runs in the test's main thread."""

    def __init__(self, action: Any) -> None:
        super().__init__(daemon=True)
        self.action = action
        self.error: BaseException | None = None
        self.info: dict[str, Any] = {}

    def run(self) -> None:
        try:
            self.action(self.info)
        except BaseException as err:  # surfaced by check()
            self.error = err

    def check(self) -> dict[str, Any]:
        self.join(timeout=600)
        if self.error is not None:
            raise self.error
        return self.info


# ---------------------------------------------------------------- a training worker dies


def _registered_checkpoint_step(train_dir: Path) -> int | None:
    """Step of the latest checkpoint Ray Train's controller has registered (None: none yet)."""
    for f in train_dir.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(f.read_text()).get("latest_checkpoint_result")
        except ValueError:  # being written
            continue
        if latest and 0 < latest["metrics"]["step"] < STEPS - 2 * REPORT_EVERY:
            return int(latest["metrics"]["step"])
    return None


def _train_worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        # This test's cluster, even when other Ray instances run on the machine.
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        raise_on_missing_output=False,
    )
    return [a.pid for a in actors if a.pid]


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "one-of-two-workers"])
def test_killed_training_worker_resumes_from_its_checkpoint(
    ray_local, small_dataset, tmp_path, workers
):
    """A worker SIGKILLed mid-trial (with two data-parallel workers, one of them): Ray Train
    restarts the whole worker group from the last registered checkpoint."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opts = _options(
        tmp_path,
        small_dataset,
        uri,
        "worker-kill",
        **{"resources.max_failures": 2, "resources.workers_per_trial": workers},
    )
    train_dir = tmp_path / "sweeps" / "worker-kill" / "train"

    def kill_worker(info: dict[str, Any]) -> None:
        # Kill the training worker once Ray Train's controller has registered a checkpoint
        # (a reported checkpoint counts only then: a worker killed before the controller's
        # next poll restarts from the one before).
        info["registered_step"] = _wait_for(
            lambda: _registered_checkpoint_step(train_dir), 300, "a registered checkpoint"
        )
        pids = _wait_for(
            lambda: (p := _train_worker_pids()) and len(p) == workers and p, 60, "the workers"
        )
        info["logged_before_kill"] = max(_logged_steps(uri))
        info["pid"] = pids[-1]
        os.kill(pids[-1], signal.SIGKILL)

    fault = Fault(kill_worker)
    fault.start()
    result = run_sweep(opts)
    info = fault.check()
    assert info["logged_before_kill"] < STEPS, "the kill came after the trial ended"

    client = MlflowClient(tracking_uri=uri)
    (run,) = child_runs(uri, result.parent_run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("error")
    # The restarted worker group started from a checkpoint (one every report), not from 0:
    # the one registered before the kill, or a later one registered in the meantime.
    resumed = int(run.data.tags["resumed_from_step"])
    assert info["registered_step"] <= resumed < STEPS
    assert resumed % REPORT_EVERY == 0
    _assert_history_complete(client, run)
    assert result.best is not None and result.best["steps"] == STEPS
    assert client.get_run(run.info.run_id).data.params["num_workers"] == str(workers)
    assert info["pid"] not in _train_worker_pids()


# ---------------------------------------------------------------- the sweep driver dies


def test_killed_sweep_driver_resumes_without_losing_or_duplicating(
    ray_local, small_dataset, tmp_path
):
    uri = sweep_tracking_uri(tmp_path)  # before the sweep process opens it
    cmd = lr_sweep_command(
        tmp_path,
        small_dataset,
        *("--search-only", "--trials", "2", "--steps", str(STEPS)),
        *("--report-every", str(REPORT_EVERY), "--name", "driver-kill"),
        *("--address", ray_local, "--max-concurrent", "1"),
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = MlflowClient(tracking_uri=uri)

    def children() -> list[Any]:
        try:
            exps = client.search_experiments()
            runs = client.search_runs([e.experiment_id for e in exps], max_results=100)
        except Exception:
            return []
        return [r for r in runs if "mlflow.parentRunId" in r.data.tags]

    try:
        # SIGKILL (no clean-up at all) once one trial has finished and the second has
        # logged part of its curve.
        def second_under_way() -> bool:
            runs = children()
            done = [r for r in runs if r.info.status == "FINISHED"]
            running = [r for r in runs if r.info.status == "RUNNING"]
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            return bool(
                done
                and running
                and len(client.get_metric_history(running[0].info.run_id, "loss")) >= 2
            )

        _wait_for(second_under_way, 400, "the second trial")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    before = {r.data.tags[TAG_TRIAL_ID]: r for r in children()}
    assert len(before) == 2
    parent = json.loads((tmp_path / "sweeps" / "driver-kill" / "sweep.json").read_text())[
        "parent_run_id"
    ]

    resumed = subprocess.run(
        [*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Best configuration" in resumed.stdout

    runs = child_runs(uri, parent)
    ids = sorted(r.data.tags[TAG_TRIAL_ID] for r in runs)
    assert ids == sorted(before), "a trial was lost or its run duplicated"
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    for r in runs:
        _assert_history_complete(client, r)
    assert client.get_run(parent).info.status == "FINISHED"
    study = optuna.load_study(
        study_name=OPTUNA_STUDY,
        storage=optuna_storage_url(tmp_path / "sweeps" / "driver-kill"),
    )
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2, states
    assert optuna.trial.TrialState.RUNNING not in states, states


# ---------------------------------------------------------------- MLflow goes away


def test_mlflow_server_down_during_a_sweep_loses_nothing(
    ray_local, small_dataset, tmp_path, mlflow_server: MlflowServer, caplog
):
    opts = _options(
        tmp_path,
        small_dataset,
        mlflow_server.url,
        "mlflow-outage",
        **{"search.steps": OUTAGE_STEPS},
    )
    sweep_dir = tmp_path / "sweeps" / "mlflow-outage"
    caplog.set_level(logging.WARNING, logger="iceaggr_tune.mlflow_runs")

    def outage(info: dict[str, Any]) -> None:
        _wait_for(
            lambda: max(_logged_steps(mlflow_server.url), default=0) >= 4 * LOG_EVERY,
            300,
            "the trial's first metrics",
        )
        mlflow_server.stop()
        info["t_down"] = time.time() * 1000
        time.sleep(OUTAGE_S)  # long enough for the sweep's health watch to notice
        mlflow_server.start()
        info["t_up"] = time.time() * 1000

    fault = Fault(outage)
    fault.start()
    result = run_sweep(opts)
    info = fault.check()

    client = MlflowClient(tracking_uri=mlflow_server.url)
    (run,) = child_runs(mlflow_server.url, result.parent_run_id)
    assert run.info.status == "FINISHED"
    _assert_history_complete(client, run, OUTAGE_STEPS)
    # Training went on while the server was down: steps were logged (time-stamped by the
    # worker) during the outage, and reached the server after it came back.
    during = [
        m.step
        for m in client.get_metric_history(run.info.run_id, "loss")
        if info["t_down"] < m.timestamp < info["t_up"]
    ]
    assert len(during) >= 3, (during, info)
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    warnings = [r.getMessage() for r in caplog.records if r.name == "iceaggr_tune.mlflow_runs"]
    assert any("not answering" in w for w in warnings), warnings
    assert any("is back" in w for w in warnings), warnings
    assert not list((sweep_dir / "mlflow-spool").glob("*.jsonl")), "records left unsent"


# ---------------------------------------------------------------- bad data


def test_cut_off_batch_file_stops_the_sweep_before_anything_starts(small_dataset, tmp_path):
    """A truncated parquet file: the sweep names it and exits before Ray, MLflow or any trial
    starts, leaving no sweep folder or run that could pass for a finished sweep."""
    import shutil

    data = Path(shutil.copytree(small_dataset, tmp_path / "data"))
    bad = data / "train" / "batch_2.parquet"
    bad.write_bytes(bad.read_bytes()[:-2000])
    out = subprocess.run(
        lr_sweep_command(tmp_path, data, "--name", "bad-data"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"error: {bad}: not a readable parquet file" in out.stderr
    assert "truncated" in out.stderr
    assert not (tmp_path / "sweeps" / "bad-data").exists()
    assert not (tmp_path / "mlflow.db").exists()
