"""The main job: the learning-rate stability table and an Optuna search on Ray Tune.

    python tune/lr_sweep.py                  # local Ray, synthetic data, sqlite MLflow
    python tune/lr_sweep.py --smoke-test     # the whole path at toy size
    python tune/lr_sweep.py --resume         # continue the latest interrupted sweep
    python tune/lr_sweep.py --address auto --gpus-per-worker 0.25 \\
        --tracking-uri http://127.0.0.1:5000 --storage-path /shared/sweeps

Then open MLflow (``mlflow ui --backend-store-uri sqlite:///mlflow.db``) to compare
the trials. All logic lives in ``iceaggr_tune.sweep``; this file parses arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", help="sweep name (default: next free sweep-N; with --resume: latest)")
    p.add_argument("--config", help="base experiment YAML (default: the baseline config)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override in the base config, e.g. --set model.d_model=64",
    )
    p.add_argument("--data", default=None, help="Kaggle-layout dataset (made on first use)")
    p.add_argument("--events", type=int, default=None, help="synthetic events made on first use")
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    )
    p.add_argument("--experiment", default="iceaggr-lr-sweep", help="MLflow experiment name")
    p.add_argument(
        "--storage-path",
        default="runs/sweeps",
        help="results and checkpoints (s3:// or a shared folder on a cluster)",
    )
    part = p.add_mutually_exclusive_group()
    part.add_argument("--table-only", action="store_true", help="only the stability table")
    part.add_argument("--search-only", action="store_true", help="only the Optuna search")
    p.add_argument("--trials", type=int, help="Optuna trials")
    p.add_argument("--steps", type=int, help="training steps per search trial")
    p.add_argument("--table-steps", type=int, help="steps per table cell (original: 20)")
    p.add_argument("--table-batch-size", type=int, help="batch per table cell (original: 256)")
    p.add_argument("--search-batch-size", type=int, help="batch per search step")
    p.add_argument("--lr-min", type=float)
    p.add_argument("--lr-max", type=float)
    p.add_argument("--dropout-min", type=float)
    p.add_argument("--dropout-max", type=float)
    p.add_argument("--report-every", type=int, help="steps between reports to Tune")
    p.add_argument(
        "--workers-per-trial", type=int, help="Ray Train workers (data parallel) per trial"
    )
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        help="GPUs per worker; 0.25 runs four one-worker trials per GPU (default 0: CPU)",
    )
    p.add_argument(
        "--max-concurrent", type=int, help="trials at once (default: what resources allow)"
    )
    p.add_argument(
        "--worker-resource",
        action="append",
        default=[],
        metavar="NAME=AMOUNT",
        help="custom Ray resource each training worker needs (repeatable), e.g. trainer=1",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        help="worker-group restarts per trial, each from its last checkpoint (default 1)",
    )
    p.add_argument(
        "--mlflow-wait",
        type=float,
        help="seconds MLflow bookkeeping waits for an unreachable tracking server (default "
        "1800); training goes on meanwhile and its metrics are sent when the server is back",
    )
    p.add_argument(
        "--allow-unauthenticated-ray",
        action="store_true",
        help="run on a Ray cluster without token authentication (refused by default)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--smoke-test", action="store_true", help="the whole path at toy size")
    p.add_argument("--json", help="also write the result summary as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from iceaggr.dataset import DatasetError
    from iceaggr.logs import setup_logging
    from iceaggr.probe import format_table
    from iceaggr.tracking import redact_uri
    from iceaggr_tune.cluster import ClusterConfigError
    from iceaggr_tune.sweep import SweepOptions, run_sweep

    setup_logging()
    args = parse_args(argv)
    mapping = {
        "name": args.name,
        "config": args.config,
        "data": args.data,
        "events": args.events,
        "address": args.address,
        "tracking_uri": args.tracking_uri,
        "experiment": args.experiment,
        "storage_path": args.storage_path,
        "trials": args.trials,
        "search_steps": args.steps,
        "table_steps": args.table_steps,
        "table_batch_size": args.table_batch_size,
        "search_batch_size": args.search_batch_size,
        "lr_min": args.lr_min,
        "lr_max": args.lr_max,
        "dropout_min": args.dropout_min,
        "dropout_max": args.dropout_max,
        "report_every": args.report_every,
        "workers_per_trial": args.workers_per_trial,
        "cpus_per_worker": args.cpus_per_worker,
        "gpus_per_worker": args.gpus_per_worker,
        "max_concurrent": args.max_concurrent,
        "seed": args.seed,
        "max_failures": args.max_failures,
        "mlflow_wait_s": args.mlflow_wait,
    }
    kw = {k: v for k, v in mapping.items() if v is not None}
    try:
        kw["worker_resources"] = {
            name: float(amount)
            for name, amount in (item.split("=", 1) for item in args.worker_resource)
        }
    except ValueError:
        print(
            f"error: --worker-resource takes NAME=AMOUNT, got {args.worker_resource}",
            file=sys.stderr,
        )
        return 2
    kw.update(
        table=not args.search_only,
        search=not args.table_only,
        resume=args.resume,
        model_overrides=args.set,
        allow_unauthenticated_ray=args.allow_unauthenticated_ray,
    )
    try:
        opts = SweepOptions.smoke(**kw) if args.smoke_test else SweepOptions(**kw)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = run_sweep(opts)
    except (ClusterConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    if result.table is not None:
        print(f"## Stability table ({opts.table_steps} steps, batch {opts.table_batch_size})\n")
        print(format_table(result.table))
        print()
    if result.best is not None:
        b = result.best
        print(
            f"## Best configuration\n\nlr {b['lr']:.3g}, dropout {b['dropout']:.3f}: "
            f"validation angular error {b['val_angle']:.4f} rad after {b['steps']} steps"
        )
    for part, over in result.overhead.items():
        if over:
            print(
                f"\n{part}: {int(over['trials'])} trials, "
                f"mean wall {over['mean_trial_wall_s']:.1f} s, "
                f"in training steps {over['mean_train_step_s']:.1f} s, "
                f"overhead {over['mean_overhead_s']:.1f} s per trial"
            )
    print(
        f"\nsweep {result.name}: {result.wall_seconds:.0f} s; "
        f"MLflow parent run {result.parent_run_id} at {redact_uri(opts.tracking_uri)}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "name": result.name,
                    "parent_run_id": result.parent_run_id,
                    "table": [c.__dict__ for c in result.table or []],
                    "best": result.best,
                    "interrupted": result.interrupted,
                    "wall_seconds": result.wall_seconds,
                    "overhead": result.overhead,
                },
                f,
                indent=2,
            )
    if result.interrupted:
        print("interrupted: run again with --resume to finish", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
