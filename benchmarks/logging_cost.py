"""What a training step pays for MLflow logging: off, a fast server, a server that takes 1 s.

Trains a search trial as the sweep does on CPUs (``iceaggr_tune.search.search_config`` of the
sweep's base config with the CPU preset: batch 64, a report every 10 steps, validation,
checkpoint and early-stopping rung every 20) in this process, once per case:

* ``off``: no MLflow;
* ``fast``: an ``mlflow server`` (sqlite) on 127.0.0.1, started here;
* ``slow``: the same server behind a proxy on 127.0.0.1 that holds every request ``--delay``
  seconds (default 1) before passing it on: a loaded or distant tracking server;

each with the trainer's MLflow hook sending in the training thread (``sync``, what the
trainer did before) and from its background thread (``async``, what it does now).

Reported per case: mean wall seconds per training step (over all steps, reports included),
the wall seconds the MLflow hook took in the training thread (at the start, at all reports,
at the end), per report, and the whole run. The curves of every case are read back from the
server: ``points`` must equal the steps logged times the metrics per report.

    python benchmarks/logging_cost.py              # the CPU preset: 100 steps per case
    python benchmarks/logging_cost.py --quick      # 20 steps per case, fast and slow async

Prints a Markdown table and writes JSON (default ``benchmarks/results/logging_cost.json``);
the server's store (``--workdir``, default ``runs/logging_cost``) keeps the runs, so
``benchmarks/tracking_load.py --cadence-from sqlite:///runs/logging_cost/mlflow.db`` reads a
real trial's logging cadence from them.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tracking_load import free_port, mlflow_server

from iceaggr.training.hooks import Hook
from iceaggr.training.mlflow_hook import MlflowHook

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "logging_cost.json"


@contextlib.contextmanager
def slow_proxy(upstream: str, delay: float) -> Iterator[str]:
    """An HTTP proxy on 127.0.0.1 that waits ``delay`` s, then forwards to ``upstream``."""
    host, port = upstream.removeprefix("http://").split(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(delay)
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class TimedMlflowHook(MlflowHook):
    """The trainer's MLflow hook, with the wall time it takes in the training thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spent = {"start": 0.0, "reports": 0.0, "end": 0.0}
        self.reports = 0
        self.points = 0

    def on_start(self, trainer: Any) -> None:
        t0 = time.perf_counter()
        super().on_start(trainer)
        self.spent["start"] += time.perf_counter() - t0

    def on_report(self, metrics: dict[str, float], step: int, checkpoint_dir: Path | None) -> None:
        t0 = time.perf_counter()
        super().on_report(metrics, step, checkpoint_dir)
        self.spent["reports"] += time.perf_counter() - t0
        self.reports += 1
        self.points += len(metrics)

    def on_end(self, result: Any) -> None:
        t0 = time.perf_counter()
        super().on_end(result)
        self.spent["end"] += time.perf_counter() - t0


