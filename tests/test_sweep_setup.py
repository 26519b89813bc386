"""The sweep's set-up without a cluster: its base config, a table trial's config and the
``sweep.json`` it keeps for ``--resume`` (the sweep itself runs in test_sweep.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from iceaggr.training.config import ConfigError, baseline_config, debug_config, to_dict
from iceaggr.training.probe import Cell, Column, probe_config
from iceaggr_tune.options import EarlyStopOptions, SearchOptions, TableOptions
from iceaggr_tune.search import search_config, warm_start
from iceaggr_tune.sweep import (
    SWEEP_STATE,
    SweepError,
    SweepOptions,
    base_experiment,
    read_sweep_state,
    write_sweep_state,
)
from iceaggr_tune.table import table_columns, table_trials
from iceaggr_tune.trial import TrialSettings, trial_experiment

# ---------------------------------------------------------------- the base config


def test_set_overrides_apply_to_the_default_config_without_config() -> None:
    opts = SweepOptions().changed({"model_overrides": ["model.d_model=64", "train.lr=1e-3"]})
    cfg = base_experiment(opts)
    assert (cfg.model.d_model, cfg.train.lr) == (64, 1e-3)
    baseline = baseline_config().model
    assert dataclasses.replace(cfg.model, d_model=baseline.d_model) == baseline  # the rest kept


def test_set_overrides_apply_to_the_smoke_config() -> None:
    opts = SweepOptions.smoke().changed({"model_overrides": ["model.dropout=0.2"]})
    cfg = base_experiment(opts)
    assert cfg.model.dropout == 0.2
    assert cfg.model.d_model == debug_config().model.d_model


def test_set_overrides_apply_to_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "base.yaml"
    path.write_text("model:\n  d_model: 96\n")
    opts = SweepOptions().changed({"config": str(path), "model_overrides": ["train.lr=2e-4"]})
    cfg = base_experiment(opts)
    assert (cfg.model.d_model, cfg.train.lr) == (96, 2e-4)


def test_a_bad_set_override_fails_naming_the_key() -> None:
    opts = SweepOptions().changed({"model_overrides": ["train.lrr=1"]})
    with pytest.raises(ConfigError, match=r"--set\.train: unknown key\(s\) \['lrr'\]"):
        base_experiment(opts)


# ---------------------------------------------------------------- a table trial's config


@pytest.mark.parametrize("normalize", [False, True])
def test_a_table_trial_trains_exactly_the_probe_cell(normalize: bool) -> None:
    base = debug_config("/data")
    base.model.dropout = 0.1  # the protocol keeps the base's dropout, in both paths
    table = TableOptions(lrs=(3e-4,), steps=7, batch_size=48)
    settings = TrialSettings(
        base=to_dict(base),
        part="table",
        parent_run_id="p",
        storage_path="/tmp/unused",
        tracking=SweepOptions().tracking,
        resources=SweepOptions().resources,
        table=table,
    )
    hp = {"lr": 3e-4, "column": "original-norm" if normalize else "original-raw", "seed": 2}
    cfg = trial_experiment(settings, hp)
    expected = probe_config(
        base, 3e-4, normalize, steps=7, batch_size=48, arch="original", seed=base.train.seed + 2
    )
    assert cfg == expected
    assert (cfg.model.dropout, cfg.train.max_steps, cfg.train.batch_size) == (0.1, 7, 48)
    assert (cfg.model.arch, cfg.train.seed) == ("original", base.train.seed + 2)


# ---------------------------------------------------------------- sweep.json


def credentialed(host: str = "mlflow.internal:5000") -> str:
    return "https://alice:" + "s3cret" + f"@{host}"


def test_sweep_json_keeps_no_credentials(tmp_path: Path) -> None:
    opts = SweepOptions().changed(
        {"tracking.uri": credentialed(), "address": "ray://bob:" + "hunter2" + "@head:10001"}
    )
    path = write_sweep_state(tmp_path, "parent-1", opts)
    assert path == tmp_path / SWEEP_STATE
    text = path.read_text()
    assert "s3cret" not in text and "hunter2" not in text
    state = json.loads(text)
    assert state["tracking_uri"] == "https://***@mlflow.internal:5000"
    assert state["options"]["tracking.uri"] == "https://***@mlflow.internal:5000"
    assert state["options"]["address"] == "ray://***@head:10001"
    assert state["options"]["search.lr_max"] == 3e-3


def test_resume_takes_the_credentials_from_the_given_uri(tmp_path: Path) -> None:
    write_sweep_state(
        tmp_path, "parent-1", SweepOptions().changed({"tracking.uri": credentialed()})
    )
    assert read_sweep_state(tmp_path, credentialed()) == ("parent-1", credentialed())
    with pytest.raises(SweepError, match=r"logs to https://\*\*\*@mlflow.internal:5000, whose"):
        read_sweep_state(tmp_path, "sqlite:///mlflow.db")


def test_resume_without_credentials_uses_the_recorded_uri(tmp_path: Path) -> None:
    recorded = "http://127.0.0.1:5000"
    write_sweep_state(tmp_path, "parent-2", SweepOptions().changed({"tracking.uri": recorded}))
    assert read_sweep_state(tmp_path, "sqlite:////elsewhere.db") == ("parent-2", recorded)


# ---------------------------------------------------------------- Optuna's warm start


def test_warm_start_takes_only_the_searched_networks_cells() -> None:
    """The search trains this project's model: the original network's cells (another
    network) must not seed it, and exploded cells of ours are told as penalized points."""

    def cell(model: str, lr: float, status: str, change: float | None) -> Cell:
        return Cell(
            lr=lr, normalize=True, status=status, loss_change=change, loss_initial=None,
            loss_final=None, max_grad_norm=1.0, model=model,
        )  # fmt: skip

    table = [
        cell("original", 1e-4, "ok", -0.5),  # the best change overall, but another network
        cell("iceaggr", 1e-4, "ok", -0.01),
        cell("iceaggr", 3e-4, "ok", -0.03),
        cell("iceaggr", 1e-3, "no_decrease", 0.02),
        cell("iceaggr", 3e-3, "explodes", None),
        cell("original", 3e-3, "explodes", None),
    ]
    search = SearchOptions(lr_min=3e-5, lr_max=3e-3)
    points, evaluated, rewards = warm_start(table, search, "iceaggr")
    assert [p["lr"] for p in points] == [3e-4, 1e-4]
    assert [p["lr"] for p in evaluated] == [3e-3] and len(rewards) == 1
    assert warm_start(table, search, "original")[0] == [{"lr": 1e-4, "dropout": 0.0}]


def test_table_columns_follow_the_resources_unless_given() -> None:
    keys = lambda opts: [c.key for c in table_columns(opts)]  # noqa: E731
    cpu = SweepOptions()
    assert keys(cpu) == ["original-raw", "original-norm"]
    assert table_trials(cpu) == 5 * 2 * 1
    gpu = cpu.changed({"resources.gpus_per_worker": 0.25})
    assert keys(gpu) == ["original-raw", "original-norm", "iceaggr-raw", "iceaggr-norm"]
    assert table_trials(gpu) == 5 * 4 * 3
    both = cpu.changed({"table.models": ("original", "iceaggr")})
    assert keys(both) == ["original-raw", "original-norm", "iceaggr-raw"]
    assert keys(both.changed({"table.hidden_columns": True}))[-1] == "iceaggr-norm"
    assert keys(gpu.changed({"table.models": ("original",)})) == ["original-raw", "original-norm"]
    with pytest.raises(ValueError, match="unknown table column 'ours-raw'"):
        Column.by_key("ours-raw")


@pytest.mark.parametrize("every", [1, 2, 3, 7, 10, 20, 25, 50])
def test_every_report_step_of_a_search_trial_is_a_logging_step(every: int) -> None:
    """The trainer validates, checkpoints and asks the early-stopping board only at logging
    steps: with a logging interval that does not divide the report interval, a trial would
    report only at its end and never be stopped early."""
    search = SearchOptions(steps=100, batch_size=8)
    cfg = search_config(debug_config("/data"), search, EarlyStopOptions(report_every=every))
    t = cfg.train
    assert every % t.log_every == 0 and (t.log_every < every or every == 1)
    assert t.checkpoint_every == every
    # Validation at the rungs only (report steps, so logging steps), or at every report.
    assert t.eval_every == 0 and all(s % every == 0 for s in t.eval_steps)
    full = EarlyStopOptions(report_every=every, validate_every_report=True)
    assert search_config(debug_config("/data"), search, full).train.eval_every == every


def test_a_search_trial_validates_where_early_stopping_and_optuna_read_it() -> None:
    """Rungs after reports 3 and 6 of 10 (grace 3, factor 2): steps 60 and 120 of 200; the
    last step always validates (Optuna's value)."""
    search = SearchOptions(steps=200, batch_size=8)
    early = EarlyStopOptions(report_every=20, grace_reports=3, reduction_factor=2)
    t = search_config(debug_config("/data"), search, early).train
    assert (t.eval_every, t.eval_steps) == (0, (60, 120))
