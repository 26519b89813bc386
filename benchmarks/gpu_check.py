"""One command that checks this project on a CUDA machine: speed, memory, bf16 and the sweep.

On the GPU machine, from the repository root (that machine has no Ray, Optuna or MLflow: the
git-ignored folder ``.gpu-bundle/``, made beforehand with the ``gpu-bundle`` script and
carried along, installs them)::

    source .gpu-bundle/install.sh && python3 benchmarks/gpu_check.py

Anywhere, at toy size on the CPU (what the test runs; ~1-2 minutes on 2 cores)::

    python benchmarks/gpu_check.py --device cpu --quick

It measures, in this order, and stops starting new sections when ``--budget-s`` (default
480 s on CUDA) is spent (a section not run is listed with the reason; a sweep part past it is
stopped, and the table part may use at most 45% of what is left when it starts):

1. **throughput**: training events/s of ``Trainer.train_step`` in fp32 and bf16 autocast, of
   this project's model packed vs padded (:mod:`benchmarks.throughput` runs it: its rows and
   speed-ups) and of the original network (``experiments/baseline_1m/config_fixed.yaml``,
   timed with :func:`benchmarks.harness.time_training` on the same synthetic batches);
2. **bf16 vs fp32**: the same model, initial weights and batches trained ``--agreement-steps``
   steps in each precision; the per-step loss difference (max and mean, rad);
3. **the sweep**, through its own entry point (``tune/lr_sweep.py``, with
   ``--gpus-per-worker 0.25``: four one-worker trials per GPU), one subprocess per part so
   that a part cut by the budget leaves the other's results: the full stability table
   (every learning rate and all four columns, ``--table-seeds`` seeds, default 1 to fit the
   budget; the GPU preset's default is 3), then a ``--search-trials`` (16) trial Optuna
   search; per part its wall time, trials, per-trial overhead (the worker-group start in its
   parts) and the workers' peak memory per trial (``torch.cuda.max_memory_allocated``,
   reported by each worker; mean and max), the table's cells and the best configuration.

Writes ``<out-dir>/gpu_check.json`` and ``gpu_check.md`` (``gpu_check_cpu.*`` with
``--device cpu``); the sweep's logs, data and MLflow store go to ``<out-dir>/gpu_check_sweep/``
(``gpu_check_cpu_sweep/``). Nothing here has run on a GPU yet: the time per section on a GPU
is unmeasured, which is why the budget stops it rather than an estimate.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ORIGINAL_CONFIG = ROOT / "experiments" / "baseline_1m" / "config_fixed.yaml"
OURS_CONFIG = ROOT / "experiments" / "iceaggr_baseline" / "config.yaml"
TABLE_SHARE = 0.45
"""Of the budget left when the sweep starts, what its table part may use at most."""
NEEDED = ("ray", "optuna", "mlflow", "pyarrow", "pandas", "yaml", "tqdm", "matplotlib")
"""Modules the sweep imports; missing ones stop the check before anything runs."""


@dataclasses.dataclass
class Plan:
    """What the check runs: the GPU sizes, or toy sizes with ``--quick``."""

    device: str
    quick: bool
    batch: int
    steps: int
    repeats: int
    agreement_steps: int
    table_seeds: int
    search_trials: int
    gpus_per_worker: float


def plan_for(args: argparse.Namespace) -> Plan:
    cuda = args.device == "cuda"
    return Plan(
        device=args.device,
        quick=args.quick,
        batch=args.batch_size or (16 if args.quick else 256),
        steps=2 if args.quick else 8,
        repeats=2 if args.quick else 3,
        agreement_steps=args.agreement_steps or (4 if args.quick else 50),
        table_seeds=args.table_seeds,
        search_trials=args.search_trials or (2 if args.quick else 16),
        gpus_per_worker=args.gpus_per_worker if cuda else 0.0,
    )


# ---------------------------------------------------------------- 1. throughput


def throughput_ours(plan: Plan, tmp: Path) -> dict[str, Any]:
    """benchmarks/throughput.py on this project's model: packed vs padded, fp32 and bf16."""
    from benchmarks import throughput

    argv = ["--device", plan.device, "--precision", "fp32", "bf16", "--json", str(tmp / "t.json")]
    argv += ["--batch-size", str(plan.batch), "--steps", str(plan.steps)]
    argv += ["--repeats", str(plan.repeats)] + (["--quick"] if plan.quick else [])
    doc = throughput.run(throughput.parse_args(argv))
    return {"command": ["python", "benchmarks/throughput.py", *argv], **doc}


