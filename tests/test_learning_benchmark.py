"""CPU smoke and unit tests for ``benchmarks/learning.py`` (no learning speed is asserted).

The benchmark runs in-process on the shared small synthetic dataset with two debug-sized models
for 10 steps; the tests check the curves it records, that the two models saw the same batches,
that its last score is train()'s own validation score, and its checkpoint/interpolation rules.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from iceaggr.data.linefit import line_fit_dataset

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"

DEBUG_MODEL = [
    "model.d_model=16",
    "model.dom_heads=2",
    "model.dom_layers=1",
    "model.event_heads=2",
    "model.event_layers=1",
    "train.batch_size=32",
    "train.warmup_steps=2",
]


@pytest.fixture(scope="module")
def learning() -> Iterator[ModuleType]:
    """benchmarks/learning.py imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_learning", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_smoke_two_models_same_batches(
    learning: ModuleType,
    small_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    torch_one_thread: None,
) -> None:
    out = tmp_path / "out"
    argv = ["--data", str(small_dataset), "--steps", "10", "--checkpoints", "2"]
    argv += ["--equal-time-at", "5", "--steps-at", "5", "--val-events", "64", "--out", str(out)]
    argv += ["--model", "a", "--model", "b", "--set", "b:train.lr=1e-3"]
    argv += [f"--set={s}" for s in DEBUG_MODEL]
    assert learning.main(argv) == 0

    doc = json.loads((out / "learning.json").read_text())
    curves = {c["label"]: c for c in doc["curves"]}
    assert list(curves) == ["a", "b"]
    for c in curves.values():
        # Step 0, the log-spaced steps from 10 to 10 (just 10), and the equal-time mark 5.
        assert c["steps"] == [0, 5, 10]
        assert c["diverged"] is None
        assert c["seconds"][0] == 0.0 and c["seconds"][1] < c["seconds"][2]
        assert all(0.0 < v < math.pi for v in c["val_angle"])
        assert math.isnan(c["train_loss"][0]) and c["train_loss"][2] > 0
        # R: length of the mean unit prediction, one per checkpoint.
        assert len(c["resultant"]) == 3 and all(0.0 <= r <= 1.0 + 1e-9 for r in c["resultant"])
        assert c["config"]["train"]["max_steps"] == 10
        assert c["config"]["data"]["prefetch"] == 0
    # Shared overrides reach every model, own ones only theirs.
    assert curves["a"]["config"]["model"]["d_model"] == 16
    assert (curves["a"]["config"]["train"]["lr"], curves["b"]["config"]["train"]["lr"]) == (
        3e-4,
        1e-3,
    )
    # Same seed, same init, same held-out events: equal step-0 scores; different lr afterwards.
    assert curves["a"]["val_angle"][0] == curves["b"]["val_angle"][0]
    assert curves["a"]["val_angle"][2] != curves["b"]["val_angle"][2]
    # The line fit on the held-out events is the 64 first events of the last file (batch 3).
    assert 0.5 < doc["line_fit_val_angle"] < math.pi / 2
    assert {(r["mark_steps"], r["clock"]) for r in doc["equal_time"]} == {
        (5, "seconds"),
        (10, "seconds"),
        (5, "cpu_seconds"),
        (10, "cpu_seconds"),
    }
    assert (out / "learning.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "### a (" in printed and "Validation error at equal training time" in printed
    assert doc["steps_at"] == [5]
    row = next(line for line in printed.splitlines() if line.startswith("| 5 | "))
    a5 = curves["a"]["steps"].index(5)
    assert f"{curves['a']['val_angle'][a5]:.4f} ({curves['a']['resultant'][a5]:.3f})" in row


def test_line_fit_error_is_the_librarys_line_fit(learning: ModuleType, small_dataset: Path) -> None:
    # line_fit_dataset scores the first events of the first file: the same events as here. It
    # reads the geometry in float64, KaggleDataset keeps it in float32 (positions to ~1e-5 m).
    expected = line_fit_dataset(small_dataset, max_events=100)["mean_angular_error"]
    assert learning.line_fit_error(small_dataset, [1], 100) == pytest.approx(expected, abs=1e-7)
    # Across a file boundary (500 events per file).
    expected = line_fit_dataset(small_dataset, max_events=700)["mean_angular_error"]
    assert learning.line_fit_error(small_dataset, [1, 2], 700) == pytest.approx(expected, abs=1e-7)


def test_checkpoint_steps_are_log_spaced_with_marks(learning: ModuleType) -> None:
    assert learning.checkpoint_steps(1500, 5, [300, 1500]) == {10, 35, 122, 300, 429, 1500}
    assert learning.checkpoint_steps(8, 3, [300]) == {8}


def test_equal_time_reads_every_model_at_the_slowest_models_time(learning: ModuleType) -> None:
    fast = learning.Curve(label="fast", config={})
    slow = learning.Curve(label="slow", config={})
    fast.steps, fast.seconds, fast.cpu_seconds = [0, 10, 20], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]
    fast.val_angle = [1.5, 1.3, 1.2]
    slow.steps, slow.seconds, slow.cpu_seconds = [0, 10, 20], [0.0, 1.5, 3.0], [0.0, 1.5, 3.0]
    slow.val_angle = [1.5, 1.4, 1.0]
    rows = learning.equal_time([fast, slow], [10, 20], "seconds")
    assert [r["seconds"] for r in rows] == [1.5, 3.0]
    at10 = rows[0]["models"]
    assert at10["fast"] == {
        "val_angle": pytest.approx(1.25),
        "step": 15.0,
        "finished_before": False,
    }
    assert at10["slow"] == {"val_angle": 1.4, "step": 10.0, "finished_before": False}
    at20 = rows[1]["models"]
    assert at20["fast"] == {"val_angle": 1.2, "step": 20.0, "finished_before": True}


def test_models_must_share_batches(learning: ModuleType, small_dataset: Path) -> None:
    argv = ["--data", str(small_dataset), "--model", "a", "--model", "b"]
    argv += ["--set", "b:train.batch_size=16"]
    with pytest.raises(SystemExit, match=r"train.batch_size differs: \{'a': 256, 'b': 16\}"):
        learning.main(argv)
    with pytest.raises(SystemExit, match="no --model labelled 'c'"):
        learning.main(["--model", "a", "--set", "c:train.lr=1"])
