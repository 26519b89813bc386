"""Training throughput of the hierarchical transformer: packed (varlen) vs naive padded attention.

Measures, for every device (CPU always, CUDA when available) and precision (fp32, bf16 autocast):

- training events/s of :meth:`iceaggr.training.trainer.Trainer.train_step`, the step training runs
  (input magnitudes for the divergence guard, forward, the config's loss, backward,
  per-parameter gradient norms, clipping at the config's ``grad_clip``, AdamW and schedule
  step), of the model in ``experiments/iceaggr_baseline/config.yaml`` (d_model 128, 4 DOM +
  4 event layers), with ``attention="packed"`` and, in the same run, with
  ``attention="padded"`` (the naive reference, same parameters: every DOM padded to the
  longest DOM of the batch, every event to the largest event, a dense key-padding mask). The
  speed-up is the ratio of the two rates at the same batch size. The padded model can need
  hundreds of GB at batch 256; its batch is halved until the estimated memory fits (and, so
  that a CPU run ends, the predicted step time fits ``--max-step-s``); the packed model is
  then also timed at that batch for the ratio, and the configurations that do not fit are
  listed as ``skipped: would need N GB``.
- peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the peak resident set
  size (``VmHWM``, reset through ``/proc/self/clear_refs``) above the RSS before the model was
  built (falls back to ``getrusage`` max RSS, a whole-process peak, where that is not possible).
- FLOPs and minimum bytes per event, counted analytically from the config and the realized
  lengths (see :func:`count_flops` and :func:`count_min_bytes`), turned into achieved FLOP/s and
  bytes/s and a fraction of a ceiling measured in the same run (a large matmul and a large
  copy on the device); on CUDA also against assumed H200 numbers (:data:`H200_SPEC`).
- with ``--compile``, ``torch.compile(model)`` of the packed model (compile time separately;
  a failure is reported with its reason, not raised).
- with ``--data DIR``, the time :class:`~iceaggr.data.loader.EventLoader` needs to produce a batch
  from a Kaggle-layout folder, next to the step time (does the loader keep up?).

Batches are synthetic :class:`~iceaggr.data.batch.DomBatch`es built in memory (no files) whose
lengths follow the real distribution after the 3,000-pulse cap (DESIGN.md section 3: mean ~109
pulses and ~65 hit DOMs per event, ~78% single-pulse DOMs, a heavy tail), see
:func:`sample_lengths`; features are raw-scale (time ns, charge p.e., xyz m) because the model
normalizes them. The realized statistics are printed. Batches are on the device before timing
(host-to-device copies are not timed). Warm-up steps are excluded; each repeat times ``--steps``
steps over the same batches; the median and best repeat are reported.

Run from the repository root::

    python benchmarks/throughput.py --quick              # CPU, small batch, < 1 minute
    python benchmarks/throughput.py --device cpu         # batch 256 on the CPU (slow)
    python benchmarks/throughput.py --data data/synthetic --quick   # + loader vs step time

On a GPU box::

    python benchmarks/throughput.py --device cuda --precision fp32 bf16 --compile

Prints a Markdown table and writes JSON (default ``benchmarks/results/throughput.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks.harness import (
    H200_SPEC,
    Ceiling,
    CpuPeakMemory,
    batches_stats,
    devices_for,
    halvings,
    length_stats,
    measure_ceilings,
    memory_budget_bytes,
    sample_lengths,
    synthetic_batches,
    time_loader,
    time_training,
)

# Re-exported: tests/test_throughput.py checks the byte counts against it.
from benchmarks.step_costs import ADAMW_BYTES_PER_PARAM as ADAMW_BYTES_PER_PARAM
from benchmarks.step_costs import (
    TRAIN_FLOP_FACTOR,
    Row,
    _pool_lengths,
    count_flops,
    count_min_bytes,
    make_row,
    markdown_table,
    max_estimated_peak,
    per_event_counts,
)
from iceaggr.data.batch import DomBatch
from iceaggr.models.model import IceAggrModel, ModelConfig
from iceaggr.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "experiments" / "iceaggr_baseline" / "config.yaml"
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "throughput.json"
PRECISIONS = ("fp32", "bf16")
PADDED_STEP_EFFICIENCY = 0.25
"""Assumed fraction of the measured matmul ceiling a padded step reaches, used to predict its
step time (``--max-step-s``) only when no packed step was measured to scale from."""


# ------------------------------------------------------------------------ the run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small batch, few steps (< 1 min, CPU)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="experiment YAML")
    p.add_argument("--batch-size", type=int, help="events per step (default: config; quick 16)")
    p.add_argument(
        "--padded-batch-size",
        type=int,
        help="batch of the padded reference (default: largest power of two <= --batch-size "
        "that fits the memory budget and --max-step-s)",
    )
    p.add_argument("--steps", type=int, help="distinct batches = timed steps per repeat")
    p.add_argument("--warmup", type=int, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, help="timed repeats (median and best reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic batches and model")
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's; --quick: 1, since the ops of a small "
        "batch are too short to share and threads waiting on each other dominate)",
    )
    p.add_argument("--memory-budget-gb", type=float, help="skip configurations estimated above")
    p.add_argument(
        "--max-step-s",
        type=float,
        help="padded batch is halved until its predicted step takes less (default 30; quick 2)",
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    p.add_argument("--data", type=Path, help="Kaggle-layout folder: time EventLoader batches")
    p.add_argument("--loader-batches", type=int, help="batches timed from --data (default 20)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "steps": 2 if quick else 8,
        "warmup": 1 if quick else 2,
        "repeats": 2 if quick else 3,
        "max_step_s": 2.0 if quick else 30.0,
        "loader_batches": 5 if quick else 20,
        "threads": 1 if quick else None,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "repeats", "loader_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("batch_size", "padded_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document (also printed and written)."""
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return Benchmark(args).run()
    finally:
        torch.set_num_threads(threads_before)


