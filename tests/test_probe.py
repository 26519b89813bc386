"""Tests for the stability probe (iceaggr.training.probe) and the ``iceaggr`` command line.

The table layout is pinned to DESIGN.md section 6; the probe and the CLI run for real on a small
synthetic dataset with the debug model (3 steps per cell).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from iceaggr.cli import main
from iceaggr.training.config import ExperimentConfig, debug_config, to_dict
from iceaggr.training.probe import (
    CELL_METRIC,
    COLUMNS,
    PROBE_EVAL_EVENTS,
    Cell,
    cell_from_result,
    classify,
    probe_config,
    run_probe,
)
from iceaggr.training.results import TrainResult
from iceaggr.training.stability_table import (
    LEARNING_TITLE,
    REPRODUCTION_TITLE,
    column_of,
    format_learning,
    format_table,
    write_table,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
PROBE_TEST_LRS = (1e-4, 1e-3)
PROBE_TEST_STEPS = 3
PROBE_TEST_BATCH = 32

HEADER = (
    "| Learning Rate | Before Normalization | After Normalization "
    "| This project's model, raw inputs | This project's model, normalized |"
)


# ---------------------------------------------------------------- classify


def test_classify_explodes() -> None:
    kw = dict(max_param_grad_norm=5.0, grad_norm_warn=1e3)
    assert classify(diverged=True, loss_initial=1.6, loss_final=1.5, **kw) == ("explodes", None)
    assert classify(diverged=False, loss_initial=None, loss_final=1.5, **kw) == ("explodes", None)
    assert classify(diverged=False, loss_initial=1.6, loss_final=None, **kw) == ("explodes", None)


def test_classify_non_finite_fixed_batch_loss_explodes() -> None:
    kw = dict(diverged=False, max_param_grad_norm=5.0, grad_norm_warn=1e3)
    assert classify(loss_initial=1.6, loss_final=math.nan, **kw) == ("explodes", None)
    assert classify(loss_initial=math.inf, loss_final=1.5, **kw) == ("explodes", None)
    assert classify(loss_initial=1.6, loss_final=-math.inf, **kw) == ("explodes", None)


def test_a_nan_final_fixed_batch_loss_is_an_explosion_in_the_table() -> None:
    # The run itself did not diverge (no guard fired), but the fixed batch scored NaN after
    # the last step: the cell must say EXPLODES, not "Loss +nan".
    result = TrainResult(
        steps=3, fixed_batch_loss_initial=1.5, fixed_batch_loss_final=math.nan, max_grad_norm=0.5
    )
    cfg = probe_config(debug_config("d"), 1e-3, False, steps=3, batch_size=32, arch="original")
    cell = cell_from_result(cfg, result)
    assert cell.text == "❌ EXPLODES"
    assert (cell.status, cell.loss_change) == ("explodes", None)
    assert (cell.loss_initial, cell.loss_final) == (1.5, None)
    assert cell.diverged_at_step is None
    assert cell.divergence_reason == (
        "held-out loss not finite: 1.5 before the first step, nan after"
    )
    assert (cell.model, cell.seed) == ("original", 0)
    assert (cell.stable, cell.learned, cell.collapsed) == (False, False, False)
    assert format_learning([cell]).splitlines()[2] == "| 1e-3 | ❌ EXPLODES |"


def test_cell_travels_as_one_metric_and_comes_back_exactly() -> None:
    cell = Cell(
        lr=1e-3,
        normalize=False,
        status="explodes",
        loss_change=None,
        loss_initial=1.5707963267948966,
        loss_final=None,
        max_grad_norm=4.3e8,
        diverged_at_step=7,
        divergence_reason="diverged at step 7: non-finite loss (nan)",
        max_abs_input=36012.5,
    )
    metrics = cell.to_metrics()
    assert list(metrics) == [CELL_METRIC] and isinstance(metrics[CELL_METRIC], str)
    back = Cell.from_metrics({"step": 7.0, **metrics})
    assert back == cell
    assert back.text == "❌ EXPLODES"
    with pytest.raises(ValueError, match=r"no 'cell' in the trial's metrics \['step'\]"):
        Cell.from_metrics({"step": 7.0})


def test_classify_no_decrease() -> None:
    status, change = classify(
        diverged=False,
        loss_initial=1.5,
        loss_final=1.523,
        max_param_grad_norm=5.0,
        grad_norm_warn=1e3,
    )
    assert status == "no_decrease"
    assert change == pytest.approx(0.023)
    # Exactly unchanged is not a decrease, whatever the gradients did.
    assert classify(
        diverged=False,
        loss_initial=1.5,
        loss_final=1.5,
        max_param_grad_norm=1e9,
        grad_norm_warn=1e3,
    ) == ("no_decrease", 0.0)


def test_classify_warn_and_ok_split_on_the_gradient_threshold() -> None:
    def run(max_grad_norm: float) -> tuple[str, float | None]:
        return classify(
            diverged=False,
            loss_initial=1.549,
            loss_final=1.5,
            max_param_grad_norm=max_grad_norm,
            grad_norm_warn=1e3,
        )

    status, change = run(4e8)
    assert status == "warn"
    assert change == pytest.approx(-0.049)
    assert run(1000.0001)[0] == "warn"
    assert run(1000.0)[0] == "ok"  # the threshold itself is still tame
    status, change = run(0.5)
    assert status == "ok"
    assert change == pytest.approx(-0.049)


# ---------------------------------------------------------------- the protocol


def test_probe_config_is_the_original_protocol() -> None:
    base = debug_config("d")
    cfg = probe_config(base, 3e-4, False, steps=20, batch_size=256)
    t = cfg.train
    assert cfg.model.normalize is False
    assert (t.lr, t.max_steps, t.batch_size) == (3e-4, 20, 256)
    assert (t.warmup_steps, t.min_lr_ratio) == (0, 1.0)  # constant learning rate
    assert t.loss == "angular"
    assert t.grad_clip == base.train.grad_clip
    assert (t.checkpoint_every, t.eval_every, t.mlflow_tracking_uri) == (0, 0, None)
    assert cfg.data.max_val_events == PROBE_EVAL_EVENTS  # the held-out set
    assert cfg.name == "probe-iceaggr-lr3e-04-raw-seed0"
    assert base == debug_config("d")  # the base is not modified


def test_probe_config_keeps_the_base_dropout_and_seed() -> None:
    base = debug_config("d")
    base.model.dropout = 0.1
    base.train.seed = 5
    cfg = probe_config(base, 1e-4, True, steps=4, batch_size=32)
    assert (cfg.model.dropout, cfg.train.seed, cfg.model.normalize) == (0.1, 5, True)


# ---------------------------------------------------------------- the probe, for real


def probe_base(data: Path) -> ExperimentConfig:
    return debug_config(str(data))


@pytest.fixture(scope="module")
def probe_cells(small_dataset: Path) -> list[Cell]:
    return run_probe(
        probe_base(small_dataset),
        lrs=PROBE_TEST_LRS,
        steps=PROBE_TEST_STEPS,
        batch_size=PROBE_TEST_BATCH,
        progress=False,
    )


def test_run_probe_computes_every_cell(probe_cells: list[Cell]) -> None:
    assert [(c.lr, c.model, c.normalize) for c in probe_cells] == [
        (lr, col.arch, col.normalize) for lr in PROBE_TEST_LRS for col in COLUMNS
    ]
    warn = probe_base(Path(".")).train.grad_norm_warn
    for c in probe_cells:
        assert c.max_grad_norm > 0 and math.isfinite(c.max_grad_norm)
        expected = classify(
            diverged=c.diverged_at_step is not None,
            loss_initial=c.loss_initial,
            loss_final=c.loss_final,
            max_param_grad_norm=c.max_param_grad_norm,
            grad_norm_warn=warn,
        )
        assert (c.status, c.loss_change) == expected
        if c.status != "explodes":
            assert c.loss_initial is not None and c.loss_final is not None
            assert 0.0 < c.loss_initial < math.pi and 0.0 < c.loss_final < math.pi
            assert c.loss_change == pytest.approx(c.loss_final - c.loss_initial)
            assert c.diverged_at_step is None
        else:
            assert c.diverged_at_step is not None and 1 <= c.diverged_at_step <= PROBE_TEST_STEPS
        # Raw cells feed ns and metres to the network; normalized ones O(1) values.
        assert c.max_abs_input is not None
        assert (c.max_abs_input > 1e3) if not c.normalize else (c.max_abs_input < 10)
        assert 0 < c.max_param_grad_norm <= c.max_grad_norm * (1 + 1e-6)
        assert c.max_param_grad_name is not None and c.eval_events > 0
        assert c.train_loss_change is not None and c.loss_change_stderr is not None
        # The collapse signals of the held-out set, before and after.
        assert c.resultant_initial is not None and 0.0 <= c.resultant_initial <= 1.0
        assert c.target_resultant is not None and c.target_resultant < 0.5
        assert c.const_loss is not None and 0.5 < c.const_loss < math.pi / 2 + 0.1
        assert c.original_status is not None
        if c.status != "explodes":
            assert c.vs_const == pytest.approx(c.loss_final - c.const_loss, abs=1e-6)
            assert c.vs_const_stderr is not None and c.vs_const_stderr > 0
            assert c.collapsed == (c.resultant_final >= 0.9)
            assert c.stable == (c.max_param_grad_norm <= warn)
    # Every cell of a column starts from the same weights and is scored on the same events.
    for col in COLUMNS:
        initial = {
            (c.loss_initial, c.resultant_initial) for c in probe_cells if column_of(c) == col
        }
        assert len(initial) == 1
    assert len({c.const_loss for c in probe_cells}) == 1  # the same held-out events


def test_write_table_json_and_markdown(probe_cells: list[Cell], tmp_path: Path) -> None:
    md, js = write_table(probe_cells, tmp_path / "out", meta={"steps": PROBE_TEST_STEPS})
    assert md.read_text() == format_table(probe_cells) + "\n"
    data = json.loads(js.read_text())
    assert data["meta"] == {"steps": PROBE_TEST_STEPS}
    assert len(data["cells"]) == 2 * len(COLUMNS)
    for entry, cell in zip(data["cells"], probe_cells, strict=True):
        for key in ("lr", "normalize", "status", "loss_change", "max_grad_norm", "text"):
            assert key in entry
        assert entry["lr"] == cell.lr and entry["normalize"] == cell.normalize
        assert entry["status"] == cell.status
        assert entry["loss_change"] == cell.loss_change
        assert entry["max_grad_norm"] == pytest.approx(cell.max_grad_norm)
        assert entry["text"] == cell.text
    lines = md.read_text().splitlines()
    at = lines.index(LEARNING_TITLE) + 2
    assert lines[at] == HEADER
    assert [line.split(" | ")[0] for line in lines[at + 2 : at + 4]] == ["| 1e-4", "| 1e-3"]
    assert data["reproduction"]["of"] == 2 * len(PROBE_TEST_LRS)  # lrs with a published value
    assert len(data["learning"]) == 2 * len(COLUMNS)


# ---------------------------------------------------------------- the command line


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    """``main`` configures the root logger; undo it so later tests see pytest's set-up."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def write_debug_yaml(path: Path, data: Path, out: Path, **train: object) -> Path:
    d = to_dict(debug_config(str(data)))
    d["train"].update(out_dir=str(out), **train)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.mark.usefixtures("restore_root_logging")
