"""Does the first early-stopping rung rank search trials the way their final values do?

Runs the sweep's search trials to the end, without early stopping, in this process (no Ray):
the config is the one the sweep builds for a search trial (:func:`iceaggr_tune.sweep.
base_experiment`, :func:`~iceaggr_tune.search.search_config` and
:func:`iceaggr_tune.trial.trial_experiment` on the default :class:`~iceaggr_tune.options.
SweepOptions`, resolved for CPU trials: 60 steps of 64 events, warm-up 10, reports every 20
steps; here every report scores the 1,000 held-out events, where the sweep scores only its
rungs and the last step), with the learning rate and dropout of each trial taken
from a fixed Latin grid over the search space (log-uniform lr in ``[lr_min, lr_max]``, uniform
dropout in ``[dropout_min, dropout_max]``: one trial per stratum of each, the dropout strata
permuted by ``--seed``). For every report step it prints each trial's validation error, and the
Spearman rank correlation between the value at that step and the final value; the first rung
of early stopping (report ``grace_reports``: step 40 on CPUs) is marked. It also replays the
trials, in grid order, through the sweep's own :class:`~iceaggr_tune.early_stop.RungBoard` and
says which of them early stopping would have ended, and whether the best final trial survives.

Run from the repository root (one thread; 8 trials of 60 steps took ~17 minutes on one core of
a 2-core machine while other work shared it; the CPU preset's 4 trials give too few ranks to
read, hence ``--trials 8``)::

    python benchmarks/rung_fidelity.py --trials 8 --out runs/benchmarks/rung_fidelity
    python benchmarks/rung_fidelity.py --trials 8 --set model.prior_direction=moment \
        --out runs/benchmarks/rf-moment

``--set KEY=VALUE`` changes the sweep's base config as the sweep's own ``--set`` does. Writes
``rung_fidelity.json`` and ``rung_fidelity.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(1, str(Path(__file__).resolve().parent))  # benchmarks/learning.py

from learning import line_fit_error

from iceaggr.data.dataset import KaggleDataset, split_batch_ids
from iceaggr.logs import setup_logging
from iceaggr.training.config import ExperimentConfig, to_dict
from iceaggr.training.trainer import train
from iceaggr_tune.early_stop import RungBoard
from iceaggr_tune.options import SearchOptions, SweepOptions
from iceaggr_tune.search import search_config
from iceaggr_tune.sweep import base_experiment, ensure_data
from iceaggr_tune.trial import TrialSettings, trial_experiment

log = logging.getLogger("benchmarks.rung_fidelity")

DEFAULT_OUT = Path("runs/benchmarks/rung_fidelity")


def latin_grid(search: SearchOptions, n: int, seed: int) -> list[dict[str, float]]:
    """``n`` (lr, dropout) points, one in the middle of each of ``n`` equal strata of log lr
    (ascending) and of dropout (strata order permuted with ``seed``)."""
    mid = (np.arange(n) + 0.5) / n  # (n,) stratum centres in [0, 1]
    lo, hi = math.log(search.lr_min), math.log(search.lr_max)
    lrs = np.exp(lo + mid * (hi - lo))
    perm = np.random.default_rng(seed).permutation(n)
    drops = search.dropout_min + mid[perm] * (search.dropout_max - search.dropout_min)
    return [{"lr": float(a), "dropout": float(b)} for a, b in zip(lrs, drops, strict=True)]


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` (ascending), ties getting the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks (nan when
    either side is constant or has fewer than 2 finite pairs)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 2:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


def trial_configs(opts: SweepOptions, points: list[dict[str, float]]) -> list[ExperimentConfig]:
    """The config of each search trial, built as the sweep builds it."""
    cfg = search_config(base_experiment(opts), opts.search, opts.early_stop)
    cfg.train.checkpoint_every = 0  # no checkpoints: they change no number here
    cfg.train.mlflow_tracking_uri = None
    settings = TrialSettings(
        base=to_dict(cfg),
        part="search",
        parent_run_id="",
        storage_path="",
        tracking=opts.tracking,
        resources=opts.resources,
    )
    return [trial_experiment(settings, hp) for hp in points]


def run_trial(cfg: ExperimentConfig, out_dir: Path) -> tuple[dict[int, float], str | None]:
    """Train one trial to the end; its validation error (rad) at every evaluation step."""
    cfg.train.out_dir = str(out_dir)
    values: dict[int, float] = {}

    def report(metrics: dict[str, float], step: int, checkpoint: Path | None) -> bool:
        if "val_angle" in metrics:
            values[step] = float(metrics["val_angle"])
        return False  # never stop: the point is to see the end

    result = train(cfg, report=report, progress=False)
    diverged = result.diverged.summary() if result.diverged is not None else None
    return values, diverged


def replay_asha(
    values: list[dict[int, float]], report_every: int, grace: int, rf: int, n_reports: int
) -> list[int | None]:
    """The step at which the sweep's RungBoard would have stopped each trial (None: it runs
    to the end), trials reporting in grid order, each to its end before the next (as with
    one trial at a time)."""
    board = RungBoard(grace, rf, n_reports)
    stopped: list[int | None] = []
    for i, v in enumerate(values):
        stop_at = None
        for report in range(1, n_reports):
            step = report * report_every
            if step in v and board.should_stop(str(i), report, v[step]):
                stop_at = step
                break
        stopped.append(stop_at)
    return stopped


def format_report(doc: dict[str, Any]) -> str:
    steps: list[int] = doc["report_steps"]
    rung = doc["first_rung_step"]
    out = [f"\n### Search trials run to step {doc['final_step']} (base overrides: "]
    out[-1] += f"{', '.join(doc['overrides']) or 'none'})"
    head = " | ".join(f"step {s}{' (rung)' if s == rung else ''}" for s in steps)
    out.append(f"\n| trial | lr | dropout | {head} | ASHA would stop at |")
    out.append("|---:|---:|---:|" + "---:|" * len(steps) + "---|")
    for t in doc["trials"]:
        cells = " | ".join(
            f"{t['val_angle'][str(s)]:.4f}" if str(s) in t["val_angle"] else "—" for s in steps
        )
        stop = t["asha_stop_step"]
        out.append(
            f"| {t['trial']} | {t['lr']:.2e} | {t['dropout']:.3f} | {cells} | "
            f"{'step ' + str(stop) if stop else 'runs to the end'} |"
        )
    out.append("\n| rung at step | Spearman(value there, final value) |\n|---:|---:|")
    for s in steps[:-1]:
        mark = " (first rung)" if s == rung else ""
        out.append(f"| {s}{mark} | {doc['spearman'][str(s)]:+.3f} |")
    out.append(
        f"\nBest final trial: {doc['best_final_trial']} ({doc['best_final']:.4f} rad); "
        f"{'stopped' if doc['best_final_stopped'] else 'kept'} by early stopping. "
        f"Line fit on the same held-out events: {doc['line_fit_val_angle']:.4f} rad."
    )
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="dataset folder (default: the sweep's)")
    p.add_argument("--trials", type=int, default=None, help="default: the sweep's (4 on CPUs)")
    p.add_argument("--seed", type=int, default=0, help="permutation of the dropout strata")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    # Every report step is scored (the sweep scores only its rungs and the last step), so the
    # rank correlation is known at each step.
    changes: dict[str, Any] = {
        "model_overrides": args.set,
        "early_stop.validate_every_report": True,
    }
    if args.data:
        changes["data.path"] = args.data
    if args.trials:
        changes["search.trials"] = args.trials
    opts = SweepOptions().changed(changes).resolved()
    ensure_data(opts.data)
    points = latin_grid(opts.search, opts.search.trials, args.seed)
    cfgs = trial_configs(opts, points)
    every, grace = opts.early_stop.report_every, opts.early_stop.grace_reports
    assert every is not None and opts.search.steps is not None
    n_reports = max(1, opts.search.steps // every)
    steps = [every * k for k in range(1, n_reports + 1)]
    final = steps[-1]
    values: list[dict[int, float]] = []
    trials: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (hp, cfg) in enumerate(zip(points, cfgs, strict=True)):
            t0 = time.process_time()
            v, diverged = run_trial(cfg, Path(tmp) / f"trial-{i}")
            values.append(v)
            log.info("trial %d (lr %.2e, dropout %.3f): %s", i, hp["lr"], hp["dropout"], v)
            trials.append(
                {
                    "trial": i,
                    **hp,
                    "val_angle": {str(s): x for s, x in sorted(v.items())},
                    "diverged": diverged,
                    "cpu_seconds": time.process_time() - t0,
                }
            )
    # A diverged trial scores the sweep's penalty (pi) from its divergence on.
    for v in values:
        for s in steps:
            v.setdefault(s, math.pi)
    stops = replay_asha(values, every, grace, opts.early_stop.reduction_factor, n_reports)
    for t, stop in zip(trials, stops, strict=True):
        t["asha_stop_step"] = stop
    finals = [v[final] for v in values]
    best = int(np.argmin(finals))
    data = Path(cfgs[0].data.path)
    _, val_ids = split_batch_ids(KaggleDataset(data).batch_ids, 1)
    doc = {
        "data": str(data),
        "overrides": args.set,
        "seed": args.seed,
        "threads": args.threads,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "search": dataclasses.asdict(opts.search),
        "early_stop": dataclasses.asdict(opts.early_stop),
        "report_steps": steps,
        "final_step": final,
        "first_rung_step": grace * every,
        "trials": trials,
        "spearman": {str(s): spearman([v[s] for v in values], finals) for s in steps[:-1]},
        "best_final_trial": best,
        "best_final": finals[best],
        "best_final_stopped": stops[best] is not None,
        "line_fit_val_angle": line_fit_error(data, val_ids, opts.search.val_events),
    }
    report = format_report(doc)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rung_fidelity.json").write_text(json.dumps(doc, indent=2))
    (args.out / "rung_fidelity.md").write_text(report + "\n")
    print(f"\nwritten: {args.out / 'rung_fidelity.json'}, {args.out / 'rung_fidelity.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
