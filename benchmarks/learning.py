"""How fast do models learn? Validation angular error vs training steps and vs training seconds.

Trains each model, given as an experiment config, on the SAME batches in the SAME order (one
synthetic dataset, the same ``train.batch_size`` and ``train.seed``), one after another in one
process with the same number of CPU threads, through the project's own training loop
(:func:`iceaggr.training.trainer.train`: AdamW, warm-up + cosine schedule, gradient clipping,
exactly as a real run). A report callback scores the model on a fixed held-out set (the first
``--val-events`` events of the last batch file, which training never sees) at log-spaced steps,
with the competition metric (mean angular error, rad;
:func:`iceaggr.models.losses.angular_distance`), and records the mean resultant length R of the
predicted unit vectors on the same events (R near 1: every event gets the same direction, the
collapse of DESIGN.md section 7; the true directions of the held-out events have R ~0.02). The
improved line fit (:mod:`iceaggr.data.linefit`) on the same held-out events is the reference line.

Time is counted for training only: wall seconds (``time.perf_counter``) and CPU seconds of the
process (``time.process_time``; with one thread and no prefetch thread this is the compute
cost, robust to other jobs on a shared machine) from the first forward pass on, with the
evaluations excluded. The data loader runs in the training thread (``data.prefetch=0``), so
loading counts for every model alike.

Run from the repository root::

    python benchmarks/learning.py --model ours --set train.lr=1e-3 --set train.batch_size=64
    python benchmarks/learning.py --model ours --model ref=experiments/x.yaml \\
        --set ref:model.dropout=0.1 --set train.lr=1e-3 --steps 300
    python benchmarks/learning.py --data data/synthetic --steps 300 --steps-at 20 60 100 300 \\
        --model ours --model original=experiments/baseline_1m/config_fixed.yaml \\
        --set train.lr=1e-3 --set train.batch_size=64 --set train.warmup_steps=10 \\
        --set model.dropout=0 --val-events 500 --equal-time-at

``--model LABEL[=CONFIG.yaml]`` (repeatable; no path:
:func:`iceaggr.training.config.baseline_config`),
``--set key=value`` applies to every model, ``--set LABEL:key=value`` to one. The benchmark
itself fixes the data path, ``train.max_steps=--steps``, CPU, ``log_every=1`` and no
checkpoints or MLflow. It prints a Markdown table (steps, seconds, validation error per model;
then the error of every model at equal training time: at the wall and CPU seconds the slowest
model needed for each ``--equal-time-at`` step count; with ``--steps-at N ...`` first a table
of every model's error and R at exactly those steps next to the line fit) and writes
``learning.json`` and ``learning.png`` (two panels: vs steps, vs wall seconds) under
``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from iceaggr.data.batch import DomBatch
from iceaggr.data.dataset import KaggleDataset, split_batch_ids
from iceaggr.data.linefit import angular_error, line_fit, select_hits
from iceaggr.data.loader import EventLoader
from iceaggr.data.synth import write_synthetic_dataset
from iceaggr.logs import setup_logging
from iceaggr.training.config import ExperimentConfig, load_config, to_dict
from iceaggr.training.evaluation import evaluate
from iceaggr.training.trainer import train

log = logging.getLogger("benchmarks.learning")

DEFAULT_DATA = Path("data/synthetic-learning")
DEFAULT_OUT = Path("runs/benchmarks/learning")
SAME_BATCHES_KEYS = ("train.batch_size", "train.seed", "data.max_train_events")
"""Config values that decide which events each step sees; they must agree across models."""


@dataclass
class ModelSpec:
    """One model of the comparison: a label, a config file (None: the baseline), overrides."""

    label: str
    config: str | None
    overrides: list[str] = field(default_factory=list)


@dataclass
class Curve:
    """What one model's run recorded."""

    label: str
    config: dict[str, Any]
    num_parameters: int = 0
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    """Wall seconds of training (evaluation excluded) when the step's checkpoint was taken."""
    cpu_seconds: list[float] = field(default_factory=list)
    """CPU seconds of the process over the same intervals."""
    val_angle: list[float] = field(default_factory=list)
    """Mean angular error (rad) on the held-out events after ``steps`` optimizer steps."""
    resultant: list[float] = field(default_factory=list)
    """Mean resultant length R of the predicted unit vectors on the held-out events (1: all
    events get one direction)."""
    train_loss: list[float] = field(default_factory=list)
    """Training loss of the step itself (nan at step 0)."""
    diverged: str | None = None
    train_seconds_by_train: float = 0.0
    """``TrainResult.train_seconds``: train()'s own clock (it also counts step 1's model copy)."""


