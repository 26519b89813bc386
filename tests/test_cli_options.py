"""Tests for the option dataclasses (iceaggr_tune.options), the flags made from them
(iceaggr_tune.cli_options) and the command line of ``tune/lr_sweep.py`` built with both."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import REPO

from iceaggr_tune.cli_options import OptionError, OptionFlags, field_docs, with_changes
from iceaggr_tune.options import (
    DataOptions,
    ResourceOptions,
    SearchOptions,
    SweepOptions,
    TableOptions,
    TrackingOptions,
)


@pytest.fixture(autouse=True)
def no_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two flags whose default an environment variable overrides start from the dataclass."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def lr_sweep() -> Any:
    spec = importlib.util.spec_from_file_location("lr_sweep", REPO / "tune" / "lr_sweep.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(argv: list[str]) -> SweepOptions:
    return lr_sweep().parse_args(argv)[0]


def value_at(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def option_paths(obj: Any, prefix: str = "") -> Iterator[str]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from option_paths(value, f"{prefix}{f.name}.")
        elif f.metadata.get("cli", True):
            yield prefix + f.name


# ---------------------------------------------------------------- defaults written once


@pytest.mark.parametrize("preset", [SweepOptions(), SweepOptions.smoke()], ids=["plain", "smoke"])
def test_every_flag_default_is_the_dataclass_default(preset: SweepOptions) -> None:
    parser = argparse.ArgumentParser()
    flags = OptionFlags(parser, preset)
    assert sorted(flags.flags) == sorted(option_paths(preset))  # every field has its flag
    for path in flags.flags:
        default = parser.get_default(path)
        expected = value_at(preset, path)
        assert (dict(default) if isinstance(expected, dict) else default) == expected, path
    assert flags.options(parser.parse_args([])) == preset


def test_the_command_line_without_flags_is_the_default_options() -> None:
    assert parse([]) == SweepOptions()
    assert parse(["--smoke-test"]) == SweepOptions.smoke()


def test_the_existing_flag_names_are_kept() -> None:
    parser = argparse.ArgumentParser()
    flags = set(OptionFlags(parser, SweepOptions()).flags.values())
    assert flags >= {
        *("--name", "--config", "--set", "--data", "--events", "--address", "--tracking-uri"),
        *("--experiment", "--storage-path", "--trials", "--steps", "--table-steps"),
        *("--table-batch-size", "--search-batch-size", "--lr-min", "--lr-max", "--dropout-min"),
        *("--dropout-max", "--report-every", "--workers-per-trial", "--cpus-per-worker"),
        *("--gpus-per-worker", "--max-concurrent", "--worker-resource", "--max-failures"),
        *("--mlflow-wait", "--allow-unauthenticated-ray", "--seed", "--resume", "--smoke-test"),
    }


def test_flags_set_the_options_they_name() -> None:
    opts = parse(
        [
            *("--steps", "200", "--trials", "16", "--lr-min", "3e-5", "--lr-max", "3e-3"),
            *("--table-lrs", "1e-4", "1e-3", "--table-steps", "5"),
            *("--worker-resource", "trainer=1", "--worker-resource", "big=0.5"),
            *("--set", "model.d_model=64", "--set", "train.lr=1e-3"),
            *("--gpus-per-worker", "0.25", "--max-concurrent", "3", "--mlflow-wait", "60"),
            *("--tracking-uri", "http://127.0.0.1:5000", "--data", "/d", "--table-only"),
            *("--address", "auto", "--resume", "--name", "n", "--allow-unauthenticated-ray"),
        ]
    )
    assert opts.search == SearchOptions(trials=16, steps=200, lr_min=3e-5, lr_max=3e-3)
    assert opts.table == TableOptions(lrs=(1e-4, 1e-3), steps=5)
    assert opts.resources == ResourceOptions(
        gpus_per_worker=0.25, worker_resources={"trainer": 1.0, "big": 0.5}, max_concurrent=3
    )
    assert opts.tracking == TrackingOptions(uri="http://127.0.0.1:5000", wait_s=60.0)
    assert opts.data == DataOptions(path="/d")
    assert opts.model_overrides == ["model.d_model=64", "train.lr=1e-3"]
    assert (opts.run_table, opts.run_search) == (True, False)
    assert (opts.address, opts.resume, opts.name, opts.allow_unauthenticated_ray) == (
        "auto",
        True,
        "n",
        True,
    )


def test_smoke_defaults_give_way_to_explicit_flags() -> None:
    opts = parse(["--smoke-test", "--trials", "3", "--search-only"])
    smoke = SweepOptions.smoke()
    assert opts.search == dataclasses.replace(smoke.search, trials=3)
    assert (opts.table, opts.data, opts.early_stop) == (smoke.table, smoke.data, smoke.early_stop)
    assert (opts.run_table, opts.run_search, opts.smoke_test) == (False, True, True)


def test_environment_sets_the_address_and_tracking_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    opts = parse([])
    assert (opts.address, opts.tracking.uri) == ("ray://head:10001", "http://mlflow:5000")
    assert parse(["--tracking-uri", "sqlite:///x.db"]).tracking.uri == "sqlite:///x.db"


def test_help_comes_from_the_field_docstrings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--trials TRIALS Optuna trials; default: 4 when trials train on CPUs, 8 on GPUs." in out
    assert "--steps STEPS Training steps per search trial; default: 60 when trials" in out
    assert "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)" in out
    assert "--worker-resource NAME=AMOUNT Custom Ray resource" in out
    assert "--table-only only the stability table" in out


# ---------------------------------------------------------------- bad input names the flag


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trails", "3"], "unrecognized arguments: --trails 3"),
        (["--trials", "x"], "argument --trials: invalid int value: 'x'"),
        (["--trials", "0"], "argument --trials: must be >= 1, got 0"),
        (["--steps", "-5"], "argument --steps: must be >= 1, got -5"),
        (
            ["--lr-min", "1e-2", "--lr-max", "1e-3"],
            "argument --lr-min/--lr-max: need 0 < lr_min < lr_max, got 0.01, 0.001",
        ),
        (["--dropout-max", "1.5"], "argument --dropout-min/--dropout-max: need 0 <= dropout_min"),
        (["--cpus-per-worker", "0"], "argument --cpus-per-worker: must be > 0, got 0.0"),
        (["--worker-resource", "trainer"], "argument --worker-resource: expected NAME=VALUE, got"),
        (["--worker-resource", "trainer=x"], "argument --worker-resource: 'x' in 'trainer=x' is"),
        (["--worker-resource", "trainer=0"], "argument --worker-resource: trainer=0.0: amount"),
        (["--table-lrs", "1e-4", "-1"], "argument --table-lrs: need one or more learning rates"),
        (["--table-only", "--search-only"], "argument --search-only: not allowed with argument"),
    ],
)
def test_bad_values_fail_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- dotted changes


def test_changes_by_dotted_path_are_validated_and_leave_the_original_alone() -> None:
    smoke = SweepOptions.smoke()
    opts = smoke.changed({"name": "x", "search.trials": 5, "resources.max_failures": 3})
    assert (opts.name, opts.search.trials, opts.resources.max_failures) == ("x", 5, 3)
    assert opts.search.steps == smoke.search.steps  # the rest of the group is kept
    assert smoke == SweepOptions.smoke()
    with pytest.raises(OptionError, match=r"^search\.lr_min/search\.lr_max: need 0 < lr_min"):
        smoke.changed({"search.lr_min": 1.0})
    with pytest.raises(OptionError, match=r"^search\.trails: unknown option; valid ones are"):
        smoke.changed({"search.trails": 5})
    with pytest.raises(OptionError, match=r"^name\.x: name has no sub-options"):
        smoke.changed({"name.x": 5})
    with pytest.raises(OptionError, match=r"^run_table/run_search: nothing to run"):
        smoke.changed({"run_table": False, "run_search": False})


# ---------------------------------------------------------------- the generic parts


@dataclass(kw_only=True)
class _Inner:
    """Inner group: a docstring's first line titles the group."""

    ratio: float = 0.5
    """A ratio."""

    def __post_init__(self) -> None:
        if not 0 <= self.ratio <= 1:
            raise OptionError("ratio", f"must be in [0, 1], got {self.ratio}")


