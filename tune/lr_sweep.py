"""The main job: the learning-rate stability table and an Optuna search on Ray Tune.

    python tune/lr_sweep.py                  # local Ray, synthetic data, sqlite MLflow
    python tune/lr_sweep.py --smoke-test     # the whole path at toy size
    python tune/lr_sweep.py --resume         # continue the latest interrupted sweep
    python tune/lr_sweep.py --address auto --gpus-per-worker 0.25 \\
        --tracking-uri http://127.0.0.1:5000 --storage-path /shared/sweeps

Then open MLflow (``mlflow ui --backend-store-uri sqlite:///mlflow.db``) to compare
the trials. All logic lives in ``iceaggr_tune.sweep``; this file parses arguments (made
from the option dataclasses of ``iceaggr_tune.options``) and prints the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def parse_args(argv: list[str] | None = None) -> tuple[Any, argparse.Namespace]:
    """The sweep's options and the namespace (for ``--json``). Every option flag comes from a
    field of ``iceaggr_tune.options.SweepOptions`` (help and default included); with
    ``--smoke-test`` the defaults are those of the smoke preset."""
    from iceaggr_tune.cli_options import OptionFlags
    from iceaggr_tune.options import SweepOptions

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--smoke-test", action="store_true")
    smoke = first.parse_known_args(argv)[0].smoke_test
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    flags = OptionFlags(p, SweepOptions.smoke() if smoke else SweepOptions())
    part = p.add_mutually_exclusive_group()
    part.add_argument("--table-only", action="store_true", help="only the stability table")
    part.add_argument("--search-only", action="store_true", help="only the Optuna search")
    p.add_argument("--json", help="also write the result summary as JSON here")
    args = p.parse_args(argv)
    parts = {"run_table": not args.search_only, "run_search": not args.table_only}
    return flags.options(args, parts), args


def print_result(opts: Any, result: Any) -> None:
    from iceaggr.tracking.client import redact_uri

    print()
    if result.table_markdown is not None:
        t = opts.resolved().table
        seeds = t.seeds
        print(
            f"## Stability table ({t.steps} steps, batch {t.batch_size}, {seeds} seed(s) per "
            f"cell, {t.eval_events} held-out events)\n"
        )
        print(result.table_markdown)
    if result.best is not None:
        b = result.best
        refs = "".join(f"; {k} {v:.4f} rad" for k, v in result.references.items())
        print(
            f"## Best configuration\n\nlr {b['lr']:.3g}, dropout {b['dropout']:.3f}: "
            f"validation angular error {b['val_angle']:.4f} rad after {b['steps']} steps{refs} "
            f"(same {opts.search.val_events} held-out events)"
        )
    if result.search_trials:
        from iceaggr_tune.summary import format_search_table

        print("\n## Search trials\n")
        print(format_search_table(result.search_trials))
    for part, over in result.overhead.items():
        if over:
            print(format_overhead(part, over))
    print(
        f"\nsweep {result.name}: {result.wall_seconds:.0f} s; "
        f"MLflow parent run {result.parent_run_id} at {redact_uri(opts.tracking.uri)}"
    )
    if result.links:
        from iceaggr_tune.mlflow_runs import format_links

        print(format_links(opts.tracking.uri, result.links))


def format_overhead(part: str, over: dict[str, float]) -> str:
    """One part's per-trial time: the wall, the training steps and where the rest went."""
    from iceaggr_tune.fit import OVERHEAD_PARTS, WORKER_START_PARTS

    lines = [
        f"\n{part}: {int(over['trials'])} trials, mean wall {over['mean_trial_wall_s']:.1f} s, "
        f"in training steps {over['mean_train_step_s']:.1f} s, "
        f"overhead {over['mean_overhead_s']:.1f} s per trial:"
    ]
    labels = {**OVERHEAD_PARTS, "t_worker_other_s": "other, in the worker", "rest_s": "Ray's end"}
    for key, label in labels.items():
        if key in over:
            lines.append(f"  {label:<36} {over[key]:6.1f} s")
        if key == "t_worker_start_s":
            for sub, sub_label in WORKER_START_PARTS.items():
                if sub in over:
                    lines.append(f"    {sub_label:<34} {over[sub]:6.1f} s")
    if "peak_memory_mb" in over:
        lines.append(
            f"  peak memory per trial (worker)       {over['peak_memory_mb']:6.0f} MiB mean, "
            f"{over['peak_memory_mb_max']:.0f} MiB max"
        )
    return "\n".join(lines)


def write_json(path: str, result: Any) -> None:
    with open(path, "w") as f:
        json.dump(
            {
                "name": result.name,
                "parent_run_id": result.parent_run_id,
                "table": [c.__dict__ for c in result.table or []],
                "best": result.best,
                "search_trials": result.search_trials,
                "references": result.references,
                "interrupted": result.interrupted,
                "wall_seconds": result.wall_seconds,
                "part_seconds": result.part_seconds,
                "overhead": result.overhead,
            },
            f,
            indent=2,
        )


def main(argv: list[str] | None = None) -> int:
    from iceaggr.data.dataset import DatasetError
    from iceaggr.logs import setup_logging
    from iceaggr.training.config import ConfigError
    from iceaggr_tune.cluster import ClusterConfigError
    from iceaggr_tune.sweep import SweepError, run_sweep

    setup_logging()
    opts, args = parse_args(argv)
    try:
        result = run_sweep(opts)
    except (ClusterConfigError, ConfigError, DatasetError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_result(opts, result)
    if args.json:
        write_json(args.json, result)
    if result.interrupted:
        print("interrupted: run again with --resume to finish", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
