"""Tests for the trainer (iceaggr.training.trainer) on a real synthetic dataset, debug model.

Covers: learning with normalized inputs, the divergence guard (an absurd learning rate, a
raw feature that overflows float32, a NaN gradient injected at step 3, hand-made steps),
exact resume from a checkpoint (bit for bit through ``TrainState``), the input audit, the
pre-clip global and per-parameter gradient norms, the learning-rate schedule, the order and
arguments of hook calls, and MLflow records in a real sqlite store.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from iceaggr.data.batch import DomBatch
from iceaggr.data.dataset import KaggleDataset, split_batch_ids
from iceaggr.data.loader import EventLoader
from iceaggr.models.losses import angular_distance
from iceaggr.models.model import IceAggrModel
from iceaggr.models.normalization import TIME_OFFSET_NS, TIME_SCALE_NS, XYZ_SCALE_M
from iceaggr.training.checkpoint import CHECKPOINT_NAME, TrainState
from iceaggr.training.config import ExperimentConfig, debug_config, to_dict
from iceaggr.training.evaluation import evaluate
from iceaggr.training.guard import DivergenceGuard, DivergenceReport, StepOutput
from iceaggr.training.hooks import Hook
from iceaggr.training.mlflow_hook import TAG_RESUMED_FROM_STEP, MlflowHook
from iceaggr.training.results import TrainResult
from iceaggr.training.trainer import Trainer, lr_lambda, train

pytestmark = pytest.mark.usefixtures("torch_one_thread")

RANDOM_GUESS_RAD = math.pi / 2


def make_cfg(data: Path, out: Path, *, normalize: bool = True, **train: Any) -> ExperimentConfig:
    """The debug preset on ``data`` writing to ``out``; ``train`` overrides (validated)."""
    cfg = debug_config(str(data))
    cfg.model = dataclasses.replace(cfg.model, normalize=normalize)
    cfg.data = dataclasses.replace(cfg.data, max_val_events=64)
    cfg.train = dataclasses.replace(cfg.train, out_dir=str(out), **train)
    return cfg


def train_loader(cfg: ExperimentConfig) -> EventLoader:
    """The training loader exactly as ``train`` builds it (same files, order and batches)."""
    ds = KaggleDataset(cfg.data.path)
    train_ids, _ = split_batch_ids(ds.batch_ids, cfg.data.val_files)
    return EventLoader(
        dataset=ds,
        batch_ids=train_ids,
        batch_size=cfg.train.batch_size,
        truncation=cfg.data.truncation(),
        seed=cfg.train.seed,
        prefetch=0,
        max_events=cfg.data.max_train_events,
    )


def fresh_model(cfg: ExperimentConfig) -> IceAggrModel:
    """The model ``train`` starts from (same seed, same initialization)."""
    torch.manual_seed(cfg.train.seed)
    return IceAggrModel(cfg.model)


def mean_angle(model: IceAggrModel, data: Path, batch_ids: list[int]) -> float:
    """Mean angular error (rad) of ``model`` over every event of ``batch_ids``."""
    loader = EventLoader(
        dataset=KaggleDataset(data),
        batch_ids=batch_ids,
        batch_size=500,
        shuffle=False,
        drop_last=False,
        prefetch=0,
    )
    total, n = evaluate(model, loader, torch.device("cpu"), nullcontext)
    return total / n


def load_checkpoint(out: Path) -> dict[str, Any]:
    return torch.load(out / CHECKPOINT_NAME, weights_only=False)


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


# ---------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def normalized_run(
    small_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ExperimentConfig, TrainResult, IceAggrModel]:
    """60 steps of the debug model on normalized inputs, batch 32; its final model."""
    out = tmp_path_factory.mktemp("normalized_run")
    cfg = make_cfg(
        small_dataset,
        out,
        max_steps=60,
        lr=3e-3,
        warmup_steps=5,
        log_every=10,
        eval_every=0,
        checkpoint_every=60,
    )
    cfg.data = dataclasses.replace(cfg.data, max_val_events=500)  # the whole validation file
    # Without the moment prior: this checks that the trainer learns from an uninformed start.
    # With it (the default) the untrained debug model already predicts the moment direction
    # (1.249 rad on these events) and 60 steps of this 16-wide model leave it there (1.246).
    cfg.model = dataclasses.replace(cfg.model, moment_prior=0.0)
    result = train(cfg, progress=False)
    model = IceAggrModel(cfg.model)
    model.load_state_dict(load_checkpoint(out)["model"])
    return cfg, result, model


def test_normalized_training_lowers_the_loss_on_training_events(
    small_dataset: Path, normalized_run: tuple[ExperimentConfig, TrainResult, IceAggrModel]
) -> None:
    cfg, result, trained = normalized_run
    assert result.diverged is None
    assert result.steps == 60
    assert [h["step"] for h in result.history] == [10, 20, 30, 40, 50, 60]
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert result.val_angle is not None and math.isfinite(result.val_angle)
    # Same 1,000 training events before and after: no batch-to-batch sampling noise (~0.12 rad
    # for one batch of 32), so a small margin separates learning from chance.
    before = mean_angle(fresh_model(cfg), small_dataset, [1, 2])
    after = mean_angle(trained, small_dataset, [1, 2])
    assert after < before - 0.03, (before, after)
    assert after < RANDOM_GUESS_RAD - 0.03


# ---------------------------------------------------------------- divergence guard


def expected_parameter_names(cfg: ExperimentConfig) -> set[str]:
    return {n for n, p in IceAggrModel(cfg.model).named_parameters() if p.requires_grad}


def expected_input_features(cfg: ExperimentConfig) -> set[str]:
    batch = next(train_loader(cfg).iter_epoch(0))
    return set(IceAggrModel(cfg.model).input_features(batch))


def check_stopped_at(result: TrainResult, out: Path, bad_step: int) -> None:
    """The run ended at ``bad_step`` and the last checkpoint is the step before it."""
    report = result.diverged
    assert report is not None
    assert report.step == bad_step
    assert result.steps == bad_step  # training did not continue past it
    assert [h["step"] for h in result.history] == list(range(1, bad_step + 1))
    assert result.history[-1]["diverged"] == 1.0
    for h in result.history[:-1]:  # every earlier step was finite
        assert h["diverged"] == 0.0
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"])
    last = result.history[-1]
    assert not (math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"]))
    assert report.last_finite_loss == pytest.approx(result.history[-2]["loss"])
    assert result.last_loss == report.last_finite_loss
    assert report.reason in ("non-finite loss", "non-finite prediction", "non-finite gradient")
    assert f"diverged at step {bad_step}: {report.reason}" in report.summary()
    # checkpoint_every=1: one per finite step, none for the bad step or later.
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_NAME]
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == bad_step - 1
    assert all_finite(ckpt["model"])


def test_absurd_learning_rate_on_raw_inputs_diverges(small_dataset: Path, tmp_path: Path) -> None:
    # Constant lr (no warm-up, no decay), so a shorter run follows the same trajectory.
    def cfg_for(steps: int, out: Path) -> ExperimentConfig:
        return make_cfg(
            small_dataset,
            out,
            normalize=False,
            lr=1e6,
            max_steps=steps,
            warmup_steps=0,
            min_lr_ratio=1.0,
            log_every=1,
            eval_every=0,
            checkpoint_every=1,
        )

    cfg = cfg_for(20, tmp_path / "run")
    result = train(cfg, progress=False)
    report = result.diverged
    assert report is not None
    # Step 1 runs on the initial weights; the first 1e6-sized update breaks step 2.
    assert report.step == 2
    check_stopped_at(result, tmp_path / "run", report.step)
    # Here the head's output (~1e19) overflows the norm inside F.normalize: the predictions
    # become zero vectors (loss 0) and every gradient NaN. Either way the first one is named.
    assert report.reason in ("non-finite gradient", "non-finite loss")
    assert report.first_bad_parameter in expected_parameter_names(cfg)
    assert report.max_grad_norm == pytest.approx(result.history[0]["grad_norm"])
    assert set(report.max_abs_input) == expected_input_features(cfg)
    assert report.max_abs_input["pulse_time"] > 1e4  # raw ns reached the network
    assert report.max_abs_input["pulse_auxiliary"] == 1.0
    # Independent check that step 2 is the first bad one: the run that stops before it is clean.
    shorter = train(cfg_for(report.step - 1, tmp_path / "short"), progress=False)
    assert shorter.diverged is None
    assert shorter.steps == report.step - 1


def corrupt_charge(data: Path, out: Path, cfg: ExperimentConfig, batch_index: int) -> None:
    """Copy ``data`` to ``out`` with one pulse charge of 1e39 p.e. in training batch
    ``batch_index`` (0-based) of epoch 0: finite in the float64 file, inf as float32."""
    shutil.copytree(data, out)
    corrupt = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(out)))
    loader = train_loader(corrupt)
    piece = loader.plan(0)[batch_index][0]
    meta = loader.dataset.meta(piece.batch_id)
    row = int(meta["first_pulse_index"][piece.events[0]])  # the event's earliest pulse: kept
    path = loader.dataset.batch_path(piece.batch_id)
    table = pq.read_table(path)
    charge = table.column("charge").to_numpy().copy()
    charge[row] = 1e39
    i = table.schema.get_field_index("charge")
    pq.write_table(table.set_column(i, "charge", pa.array(charge, pa.float64())), path)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("normalize", [True, False])
def test_feature_overflowing_float32_diverges_at_its_batch(
    small_dataset: Path, tmp_path: Path, normalize: bool
) -> None:
    bad_batch = 2  # 0-based: the third step of epoch 0 sees it
    cfg = make_cfg(
        tmp_path / "data",
        tmp_path / "run",
        normalize=normalize,
        lr=1e-3,
        max_steps=6,
        warmup_steps=0,
        log_every=1,
        eval_every=0,
        checkpoint_every=1,
    )
    corrupt_charge(small_dataset, tmp_path / "data", cfg, bad_batch)
    result = train(cfg, progress=False)
    report = result.diverged
    assert report is not None
    check_stopped_at(result, tmp_path / "run", bad_batch + 1)
    assert report.reason == "non-finite loss"
    assert report.first_bad_parameter in expected_parameter_names(cfg)
    assert set(report.max_abs_input) == expected_input_features(cfg)
    assert report.max_abs_input["pulse_charge"] == math.inf
    assert report.max_abs_input["dom_total_charge"] == math.inf
    assert math.isfinite(report.max_abs_input["pulse_time"])
    assert "largest input pulse_charge=inf" in report.summary()


# ---------------------------------------------------------------- checkpoints


class Preempted(Exception):
    """Raised from the report callback to simulate a job killed right after a checkpoint."""


def test_resume_from_checkpoint_is_exact(small_dataset: Path, tmp_path: Path) -> None:
    def cfg_for(out: Path) -> ExperimentConfig:
        cfg = make_cfg(
            small_dataset,
            out,
            max_steps=12,
            warmup_steps=2,
            lr=2e-3,
            log_every=3,
            eval_every=0,
            checkpoint_every=6,
        )
        # Dropout exercises the restored RNG; 4 batches per epoch make the resume cross epochs.
        cfg.model = dataclasses.replace(cfg.model, dropout=0.1)
        cfg.data = dataclasses.replace(cfg.data, max_train_events=128)
        return cfg

    straight = train(cfg_for(tmp_path / "straight"), progress=False)

    def preempt(metrics: dict[str, float], step: int, ckpt: Path | None) -> None:
        if step == 6:
            assert ckpt == tmp_path / "first_half"
            raise Preempted

    with pytest.raises(Preempted):
        train(cfg_for(tmp_path / "first_half"), report=preempt, progress=False)
    half = load_checkpoint(tmp_path / "first_half")
    assert (half["step"], half["epoch"], half["batch_in_epoch"]) == (6, 1, 2)

    resumed = train(
        cfg_for(tmp_path / "resumed"), resume_from=tmp_path / "first_half", progress=False
    )
    assert resumed.steps == straight.steps == 12
    assert resumed.first_loss == straight.first_loss

    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], rtol=0, atol=1e-6), name
    moved = [n for n in a["model"] if not torch.equal(a["model"][n], half["model"][n])]
    assert moved, "the second half of training must change the parameters"
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=0, atol=1e-9)

    after = [h for h in straight.history if h["step"] > 6]
    assert [h["step"] for h in resumed.history] == [h["step"] for h in after] == [9, 12]
    for hs, hr in zip(after, resumed.history, strict=True):
        for key in ("loss", "grad_norm", "max_grad_norm", "lr", "epoch", "val_angle"):
            if key in hs:
                assert hr[key] == pytest.approx(hs[key], rel=1e-6, abs=1e-7), key
    assert "val_angle" in resumed.history[-1]
    assert resumed.val_angle == pytest.approx(straight.val_angle, abs=1e-6)


def test_report_callback_can_stop_the_run_early(small_dataset: Path, tmp_path: Path) -> None:
    """The early-stopping path of the sweep: the callback returns True at a report."""
    cfg = make_cfg(small_dataset, tmp_path, max_steps=12, log_every=3, eval_every=0)
    seen: list[int] = []

    def stop_at_6(metrics: dict[str, float], step: int, ckpt: Path | None) -> bool:
        seen.append(step)
        return step == 6

    result = train(cfg, report=stop_at_6, progress=False)
    assert seen == [3, 6]
    assert result.stopped_early
    assert result.steps == 6
    assert [h["step"] for h in result.history] == [3, 6]

    # Asking to stop at the last step is an ordinary finish.
    last = train(
        make_cfg(small_dataset, tmp_path / "last", max_steps=6, log_every=3, eval_every=0),
        report=lambda m, step, c: step == 6,
        progress=False,
    )
    assert not last.stopped_early and last.steps == 6


def test_time_outside_the_steps_is_accounted_by_part(small_dataset: Path, tmp_path: Path) -> None:
    """``TrainResult.timings`` says where a run's time outside the steps went: a report hook
    that takes 0.1 s per report shows up as 0.1 s per report in ``report_s``."""
    cfg = make_cfg(
        small_dataset, tmp_path, max_steps=6, log_every=2, eval_every=2, checkpoint_every=2
    )
    reports: list[int] = []

    def slow(metrics: dict[str, float], step: int, ckpt: Path | None) -> bool:
        reports.append(step)
        time.sleep(0.1)
        return False

    result = train(cfg, report=slow, track_fixed_batch=True, progress=False)
    t = result.timings
    assert set(t) == {
        "setup_s",
        "held_out_s",
        "validation_s",
        "checkpoint_s",
        "report_s",
        "first_step_s",
    }
    assert reports == [2, 4, 6]
    assert 0.3 <= t["report_s"] < 0.3 + 1.0
    assert all(v > 0 for v in t.values()), t
    # The held-out set is the validation events: its final score is the last validation's.
    assert result.val_angle == pytest.approx(result.history[-1]["val_angle"], rel=1e-6)
    # A run without checkpoints or a held-out set (validation at its last step only).
    bare = train(
        make_cfg(small_dataset, tmp_path / "bare", max_steps=2, log_every=1, eval_every=0,
                 checkpoint_every=0),
        progress=False,
    )  # fmt: skip
    assert "held_out_s" not in bare.timings and bare.timings["validation_s"] > 0
    assert bare.timings["checkpoint_s"] < 0.05


def test_validation_at_the_given_steps_and_the_last(small_dataset: Path, tmp_path: Path) -> None:
    """``eval_steps`` validates at those steps (a search trial's rungs) besides the last."""
    cfg = make_cfg(
        small_dataset, tmp_path, max_steps=5, log_every=1, eval_every=0, eval_steps=(2,),
        checkpoint_every=0,
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert [int(h["step"]) for h in result.history if "val_angle" in h] == [2, 5]


# ---------------------------------------------------------------- input audit


def test_input_audit_warns_about_raw_features(
    small_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kw: dict[str, Any] = dict(max_steps=1, eval_every=0, checkpoint_every=0)
    caplog.set_level(logging.WARNING, logger="iceaggr.training.guard")
    raw = train(make_cfg(small_dataset, tmp_path / "raw", normalize=False, **kw), progress=False)
    raw_warnings = [r.getMessage() for r in caplog.records if "INPUT AUDIT" in r.getMessage()]
    caplog.clear()
    norm = train(make_cfg(small_dataset, tmp_path / "norm", normalize=True, **kw), progress=False)
    norm_warnings = [r.getMessage() for r in caplog.records if "INPUT AUDIT" in r.getMessage()]

    features = expected_input_features(make_cfg(small_dataset, tmp_path))
    assert set(raw.input_audit) == set(norm.input_audit) == features
    for stats in (*raw.input_audit.values(), *norm.input_audit.values()):
        assert set(stats) == {"min", "max", "mean", "absmax"}
        assert stats["min"] <= stats["mean"] <= stats["max"]
        assert stats["absmax"] == max(abs(stats["min"]), abs(stats["max"]))

    # Raw: one warning per feature above the threshold, naming it and its largest magnitude.
    too_big = {k: v["absmax"] for k, v in raw.input_audit.items() if v["absmax"] > 100.0}
    assert {"pulse_time", "dom_first_time", "dom_x", "dom_z"} <= set(too_big)
    assert len(raw_warnings) == len(too_big)
    for name, absmax in too_big.items():
        assert any(f"'{name}' reaches {absmax:.4g}" in m for m in raw_warnings), name
    assert not any("'pulse_auxiliary'" in m for m in raw_warnings)
    # Normalized: silent, and every input is O(1).
    assert norm_warnings == []
    assert all(v["absmax"] < 10.0 for v in norm.input_audit.values())

    # The two audits saw the same batches: the normalized extremes are the transformed raw ones.
    r, n = raw.input_audit, norm.input_audit
    assert n["pulse_time"]["max"] == pytest.approx(
        (r["pulse_time"]["max"] - TIME_OFFSET_NS) / TIME_SCALE_NS, rel=1e-5
    )
    assert n["pulse_charge"]["max"] == pytest.approx(
        math.log10(r["pulse_charge"]["max"]) / 3.0, rel=1e-5
    )
    assert n["dom_z"]["min"] == pytest.approx(r["dom_z"]["min"] / XYZ_SCALE_M, rel=1e-5)
    assert n["pulse_auxiliary"] == r["pulse_auxiliary"]
    # And the raw extremes are real values of the files.
    times = np.concatenate(
        [
            pq.read_table(p, columns=["time"]).column("time").to_numpy()
            for p in sorted((small_dataset / "train").glob("batch_*.parquet"))
        ]
    )
    assert times.min() <= r["pulse_time"]["min"] <= r["pulse_time"]["max"] <= times.max()


# ---------------------------------------------------------------- gradient norm and lr schedule


def test_lr_lambda_warmup_then_cosine() -> None:
    got = [lr_lambda(s, warmup=4, total=12, min_ratio=0.1) for s in range(14)]
    expected = [
        0.25,
        0.5,
        0.75,
        1.0,  # linear warm-up: (step + 1) / warmup
        # cosine, progress (step - 4) / 8: 0.1 + 0.45 * (1 + cos(pi * progress))
        1.0,
        0.9657457896,
        0.8681980515,
        0.7222075446,
        0.55,
        0.3777924554,
        0.2318019485,
        0.1342542104,
        0.1,
        0.1,  # past the end: clamped at the floor
    ]
    assert got == pytest.approx(expected, abs=1e-9)
    assert got[12] == pytest.approx(0.1) and got[13] == pytest.approx(0.1)  # floor, clamped
    assert lr_lambda(0, warmup=0, total=10, min_ratio=0.0) == 1.0
    assert lr_lambda(5, warmup=0, total=10, min_ratio=0.0) == pytest.approx(0.5)
    assert lr_lambda(10, warmup=0, total=10, min_ratio=0.0) == pytest.approx(0.0)
    assert lr_lambda(3, warmup=0, total=10, min_ratio=1.0) == 1.0  # constant (the probe)


def test_grad_norm_is_recorded_before_clipping_and_lr_follows_schedule(
    small_dataset: Path, tmp_path: Path
) -> None:
    cfg = make_cfg(
        small_dataset,
        tmp_path,
        normalize=False,
        lr=1e-4,
        max_steps=9,
        warmup_steps=3,
        min_lr_ratio=0.1,
        grad_clip=1.0,
        log_every=1,
        eval_every=0,
        checkpoint_every=0,
    )
    # The uninformed start (no moment prior): raw inputs then give gradients far above the clip.
    cfg.model = dataclasses.replace(cfg.model, moment_prior=0.0)
    result = train(cfg, progress=False)
    assert result.diverged is None
    hist = result.history
    assert [h["step"] for h in hist] == list(range(1, 10))

    # The lr each step used: warm-up (1/3, 2/3, 1) then cosine from 1 towards 0.1.
    multipliers = [1 / 3, 2 / 3, 1.0, 1.0, 0.9397114317, 0.775, 0.55, 0.325, 0.1602885683]
    assert [h["lr"] for h in hist] == pytest.approx([1e-4 * m for m in multipliers], rel=1e-8)

    norms = [h["grad_norm"] for h in hist]
    assert all(n > 0 and math.isfinite(n) for n in norms)
    running = np.maximum.accumulate(norms)
    assert [h["max_grad_norm"] for h in hist] == pytest.approx(running.tolist(), rel=1e-6)
    assert result.max_grad_norm == pytest.approx(max(norms), rel=1e-6)
    # Raw inputs give gradients far above the clip: the recorded norm is the pre-clip one.
    assert result.max_grad_norm > 10 * cfg.train.grad_clip

    # Independent recomputation of step 1 (same initial weights, same first batch).
    model = fresh_model(cfg)
    batch = next(train_loader(cfg).iter_epoch(0))
    loss = angular_distance(model(batch).direction, batch.direction).mean()
    loss.backward()
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    )
    assert result.first_loss == pytest.approx(loss.item(), rel=1e-5)
    assert hist[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert hist[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-4)


# ---------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def only_run(uri: str, experiment: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_records_a_finished_run(
    small_dataset: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    cfg = make_cfg(
        small_dataset,
        tmp_path,
        max_steps=6,
        log_every=2,
        eval_every=0,
        checkpoint_every=0,
        mlflow_tracking_uri=mlflow_uri,
        mlflow_experiment="test-finished",
    )
    result = train(cfg, progress=False)
    assert result.diverged is None
    client, run = only_run(mlflow_uri, "test-finished")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == cfg.name
    params = run.data.params
    assert float(params["train.lr"]) == cfg.train.lr
    assert params["model.d_model"] == str(cfg.model.d_model)
    assert params["model.normalize"] == "True"
    assert params["world_size"] == "1"
    assert float(params["input_audit.pulse_time.absmax"]) == pytest.approx(
        result.input_audit["pulse_time"]["absmax"], rel=1e-3
    )
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [2, 4, 6]
    by_step = {m.step: m.value for m in loss}
    for h in result.history:
        assert by_step[int(h["step"])] == pytest.approx(h["loss"])
    assert len(client.get_metric_history(run.info.run_id, "grad_norm")) == 3
    val = client.get_metric_history(run.info.run_id, "val_angle")
    assert [m.step for m in val] == [6]
    assert "diverged" not in run.data.tags


def test_mlflow_marks_a_diverged_run_failed(
    small_dataset: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    cfg = make_cfg(
        small_dataset,
        tmp_path,
        normalize=False,
        lr=1e6,
        max_steps=10,
        warmup_steps=0,
        min_lr_ratio=1.0,
        log_every=1,
        eval_every=0,
        checkpoint_every=0,
        mlflow_tracking_uri=mlflow_uri,
        mlflow_experiment="test-diverged",
    )
    result = train(cfg, progress=False)
    assert result.diverged is not None
    client, run = only_run(mlflow_uri, "test-diverged")
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["diverged"] == "true"
    assert tags["diverged_at_step"] == str(result.diverged.step)
    assert tags["divergence_reason"] == result.diverged.summary()
    assert tags["divergence_reason"].startswith(f"diverged at step {result.diverged.step}")
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, result.diverged.step + 1))
    flag = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "diverged")}
    assert flag[result.diverged.step] == 1.0
    assert all(v == 0.0 for s, v in flag.items() if s < result.diverged.step)


