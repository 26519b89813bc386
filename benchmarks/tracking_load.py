"""How many trials one MLflow tracking server serves: sqlite against PostgreSQL.

N simulated trials log to one ``mlflow server`` (started here with ``iceaggr mlflow-server``
on 127.0.0.1, on a sqlite file or on a PostgreSQL server that this script also starts in a
temporary folder with :class:`iceaggr.tracking.pgstore.LocalPostgres`). Each simulated trial does
what a search trial's :class:`~iceaggr.tracking.run_logger.RunLogger` does: it creates a run, logs
its params in one batch, then every ``interval`` seconds one ``log_batch`` of ``metrics`` values at
the next step, for ``--duration`` seconds (start times spread over the first interval). It does
not retry: a failed call is an error, and its points count as lost. Afterwards every metric
history is read back and counted.

The cadence (seconds between a trial's metric batches, metrics per batch, params) is read
from real trials' records with ``--cadence-from URI`` (an MLflow store a sweep or
``benchmarks/logging_cost.py`` wrote, e.g. ``sqlite:///runs/logging_cost/mlflow.db``); the
default, :data:`DEFAULT_CADENCE`, takes the batch size and params from that and assumes a
GPU's step time. ``--rates`` multiplies the trial's rate (GPUs train several times
faster than the 2-core CPU the default was measured on).

Reported per (backend, trials, rate): calls offered and served per second, failed calls,
points lost after read-back, p50/p99 latency of ``log_batch``; the knee of each backend is
the largest number of trials that is served (served >= 95% of offered, no error, no point
lost, p99 below 1 s) at every smaller load too.

    python benchmarks/tracking_load.py --quick                 # < 1 minute
    python benchmarks/tracking_load.py --trials 8 32 64 128    # the full comparison

Prints a Markdown table and writes JSON (default ``benchmarks/results/tracking_load.json``).
The simulated trials run in this process (threads over a few processes), on the same machine
as the server: on a small shared machine the clients take CPU from the server, so the numbers
are a lower bound of what a dedicated head serves.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "tracking_load.json"
KNEE_P99_S = 1.0
KNEE_SERVED = 0.95


@dataclass(frozen=True)
class Cadence:
    """How a trial logs: a batch of ``metrics`` values every ``interval_s``, ``params`` once."""

    interval_s: float
    metrics: int
    params: int
    source: str


DEFAULT_CADENCE = Cadence(interval_s=1.0, metrics=10, params=61, source="default")
"""A search trial's logging: 61 params at its start and a batch of at most 10 metrics
(loss, grad_norm, max_grad_norm, lr, events_per_s, epoch, diverged, events_truncated,
pulses_dropped; val_angle every second batch) every ``log_every`` = 10 steps, as its MLflow
records show (``benchmarks/logging_cost.py``, then ``--cadence-from
sqlite:///runs/logging_cost/mlflow.db``). On this project's 2-core CPU a step took 4-8 s, a
batch every 40-80 s: no load at all. The default interval, 1 s, is those 10 steps at 0.1 s a
step, an assumed GPU step (batch 256), not a measured one; ``--rates`` scales it."""


def cadence_from_store(uri: str) -> Cadence:
    """The median cadence of the finished runs in an MLflow store that logged ``loss``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    intervals, per_batch, params = [], [], []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            if "loss" not in run.data.metrics:
                continue
            points: dict[int, list[int]] = {}
            for key in run.data.metrics:
                for m in client.get_metric_history(run.info.run_id, key):
                    points.setdefault(m.step, []).append(m.timestamp)
            if len(points) < 2:
                continue
            first = [min(ts) for _, ts in sorted(points.items())]
            intervals.append((first[-1] - first[0]) / 1000 / (len(first) - 1))
            per_batch.append(sum(len(v) for v in points.values()) / len(points))
            params.append(len(run.data.params))
    if not intervals:
        raise SystemExit(
            f"--cadence-from {uri}: no run there logged 'loss' at two steps or more; "
            "point it at a store a sweep or benchmarks/logging_cost.py wrote"
        )

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    return Cadence(
        interval_s=round(median(intervals), 3),
        metrics=round(median(per_batch)),
        params=round(median(params)),
        source=f"{uri} ({len(intervals)} runs)",
    )


# ---------------------------------------------------------------- servers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(store_uri: str, root: Path, workers: int = 2) -> Iterator[str]:
    """``iceaggr mlflow-server`` on a free port of 127.0.0.1; stopped (group) on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logfile = root / f"mlflow-server-{port}.log"
    cmd = [
        sys.executable, "-m", "iceaggr.cli", "mlflow-server", "--port", str(port),
        "--backend-store-uri", store_uri, "--artifacts", str(root / "artifacts"),
        "--workers", str(workers),
    ]  # fmt: skip
    with logfile.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up: {logfile.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def postgres_store() -> Iterator[str]:
    """A fresh PostgreSQL server in a temporary folder; stopped and removed on exit."""
    from iceaggr.tracking.pgstore import LocalPostgres

    # Short (a Unix socket path) and directly under /tmp (run as root, the postgres account
    # must reach it).
    folder = Path(tempfile.mkdtemp(prefix="iceaggr-pg-", dir="/tmp"))
    pg = LocalPostgres(folder)
    try:
        yield pg.start()
    finally:
        try:
            pg.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def backend_server(backend: str, root: Path, workers: int = 2) -> Iterator[str]:
    """An MLflow server on a new ``sqlite`` file or a new ``postgresql`` server."""
    root.mkdir(parents=True, exist_ok=True)
    if backend == "sqlite":
        with mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root, workers) as url:
            yield url
    elif backend == "postgresql":
        with postgres_store() as uri, mlflow_server(uri, root, workers) as url:
            yield url
    else:
        raise ValueError(f"unknown backend {backend!r}: sqlite or postgresql")


# ---------------------------------------------------------------- load


@dataclass
class TrialLog:
    run_id: str | None = None
    calls: int = 0
    errors: int = 0
    points: int = 0  # metric points the trial tried to log
    latencies: list[float] | None = None
    error_sample: str = ""
    served_per_s: float = 0.0  # calls / max(the span they took, the span they were due in)


def simulated_trial(
    url: str, experiment_id: str, cadence: Cadence, rate: float, duration: float, seed: int
) -> TrialLog:
    """One trial's logging: a run, its params, a metric batch every interval (no retries)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    out = TrialLog(latencies=[])
    client = MlflowClient(tracking_uri=url)
    rng = random.Random(seed)
    interval = cadence.interval_s / rate
    # Every planned point counts: a trial whose run or params failed lost all of them.
    out.points = math.ceil(duration / interval) * cadence.metrics
    time.sleep(rng.uniform(0, interval))
    try:
        run = client.create_run(experiment_id, run_name=f"sim-{seed}")
        out.run_id = run.info.run_id
        client.log_batch(out.run_id, params=[Param(f"p{i}", str(i)) for i in range(cadence.params)])
    except Exception as err:
        out.errors += 1
        out.error_sample = f"{type(err).__name__}: {str(err)[:200]}"
        return out
    start = time.monotonic()
    step = 0
    while True:
        due = start + step * interval
        if due - start >= duration:
            break
        time.sleep(max(0.0, due - time.monotonic()))
        step += 1
        ts = int(time.time() * 1000)
        metrics = [Metric(f"m{k}", rng.random(), ts, step) for k in range(cadence.metrics)]
        t0 = time.perf_counter()
        try:
            client.log_batch(out.run_id, metrics=metrics)
        except Exception as err:
            out.errors += 1
            out.error_sample = out.error_sample or f"{type(err).__name__}: {str(err)[:200]}"
        else:
            out.latencies.append(time.perf_counter() - t0)
        out.calls += 1
    taken = time.monotonic() - start
    out.served_per_s = out.calls / max(taken, out.calls * interval) if out.calls else 0.0
    return out


def _trial_group(args: tuple[str, str, Cadence, float, float, list[int]]) -> list[TrialLog]:
    url, exp_id, cadence, rate, duration, seeds = args
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    with cf.ThreadPoolExecutor(len(seeds)) as pool:
        futures = [
            pool.submit(simulated_trial, url, exp_id, cadence, rate, duration, s) for s in seeds
        ]
        return [f.result() for f in futures]


def read_back(url: str, runs: list[str], metrics: int) -> int:
    """Metric points stored in ``runs`` (every key's full history)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)

    def count(run_id: str) -> int:
        return sum(len(client.get_metric_history(run_id, f"m{k}")) for k in range(metrics))

    with cf.ThreadPoolExecutor(8) as pool:
        return sum(pool.map(count, runs))


@dataclass
class LoadResult:
    backend: str
    trials: int
    rate: float
    interval_s: float
    duration_s: float
    offered_calls_per_s: float
    served_calls_per_s: float
    calls: int
    errors: int
    points: int
    points_lost: int
    p50_ms: float | None
    p99_ms: float | None
    error_sample: str

    @property
    def ok(self) -> bool:
        return (
            self.errors == 0
            and self.points_lost == 0
            and self.served_calls_per_s >= KNEE_SERVED * self.offered_calls_per_s
            and self.p99_ms is not None
            and self.p99_ms < KNEE_P99_S * 1000
        )


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_load(
    url: str,
    backend: str,
    trials: int,
    cadence: Cadence,
    rate: float = 1.0,
    duration: float = 20.0,
    processes: int = 4,
) -> LoadResult:
    """``trials`` simulated trials against ``url``; every point read back afterwards."""
    from mlflow.tracking import MlflowClient

    exp_id = MlflowClient(tracking_uri=url).create_experiment(
        f"load-{backend}-{trials}-{rate:g}-{time.time_ns()}"
    )
    groups = [list(range(i, trials, processes)) for i in range(min(processes, trials))]
    t0 = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(len(groups), mp_context=ctx) as pool:
        parts = pool.map(_trial_group, [(url, exp_id, cadence, rate, duration, g) for g in groups])
        logs = [t for part in parts for t in part]
    wall = time.monotonic() - t0
    runs = [t.run_id for t in logs if t.run_id]
    stored = read_back(url, runs, cadence.metrics)
    points = sum(t.points for t in logs)
    lat = [x for t in logs for x in (t.latencies or [])]
    calls = sum(t.calls for t in logs)
    p50, p99 = _percentile(lat, 0.5), _percentile(lat, 0.99)
    return LoadResult(
        backend=backend,
        trials=trials,
        rate=rate,
        interval_s=round(cadence.interval_s / rate, 3),
        duration_s=round(wall, 1),
        offered_calls_per_s=round(trials * rate / cadence.interval_s, 2),
        served_calls_per_s=round(sum(t.served_per_s for t in logs), 2),
        calls=calls,
        errors=sum(t.errors for t in logs),
        points=points,
        points_lost=points - stored,
        p50_ms=None if p50 is None else round(p50 * 1000, 1),
        p99_ms=None if p99 is None else round(p99 * 1000, 1),
        error_sample=next((t.error_sample for t in logs if t.error_sample), ""),
    )


def knees(results: list[LoadResult]) -> dict[str, dict[str, dict[str, int | None]]]:
    """Per backend and rate: the largest trial count served there and at every smaller one
    (``serves``), and the smallest that was not (``breaks_at``; None: none broke)."""
    out: dict[str, dict[str, dict[str, int | None]]] = {}
    for r in sorted(results, key=lambda r: (r.backend, r.rate, r.trials)):
        cell = out.setdefault(r.backend, {}).setdefault(
            f"rate x{r.rate:g}", {"serves": None, "breaks_at": None}
        )
        if cell["breaks_at"] is not None:
            continue
        if r.ok:
            cell["serves"] = r.trials
        else:
            cell["breaks_at"] = r.trials
    return out


def format_table(results: list[LoadResult]) -> str:
    head = (
        "| backend | trials | rate x | interval s | offered calls/s | served calls/s | errors "
        "| points | lost | p50 ms | p99 ms | ok |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    rows = [
        f"| {r.backend} | {r.trials} | {r.rate:g} | {r.interval_s:g} | {r.offered_calls_per_s:g} "
        f"| {r.served_calls_per_s:g} | {r.errors} | {r.points} | {r.points_lost} "
        f"| {r.p50_ms} | {r.p99_ms} | {'yes' if r.ok else 'NO'} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    p.add_argument("--trials", type=int, nargs="+", default=[8, 32, 64, 128])
    p.add_argument("--rates", type=float, nargs="+", default=[1.0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds each load runs")
    p.add_argument("--workers", type=int, default=2, help="mlflow server worker processes")
    p.add_argument("--processes", type=int, default=4, help="client processes")
    p.add_argument("--cadence-from", default=None, help="MLflow store URI of real trials")
    p.add_argument("--quick", action="store_true", help="8 trials, 8 s, each backend")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the servers this script started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cadence = cadence_from_store(args.cadence_from) if args.cadence_from else DEFAULT_CADENCE
    if args.quick:
        args.trials, args.duration, args.rates, args.processes = [8], 8.0, [1.0], 1
    print(
        f"cadence: a batch of {cadence.metrics} metrics every {cadence.interval_s} s, "
        f"{cadence.params} params ({cadence.source})",
        flush=True,
    )
    results: list[LoadResult] = []
    with tempfile.TemporaryDirectory(prefix="tracking-load-") as tmp:
        for backend in args.backends:
            with backend_server(backend, Path(tmp) / backend, args.workers) as url:
                for rate in args.rates:
                    for n in args.trials:
                        r = run_load(url, backend, n, cadence, rate, args.duration, args.processes)
                        results.append(r)
                        print(format_table([r]).splitlines()[-1], flush=True)
    table = format_table(results)
    summary = knees(results)
    print("\n" + table + "\n")
    for backend, per in summary.items():
        print(f"knee {backend}: {per}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "cadence": asdict(cadence),
        "server_workers": args.workers,
        "duration_s": args.duration,
        "cpus": os.cpu_count(),
        "results": [asdict(r) | {"ok": r.ok} for r in results],
        "knee": summary,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
