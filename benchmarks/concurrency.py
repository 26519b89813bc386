"""Trials in flight vs threads per trial on the CPUs: which split of the cores trains most.

A sweep on CPUs can run P trials at once with T torch threads each (P x T <= cores). This
script measures every such split on this machine's cores: P processes start together (a
barrier), each builds a :class:`~iceaggr.training.trainer.Trainer` with ``torch.set_num_threads(T)``
and times ``Trainer.train_step`` (the step the sweep's trials run) on synthetic batches made by
:func:`benchmarks.harness.synthetic_batches`; the score of a split is the events/s of all
P processes together (events trained / wall time from the barrier until the last process
ends), i.e. trials finished per hour for a fixed step budget.

Two workloads, the sweep's two kinds of trial:

* ``table``: the original network (``experiments/baseline_1m/config_fixed.yaml``) at the
  table's batch (256; ``--quick``: 32);
* ``search``: this project's normalized model (``experiments/iceaggr_baseline/config.yaml``)
  at the CPU search batch (64; ``--quick``: 16).

Run from the repository root (on an otherwise idle machine: other processes on the cores
change the answer)::

    python benchmarks/concurrency.py            # ~3 min on 2 cores
    python benchmarks/concurrency.py --quick    # < 1 min

Prints a Markdown table and writes JSON (default ``benchmarks/results/concurrency.json``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "concurrency.json"
WORKLOADS: dict[str, dict[str, Any]] = {
    "table": {"config": "experiments/baseline_1m/config_fixed.yaml", "batch": 256, "quick": 32},
    "search": {"config": "experiments/iceaggr_baseline/config.yaml", "batch": 64, "quick": 16},
}


def splits(cores: int) -> list[tuple[int, int]]:
    """Every (trials in flight, threads per trial) with trials x threads <= ``cores``."""
    return [(p, t) for p in range(1, cores + 1) for t in range(1, cores // p + 1)]


def _worker(
    workload: str, batch: int, steps: int, threads: int, seed: int, barrier: Any, out: Any
) -> None:
    """One trial's process: build, warm up one step, wait for the others, time ``steps``."""
    import torch

    torch.set_num_threads(threads)
    from benchmarks.harness import synthetic_batches
    from iceaggr.training.config import load_config
    from iceaggr.training.trainer import Trainer

    cfg = load_config(ROOT / WORKLOADS[workload]["config"])
    cfg.train.batch_size = batch
    cfg.train.precision = "fp32"
    cfg.model.normalize = True
    trainer = Trainer(cfg, device="cpu", build_data=False)
    batches = synthetic_batches(steps, batch, seed, cfg.data.truncation())
    trainer.train_model.train()
    trainer.train_step(batches[0])  # warm-up (allocator, code pages), untimed
    barrier.wait()
    t0 = time.perf_counter()
    for b in batches:
        trainer.train_step(b)
    out.put((time.time(), time.perf_counter() - t0, steps * batch))


def measure(workload: str, batch: int, steps: int, trials: int, threads: int) -> dict[str, Any]:
    """``trials`` processes of ``threads`` threads, started together; their summed rate."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(trials + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(workload, batch, steps, threads, 1000 + i, barrier, out))
        for i in range(trials)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    t_start = time.time()
    done = [out.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{workload} {trials}x{threads}: a process exited {p.exitcode}")
    wall = max(end for end, _, _ in done) - t_start
    events = sum(n for _, _, n in done)
    per_trial = [n / s for _, s, n in done]
    return {
        "workload": workload,
        "batch_size": batch,
        "trials_in_flight": trials,
        "threads_per_trial": threads,
        "steps_per_trial": steps,
        "wall_s": wall,
        "events_per_s_total": events / wall,
        "events_per_s_per_trial": sum(per_trial) / len(per_trial),
        "step_s_per_trial": batch / (sum(per_trial) / len(per_trial)),
    }


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| workload | batch | trials x threads | events/s (all trials) | events/s per trial "
        "| s/step per trial | vs best |",
        "|---|---|---|---|---|---|---|",
    ]
    best = {}
    for r in rows:
        best[r["workload"]] = max(best.get(r["workload"], 0.0), r["events_per_s_total"])
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['batch_size']} | {r['trials_in_flight']} x "
            f"{r['threads_per_trial']} | {r['events_per_s_total']:.1f} | "
            f"{r['events_per_s_per_trial']:.1f} | {r['step_s_per_trial']:.2f} | "
            f"{r['events_per_s_total'] / best[r['workload']]:.2f} |"
        )
    return "\n".join(lines)


def best_split(rows: Sequence[dict[str, Any]], workload: str) -> tuple[int, int]:
    r = max((r for r in rows if r["workload"] == workload), key=lambda r: r["events_per_s_total"])
    return r["trials_in_flight"], r["threads_per_trial"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small batches, few steps (< 1 min)")
    p.add_argument("--cores", type=int, help="cores to split (default: os.cpu_count())")
    p.add_argument("--steps", type=int, help="timed steps per trial (default 4; quick 3)")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    args = p.parse_args(argv)
    args.cores = args.cores or os.cpu_count() or 1
    args.steps = args.steps or (3 if args.quick else 4)
    if args.cores < 1 or args.steps < 1:
        p.error(f"--cores and --steps must be >= 1, got {args.cores}, {args.steps}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    rows = []
    for workload in args.workloads:
        spec = WORKLOADS[workload]
        batch = spec["quick"] if args.quick else spec["batch"]
        for trials, threads in splits(args.cores):
            row = measure(workload, batch, args.steps, trials, threads)
            print(
                f"{workload} batch {batch}: {trials} trial(s) x {threads} thread(s): "
                f"{row['events_per_s_total']:.1f} events/s in all",
                flush=True,
            )
            rows.append(row)
    table = markdown(rows)
    print()
    print(table)
    best = {w: best_split(rows, w) for w in args.workloads}
    for w, (p, t) in best.items():
        print(f"best for {w}: {p} trial(s) in flight x {t} thread(s)")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    doc = {
        "command": ["python", "benchmarks/concurrency.py", *argv],
        "cores": args.cores,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": load,
        "platform": platform.platform(),
        "rows": rows,
        "best": {w: {"trials_in_flight": p, "threads_per_trial": t} for w, (p, t) in best.items()},
        "markdown": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