class Recorder:
    """The report callback of :func:`iceaggr.training.trainer.train` that scores the model at
    checkpoints.

    ``train()`` does not hand its model to the callback; a global forward pre-hook catches the
    model at its first forward call (the first training step: the first module with parameters
    called on a :class:`~iceaggr.data.batch.DomBatch`; the input audit before it only calls the
    parameter-free normalizer), copies it for the step-0 score, and removes itself. From then on
    the clocks run between callbacks only, so evaluation time is never counted as training time.
    """

    def __init__(
        self, curve: Curve, checkpoints: set[int], val_loader: EventLoader, max_steps: int
    ) -> None:
        self.curve = curve
        self.checkpoints = checkpoints
        self.val_loader = val_loader
        self.max_steps = max_steps
        self.model: nn.Module | None = None
        self.initial: nn.Module | None = None
        self.wall = 0.0
        self.cpu = 0.0
        self._resumed = (0.0, 0.0)
        self._handle = nn.modules.module.register_module_forward_pre_hook(self._catch)

    def _catch(self, module: nn.Module, args: Any) -> None:
        if not (args and isinstance(args[0], DomBatch) and any(True for _ in module.parameters())):
            return
        self._handle.remove()
        self.model = module
        self.initial = copy.deepcopy(module)
        self._resumed = (time.perf_counter(), time.process_time())

    def close(self) -> None:
        self._handle.remove()

    def _record(self, model: nn.Module, step: int, loss: float, val: float | None) -> None:
        if val is None:
            total, n = evaluate(model, self.val_loader, torch.device("cpu"), nullcontext)
            val = total / max(1, n)
        resultant = mean_resultant_length(model, self.val_loader)
        wall, cpu = (self.wall, self.cpu) if step > 0 else (0.0, 0.0)
        c = self.curve
        c.steps.append(step)
        c.seconds.append(wall)
        c.cpu_seconds.append(cpu)
        c.val_angle.append(val)
        c.resultant.append(resultant)
        c.train_loss.append(loss)
        log.info(
            "%s: step %d, %.1f s (cpu %.1f s), val %.4f rad, R %.3f",
            c.label, step, wall, cpu, val, resultant,
        )  # fmt: skip

    def __call__(self, metrics: dict[str, float], step: int, checkpoint: Path | None) -> bool:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall += wall - self._resumed[0]
        self.cpu += cpu - self._resumed[1]
        assert self.model is not None, "a report came before the first forward pass"
        if self.initial is not None:
            self._record(self.initial, 0, math.nan, None)
            self.initial = None
        if "diverged_at_step" in metrics:
            self.curve.diverged = f"diverged at step {int(metrics['diverged_at_step'])}"
        elif step in self.checkpoints or step == self.max_steps:
            # train() scores the last step itself, on the same held-out events.
            self._record(self.model, step, metrics["loss"], metrics.get("val_angle"))
        self._resumed = (time.perf_counter(), time.process_time())
        return False


@torch.no_grad()
def mean_resultant_length(model: nn.Module, loader: EventLoader) -> float:
    """Length of the mean of the model's unit predictions over one pass of ``loader``."""
    was_training = model.training
    model.eval()
    total, n = torch.zeros(3, dtype=torch.float64), 0
    for b in loader.iter_epoch(0):
        total += model(b).direction.double().sum(dim=0)  # (3,)
        n += b.num_events
    model.train(was_training)
    return float(total.norm() / max(1, n))


def checkpoint_steps(steps: int, count: int, marks: list[int]) -> set[int]:
    """About ``count`` log-spaced steps from 10 to ``steps``, plus ``marks`` (<= ``steps``)."""
    spaced = np.unique(np.round(np.geomspace(min(10, steps), steps, max(2, count))).astype(int))
    return {int(s) for s in spaced} | {m for m in marks if m <= steps}