@dataclass(kw_only=True)
class _Outer:
    count: int = 3
    """How many
    (over two lines)."""
    tags: list[str] = field(default_factory=lambda: ["a"], metadata={"flag": "tag"})
    hidden: bool = field(default=True, metadata={"cli": False})
    inner: _Inner = field(default_factory=_Inner)


def test_field_docs_reads_the_docstring_under_each_field() -> None:
    assert field_docs(_Outer) == {"count": "How many (over two lines)."}
    assert field_docs(_Inner) == {"ratio": "A ratio."}


def test_generic_flags_for_a_small_tree(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="demo")
    flags = OptionFlags(parser, _Outer())
    assert flags.flags == {"count": "--count", "tags": "--tag", "inner.ratio": "--ratio"}
    got = flags.options(parser.parse_args(["--tag", "b", "--ratio", "1"]), {"hidden": False})
    assert got == _Outer(tags=["a", "b"], hidden=False, inner=_Inner(ratio=1.0))
    assert _Outer().tags == ["a"]  # appending did not change the default
    with pytest.raises(SystemExit):
        flags.options(parser.parse_args(["--ratio", "2"]))
    assert "demo: error: argument --ratio: must be in [0, 1], got 2.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="two option fields make the flag --ratio"):

        @dataclass(kw_only=True)
        class _Clash:
            ratio: float = 1.0
            inner: _Inner = field(default_factory=_Inner)

        OptionFlags(argparse.ArgumentParser(), _Clash())


