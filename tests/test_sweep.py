"""The sweep on a real local Ray, a real Optuna study and a real MLflow sqlite store.

One Ray instance serves the module (3 logical CPUs: two one-worker trials at once plus
their drivers). Ray keeps its token authentication on, with the token written into a
scratch HOME instead of the user's ``~/.ray``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import lr_sweep_command, sweep_tracking_uri
from mlflow.tracking import MlflowClient

from iceaggr.data.synth import write_synthetic_dataset
from iceaggr_tune.mlflow_runs import TAG_TRIAL_ID, child_runs
from iceaggr_tune.search import OPTUNA_STUDY, optuna_storage_url, run_search
from iceaggr_tune.sweep import SweepOptions, base_experiment, run_sweep

pytestmark = pytest.mark.slow

TABLE_LRS = (1e-4, 1e3)  # 1e3 is absurd: it diverges within a few steps


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic_dataset(path, n_events=1_500, batch_size=500, seed=3, progress=False)
    return path


def _options(tmp: Path, data: Path, changes: dict[str, Any]) -> SweepOptions:
    return SweepOptions.smoke().changed(
        {
            "data.path": str(data),
            "storage_path": str(tmp / "sweeps"),
            "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "table.lrs": TABLE_LRS,
            **changes,
        }
    )


def test_sweep_records_table_search_and_divergence(ray_local, sweep_data, tmp_path):
    opts = _options(tmp_path, sweep_data, {"name": "records", "search.trials": 2})
    result = run_sweep(opts)
    assert not result.interrupted

    client = MlflowClient(tracking_uri=opts.tracking.uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"stability_table.md", "stability_table.json", "best_config.json"} <= artifacts
    assert {"search_landscape.png", "search_trials.json"} <= artifacts
    assert len(result.search_trials) == opts.search.trials
    assert set(result.references) == {"line fit", "random"}
    assert 0.5 < result.references["line fit"] < result.references["random"]
    # The MLflow UI opens the experiment in its model-training layout, not the GenAI one.
    experiment = client.get_experiment_by_name(opts.tracking.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    runs = child_runs(opts.tracking.uri, result.parent_run_id)
    assert len(runs) == 2 * len(TABLE_LRS) + opts.search.trials
    assert all(r.data.tags["mlflow.parentRunId"] == result.parent_run_id for r in runs)
    assert len({r.data.tags[TAG_TRIAL_ID] for r in runs}) == len(runs)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for r in runs:
        for key in ("lr", "dropout", "normalize", "seed", "num_workers", "model.d_model"):
            assert key in r.data.params, f"{r.info.run_name} lacks param {key}"
        assert r.data.tags[TAG_TRIAL_ID] in r.info.run_name

    table_runs = [r for r in runs if r.data.tags["sweep_part"] == "table"]
    diverged = [r for r in table_runs if r.data.tags.get("diverged") == "true"]
    healthy = [r for r in table_runs if r not in diverged]
    # Both cells at lr 1e3 (raw and normalized) diverge; both at 1e-4 train all steps.
    assert sorted(float(r.data.params["lr"]) for r in diverged) == [1e3, 1e3]
    for r in diverged:
        assert r.info.status == "FAILED"
        step = int(r.data.tags["diverged_at_step"])
        assert 1 <= step < opts.table.steps
        assert "non-finite" in r.data.tags["divergence_reason"]
        history = client.get_metric_history(r.info.run_id, "loss")
        assert 1 <= len(history) <= step  # the curve up to the divergence, nothing after
    for r in healthy:
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, "loss")) == opts.table.steps
        assert len(client.get_metric_history(r.info.run_id, "grad_norm")) == opts.table.steps
        # The held-out set is the cell's last validation: its collapse signals, once.
        for key in ("val_angle", "val_resultant", "val_const_angle", "val_vs_const"):
            assert len(client.get_metric_history(r.info.run_id, key)) == 1, key
        resultant = r.data.metrics["val_resultant"]
        assert r.data.tags["collapsed"] == ("true" if resultant >= 0.9 else "false")
    # Every search trial validates at each report with its collapse signals, and is tagged.
    for r in (r for r in runs if r.data.tags["sweep_part"] == "search"):
        if r.data.tags.get("diverged") == "true":
            continue
        angles = client.get_metric_history(r.info.run_id, "val_angle")
        resultants = client.get_metric_history(r.info.run_id, "val_resultant")
        assert [m.step for m in resultants] == [m.step for m in angles] and angles
        assert all(0.0 <= m.value <= 1.0 for m in resultants)
        assert r.data.tags["collapsed"] in ("true", "false")
    assert {"runs", "parent", "compare", "curves"} <= set(result.links)

    # The table: computed cells, the exploded ones marked.
    cells = {(c.lr, c.normalize): c for c in result.table or []}
    assert len(cells) == 4
    assert cells[(1e3, True)].status == "explodes"
    assert cells[(1e-4, True)].status != "explodes"
    # Each cell is what its trial measured and classified, divergence report included.
    by_cell = {
        (float(r.data.params["lr"]), r.data.params["normalize"] == "True"): r for r in table_runs
    }
    for key, cell in cells.items():
        tags = by_cell[key].data.tags
        if cell.status == "explodes":
            assert cell.diverged_at_step == int(tags["diverged_at_step"])
            assert cell.divergence_reason == tags["divergence_reason"]
        else:
            assert cell.loss_change == pytest.approx(cell.loss_final - cell.loss_initial)
            assert cell.divergence_reason is None
    table_json = json.loads(
        (Path(opts.storage_path) / "records" / "stability_table.json").read_text()
    )
    assert len(table_json["cells"]) == 4
    assert len(table_json["learning"]) == 4 and table_json["reproduction"]["of"] == 2

    # Optuna: every trial finished (COMPLETE or PRUNED), none left RUNNING; the exploded
    # normalized lr 1e3 of the table is outside the search range, so nothing was told.
    study = optuna.load_study(
        study_name=OPTUNA_STUDY, storage=optuna_storage_url(Path(opts.storage_path) / "records")
    )
    states = [t.state for t in study.trials]
    assert len(states) == opts.search.trials
    assert optuna.trial.TrialState.RUNNING not in states
    assert result.best is not None and 0 < result.best["val_angle"] < 3.2

    # Where the trials' time went, measured in the trials: the worker group's start, the
    # worker's set-up, the held-out set (table cells), validation and checkpoints (search).
    table_time, search_time = result.overhead["table"], result.overhead["search"]
    for over in (table_time, search_time):
        assert over["t_worker_start_s"] > 0 and over["t_setup_s"] > 0
        assert over["t_worker_start_s"] + over["t_setup_s"] < over["mean_overhead_s"]
        assert over["rest_s"] >= 0 and over["t_worker_other_s"] > -0.5, over
    assert table_time["t_held_out_s"] > 0 and table_time["t_validation_s"] == 0
    assert search_time["t_validation_s"] > 0 and search_time["t_checkpoint_s"] > 0


def test_diverging_search_is_penalized_not_left_running(ray_local, sweep_data, tmp_path):
    # Every sampled lr is absurd: each trial must end diverged, penalized in Optuna.
    opts = _options(
        tmp_path,
        sweep_data,
        {
            "name": "diverging",
            "run_table": False,
            "search.trials": 2,
            "search.lr_min": 1e2,
            "search.lr_max": 1e4,
        },
    )
    result = run_sweep(opts)
    study = optuna.load_study(
        study_name=OPTUNA_STUDY, storage=optuna_storage_url(Path(opts.storage_path) / "diverging")
    )
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.value == pytest.approx(3.14159265, abs=1e-6) for t in study.trials)
    runs = child_runs(opts.tracking.uri, result.parent_run_id)
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]
    assert result.best is None


def test_interrupted_sweep_resumes_without_duplicates(ray_local, sweep_data, tmp_path):
    uri = sweep_tracking_uri(tmp_path)  # before the sweep process opens it
    cmd = lr_sweep_command(
        tmp_path,
        sweep_data,
        *("--table-only", "--name", "resumable"),
        *("--address", ray_local, "--max-concurrent", "1"),
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    client = MlflowClient(tracking_uri=uri)
    deadline = time.time() + 300
    finished_before: dict[str, int] = {}
    try:
        # Interrupt once the first trial has finished and a second one is under way.
        while time.time() < deadline:
            time.sleep(2)
            exps = client.search_experiments()
            runs = client.search_runs([e.experiment_id for e in exps], max_results=100)
            children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
            done = [r for r in children if r.info.status in ("FINISHED", "FAILED")]
            if done and len(children) > len(done):
                finished_before = {r.data.tags[TAG_TRIAL_ID]: r.info.end_time for r in done}
                break
            assert proc.poll() is None, proc.stdout.read()
        else:
            pytest.fail("the sweep did not get going in time")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out  # interrupted, not finished
    state = json.loads((tmp_path / "sweeps" / "resumable" / "sweep.json").read_text())
    parent = state["parent_run_id"]
    assert client.get_run(parent).info.status == "KILLED"
    runs = child_runs(uri, parent)
    assert not [r for r in runs if r.info.status == "RUNNING"]

    resumed = subprocess.run(
        [*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "| 1e-3 |" in resumed.stdout and "| 1e-4 |" in resumed.stdout
    runs = child_runs(uri, parent)
    ids = [r.data.tags[TAG_TRIAL_ID] for r in runs]
    assert len(ids) == len(set(ids)) == 2 * len((1e-4, 1e-3))  # smoke table: 2 lrs x 2
    assert all(r.info.status in ("FINISHED", "FAILED") for r in runs)
    by_id = {r.data.tags[TAG_TRIAL_ID]: r for r in runs}
    for trial_id, end_time in finished_before.items():
        assert by_id[trial_id].info.end_time == end_time, "a finished trial ran again"
    assert client.get_run(parent).info.status == "FINISHED"


def _boards(sweep: str) -> list[str]:
    """Names of the live early-stop board actors of sweep ``sweep``."""
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"asha-{sweep}-")
    ]


def test_a_failing_tuner_leaves_no_early_stop_board(ray_local, sweep_data, tmp_path):
    # The board is a detached actor: left alive, it outlives the sweep on a persistent cluster.
    opts = _options(tmp_path, sweep_data, {"name": "board", "run_table": False})
    sweep_dir = tmp_path / "sweeps" / "board"
    sweep_dir.mkdir(parents=True)
    not_a_folder = tmp_path / "not-a-folder"
    not_a_folder.write_text("")  # Tune cannot put its experiment under a file
    with pytest.raises(Exception, match="not-a-folder"):
        run_search(opts, base_experiment(opts), "no-run", str(not_a_folder), sweep_dir, None)
    deadline = time.time() + 30
    while _boards("board") and time.time() < deadline:
        time.sleep(0.5)
    assert _boards("board") == []


def test_sweep_records_keep_no_tracking_credentials(ray_local, mlflow_server, sweep_data, tmp_path):
    host = mlflow_server.url.split("://", 1)[1]
    uri = "http://alice:" + "s3cret" + f"@{host}"  # the server ignores them; requests sends them
    changes = {"name": "creds", "tracking.uri": uri, "run_search": False, "table.lrs": (1e3,)}
    result = run_sweep(_options(tmp_path, sweep_data, changes))
    text = (tmp_path / "sweeps" / "creds" / "sweep.json").read_text()
    assert "s3cret" not in text
    assert json.loads(text)["tracking_uri"] == f"http://***@{host}"
    params = MlflowClient(tracking_uri=mlflow_server.url).get_run(result.parent_run_id).data.params
    assert params["sweep.tracking.uri"] == f"http://***@{host}"
    assert len(result.table or []) == 2