def throughput_original(plan: Plan) -> list[dict[str, Any]]:
    """The original network's training events/s (fp32, bf16) on the throughput batches."""
    from benchmarks.harness import synthetic_batches, time_training
    from iceaggr.models.builder import build_model
    from iceaggr.training.config import load_config

    cfg = load_config(ORIGINAL_CONFIG)
    device = torch.device(plan.device)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(cfg.model).state_dict().items()}
    batches = [
        b.to(device) for b in synthetic_batches(plan.steps, plan.batch, 0, cfg.data.truncation())
    ]
    rows = []
    for precision in ("fp32", "bf16"):
        t = time_training(cfg, cfg.model, state, batches, device, precision, 1, plan.repeats)
        step = sorted(t.step_s)[len(t.step_s) // 2]
        rows.append(
            {
                "model": "original",
                "precision": precision,
                "batch_size": plan.batch,
                "events_per_s": plan.batch / step,
                "step_ms": 1e3 * step,
                "peak_mb": t.peak_bytes / 2**20,
            }
        )
        print(
            f"  original {precision} batch {plan.batch}: {plan.batch / step:,.1f} events/s",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------- 2. bf16 vs fp32


def loss_agreement(plan: Plan) -> list[dict[str, Any]]:
    """Per-step training losses of fp32 and bf16 from the same weights on the same batches."""
    from benchmarks.harness import synthetic_batches
    from iceaggr.training.config import load_config
    from iceaggr.training.trainer import Trainer

    out = []
    device = torch.device(plan.device)
    for name, path in (("iceaggr", OURS_CONFIG), ("original", ORIGINAL_CONFIG)):
        cfg = load_config(path)
        cfg.model.normalize = True
        cfg.model.dropout = 0.0  # the same network in both runs, step for step
        batches = synthetic_batches(plan.agreement_steps, plan.batch, 1, cfg.data.truncation())
        batches = [b.to(device) for b in batches]
        losses: dict[str, list[float]] = {}
        for precision in ("fp32", "bf16"):
            run = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, precision=precision)
            )
            torch.manual_seed(0)
            trainer = Trainer(run, device=device, build_data=False)
            trainer.train_model.train()
            losses[precision] = [float(trainer.train_step(b).loss) for b in batches]
        diffs = [abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"], strict=True)]
        row = {
            "model": name,
            "steps": plan.agreement_steps,
            "batch_size": plan.batch,
            "loss_fp32": losses["fp32"],
            "loss_bf16": losses["bf16"],
            "first_step_abs_diff": diffs[0],
            "max_abs_diff": max(diffs),
            "mean_abs_diff": sum(diffs) / len(diffs),
            "final_fp32": losses["fp32"][-1],
            "final_bf16": losses["bf16"][-1],
        }
        print(
            f"  {name}: bf16 - fp32 loss, step 1 {diffs[0]:.2e}, max {row['max_abs_diff']:.2e}, "
            f"mean {row['mean_abs_diff']:.2e} rad over {plan.agreement_steps} steps",
            flush=True,
        )
        out.append(row)
    return out


# ---------------------------------------------------------------- 3. the sweep


def sweep_command(plan: Plan, work: Path, part: str) -> list[str]:
    """``tune/lr_sweep.py`` for one part (``table``: the full table; ``search``) at
    ``gpus_per_worker``; its data, Ray storage, MLflow store and JSON under ``work``."""
    cmd = [sys.executable, str(ROOT / "tune" / "lr_sweep.py"), f"--{part}-only"]
    cmd += ["--name", part, "--storage-path", str(work / "runs"), "--data", str(work / "data")]
    cmd += ["--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    cmd += ["--json", str(work / f"{part}.json")]
    if plan.quick:
        cmd.append("--smoke-test")
        if part == "table":  # one learning rate: the two columns of the smoke table
            cmd += ["--table-lrs", "1e-3"]
    if part == "search":
        cmd += ["--trials", str(plan.search_trials)]
    elif not plan.quick:
        cmd += ["--table-models", "original", "iceaggr", "--table-hidden-columns"]
        cmd += ["--table-seeds", str(plan.table_seeds)]
    if plan.gpus_per_worker > 0:
        cmd += ["--gpus-per-worker", str(plan.gpus_per_worker)]
    return cmd


def run_sweep_part(plan: Plan, work: Path, part: str, timeout_s: float) -> dict[str, Any]:
    """One part of the sweep in a subprocess with its own Ray: its JSON summary, return code,
    wall time and the log's end. Past ``timeout_s`` it gets Ctrl-C (the sweep ends its runs
    and Ray cleanly), then a kill 60 s later."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = sweep_command(plan, work, part)
    env = dict(os.environ)
    # Ray's workers start from the raylet's environment: they find iceaggr through it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    log_path = work / f"{part}.log"
    print(f"  {' '.join(cmd[1:])}  (log: {log_path})", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            rc: int | str = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = f"stopped after {timeout_s:.0f} s (--budget-s)"
    wall = time.time() - t0
    js = work / f"{part}.json"
    summary = json.loads(js.read_text()) if js.exists() else {}
    tail = log_path.read_text(errors="replace").splitlines()[-40:]
    return {"command": cmd, "returncode": rc, "wall_s": wall, "summary": summary, "log_tail": tail}


# ---------------------------------------------------------------- report


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# GPU check ({doc['device_name']})", "", f"`{' '.join(doc['command'])}`", ""]
    ours = doc.get("throughput", {}).get("ours")
    if ours:
        lines += ["## Training throughput, this project's model", "", *ours["printed_table"], ""]
        lines += [r["line"] for r in ours.get("ratios", [])] + [""]
    orig = doc.get("throughput", {}).get("original")
    if orig:
        lines += ["## Training throughput, the original network", ""]
        lines += ["| precision | batch | events/s | step ms | peak MB |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['precision']} | {r['batch_size']} | {r['events_per_s']:,.1f} | "
            f"{r['step_ms']:,.1f} | {r['peak_mb']:,.0f} |"
            for r in orig
        ] + [""]
    if doc.get("agreement"):
        lines += ["## bf16 vs fp32 training loss (same weights, same batches)", ""]
        lines += [
            "| model | steps | step-1 diff | max diff | mean diff | final fp32 | final bf16 |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['steps']} | {r['first_step_abs_diff']:.2e} | "
            f"{r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | {r['final_fp32']:.4f} | "
            f"{r['final_bf16']:.4f} |"
            for r in doc["agreement"]
        ] + [""]
    runs = doc.get("sweep") or {}
    if runs:
        nan = float("nan")
        lines += ["## The sweep (tune/lr_sweep.py, one subprocess per part)", ""]
        lines += [
            "| part | return code | part wall s | trials | mean trial wall s | in steps s | "
            "overhead s | worker start s | peak MB mean | peak MB max |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for part, run in runs.items():
            s = run["summary"]
            over = (s.get("overhead") or {}).get(part) or {}
            lines.append(
                f"| {part} | {run['returncode']} | "
                f"{(s.get('part_seconds') or {}).get(part, run['wall_s']):.0f} | "
                f"{over.get('trials', 0):.0f} | {over.get('mean_trial_wall_s', nan):.1f} | "
                f"{over.get('mean_train_step_s', nan):.1f} | "
                f"{over.get('mean_overhead_s', nan):.1f} | "
                f"{over.get('t_worker_start_s', nan):.1f} | "
                f"{over.get('peak_memory_mb', nan):,.0f} | "
                f"{over.get('peak_memory_mb_max', nan):,.0f} |"
            )
        table = (runs.get("table") or {}).get("summary", {}).get("table")
        if table:
            lines += ["", f"table: {len(table)} cells; " + ", ".join(
                f"{c['model']}-{'norm' if c['normalize'] else 'raw'} lr {c['lr']:g} {c['status']}"
                for c in table
            )]  # fmt: skip
        best = (runs.get("search") or {}).get("summary", {}).get("best")
        if best:
            lines += [
                "",
                f"search best: lr {best['lr']:.3g}, dropout {best['dropout']:.3f}, "
                f"val_angle {best['val_angle']:.4f} rad after {best['steps']} steps",
            ]
        lines.append("")
    for name, why in doc.get("skipped", {}).items():
        lines.append(f"- {name}: not run ({why})")
    lines += [
        "",
        "Section times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in doc["seconds"].items()),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="toy sizes (CPU: ~1-2 minutes)")
    p.add_argument(
        "--budget-s",
        type=float,
        help="no new section after this many seconds (default: 480 on CUDA, the 8 minutes a "
        "GPU check may take; 1800 on the CPU, where it only keeps a stuck run from hanging)",
    )
    p.add_argument("--batch-size", type=int, help="throughput/agreement batch (256; quick 16)")
    p.add_argument("--agreement-steps", type=int, help="bf16 vs fp32 steps (50; quick 4)")
    p.add_argument("--table-seeds", type=int, default=1, help="seeds per table cell")
    p.add_argument("--search-trials", type=int, help="Optuna trials (16; quick 2)")
    p.add_argument("--gpus-per-worker", type=float, default=0.25, help="GPU share per trial")
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["throughput", "agreement", "table", "search"]
    )
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="JSON, Markdown, sweep log")
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 480.0 if args.device == "cuda" else 1800.0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here; use --device cpu (--quick)")
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None and m not in args.skip]
    if missing and not {"table", "search"} <= set(args.skip):
        p.error(
            f"missing Python modules {missing}: on the GPU machine `source "
            ".gpu-bundle/install.sh` first; elsewhere install the project (`make venv`)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    plan = plan_for(args)
    t_start = time.time()
    stem = "gpu_check" if plan.device == "cuda" else "gpu_check_cpu"
    doc: dict[str, Any] = {
        "command": ["python3", "benchmarks/gpu_check.py", *argv],
        "device_name": torch.cuda.get_device_name(0)
        if plan.device == "cuda"
        else platform.processor() or "cpu",
        "plan": dataclasses.asdict(plan),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "throughput": {},
        "seconds": {},
        "skipped": {},
    }

    def section(name: str, fn: Any) -> None:
        left = args.budget_s - (time.time() - t_start)
        if name in args.skip:
            doc["skipped"][name] = "--skip"
            return
        if left <= 0:
            doc["skipped"][name] = f"budget of {args.budget_s:.0f} s spent"
            return
        print(f"== {name} ({left:.0f} s of the budget left)", flush=True)
        t0 = time.time()
        fn(left)
        doc["seconds"][name] = time.time() - t0

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:

        def do_throughput(_: float) -> None:
            ours = throughput_ours(plan, Path(tmp))
            table = [line for line in ours["printed"] if line.startswith("|")]
            doc["throughput"]["ours"] = {
                "command": ours["command"],
                "rows": ours["rows"],
                "ratios": ours["ratios"],
                "skipped": ours["skipped"],
                "printed_table": table,
            }
            doc["throughput"]["original"] = throughput_original(plan)

        section("throughput", do_throughput)
    section("agreement", lambda _: doc.__setitem__("agreement", loss_agreement(plan)))
    work = args.out_dir / f"{stem}_sweep"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    doc["sweep"] = {}
    for part in ("table", "search"):
        # The table may take at most TABLE_SHARE of what is left, so the search gets its turn.
        share = TABLE_SHARE if part == "table" and "search" not in args.skip else 1.0
        section(
            part,
            lambda left, part=part, share=share: doc["sweep"].__setitem__(
                part, run_sweep_part(plan, work, part, share * left)
            ),
        )
    doc["seconds"]["total"] = time.time() - t_start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    js, md = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.md"
    js.write_text(json.dumps(doc, indent=2) + "\n")
    md.write_text(markdown(doc))
    print(md.read_text())
    print(f"wrote {js} and {md}")
    failed = [part for part, run in doc["sweep"].items() if run["returncode"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
