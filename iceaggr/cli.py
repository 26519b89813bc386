"""The ``iceaggr`` command: synthetic data, training, the stability probe, the line fit.

iceaggr synth --out data/synthetic --events 50000
iceaggr train experiments/baseline_1m/config_fixed.yaml --set train.max_steps=200
iceaggr probe --data data/synthetic
iceaggr linefit --data data/synthetic
iceaggr mlflow-server                  # the MLflow UI on http://127.0.0.1:5000
iceaggr postgres start --dir ~/mlflow/postgres   # a local PostgreSQL store; prints its URI
iceaggr mlflow-sync runs/sweeps/sweep-1/mlflow-spool --tracking-uri http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from iceaggr.logs import setup_logging

log = logging.getLogger(__name__)


def _synth(args: argparse.Namespace) -> int:
    from iceaggr.data.synth import write_synthetic_dataset

    path = write_synthetic_dataset(
        args.out, n_events=args.events, batch_size=args.batch_size, seed=args.seed
    )
    print(f"wrote {args.events} events to {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from iceaggr.training.config import load_config
    from iceaggr.training.results import write_result
    from iceaggr.training.trainer import train

    cfg = load_config(args.config, args.set)
    result = train(cfg, resume_from=args.resume)
    out = Path(cfg.train.out_dir) / "result.json"
    write_result(result, out)
    if result.diverged:
        print(f"DIVERGED: {result.diverged.summary()}")
        print(json.dumps(result.to_json()["diverged"], indent=2))
        return 3
    val = result.val_angle if result.val_angle is not None else float("nan")
    collapse = ""
    if result.val_collapse is not None:
        c = result.val_collapse
        collapse = (
            f" ({c['margin']:+.4f} vs the best constant direction, R {c['resultant']:.3f}"
            + (", COLLAPSED: one direction for every event" if result.collapsed else "")
            + ")"
        )
    print(
        f"trained {result.steps} steps: last loss {result.last_loss:.4f}, "
        f"validation angular error {val:.4f} rad{collapse}, "
        f"{result.events_per_s:.0f} events/s; result in {out}"
    )
    return 0


def _probe(args: argparse.Namespace) -> int:
    from iceaggr.training import probe, stability_table
    from iceaggr.training.config import load_config

    overrides = [*args.set, f"data.path={args.data}"]
    cfg = load_config(args.config, overrides)
    lrs = tuple(args.lrs) if args.lrs else probe.PROBE_LRS
    columns = tuple(c for c in probe.COLUMNS if args.models is None or c.arch in args.models)
    eval_events = args.eval_events or probe.PROBE_EVAL_EVENTS
    cells = probe.run_probe(
        cfg,
        lrs=lrs,
        steps=args.steps,
        batch_size=args.batch_size,
        seeds=args.seeds,
        columns=columns,
        eval_events=eval_events,
    )
    meta = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "eval_events": eval_events,
        "data": args.data,
        "grad_norm_warn": cfg.train.grad_norm_warn,
    }
    md, js = stability_table.write_table(cells, args.out, meta=meta)
    print(md.read_text(), end="")
    print(f"\nwritten: {md} and {js}")
    return 0


def _linefit(args: argparse.Namespace) -> int:
    from iceaggr.data.linefit import line_fit_dataset

    res = line_fit_dataset(args.data, max_events=args.max_events)
    print(json.dumps(res, indent=2, default=float))
    return 0


def mlflow_server_command(args: argparse.Namespace) -> list[str]:
    """The ``mlflow server`` command line for ``iceaggr mlflow-server``."""
    from iceaggr.tracking.client import absolute_tracking_uri

    store = absolute_tracking_uri(args.backend_store_uri)
    if store.split("://", 1)[0].split("+", 1)[0] == "postgresql":
        store = _postgres_store(store)
    workers = (os.cpu_count() or 1) if args.workers == "auto" else int(args.workers)
    artifacts = str(Path(args.artifacts).resolve())
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--backend-store-uri",
        store,
        "--artifacts-destination",
        artifacts,
        "--workers",
        str(workers),
    ]


def _postgres_store(store: str) -> str:
    """A PostgreSQL store URI with psycopg2 as its driver, checked to be importable.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; MLflow 3.17's job locks know
    psycopg2 only, which is the driver this project locks (psycopg2-binary).
    """
    scheme, _, rest = store.partition("://")
    if scheme == "postgresql":
        store = f"postgresql+psycopg2://{rest}"
    elif scheme != "postgresql+psycopg2":
        return store  # another driver named explicitly: the user's choice
    try:
        import psycopg2  # noqa: F401
    except ImportError as err:
        from iceaggr.tracking.client import redact_uri

        raise SystemExit(
            f"--backend-store-uri {redact_uri(store)} needs the psycopg2 driver: "
            "pip install psycopg2-binary (requirements/lock.txt pins it)"
        ) from err
    return store


def _workers(value: str) -> str:
    if value == "auto" or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(
        f"--workers must be a positive number or 'auto', not {value!r}"
    )


def _mlflow_server(args: argparse.Namespace) -> int:
    from iceaggr.tracking.client import LOOPBACK_HOSTS

    if args.host not in LOOPBACK_HOSTS:
        log.warning(
            "MLflow listens on %s: every machine that reaches this address can read and write "
            "runs (the server has no login). Do this only on a private network (a cluster's "
            "VPC), never on an address the internet can reach.",
            args.host,
        )
    cmd = mlflow_server_command(args)
    if args.backend_store_uri.startswith("postgresql"):
        # One database connection for every request thread of a server worker (Starlette runs
        # the MLflow app in a pool of 40 threads): with SQLAlchemy's default pool (5 + 10
        # overflow) the 16th concurrent request waits 30 s and fails with "QueuePool limit of
        # size 5 overflow 10 reached". 8 workers x 40 stays under the server's
        # max_connections (iceaggr.tracking.pgstore.MAX_CONNECTIONS).
        os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "10")
        os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "30")
    print(" ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)  # the server replaces this process (signals reach it directly)
    return 0  # pragma: no cover


def _postgres(args: argparse.Namespace) -> int:
    from iceaggr.tracking.pgstore import LocalPostgres, PostgresError

    try:
        pg = LocalPostgres(args.dir, port=args.port)
        if args.action == "start":
            print(pg.start())
        else:
            pg.stop()
    except PostgresError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _mlflow_sync(args: argparse.Namespace) -> int:
    from iceaggr.tracking.client import redact_uri
    from iceaggr.tracking.run_logger import sync_spool

    sent = sync_spool(args.spool_dir, args.tracking_uri, wait_s=args.wait)
    for run_id, n in sent.items():
        print(f"run {run_id}: sent {n} records")
    print(f"{len(sent)} spool file(s) sent to {redact_uri(args.tracking_uri)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iceaggr", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a physics-based synthetic dataset (Kaggle layout)")
    s.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    s.add_argument("--events", type=int, required=True, help="number of events")
    s.add_argument("--batch-size", type=int, default=200_000, help="events per batch file")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_synth)

    t = sub.add_parser("train", help="train from an experiment YAML")
    t.add_argument("config", help="experiment YAML, e.g. experiments/baseline_1m/config_fixed.yaml")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. --set train.lr=1e-3 (repeatable)",
    )
    t.add_argument("--resume", default=None, help="checkpoint file or folder to resume from")
    t.set_defaults(fn=_train)

    pr = sub.add_parser("probe", help="the learning-rate stability table, in one process")
    pr.add_argument("--data", default="data/synthetic", help="Kaggle-layout dataset folder")
    pr.add_argument("--config", default=None, help="experiment YAML (default: the baseline)")
    pr.add_argument("--steps", type=int, default=20)
    pr.add_argument("--batch-size", type=int, default=256)
    pr.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=None,
        help="learning rates (default: 1e-5 3e-5 1e-4 3e-4 1e-3)",
    )
    pr.add_argument(
        "--seeds", type=int, default=1, help="seeds per cell (fresh weights, own batch order)"
    )
    pr.add_argument(
        "--eval-events", type=int, default=None,
        help="held-out events the loss change is measured on (default: 1024)",
    )  # fmt: skip
    pr.add_argument(
        "--models", nargs="+", choices=("original", "iceaggr"), default=None,
        help="networks to probe (default: both; the table's columns)",
    )  # fmt: skip
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pr.add_argument("--out", default="runs/probe", help="folder for the Markdown and JSON table")
    pr.set_defaults(fn=_probe)

    lf = sub.add_parser("linefit", help="score the line-fit baseline on a dataset")
    lf.add_argument(
        "--data",
        default="data/synthetic",
        help="Kaggle-layout folder, or s3://bucket/prefix (files fetched into "
        "~/.cache/iceaggr/data; AWS_ENDPOINT_URL names an S3-compatible server)",
    )
    lf.add_argument("--max-events", type=int, default=None)
    lf.set_defaults(fn=_linefit)

    ms = sub.add_parser(
        "mlflow-server",
        help="run an MLflow tracking server + UI for the sweep's store (127.0.0.1 by default)",
    )
    ms.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; reach it from "
        "elsewhere through an SSH tunnel). Another address exposes the server to that network.",
    )
    ms.add_argument("--port", type=int, default=5000)
    ms.add_argument(
        "--backend-store-uri",
        default="sqlite:///mlflow.db",
        help="the run store: sqlite:///FILE (default sqlite:///mlflow.db), or a PostgreSQL "
        "database such as the URI `iceaggr postgres start` prints (a cluster's head)",
    )
    ms.add_argument("--artifacts", default="mlartifacts", help="artifact folder")
    ms.add_argument(
        "--workers",
        type=_workers,
        default="2",
        help="server worker processes, or 'auto' for one per CPU core (default 2)",
    )
    ms.set_defaults(fn=_mlflow_server)

    pg = sub.add_parser(
        "postgres",
        help="start or stop a PostgreSQL server in a folder (Unix socket only) for mlflow-server",
    )
    pg.add_argument("action", choices=("start", "stop"))
    pg.add_argument("--dir", required=True, help="folder of its data, socket and log")
    pg.add_argument("--port", type=int, default=5432, help="names the socket file (no TCP)")
    pg.set_defaults(fn=_postgres)

    sy = sub.add_parser(
        "mlflow-sync", help="send MLflow records that a process could not deliver (spool files)"
    )
    sy.add_argument("spool_dir", help="folder holding mlflow-spool-<run id>.jsonl files")
    sy.add_argument("--tracking-uri", required=True)
    sy.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the server")
    sy.set_defaults(fn=_mlflow_sync)
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    from iceaggr.data.dataset import DatasetError
    from iceaggr.training.config import ConfigError

    try:
        return args.fn(args)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