def model_config(spec: ModelSpec, args: argparse.Namespace) -> ExperimentConfig:
    """The spec's config with the shared and own overrides, then the benchmark's fixed settings."""
    fixed = [
        f"data.path={args.data}",
        "data.val_files=1",
        f"data.max_val_events={args.val_events}",
        "data.prefetch=0",
        f"train.max_steps={args.steps}",
        "train.device=cpu",
        "train.precision=fp32",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.mlflow_tracking_uri=null",
        f"train.out_dir={Path(args.out) / spec.label}",
    ]
    return load_config(spec.config, [*args.shared, *spec.overrides, *fixed])


def check_same_batches(cfgs: dict[str, ExperimentConfig]) -> None:
    """Every model must see the same events in the same order; name the first disagreement."""
    flat = {label: to_dict(c) for label, c in cfgs.items()}
    for key in SAME_BATCHES_KEYS:
        section, name = key.split(".")
        values = {label: d[section][name] for label, d in flat.items()}
        if len(set(map(repr, values.values()))) > 1:
            raise SystemExit(
                f"models must train on the same batches, but {key} differs: {values}; "
                f"set it for all models with --set {key}=VALUE"
            )


def held_out_loader(cfg: ExperimentConfig) -> EventLoader:
    """The held-out events exactly as train() builds its validation loader."""
    dataset = KaggleDataset(cfg.data.path)
    _, val_ids = split_batch_ids(dataset.batch_ids, cfg.data.val_files)
    return EventLoader(
        dataset=dataset,
        batch_ids=val_ids,
        batch_size=min(cfg.train.batch_size, cfg.data.max_val_events),
        truncation=cfg.data.truncation(),
        shuffle=False,
        drop_last=False,
        prefetch=0,
        max_events=cfg.data.max_val_events,
        line_fit=cfg.model.uses_line_fit,
    )


def line_fit_error(data: Path, batch_ids: list[int], n_events: int) -> float:
    """Mean angular error (rad) of the improved line fit on the first ``n_events`` events of
    ``batch_ids`` in file order (all their pulses; the held-out set when given the validation
    files)."""
    dataset = KaggleDataset(data)
    errors, left = [], n_events
    for batch_id in batch_ids:
        f = dataset.read_batch(batch_id)
        k = min(left, f.num_events)
        counts = f.last_pulse_index[:k] - f.first_pulse_index[:k] + 1  # (k,) pulses per event
        rows = np.repeat(f.first_pulse_index[:k] - np.cumsum(counts) + counts, counts)
        rows += np.arange(int(counts.sum()))  # pulse rows of the k events, grouped by event
        cu = np.concatenate([[0], np.cumsum(counts)])
        sensor = f.sensor_id[rows].astype(np.int64)
        sel, cu_sel = select_hits(sensor, f.auxiliary[rows], cu)
        xyz = dataset.geometry[sensor[sel]].astype(np.float64)  # (H, 3) m
        az, zen = line_fit(f.time[rows][sel].astype(np.float64), xyz, None, cu_sel)
        assert f.azimuth is not None and f.zenith is not None
        errors.append(angular_error(f.azimuth[:k], f.zenith[:k], az, zen))
        left -= k
        if left <= 0:
            break
    return float(np.concatenate(errors).mean())


def run_model(cfg: ExperimentConfig, label: str, checkpoints: set[int]) -> Curve:
    """Train one model with train() and return its curve."""
    curve = Curve(label=label, config=to_dict(cfg))
    recorder = Recorder(curve, checkpoints, held_out_loader(cfg), cfg.train.max_steps)
    try:
        result = train(cfg, report=recorder, progress=False)
    finally:
        recorder.close()
    if recorder.model is not None:
        curve.num_parameters = sum(p.numel() for p in recorder.model.parameters())
    curve.train_seconds_by_train = result.train_seconds
    if result.diverged is not None:
        curve.diverged = result.diverged.summary()
    return curve