def test_with_changes_works_on_any_option_tree() -> None:
    assert with_changes(_Outer(), {"inner.ratio": 0.25}).inner == _Inner(ratio=0.25)
    with pytest.raises(OptionError, match=r"^inner\.ratio: must be in \[0, 1\], got 7"):
        with_changes(_Outer(), {"inner.ratio": 7})


# ---------------------------------------------------------------- CPU and GPU defaults


def test_resource_dependent_defaults_follow_the_trials_resources() -> None:
    cpu = SweepOptions().resolved()
    assert (cpu.search.trials, cpu.search.steps, cpu.search.batch_size) == (4, 60, 64)
    assert (cpu.early_stop.report_every, cpu.table.seeds) == (20, 1)
    assert (cpu.table.models, cpu.table.hidden_columns) == (("original",), False)
    gpu = parse(["--gpus-per-worker", "0.25"]).resolved()
    assert (gpu.search.trials, gpu.search.steps, gpu.search.batch_size) == (8, 300, 256)
    assert (gpu.early_stop.report_every, gpu.table.seeds) == (50, 3)
    assert (gpu.table.models, gpu.table.hidden_columns) == (("original", "iceaggr"), True)
    off = parse(["--gpus-per-worker", "1", "--no-table-hidden-columns"]).resolved()
    assert off.table.hidden_columns is False
    # An explicit flag wins over either preset; resolving twice changes nothing.
    mine = parse(
        ["--gpus-per-worker", "1", "--steps", "40", "--report-every", "4", "--trials", "3"]
    ).resolved()
    assert (mine.search.steps, mine.early_stop.report_every, mine.search.trials) == (40, 4, 3)
    assert mine.search.batch_size == 256
    assert mine.resolved() == mine
    # The smoke preset sets every one of them.
    smoke = SweepOptions.smoke()
    assert smoke.resolved() == smoke.changed({"table.seeds": 1, "table.hidden_columns": False})
    mine = parse(["--table-models", "original", "iceaggr"]).resolved()
    assert mine.table.models == ("original", "iceaggr")