# ---------------------------------------------------------------- bad input in a training run


def _rewrite_training_file(root: Path, edit: Any) -> Path:
    """Apply ``edit`` to batch_1's pulses and rewrite the metadata's pulse indices to match."""
    import pandas as pd

    path = root / "train" / "batch_1.parquet"
    df = edit(pd.read_parquet(path))
    df.to_parquet(path)
    meta = pd.read_parquet(root / "train_meta.parquet")
    mine = meta["batch_id"] == 1
    counts = df.groupby(level=0, sort=False).size()
    counts = counts.reindex(meta.loc[mine, "event_id"].to_numpy()).to_numpy()
    last = np.cumsum(counts) - 1
    meta.loc[mine, "first_pulse_index"] = last - counts + 1
    meta.loc[mine, "last_pulse_index"] = last
    meta.to_parquet(root / "train_meta.parquet", index=False)
    return path


def test_an_event_with_120k_pulses_is_truncated_counted_and_logged(
    small_dataset: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    """A 120,000-pulse event trains like any other: cut to the caps, counted, logged."""
    import pandas as pd

    data = Path(shutil.copytree(small_dataset, tmp_path / "data"))
    rng = np.random.default_rng(1)
    n_big = 120_000

    def add_big_event(df: pd.DataFrame) -> pd.DataFrame:
        big_id = df.index[0]
        big = pd.DataFrame(
            {
                "sensor_id": rng.integers(0, 5160, n_big).astype(np.int16),
                "time": np.sort(rng.integers(9_000, 80_000, n_big)).astype(np.int64),
                "charge": rng.uniform(0.1, 5.0, n_big),
                "auxiliary": rng.random(n_big) < 0.3,
            },
            index=pd.Index(np.full(n_big, big_id, dtype=np.int64), name="event_id"),
        )
        return pd.concat([big, df.drop(index=big_id)])

    _rewrite_training_file(data, add_big_event)
    cfg = make_cfg(
        data,
        tmp_path / "out",
        batch_size=64,
        max_steps=8,  # batch_1 holds 500 events: the big one is in the first 8 batches
        log_every=8,
        eval_every=0,
        checkpoint_every=0,
        mlflow_tracking_uri=mlflow_uri,
        mlflow_experiment="test-big-event",
    )
    cfg.train.seed = 0
    result = train(cfg, progress=False)
    assert result.diverged is None and math.isfinite(result.last_loss)
    client, run = only_run(mlflow_uri, "test-big-event")
    truncated = client.get_metric_history(run.info.run_id, "events_truncated")
    dropped = client.get_metric_history(run.info.run_id, "pulses_dropped")
    cap = cfg.data.truncation().max_pulses_per_event
    assert truncated[-1].value >= 1
    assert dropped[-1].value >= n_big - cap


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("nan_charge", ("batch_1.parquet", "charge", "non-finite")),
        ("truncated_file", ("batch_1.parquet", "not a readable parquet file")),
    ],
)
def test_bad_training_file_stops_the_run_with_a_clear_error(
    small_dataset: Path, tmp_path: Path, fault: str, expected: tuple[str, ...]
) -> None:
    """NaN in the input or a cut-off file: a DatasetError naming it, never a NaN loss."""
    from iceaggr.data.dataset import DatasetError

    data = Path(shutil.copytree(small_dataset, tmp_path / "data"))
    path = data / "train" / "batch_1.parquet"
    if fault == "nan_charge":

        def poison(df: Any) -> Any:
            df.iloc[7, df.columns.get_loc("charge")] = float("nan")
            return df

        _rewrite_training_file(data, poison)
    else:
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    cfg = make_cfg(data, tmp_path / "out", max_steps=4, eval_every=0, checkpoint_every=2)
    cfg.data.prefetch = 2  # the error must cross the loader's prefetch thread too
    with pytest.raises(DatasetError) as info:
        train(cfg, progress=False)
    message = str(info.value)
    for part in expected:
        assert part in message, message
    assert not list((tmp_path / "out").glob("**/*.pt")), "no checkpoint of a failed run"