def test_cli_probe_prints_and_writes_the_table(
    small_dataset: Path,
    tmp_path: Path,
    probe_cells: list[Cell],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_debug_yaml(tmp_path / "debug.yaml", Path("elsewhere"), tmp_path / "unused")
    out = tmp_path / "probe"
    argv = ["probe", "--data", str(small_dataset), "--steps", str(PROBE_TEST_STEPS)]
    argv += ["--batch-size", str(PROBE_TEST_BATCH), "--lrs", *map(str, PROBE_TEST_LRS)]
    argv += ["--config", str(config), "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    table = (out / "stability_table.md").read_text().strip()
    assert table in stdout
    lines = table.splitlines()
    assert lines[0] == REPRODUCTION_TITLE
    # The reproduction's cells are the training-batch changes of the JSON, as printed.
    data = json.loads((out / "stability_table.json").read_text())
    for line, lr in zip(lines[4 : 4 + len(PROBE_TEST_LRS)], sorted(PROBE_TEST_LRS), strict=True):
        cells = {(c["model"], c["normalize"]): c for c in data["cells"] if c["lr"] == lr}
        first = cells[("original", False)]
        change = first["train_loss_change"]
        shown = line.split(" | ")[1]
        assert shown == "❌ EXPLODES" if change is None else shown.endswith(f"Loss {change:+.3f}")
    at = lines.index(LEARNING_TITLE) + 2
    assert lines[at] == HEADER
    data = json.loads((out / "stability_table.json").read_text())
    assert data["meta"]["steps"] == PROBE_TEST_STEPS
    assert data["meta"]["batch_size"] == PROBE_TEST_BATCH
    assert data["meta"]["data"] == str(small_dataset)  # --data replaces the YAML's data.path
    # The command runs the same protocol as run_probe: same cells, same numbers.
    assert [(c["lr"], c["normalize"], c["status"]) for c in data["cells"]] == [
        (c.lr, c.normalize, c.status) for c in probe_cells
    ]
    for entry, cell in zip(data["cells"], probe_cells, strict=True):
        assert entry["max_grad_norm"] == pytest.approx(cell.max_grad_norm, rel=1e-5)
        if cell.loss_change is not None:
            assert entry["loss_change"] == pytest.approx(cell.loss_change, abs=1e-6)


@pytest.mark.usefixtures("restore_root_logging")
def test_cli_train_with_overrides(
    small_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_debug_yaml(tmp_path / "debug.yaml", small_dataset, tmp_path / "yaml_out")
    out = tmp_path / "run"
    argv = ["train", str(config), "--set", "train.max_steps=3", "--set", f"train.out_dir={out}"]
    argv += ["--set", "train.log_every=1", "--set", "train.eval_every=0"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "trained 3 steps" in stdout
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 3
    # The last validation's collapse signals, printed and in the result.
    c = result["val_collapse"]
    assert f"{c['margin']:+.4f} vs the best constant direction, R {c['resultant']:.3f}" in stdout
    assert result["collapsed"] == (c["resultant"] >= 0.9)
    assert c["angle"] == pytest.approx(result["val_angle"])
    assert result["diverged"] is None
    assert [h["step"] for h in result["history"]] == [1, 2, 3]
    assert not (tmp_path / "yaml_out").exists()  # the override won over the YAML


@pytest.mark.usefixtures("restore_root_logging")
def test_cli_train_reports_errors_and_divergence(
    small_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_debug_yaml(tmp_path / "debug.yaml", small_dataset, tmp_path / "run")
    assert main(["train", str(config), "--set", "train.lr=-1"]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["train", str(config), "--set", "train.lrr=1"]) == 2
    assert "unknown key(s) ['lrr']" in capsys.readouterr().err

    argv = ["train", str(config), "--set", "model.normalize=false", "--set", "train.lr=1e6"]
    argv += ["--set", "train.warmup_steps=0", "--set", "train.log_every=1"]
    assert main(argv) == 3
    stdout = capsys.readouterr().out
    assert "DIVERGED: diverged at step" in stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["diverged"]["step"] == result["steps"] < debug_config().train.max_steps


def test_train_from_config_script(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = write_debug_yaml(
        tmp_path / "debug.yaml",
        small_dataset,
        out,
        max_steps=2,
        log_every=1,
        eval_every=0,
        checkpoint_every=2,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ICEAGGR_LOG_LEVEL": "WARNING"}
    proc = subprocess.run(
        [sys.executable, "scripts/train_from_config.py", str(config), "--set", "train.seed=3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "trained 2 steps" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2
    assert (out / "checkpoint.pt").is_file()


def test_a_model_that_starts_good_has_learned_but_not_improved() -> None:
    # This project's model with the moment prior: far below the best constant direction from
    # its start, and the steps move it by less than two paired standard errors.
    result = TrainResult(
        steps=20,
        fixed_batch_loss_initial=1.2079,
        fixed_batch_loss_final=1.2095,
        fixed_batch_change_stderr=0.0011,
        max_grad_norm=0.3,
        fixed_collapse_initial={"resultant": 0.04, "target_resultant": 0.03, "const_angle": 1.53},
        fixed_collapse_final={"resultant": 0.025, "margin": -0.3216, "margin_stderr": 0.0307},
    )
    cfg = probe_config(debug_config("d"), 1e-3, False, steps=20, batch_size=32, arch="iceaggr")
    cell = cell_from_result(cfg, result)
    assert (cell.stable, cell.learned, cell.improved, cell.collapsed) == (True, True, False, False)
    # The same change beyond two standard errors is an improvement; a margin within two
    # standard errors of the constant is not learning.
    result.fixed_batch_loss_final, result.fixed_batch_change_stderr = 1.1879, 0.005
    result.fixed_collapse_final = {"resultant": 0.999, "margin": -0.05, "margin_stderr": 0.03}
    cell = cell_from_result(cfg, result)
    assert (cell.learned, cell.improved, cell.collapsed) == (False, True, True)