class Benchmark:
    """One run: the model, its synthetic batches, and what was measured so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cfg = load_config(args.config)
        if self.cfg.model.arch != "iceaggr":
            raise SystemExit(
                f"{args.config}: model.arch is {self.cfg.model.arch!r}; this benchmark times and "
                "counts the FLOPs of IceAggrModel (model.arch: iceaggr) only"
            )
        self.trunc = self.cfg.data.truncation()
        self.batch_size: int = args.batch_size or (16 if args.quick else self.cfg.train.batch_size)
        self.packed_cfg = dataclasses.replace(self.cfg.model, attention="packed")
        self.padded_cfg = dataclasses.replace(self.cfg.model, attention="padded")
        torch.manual_seed(args.seed)
        model = IceAggrModel(self.packed_cfg)
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.n_params = model.num_parameters()
        self.pools: dict[int, list[DomBatch]] = {}
        self.rows: list[Row] = []
        self.ratios: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.ceilings: list[Ceiling] = []
        self.printed: list[str] = []

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.printed.append(line)

    def pool(self, batch_size: int) -> list[DomBatch]:
        """The ``--steps`` synthetic batches of this size (the same for every configuration)."""
        if batch_size not in self.pools:
            self.pools[batch_size] = synthetic_batches(
                self.args.steps, batch_size, self.args.seed, self.trunc
            )
        return self.pools[batch_size]

    def skip(self, device: torch.device, precision: str, attention: str, b: int, why: str) -> None:
        line = f"skipped: {device.type} {precision} {attention} batch {b}: {why}"
        self.say(line)
        self.skipped.append(
            dict(
                device=device.type,
                precision=precision,
                attention=attention,
                batch_size=b,
                reason=why,
                line=line,
            )
        )

    # -------------------------------------------------------------------- measurement

    def measure(
        self,
        device: torch.device,
        precision: str,
        ceiling: Ceiling,
        budget: int,
        model_cfg: ModelConfig,
        attention: str,
        batches: list[DomBatch],
        compile_model: bool = False,
    ) -> Row | None:
        """Time one configuration and add its row, or record why it was skipped."""
        b = batches[0].num_events
        need = max_estimated_peak(model_cfg, batches, self.n_params)
        if need > budget:
            why = f"would need ~{need / 2**30:.1f} GB (budget {budget / 2**30:.1f} GB)"
            self.skip(device, precision, attention, b, why)
            return None
        on_device = [x.to(device) for x in batches]
        try:
            timing = time_training(
                self.cfg,
                model_cfg,
                self.state,
                on_device,
                device,
                precision,
                self.args.warmup,
                self.args.repeats,
                compile_model,
            )
        except Exception as err:
            oom = isinstance(err, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(
                err
            )
            if oom:
                why = f"out of memory (estimated {need / 2**30:.1f} GB): {err}"
            elif compile_model:
                why = f"torch.compile failed: {type(err).__name__}: {err}"
            else:
                raise
            self.skip(device, precision, attention, b, why.split("\n")[0][:300])
            return None
        row = make_row(
            device=device,
            precision=precision,
            attention=attention,
            model_cfg=model_cfg,
            batches=batches,
            timing=timing,
            ceiling=ceiling,
            n_params=self.n_params,
            warmup=self.args.warmup,
        )
        self.rows.append(row)
        self.say(
            f"  {device.type} {precision} {attention} batch {b}: {row.events_per_s:,.1f} "
            f"events/s, {row.step_ms:,.1f} ms/step, peak {row.peak_mb:,.0f} MB (estimated "
            f"{row.estimated_peak_mb:,.0f} MB)"
            + (f", compile {row.compile_s:.1f} s" if row.compile_s is not None else "")
        )
        return row

    def padded_batch_size(
        self,
        device: torch.device,
        precision: str,
        ceiling: Ceiling,
        budget: int,
        packed: Row | None,
    ) -> int | None:
        """The largest batch (halving from --batch-size) whose padded step fits memory and time.

        The step time is predicted by scaling the measured packed step by the ratio of executed
        FLOPs (or, without one, from the matmul ceiling); every batch passed over is recorded as
        skipped with its reason.
        """
        args = self.args
        for b in [args.padded_batch_size] if args.padded_batch_size else halvings(self.batch_size):
            lengths = _pool_lengths(self.pool(b))
            need = max_estimated_peak(self.padded_cfg, self.pool(b), self.n_params)
            executed = sum(
                count_flops(self.padded_cfg, pulses, doms, "padded").total
                for pulses, doms in lengths
            )
            step_flops = TRAIN_FLOP_FACTOR * executed / len(lengths)
            if packed is not None:
                packed_flops = packed.executed_flops_per_event * packed.batch_size
                predicted_s = packed.step_ms / 1e3 * step_flops / packed_flops
            else:
                predicted_s = step_flops / (PADDED_STEP_EFFICIENCY * ceiling.matmul_flops_per_s)
            too_slow = args.padded_batch_size is None and predicted_s > args.max_step_s
            if need <= budget and not too_slow:
                return b
            why = (
                f"would need ~{need / 2**30:.1f} GB (budget {budget / 2**30:.1f} GB)"
                if need > budget
                else f"predicted {predicted_s:,.1f} s/step > --max-step-s {args.max_step_s:g} "
                f"(memory ~{need / 2**30:.2f} GB would fit)"
            )
            self.skip(device, precision, "padded", b, why)
        return None

    def run_device(self, device: torch.device) -> None:
        args = self.args
        budget = memory_budget_bytes(device, args.memory_budget_gb)
        for precision in args.precision:
            ceiling = measure_ceilings(device, precision, args.quick)
            self.ceilings.append(ceiling)
            spec = (
                f"; assumed H200: {ceiling.spec_flops_per_s / 1e12:.0f} TFLOP/s, "
                f"{ceiling.spec_bytes_per_s / 1e12:.1f} TB/s"
                if ceiling.spec_flops_per_s and ceiling.spec_bytes_per_s
                else ""
            )
            self.say(
                f"ceiling {device.type} {precision}: matmul "
                f"{ceiling.matmul_flops_per_s / 1e9:,.1f} GFLOP/s (n={ceiling.matmul_n}), copy "
                f"{ceiling.copy_bytes_per_s / 1e9:,.1f} GB/s{spec}"
            )
            # One untimed step of each model first, so that one-time costs (lazy kernel
            # initialization, code pages, allocator pools) land in no configuration's numbers.
            tiny = [x.to(device) for x in self.pool(2)[:1]]
            for model_cfg in (self.packed_cfg, self.padded_cfg):
                time_training(self.cfg, model_cfg, self.state, tiny, device, precision, 0, 1)

            common = (device, precision, ceiling, budget)
            packed = self.measure(*common, self.packed_cfg, "packed", self.pool(self.batch_size))
            if args.compile:
                self.measure(
                    *common, self.packed_cfg, "packed+compile", self.pool(self.batch_size), True
                )
            b = self.padded_batch_size(*common, packed)
            if b is None:
                continue
            padded = self.measure(*common, self.padded_cfg, "padded", self.pool(b))
            same = packed if b == self.batch_size else None
            if same is None and padded is not None:
                same = self.measure(*common, self.packed_cfg, "packed", self.pool(b))
            if padded is None or same is None:
                continue
            speedup = same.events_per_s / padded.events_per_s
            line = (
                f"speed-up packed/padded ({device.type} {precision}, batch {b}): {speedup:.1f}x "
                f"({same.events_per_s:,.1f} vs {padded.events_per_s:,.1f} events/s; peak memory "
                f"{same.peak_mb:,.0f} vs {padded.peak_mb:,.0f} MB)"
            )
            self.ratios.append(
                dict(
                    device=device.type,
                    precision=precision,
                    batch_size=b,
                    packed_events_per_s=same.events_per_s,
                    padded_events_per_s=padded.events_per_s,
                    speedup=speedup,
                    line=line,
                )
            )

    def run_loader(self) -> dict[str, Any]:
        data = self.args.data
        if not data.is_dir():
            raise SystemExit(
                f"--data {data}: no such folder; make one with "
                f"`iceaggr synth --out {data} --events 20000`"
            )
        result = time_loader(data, self.cfg, self.batch_size, self.args.loader_batches)
        result["vs_step"] = [
            dict(
                device=r.device,
                precision=r.precision,
                step_ms=r.step_ms,
                loader_over_step=result["batch_ms"] / r.step_ms,
                keeps_up=result["batch_ms"] <= r.step_ms,
            )
            for r in self.rows
            if r.attention == "packed" and r.batch_size == self.batch_size
        ]
        return result

    # -------------------------------------------------------------------- the report

    def describe_data(self) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
        """Print and return the length statistics and the per-event counts."""
        args, trunc = self.args, self.trunc
        pkd = self.packed_cfg
        self.say(
            f"model: {args.config} (d_model {pkd.d_model}, {pkd.dom_layers} DOM + "
            f"{pkd.event_layers} event layers, {self.n_params:,} parameters), torch "
            f"{torch.__version__}, {torch.get_num_threads()} CPU threads"
        )
        rng = np.random.default_rng([args.seed, 1])
        sample = length_stats(*sample_lengths(20_000, rng, trunc))
        self.say(
            f"synthetic lengths (20,000 events, caps {trunc.max_pulses_per_event}/event, "
            f"{trunc.max_pulses_per_dom}/DOM, {trunc.max_doms_per_event} DOMs/event): "
            f"{sample['mean_pulses_per_event']:.1f} pulses and "
            f"{sample['mean_doms_per_event']:.1f} hit DOMs per event, single-pulse DOM fraction "
            f"{sample['single_pulse_fraction']:.3f}, pulses/event P50 "
            f"{sample['pulses_per_event_p50']:.0f} P90 {sample['pulses_per_event_p90']:.0f} P99 "
            f"{sample['pulses_per_event_p99']:.0f}, DOMs/event {sample['min_doms_per_event']}-"
            f"{sample['max_doms_per_event']}, longest DOM {sample['max_pulses_per_dom']} pulses "
            "(real data, DESIGN.md 3: ~109, ~65, ~0.78)"
        )
        main = self.pool(self.batch_size)
        timed = batches_stats(main)
        self.say(
            f"timed batches ({args.steps} x {self.batch_size} events): "
            f"{timed['mean_pulses_per_event']:.1f} pulses and {timed['mean_doms_per_event']:.1f}"
            f" DOMs per event, single-pulse fraction {timed['single_pulse_fraction']:.3f}, "
            f"longest DOM {timed['max_pulses_per_dom']} pulses, largest event "
            f"{timed['max_doms_per_event']} DOMs"
        )
        per_event = {p: per_event_counts(pkd, main, self.n_params, p) for p in PRECISIONS}
        fp32 = per_event["fp32"]
        parts = ", ".join(f"{k} {v / 1e9:.4f}" for k, v in fp32["flops_breakdown"].items())
        self.say(
            f"per event, training step (fwd + bwd = 3x fwd), useful work: "
            f"{fp32['flops'] / 1e9:.3f} GFLOP ({parts}); minimum bytes "
            f"{fp32['bytes'] / 1e6:.2f} MB fp32, {per_event['bf16']['bytes'] / 1e6:.2f} MB bf16 "
            f"(of which parameters + AdamW "
            f"{fp32['bytes_breakdown']['parameters_optimizer'] / 1e6:.2f} MB at batch "
            f"{self.batch_size})"
        )
        return sample, timed, per_event

    def report(self, loader: dict[str, Any] | None) -> None:
        self.say()
        self.say(markdown_table(self.rows))
        self.say()
        for ratio in self.ratios:
            self.say(ratio["line"])
        for s in self.skipped:
            self.say(s["line"])
        for r in self.rows:
            if r.flop_fraction_spec is not None and r.byte_fraction_spec is not None:
                self.say(
                    f"vs assumed H200 ({r.device} {r.precision} {r.attention} batch "
                    f"{r.batch_size}): {100 * r.flop_fraction_spec:.2f}% of FLOP/s, "
                    f"{100 * r.byte_fraction_spec:.2f}% of bytes/s"
                )
        if loader is not None:
            stats = loader["data_stats"]
            self.say(
                f"loader ({loader['data']}, batch {loader['batch_size']}, one thread, no "
                f"prefetch): {loader['batch_ms']:.1f} ms/batch = {loader['steady_batch_ms']:.1f} "
                f"steady (CPU {loader['steady_batch_cpu_ms']:.1f}) + file read "
                f"{loader['file_read_ms']:.0f} ms (CPU {loader['file_read_cpu_ms']:.0f}) amortized "
                "over "
                f"{loader['events_per_file']:,.0f} events/file; {loader['events_per_s']:,.0f} "
                f"events/s; its batches: {stats['mean_pulses_per_event']:.1f} pulses, "
                f"{stats['mean_doms_per_event']:.1f} DOMs per event, single-pulse fraction "
                f"{stats['single_pulse_fraction']:.3f}"
            )
            for v in loader["vs_step"]:
                verdict = "keeps up" if v["keeps_up"] else "does NOT keep up (data-bound)"
                self.say(
                    f"  vs {v['device']} {v['precision']} packed step {v['step_ms']:.1f} ms: "
                    f"loader/step = {v['loader_over_step']:.2f} -> {verdict}"
                )
        cuda = "CUDA: max_memory_allocated; " if any(r.device == "cuda" for r in self.rows) else ""
        self.say(
            f"peak MB: {cuda}CPU: {CpuPeakMemory().method}. Timing: {self.args.warmup} warm-up "
            f"step(s) excluded, {self.args.repeats} repeat(s) of {self.args.steps} step(s); "
            "events/s and step ms are the median repeat."
        )

    def run(self) -> dict[str, Any]:
        args = self.args
        sample, timed, per_event = self.describe_data()
        for device in devices_for(args.device):
            self.run_device(device)
        loader = self.run_loader() if args.data is not None else None
        self.report(loader)
        doc: dict[str, Any] = {
            "command": ["python", "benchmarks/throughput.py", *getattr(args, "argv", [])],
            "config": str(args.config),
            "model": {**asdict(self.packed_cfg), "parameters": self.n_params},
            "batch_size": self.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "quick": args.quick,
            "seed": args.seed,
            "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "synthetic_lengths": sample,
            "timed_batches": timed,
            "per_event": per_event,
            "flop_count_rule": count_flops.__doc__,
            "byte_count_rule": count_min_bytes.__doc__,
            "h200_assumed": H200_SPEC,
            "ceilings": [asdict(c) for c in self.ceilings],
            "rows": [asdict(r) for r in self.rows],
            "ratios": self.ratios,
            "skipped": self.skipped,
            "loader": loader,
            "printed": self.printed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
        return doc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