# ---------------------------------------------------------------- Trainer, guard, state, hooks


def step_output(
    loss: float, norms: list[float], *, pred: float = 0.0, inputs: dict[str, float] | None = None
) -> StepOutput:
    """A hand-made step: per-parameter norms ``norms`` and their global norm."""
    per_param = torch.tensor(norms, dtype=torch.float32)
    return StepOutput(
        loss=torch.tensor(loss),
        grad_norm=torch.linalg.vector_norm(per_param),
        param_grad_norms=per_param,
        prediction=torch.full((2, 3), pred),
        input_absmax={k: torch.tensor(v) for k, v in (inputs or {"x": 1.0}).items()},
        lr=1e-3,
        events=2,
    )


def test_divergence_guard_keeps_the_first_bad_step_however_late_it_is_read() -> None:
    guard = DivergenceGuard(["a", "b", "c"], torch.device("cpu"))
    guard.observe(step_output(1.5, [3.0, 4.0, 0.0], inputs={"x": 2.0, "y": -1.0}), 1)
    assert guard.report() is None
    assert guard.last_finite_loss == 1.5
    guard.observe(step_output(1.25, [0.0, 12.0, 5.0], inputs={"x": 1.0, "y": 7.0}), 2)
    # Step 3: "b" is NaN and "c" inf; step 4 breaks the loss as well. Read only after step 4.
    guard.observe(step_output(1.0, [1.0, math.nan, math.inf], inputs={"x": 9.0, "y": 0.0}), 3)
    guard.observe(step_output(math.nan, [math.nan] * 3, pred=math.nan), 4)
    report = guard.report()
    assert report == DivergenceReport(
        step=3,
        reason="non-finite gradient",
        first_bad_parameter="b",
        max_grad_norm=13.0,  # step 2: sqrt(12^2 + 5^2)
        max_abs_input={"x": 9.0, "y": 7.0},
        last_finite_loss=1.5,  # the last step read finite was 1
    )
    assert guard.max_param_grad == (12.0, "b")  # finite per-parameter norms only
    assert report.summary() == (
        "diverged at step 3: non-finite gradient (first in b); max pre-clip grad norm 13; "
        "largest input x=9"
    )