def value_at(x: list[float], y: list[float], at: float) -> tuple[float, bool]:
    """``y`` linearly interpolated at ``at`` (x ascending); True if ``at`` is past the last x."""
    if not x:
        return math.nan, True
    if at >= x[-1]:
        return y[-1], at > x[-1]
    return float(np.interp(at, x, y)), False


def equal_time(curves: list[Curve], marks: list[int], clock: str) -> list[dict[str, Any]]:
    """Error of every model at the ``clock`` seconds the slowest model needed for each mark."""
    rows = []
    for mark in marks:
        times = [
            value_at([float(s) for s in c.steps], getattr(c, clock), mark)
            for c in curves
            if c.steps and c.steps[-1] >= mark
        ]
        if len(times) < len(curves):
            continue  # some model never reached the mark (diverged or fewer steps)
        at = max(t for t, _ in times)
        row: dict[str, Any] = {"mark_steps": mark, "clock": clock, "seconds": at, "models": {}}
        for c in curves:
            val, ran_out = value_at(getattr(c, clock), c.val_angle, at)
            step, _ = value_at(getattr(c, clock), [float(s) for s in c.steps], at)
            row["models"][c.label] = {"val_angle": val, "step": step, "finished_before": ran_out}
        rows.append(row)
    return rows


def steps_at_table(curves: list[Curve], line_fit_err: float, steps_at: list[int]) -> str:
    """Every model's error (and R) at exactly the ``steps_at`` steps, next to the line fit."""
    labels = [c.label for c in curves]
    out = ["\n### Validation error (rad) at fixed steps; R in brackets"]
    out.append("\n| step | " + " | ".join(labels) + " | line fit |")
    out.append("|---:|" + "---:|" * (len(labels) + 1))
    for step in steps_at:
        cells = []
        for c in curves:
            if step in c.steps:
                i = c.steps.index(step)
                cells.append(f"{c.val_angle[i]:.4f} ({c.resultant[i]:.3f})")
            else:
                cells.append("—")
        out.append(f"| {step} | " + " | ".join(cells) + f" | {line_fit_err:.4f} |")
    return "\n".join(out)