class StepClock(Hook):
    """Wall time between consecutive steps (a step's report is inside its interval)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.intervals: list[float] = []

    def on_step(self, step: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now


@dataclass
class CaseResult:
    case: str
    steps: int
    reports: int
    step_s_mean: float
    hook_start_s: float
    hook_reports_s: float
    hook_per_report_s: float
    hook_end_s: float
    run_s: float
    points_logged: int
    points_stored: int


def trial_config(data: Path, steps: int) -> Any:
    """The sweep's search-trial config on the CPU preset (``steps`` may shorten it)."""
    from iceaggr_tune.options import SweepOptions
    from iceaggr_tune.search import search_config
    from iceaggr_tune.sweep import base_experiment

    opts = SweepOptions().changed({"data.path": str(data)}).resolved()
    cfg = search_config(base_experiment(opts), opts.search, opts.early_stop)
    cfg.train.max_steps = steps
    cfg.train.warmup_steps = max(1, steps // 10)
    cfg.train.lr = 1e-3
    return cfg


def run_case(name: str, cfg: Any, url: str | None, background: bool, out: Path) -> CaseResult:
    import copy

    from mlflow.tracking import MlflowClient

    from iceaggr.training.trainer import train

    cfg = copy.deepcopy(cfg)
    cfg.name = f"logging-cost-{name}"
    cfg.train.out_dir = str(out / name)
    clock = StepClock()
    hooks: list[Hook] = []
    hook = None
    if url is not None:
        hook = TimedMlflowHook(url, experiment="logging-cost", background=background)
        hooks.append(hook)
    hooks.append(clock)
    t0 = time.perf_counter()
    result = train(cfg, hooks=hooks, progress=False, checkpoint_dir=out / name / "ckpt")
    run_s = time.perf_counter() - t0
    stored = logged = 0
    if hook is not None and hook.logger is not None:
        client = MlflowClient(tracking_uri=url)
        run = client.get_run(hook.logger.run_id)
        stored = sum(len(client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics)
        logged = hook.points
    spent = hook.spent if hook else {"start": 0.0, "reports": 0.0, "end": 0.0}
    reports = hook.reports if hook else 0
    return CaseResult(
        case=name,
        steps=result.steps,
        reports=reports,
        step_s_mean=round(sum(clock.intervals) / max(1, len(clock.intervals)), 4),
        hook_start_s=round(spent["start"], 3),
        hook_reports_s=round(spent["reports"], 3),
        hook_per_report_s=round(spent["reports"] / max(1, reports), 4),
        hook_end_s=round(spent["end"], 3),
        run_s=round(run_s, 2),
        points_logged=logged,
        points_stored=stored,
    )


def format_table(results: list[CaseResult]) -> str:
    head = (
        "| case | steps | reports | s/step | hook at start s | hook at reports s "
        "| per report s | hook at end s | run s | points logged | stored |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {r.case} | {r.steps} | {r.reports} | {r.step_s_mean:.3f} | {r.hook_start_s:.2f} "
        f"| {r.hook_reports_s:.2f} | {r.hook_per_report_s:.3f} | {r.hook_end_s:.2f} "
        f"| {r.run_s:.1f} | {r.points_logged} | {r.points_stored} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def ensure_dataset(path: Path) -> Path:
    from iceaggr.data.synth import write_synthetic_dataset

    if not (path / "train_meta.parquet").exists():
        write_synthetic_dataset(path, n_events=6_000, batch_size=2_000, seed=0, progress=False)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="training steps per case")
    p.add_argument("--delay", type=float, default=1.0, help="the slow server's delay, s")
    p.add_argument(
        "--cases",
        nargs="+",
        default=["off", "fast-sync", "fast-async", "slow-sync", "slow-async"],
    )
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "logging_cost")
    p.add_argument("--data", type=Path, default=None, help="dataset (default: made in workdir)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a trial has 1 CPU)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    import torch

    logging.basicConfig(level=logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the server this script started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.cases = 20, ["off", "fast-async", "slow-async"]
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = ensure_dataset(args.data or args.workdir / "data")
    cfg = trial_config(data, args.steps)
    results: list[CaseResult] = []
    store = f"sqlite:///{args.workdir / 'mlflow.db'}"
    with mlflow_server(store, args.workdir, 2) as fast, slow_proxy(fast, args.delay) as slow:
        for case in args.cases:
            server, _, mode = case.partition("-")
            url = {"off": None, "fast": fast, "slow": slow}[server]
            r = run_case(case, cfg, url, mode != "sync", args.workdir / "trials")
            results.append(r)
            print(format_table([r]).splitlines()[-1], flush=True)
    print("\n" + format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "steps": args.steps,
        "delay_s": args.delay,
        "torch_threads": args.threads,
        "batch_size": cfg.train.batch_size,
        "log_every": cfg.train.log_every,
        "checkpoint_every": cfg.train.checkpoint_every,
        "results": [asdict(r) for r in results],
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