@pytest.mark.parametrize(
    ("bad", "reason", "first_bad"),
    [
        (step_output(math.inf, [1.0, 2.0]), "non-finite loss", None),
        (step_output(1.0, [1.0, 2.0], pred=math.nan), "non-finite prediction", None),
        # Every norm finite, their total overflows float32: the largest (first of equals) is named.
        (step_output(1.0, [1e38, 3e38, 3e38]), "non-finite gradient", "b"),
    ],
)
def test_divergence_guard_kinds(bad: StepOutput, reason: str, first_bad: str | None) -> None:
    guard = DivergenceGuard(["a", "b", "c"], torch.device("cpu"), max_grad_norm=2.5)
    guard.observe(step_output(0.5, [1.0, 2.0, 0.0][: bad.param_grad_norms.numel()]), 7)
    guard.observe(bad, 8)
    report = guard.report()
    assert report is not None
    assert (report.step, report.reason, report.first_bad_parameter) == (8, reason, first_bad)
    assert report.max_grad_norm == 2.5  # the resumed maximum is larger than step 7's sqrt(5)


class NanGradientAt(Hook):
    """Makes the gradient of one parameter NaN in the backward pass of step ``step``."""

    def __init__(self, parameter: str, step: int) -> None:
        self.parameter, self.step, self.backwards = parameter, step, 0

    def on_start(self, trainer: Trainer) -> None:
        param = dict(trainer.model.named_parameters())[self.parameter]
        param.register_hook(self.poison)

    def poison(self, grad: torch.Tensor) -> torch.Tensor:
        self.backwards += 1
        return grad * math.nan if self.backwards == self.step else grad