def format_tables(
    curves: list[Curve], line_fit_err: float, eq: list[dict[str, Any]], steps_at: list[int]
) -> str:
    """The Markdown report: the fixed-step table, one row per checkpoint and model, then the
    equal-time comparison."""
    out = [steps_at_table(curves, line_fit_err, steps_at)] if steps_at else []
    for c in curves:
        out.append(f"\n### {c.label} ({c.num_parameters:,} parameters)")
        if c.diverged:
            out.append(f"\n{c.diverged}")
        out.append("\n| step | wall s | cpu s | val error (rad) | R |\n|---:|---:|---:|---:|---:|")
        rows = zip(c.steps, c.seconds, c.cpu_seconds, c.val_angle, c.resultant, strict=True)
        for s, w, p, v, r in rows:
            out.append(f"| {s} | {w:.1f} | {p:.1f} | {v:.4f} | {r:.3f} |")
    out.append(f"\nImproved line fit on the same held-out events: {line_fit_err:.4f} rad")
    out.append(f"(random guessing: {math.pi / 2:.4f} rad)")
    if eq:
        labels = [c.label for c in curves]
        out.append("\n### Validation error at equal training time")
        out.append(
            "\nAt the seconds the slowest model needed for N steps; each cell: error (rad), "
            "the model's step then, and the gap to the line fit (* = the model had finished "
            "its steps earlier: its last value)."
        )
        out.append(
            "\n| N steps | clock | seconds | "
            + " | ".join(labels)
            + " |\n|---:|---|---:|"
            + "---|" * len(labels)
        )
        for row in eq:
            cells = []
            for label in labels:
                m = row["models"][label]
                star = "*" if m["finished_before"] else ""
                gap = m["val_angle"] - line_fit_err
                cells.append(f"{m['val_angle']:.4f}{star} (step {m['step']:.0f}; {gap:+.3f})")
            out.append(
                f"| {row['mark_steps']} | {row['clock']} | {row['seconds']:.1f} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(out)


def plot(curves: list[Curve], line_fit_err: float, path: Path) -> Path:
    """Two panels: validation error vs steps (log x) and vs wall seconds of training."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for c in curves:
        steps = [max(s, 0.5) for s in c.steps]  # step 0 drawn at 0.5 on the log axis
        axes[0].plot(steps, c.val_angle, marker="o", ms=3, label=c.label)
        axes[1].plot(c.seconds, c.val_angle, marker="o", ms=3, label=c.label)
    for ax, xlabel in zip(axes, ("optimizer steps", "training wall seconds"), strict=True):
        ax.axhline(line_fit_err, color="k", ls="--", lw=1, label="line fit")
        ax.axhline(math.pi / 2, color="grey", ls=":", lw=1, label="random")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_ylabel("validation angular error (rad)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_models(models: list[str], sets: list[str]) -> tuple[list[ModelSpec], list[str]]:
    """``--model`` and ``--set`` values -> specs with their own overrides, and shared overrides."""
    specs: dict[str, ModelSpec] = {}
    for item in models:
        label, _, path = item.partition("=")
        if not label or label in specs or ":" in label:
            raise SystemExit(f"--model {item!r}: labels must be unique, non-empty, without ':'")
        specs[label] = ModelSpec(label, path or None)
    shared = []
    for item in sets:
        head, _, rest = item.partition("=")
        if ":" in head:
            label, _, key = head.partition(":")
            if label not in specs:
                raise SystemExit(f"--set {item!r}: no --model labelled {label!r} ({list(specs)})")
            specs[label].overrides.append(f"{key}={rest}")
        else:
            shared.append(item)
    return list(specs.values()), shared


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], metavar="LABEL[=CONFIG.yaml]")
    p.add_argument("--set", action="append", default=[], metavar="[LABEL:]KEY=VALUE")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--events", type=int, default=100_000, help="events if --data is made")
    p.add_argument("--file-events", type=int, default=20_000, help="events per made file")
    p.add_argument("--steps", type=int, default=1_500)
    p.add_argument("--checkpoints", type=int, default=12, help="log-spaced evaluations")
    p.add_argument("--equal-time-at", type=int, nargs="*", default=[300, 1_500])
    p.add_argument(
        "--steps-at",
        type=int,
        nargs="*",
        default=[],
        help="also evaluate at exactly these steps and print them as one table",
    )
    p.add_argument("--val-events", type=int, default=2_000)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    specs, args.shared = parse_models(args.model or ["ours"], args.set)
    if not (args.data / "train_meta.parquet").is_file():
        log.info("making %d synthetic events in %s", args.events, args.data)
        write_synthetic_dataset(
            args.data, n_events=args.events, batch_size=args.file_events, seed=0, progress=False
        )
    torch.set_num_threads(args.threads)
    cfgs = {s.label: model_config(s, args) for s in specs}
    check_same_batches(cfgs)
    marks = sorted({m for m in args.equal_time_at if m <= args.steps} | {args.steps})
    steps_at = sorted({s for s in args.steps_at if 0 <= s <= args.steps})
    checkpoints = checkpoint_steps(args.steps, args.checkpoints, marks + steps_at)
    _, val_ids = split_batch_ids(KaggleDataset(args.data).batch_ids, 1)
    line_fit_err = line_fit_error(args.data, val_ids, args.val_events)
    curves = [run_model(cfg, label, checkpoints) for label, cfg in cfgs.items()]
    eq = equal_time(curves, marks, "seconds") + equal_time(curves, marks, "cpu_seconds")
    report = format_tables(curves, line_fit_err, eq, steps_at)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "data": str(args.data),
        "steps": args.steps,
        "val_events": args.val_events,
        "steps_at": steps_at,
        "threads": args.threads,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "line_fit_val_angle": line_fit_err,
        "random_val_angle": math.pi / 2,
        "curves": [c.__dict__ for c in curves],
        "equal_time": eq,
    }
    (args.out / "learning.json").write_text(json.dumps(doc, indent=2))
    (args.out / "learning.md").write_text(report + "\n")
    png = plot(curves, line_fit_err, args.out / "learning.png")
    print(f"\nwritten: {args.out / 'learning.json'}, {args.out / 'learning.md'}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