def test_nan_gradient_at_step_3_is_reported_exactly(small_dataset: Path, tmp_path: Path) -> None:
    cfg = make_cfg(small_dataset, tmp_path, max_steps=10, log_every=5, eval_every=0)
    names = [n for n, p in IceAggrModel(cfg.model).named_parameters() if p.requires_grad]
    poisoned = names[len(names) // 2]
    result = Trainer(cfg, hooks=[NanGradientAt(poisoned, 3)]).fit()
    report = result.diverged
    assert report is not None
    assert (report.step, report.reason, report.first_bad_parameter) == (
        3,
        "non-finite gradient",
        poisoned,
    )
    assert result.steps == 3
    # log_every=5, but the CPU reads the guard every step: nothing trained past step 3.
    assert [h["step"] for h in result.history] == [3.0]
    assert result.history[0]["diverged"] == 1.0 and math.isfinite(result.history[0]["loss"])
    assert math.isnan(result.history[0]["grad_norm"])
    # The clean steps before it are those of a run that stops at step 2 (same warm-up lr).
    short = dataclasses.replace(cfg.train, max_steps=2, out_dir=str(tmp_path / "short"))
    clean = train(dataclasses.replace(cfg, train=short), progress=False)
    assert clean.diverged is None
    assert report.max_grad_norm == result.max_grad_norm == clean.max_grad_norm
    assert report.last_finite_loss == result.last_loss == clean.last_loss
    assert result.first_loss == clean.first_loss


def test_largest_parameter_gradient_norm_is_recorded(small_dataset: Path, tmp_path: Path) -> None:
    cfg = make_cfg(small_dataset, tmp_path, normalize=False, max_steps=4, log_every=1)
    trainer = Trainer(cfg)
    norms: list[torch.Tensor] = []
    step = trainer.train_step

    def recording_step(batch: DomBatch) -> StepOutput:
        out = step(batch)
        norms.append(out.param_grad_norms)
        return out

    trainer.train_step = recording_step  # type: ignore[method-assign]
    result = trainer.fit()
    stacked = torch.stack(norms)  # (steps, n_params)
    best = int(stacked.max(0).values.argmax())
    assert result.max_param_grad_norm == float(stacked.max())
    assert result.max_param_grad_name == trainer.param_names[best]


def state_tensors(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: parameters, optimizer moments and the RNG state."""
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for i, s in ckpt["optimizer"]["state"].items():
        out |= {f"optimizer.{i}.{k}": v for k, v in s.items()}
    return out | {"torch_rng": ckpt["torch_rng"]}


def test_train_state_round_trip_and_bit_exact_resume(small_dataset: Path, tmp_path: Path) -> None:
    def cfg_for(out: Path) -> ExperimentConfig:
        cfg = make_cfg(
            small_dataset, out, max_steps=12, lr=2e-3, log_every=3, eval_every=6, checkpoint_every=6
        )
        cfg.model = dataclasses.replace(cfg.model, dropout=0.1)  # uses the restored RNG
        cfg.data = dataclasses.replace(cfg.data, max_train_events=128)  # resume crosses epochs
        return cfg

    class StopAt6(Hook):
        def on_report(self, metrics: dict[str, float], step: int, ckpt: Path | None) -> bool:
            return step == 6

    straight = Trainer(cfg_for(tmp_path / "straight")).fit()
    half = Trainer(cfg_for(tmp_path / "half"), hooks=[StopAt6()]).fit()
    assert half.stopped_early and half.steps == 6

    # Round trip: what restore() loads is what save() wrote, and saving it again is identical.
    resumed = Trainer(cfg_for(tmp_path / "resumed"), resume_from=tmp_path / "half")
    assert resumed.state == TrainState(
        step=6,
        epoch=1,
        batch_in_epoch=2,
        max_grad_norm=half.max_grad_norm,
        max_param_grad_norm=half.max_param_grad_norm,
        max_param_grad_name=half.max_param_grad_name,
        first_loss=half.first_loss,
    )
    resumed.state.save(
        tmp_path / "again.pt",
        model=resumed.model,
        optimizer=resumed.optimizer,
        scheduler=resumed.scheduler,
        config=to_dict(resumed.cfg),
        device=resumed.device,
    )
    first, again = (
        load_checkpoint(tmp_path / "half"),
        torch.load(tmp_path / "again.pt", weights_only=False),
    )
    assert first.keys() == again.keys()
    assert first["scheduler"] == again["scheduler"]
    assert first["config"] == to_dict(cfg_for(tmp_path / "half"))
    assert again["config"] == to_dict(resumed.cfg)
    for name, t in state_tensors(first).items():
        assert torch.equal(t, state_tensors(again)[name]), name

    # Resume: the second half is the straight run's, bit for bit.
    result = resumed.fit()
    assert result.steps == 12 and result.first_loss == straight.first_loss
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    for name, t in state_tensors(a).items():
        assert torch.equal(t, state_tensors(b)[name]), name
    # Not compared: timing, and the loader's truncation counts (since the loader was made).
    timing = ("events_per_s", "events_truncated", "pulses_dropped")
    strip = [{k: v for k, v in h.items() if k not in timing} for h in straight.history[2:]]
    assert [{k: v for k, v in h.items() if k not in timing} for h in result.history] == strip
    for field_name in ("val_angle", "last_loss", "max_grad_norm", "max_param_grad_norm"):
        assert getattr(result, field_name) == getattr(straight, field_name), field_name
    assert result.max_param_grad_name == straight.max_param_grad_name


class Recorder(Hook):
    """Writes every call into a shared list, tagged with its own name."""

    def __init__(self, name: str, calls: list[tuple[Any, ...]], stop_at: int | None = None):
        self.name, self.calls, self.stop_at = name, calls, stop_at

    def on_start(self, trainer: Trainer) -> None:
        self.calls.append((self.name, "start", trainer))

    def on_step(self, step: int) -> None:
        self.calls.append((self.name, "step", step))

    def on_report(self, metrics: dict[str, float], step: int, ckpt: Path | None) -> bool:
        self.calls.append((self.name, "report", step, sorted(metrics), ckpt))
        return step == self.stop_at

    def on_diverged(self, report: DivergenceReport, metrics: dict[str, float], step: int) -> None:
        self.calls.append((self.name, "diverged", report, metrics, step))

    def on_end(self, result: TrainResult) -> None:
        self.calls.append((self.name, "end", result))


REPORT_KEYS = sorted(
    {"loss", "grad_norm", "max_grad_norm", "lr", "events_per_s", "epoch", "diverged"}
    | {"events_truncated", "pulses_dropped"}
)
"""The metrics of a report step without validation."""


def test_hooks_are_called_in_order_with_their_arguments(
    small_dataset: Path, tmp_path: Path
) -> None:
    cfg = make_cfg(small_dataset, tmp_path, max_steps=9, log_every=3, checkpoint_every=6)
    calls: list[tuple[Any, ...]] = []
    # "a" asks to stop at step 6; "b" is still told about step 6, then the run ends.
    trainer = Trainer(cfg, hooks=[Recorder("a", calls, stop_at=6), Recorder("b", calls)])
    result = trainer.fit()
    assert result.stopped_early and result.steps == 6
    expected: list[tuple[Any, ...]] = [("a", "start", trainer), ("b", "start", trainer)]
    for step in range(1, 7):
        expected += [("a", "step", step), ("b", "step", step)]
        if step % 3 == 0:
            ckpt = tmp_path if step == 6 else None  # checkpoint_every=6
            expected += [("a", "report", step, REPORT_KEYS, ckpt)]
            expected += [("b", "report", step, REPORT_KEYS, ckpt)]
    expected += [("a", "end", result), ("b", "end", result)]
    assert calls == expected


def test_hooks_hear_of_a_divergence_once(small_dataset: Path, tmp_path: Path) -> None:
    cfg = make_cfg(small_dataset, tmp_path, max_steps=6, log_every=2, eval_every=0)
    calls: list[tuple[Any, ...]] = []
    legacy: list[tuple[dict[str, float], int, Path | None]] = []
    result = train(
        cfg,
        hooks=[Recorder("a", calls), NanGradientAt("head.3.bias", 3)],
        report=lambda metrics, step, ckpt: legacy.append((metrics, step, ckpt)),
        progress=False,
    )
    report = result.diverged
    assert report is not None and report.step == 3
    assert report.first_bad_parameter == "head.3.bias"
    names = [c[1] for c in calls]
    assert names == ["start", "step", "step", "report", "step", "diverged", "end"]
    _, _, got_report, metrics, step = calls[5]
    assert got_report is report and step == 3
    assert sorted(metrics) == ["diverged", "grad_norm", "loss"]
    assert metrics["loss"] == result.history[-1]["loss"] and metrics["diverged"] == 1.0
    assert math.isnan(metrics["grad_norm"])  # the poisoned gradient
    # A plain callback is a hook too: it gets the reports and the divergence (with its step).
    assert [(s, c) for _, s, c in legacy] == [(2, None), (3, None)]
    assert legacy[1][0]["diverged_at_step"] == 3.0 and legacy[1][0]["diverged"] == 1.0


def test_mlflow_hook_logs_into_a_run_it_was_given(
    small_dataset: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    """The trial's way: the run exists, the hook fills it and leaves ending it to its owner."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.create_experiment("test-hook")
    run_id = client.create_run(exp, run_name="owned").info.run_id
    cfg = make_cfg(
        small_dataset,
        tmp_path / "out",
        max_steps=4,
        log_every=2,
        eval_every=0,
        checkpoint_every=2,
        mlflow_tracking_uri=mlflow_uri,
        mlflow_experiment="test-hook",
    )
    hook = MlflowHook.for_config(cfg, run_id=run_id, tags={"node": "n1"})
    first = train(cfg, hooks=[hook], progress=False)  # train() adds no second MLflow hook
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # the owner ends it
    assert len(client.search_runs([exp])) == 1
    assert run.data.tags["node"] == "n1" and TAG_RESUMED_FROM_STEP not in run.data.tags
    assert run.data.params["world_size"] == "1"
    assert float(run.data.params["input_audit.pulse_time.absmax"]) == pytest.approx(
        first.input_audit["pulse_time"]["absmax"], rel=1e-3
    )
    loss = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in loss] == [
        (2, first.history[0]["loss"]),
        (4, first.history[1]["loss"]),
    ]

    # A resumed run on the same MLflow run says where it resumed and continues the curve.
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=6))
    again = MlflowHook.for_config(longer, run_id=run_id)
    train(longer, hooks=[again], resume_from=tmp_path / "out", progress=False)
    run = client.get_run(run_id)
    assert run.data.tags[TAG_RESUMED_FROM_STEP] == "4"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4, 6]
    assert not list((tmp_path / "out").glob("mlflow-spool-*")), "everything was sent"


def test_a_trainer_without_data_only_steps(small_dataset: Path, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "nowhere", tmp_path)
    trainer = Trainer(cfg, build_data=False)
    batch = next(train_loader(make_cfg(small_dataset, tmp_path)).iter_epoch(0))
    out = trainer.train_step(batch)
    assert out.events == batch.num_events and out.lr == pytest.approx(cfg.train.lr / 2)
    assert out.param_grad_norms.shape == (len(trainer.param_names),)
    with pytest.raises(RuntimeError, match="built with build_data=False"):
        trainer.fit()


def test_mlflow_hook_needs_a_tracking_uri(small_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^train\.mlflow_tracking_uri is not set"):
        MlflowHook.for_config(make_cfg(small_dataset, tmp_path))
