"""Loader throughput on one CPU core: parquet files to model-ready batches, project vs naive.

Measures events/s for a full epoch through :class:`iceaggr.data.loader.EventLoader` (opening the
folder, reading and validating the parquet files, shuffling, default truncation, packing into
``DomBatch``) next to the way such a loader is usually written first: pandas, one event at a
time (``df.loc[event_id]``), per-DOM tensors, padded with ``pad_sequence`` (see
:func:`naive_batch`). Two naive variants are timed: ``groupby("sensor_id")`` per event, and
numpy masks per DOM (the first optimization people make); speed-ups are against the faster one.
The naive paths run on a subset (``--naive-events``) because they are slow; their file read is
left out of their time, which flatters them. Before timing, both naive outputs are checked to
hold exactly the pulses of the project's batches.

Everything runs in one process on one thread (``torch.set_num_threads(1)``, one pyarrow thread,
``prefetch=0``), best of ``--repeats``, files in the page cache. Rates are given per wall-clock
second and per CPU second; the targets are judged on CPU time, which is what one dedicated core
needs even when the machine is shared with other work (wall time is then inflated by waiting).

Targets (set for this project): >= 50,000 events/s per core and >= 20x the naive loader; the
original hierarchical model ran at ~500 events/s end to end (DESIGN.md section 3).

Run from the repository root::

    python benchmarks/loader.py                          # 50,000 fresh synthetic events
    python benchmarks/loader.py --events 200000 --batch-size 256
    python benchmarks/loader.py --data data/synthetic    # reuse a folder (made there if missing)
    python benchmarks/loader.py --json /tmp/loader.json

The second row is the same epoch with each whole event's improved line fit added to the batch
(``EventLoader(line_fit=True)``, what ``model.prior_direction=line_fit`` asks of the loader).

Prints a Markdown table and writes JSON (default ``benchmarks/results/loader.json``).

``--storage`` measures instead where the files come from: one synthetic batch file of
``--events`` (default for this mode: 200,000, a real file's size), one epoch through
``EventLoader`` in a fresh process per run (its peak resident memory is the worker's), read
from local disk, from an S3-compatible server on 127.0.0.1 (moto's, a dev dependency) with an
empty node cache (cold: the first trial on a new node) and with the cache filled (warm). The
cold run's time to the first batch is what a new node waits before its first step, less the
model's set-up::

    python benchmarks/loader.py --storage --json /tmp/loader-storage.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.nn.utils.rnn import pad_sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from iceaggr.data.batch import DomBatch
from iceaggr.data.dataset import KaggleDataset
from iceaggr.data.loader import EventLoader, LoaderStats, Truncation, assemble_batch
from iceaggr.data.synth import write_synthetic_dataset

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "loader.json"
TARGET_EVENTS_PER_S = 50_000
"""Per-core throughput goal: a GPU step of a few ms per 256-event batch must not wait on data."""
TARGET_SPEEDUP = 20.0
"""Goal against the naive per-event pandas loader."""


@dataclass
class Timing:
    implementation: str
    events: int
    seconds: float
    """Best wall-clock time of the repeats."""
    cpu_seconds: float
    """Best process CPU time of the repeats (all threads, so never flattering)."""

    @property
    def events_per_s(self) -> float:
        """Wall-clock rate: what a dedicated core gives, when the machine is not shared."""
        return self.events / self.seconds

    @property
    def events_per_cpu_s(self) -> float:
        """CPU-time rate: the per-core rate on a shared machine (the process has one thread)."""
        return self.events / self.cpu_seconds


def best_of(repeats: int, fn: Callable[[], int]) -> tuple[float, float, int]:
    """(best wall s, best CPU s, fn's result) over ``repeats`` calls."""
    walls, cpus, out = [], [], 0
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), out


# --- the project's loader -------------------------------------------------------------------------
def project_epoch(
    data_dir: Path, batch_size: int, trunc: Truncation, line_fit: bool = False
) -> tuple[int, LoaderStats]:
    """One full shuffled epoch, from opening the folder to the last DomBatch (``line_fit``: with
    each whole event's line fit, as for ``model.prior_direction=line_fit``)."""
    ds = KaggleDataset(data_dir)
    loader = EventLoader(
        dataset=ds,
        batch_ids=ds.batch_ids,
        batch_size=batch_size,
        truncation=trunc,
        shuffle=True,
        seed=0,
        drop_last=False,
        prefetch=0,
        line_fit=line_fit,
    )
    n = 0
    for batch in loader.iter_epoch(0):
        n += batch.num_events
    return n, loader.stats


def read_only(data_dir: Path) -> int:
    """Just the parquet read + validation of every file (the loader's share not in assembly)."""
    ds = KaggleDataset(data_dir)
    return sum(ds.read_batch(b).num_events for b in ds.batch_ids)


# --- the naive loader -----------------------------------------------------------------------------
@dataclass
class PaddedBatch:
    """What the naive loader yields: DOMs padded to the longest DOM of the batch."""

    pulses: torch.Tensor  # (D, L, 3) float32: time ns, charge p.e., auxiliary; zero padded
    dom_lengths: torch.Tensor  # (D,) int64 pulses per DOM
    dom_xyz: torch.Tensor  # (D, 3) float32 m
    sensor_id: torch.Tensor  # (D,) int64
    doms_per_event: torch.Tensor  # (B,) int64
    event_id: torch.Tensor  # (B,) int64
    direction: torch.Tensor  # (B, 3) float32


DomList = list[tuple[int, float, np.ndarray]]
"""Per DOM of an event: (sensor_id, kept charge in p.e., (n, 3) float32 time/charge/aux)."""


def doms_by_groupby(event: pd.DataFrame, trunc: Truncation) -> DomList:
    """Per DOM with ``groupby("sensor_id")``: what is usually written first."""
    doms = []
    for sensor_id, pulses in event.groupby("sensor_id", sort=True):
        pulses = pulses.iloc[: trunc.max_pulses_per_dom]
        values = pulses[["time", "charge", "auxiliary"]].to_numpy(dtype=np.float32)
        doms.append((int(sensor_id), float(pulses["charge"].sum()), values))
    return doms


def doms_by_numpy(event: pd.DataFrame, trunc: Truncation) -> DomList:
    """Per DOM with numpy masks on the event's columns: the first optimization people make."""
    values = event[["time", "charge", "auxiliary"]].to_numpy(dtype=np.float32)
    sensors = event["sensor_id"].to_numpy()
    charge = event["charge"].to_numpy()
    doms = []
    for sensor_id in np.unique(sensors):
        rows = np.flatnonzero(sensors == sensor_id)[: trunc.max_pulses_per_dom]
        doms.append((int(sensor_id), float(charge[rows].sum()), values[rows]))
    return doms


NAIVE_VARIANTS: dict[str, Callable[[pd.DataFrame, Truncation], DomList]] = {
    "naive pandas: per-event loc + groupby per DOM + pad": doms_by_groupby,
    "naive pandas+numpy: per-event loc + mask per DOM + pad": doms_by_numpy,
}


def naive_batch(
    df: pd.DataFrame,
    meta: pd.DataFrame,
    geometry: np.ndarray,
    trunc: Truncation,
    event_doms: Callable[[pd.DataFrame, Truncation], DomList] = doms_by_groupby,
) -> PaddedBatch:
    """The obvious version: per event ``loc``, per DOM a tensor, then pad to the longest DOM.

    Not a strawman: ``df.loc[event_id]`` is a binary search on the sorted ``event_id`` index
    (``df.loc[[event_id]]`` scans the whole file per event and is far slower still), and the
    geometry lookup is one numpy gather per batch.
    """
    doms: list[torch.Tensor] = []
    sensors: list[int] = []
    n_doms: list[int] = []
    directions: list[list[float]] = []
    for row in meta.itertuples():
        event = df.loc[row.event_id]
        if isinstance(event, pd.Series):  # a one-pulse event comes back as a row
            event = event.to_frame().T.astype(df.dtypes)
        per_dom = event_doms(event.iloc[: trunc.max_pulses_per_event], trunc)
        if len(per_dom) > trunc.max_doms_per_event:
            per_dom.sort(key=lambda d: -d[1])
            per_dom = sorted(per_dom[: trunc.max_doms_per_event], key=lambda d: d[0])
        for sensor_id, _, values in per_dom:
            doms.append(torch.tensor(values))
            sensors.append(sensor_id)
        n_doms.append(len(per_dom))
        az, zen = row.azimuth, row.zenith
        directions.append([np.cos(az) * np.sin(zen), np.sin(az) * np.sin(zen), np.cos(zen)])
    return PaddedBatch(
        pulses=pad_sequence(doms, batch_first=True),  # (D, L, 3)
        dom_lengths=torch.tensor([len(d) for d in doms]),
        dom_xyz=torch.from_numpy(geometry[sensors]),
        sensor_id=torch.tensor(sensors),
        doms_per_event=torch.tensor(n_doms),
        event_id=torch.tensor(meta["event_id"].to_numpy()),
        direction=torch.tensor(directions, dtype=torch.float32),
    )


def naive_inputs(data_dir: Path, n_events: int) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """(batch file, its first metadata rows) pairs holding the first ``n_events`` events."""
    meta = pd.read_parquet(data_dir / "train_meta.parquet")
    out = []
    left = n_events
    for batch_id, m in meta.groupby("batch_id", sort=True):
        if left <= 0:
            break
        df = pd.read_parquet(data_dir / "train" / f"batch_{batch_id}.parquet")
        out.append((df, m.iloc[:left]))
        left -= len(out[-1][1])
    return out


def naive_epoch(
    inputs: list[tuple[pd.DataFrame, pd.DataFrame]],
    geometry: np.ndarray,
    batch_size: int,
    trunc: Truncation,
    event_doms: Callable[[pd.DataFrame, Truncation], DomList],
) -> int:
    n = 0
    for df, meta in inputs:
        for start in range(0, len(meta), batch_size):
            chunk = meta.iloc[start : start + batch_size]
            n += naive_batch(df, chunk, geometry, trunc, event_doms).doms_per_event.numel()
    return n


def same_pulses(naive: PaddedBatch, packed: DomBatch) -> bool:
    """Whether the padded and the packed batch hold the same events, DOMs and pulses."""
    mask = torch.arange(naive.pulses.shape[1])[None, :] < naive.dom_lengths[:, None]  # (D, L)
    return (
        torch.equal(naive.pulses[mask], packed.pulses)
        and torch.equal(naive.dom_lengths, packed.dom_lengths())
        and torch.equal(naive.sensor_id, packed.sensor_id)
        and torch.equal(naive.dom_xyz, packed.dom_xyz)
        and torch.equal(naive.doms_per_event, packed.event_lengths())
        and torch.equal(naive.event_id, packed.event_id)
    )


# --- report ---------------------------------------------------------------------------------------
def markdown_table(rows: list[Timing], naive: Timing) -> str:
    lines = [
        "| implementation | events | wall s | CPU s | events/s (wall) | events/s (CPU) "
        "| speed-up vs naive (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = r.events_per_cpu_s / naive.events_per_cpu_s
        lines.append(
            f"| {r.implementation} | {r.events:,} | {r.seconds:.3f} | {r.cpu_seconds:.3f} "
            f"| {r.events_per_s:,.0f} | {r.events_per_cpu_s:,.0f} | {speedup:.1f}x |"
        )
    return "\n".join(lines)


def _storage_epoch(root: str, cache_dir: str, batch_size: int, out: Any) -> None:
    """One epoch in this (fresh) process; puts its numbers on ``out``."""
    import resource

    from iceaggr.data.cache import FileCache

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds = KaggleDataset(root, cache=FileCache(cache_dir) if "://" in root else None)
    loader = EventLoader(dataset=ds, batch_ids=ds.batch_ids, batch_size=batch_size, prefetch=0)
    first = None
    events = 0
    for batch in loader:
        events += batch.num_events
        if first is None:
            first = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    stats = ds.cache.stats if ds.cache is not None else None
    out.put(
        {
            "events": events,
            "seconds": seconds,
            "events_per_s": events / seconds,
            "first_batch_s": first,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "downloaded_mb": stats.bytes_downloaded / 1e6 if stats else 0.0,
            "cache_misses": stats.misses if stats else 0,
            "cache_hits": stats.hits if stats else 0,
        }
    )


def storage_main(args: argparse.Namespace) -> int:
    """Local disk vs an S3 server, cold and warm node cache (see the module docstring)."""
    import multiprocessing as mp

    import boto3
    from moto.server import ThreadedMotoServer

    events = args.events if args.events != 50_000 else 200_000
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="iceaggr-storage-bench-") as tmp:
            data = Path(tmp) / "data"
            t0 = time.perf_counter()
            write_synthetic_dataset(data, events, batch_size=events, seed=args.seed)
            size = (data / "train" / "batch_1.parquet").stat().st_size
            print(
                f"generated {events:,} events ({size / 1e6:.0f} MB) in "
                f"{time.perf_counter() - t0:.0f} s"
            )
            s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
            s3.create_bucket(Bucket="bench")
            for f in sorted(p for p in data.rglob("*") if p.is_file()):
                s3.upload_file(str(f), "bench", f"data/{f.relative_to(data).as_posix()}")
            ctx = mp.get_context("spawn")
            cache = str(Path(tmp) / "cache")
            runs = [("local disk", str(data)), ("S3, cold cache", "s3://bench/data"),
                    ("S3, warm cache", "s3://bench/data")]  # fmt: skip
            for name, root in runs:
                out = ctx.Queue()
                proc = ctx.Process(target=_storage_epoch, args=(root, cache, args.batch_size, out))
                proc.start()
                row = out.get(timeout=3600)
                proc.join()
                rows.append({"source": name, **row})
    finally:
        server.stop()
    lines = [
        f"| source ({events:,} events, 1 file) | events/s | first batch (s) | epoch (s) | "
        "peak RSS (MB) | downloaded (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['events_per_s']:,.0f} | {r['first_batch_s']:.2f} | "
            f"{r['seconds']:.1f} | {r['peak_rss_mb']:,.0f} | {r['downloaded_mb']:.0f} |"
        )
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"mode": "storage", "events": events, "file_bytes": size,
             "batch_size": args.batch_size, "machine": platform.platform(),
             "cpus": os.cpu_count(), "rows": rows},
            indent=2,
        )
    )  # fmt: skip
    print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000, help="events to generate")
    parser.add_argument(
        "--events-per-file", type=int, default=25_000, help="events per generated batch file"
    )
    parser.add_argument("--data", type=Path, help="dataset folder to reuse (made there if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated dataset")
    parser.add_argument("--batch-size", type=int, default=256, help="events per batch")
    parser.add_argument(
        "--naive-events", type=int, default=1_000, help="events for the naive runs (slow)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    parser.add_argument(
        "--storage",
        action="store_true",
        help="local disk vs an S3 server on 127.0.0.1, cold and warm cache (200,000 events)",
    )
    args = parser.parse_args(argv)
    if args.storage:
        return storage_main(args)

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    trunc = Truncation()

    with tempfile.TemporaryDirectory(prefix="iceaggr-loader-bench-") as tmp:
        data_dir = args.data if args.data is not None else Path(tmp) / "synthetic"
        if not data_dir.exists():
            t0 = time.perf_counter()
            write_synthetic_dataset(
                data_dir, args.events, batch_size=args.events_per_file, seed=args.seed
            )
            print(f"generated {args.events:,} events in {time.perf_counter() - t0:.1f} s")

        # Warm-up (page cache, imports), then the timed runs.
        n_events, stats = project_epoch(data_dir, args.batch_size, trunc)
        wall, cpu, _ = best_of(
            args.repeats, lambda: project_epoch(data_dir, args.batch_size, trunc)[0]
        )
        project = Timing("EventLoader: parquet -> DomBatch (full epoch)", n_events, wall, cpu)
        wall, cpu, n_fit = best_of(
            args.repeats, lambda: project_epoch(data_dir, args.batch_size, trunc, True)[0]
        )
        fitted = Timing("  the same with each event's line fit (prior_direction)", n_fit, wall, cpu)
        wall, cpu, n_read = best_of(args.repeats, lambda: read_only(data_dir))
        reading = Timing("  of which read_batch (parquet read + validation)", n_read, wall, cpu)

        geometry = pd.read_csv(data_dir / "sensor_geometry.csv")[["x", "y", "z"]]
        geometry = geometry.to_numpy(np.float32)  # (N, 3) m, row = sensor_id
        inputs = naive_inputs(data_dir, args.naive_events)
        # Same content as the project's loader (checked on the first batch, outside the timing).
        df, meta = inputs[0]
        first = meta.iloc[: args.batch_size]
        ds = KaggleDataset(data_dir)
        part = ds.read_batch(int(first["batch_id"].iloc[0]))
        packed = assemble_batch(part, np.arange(len(first)), ds.geometry, trunc)
        naives: list[Timing] = []
        agree = True
        for name, event_doms in NAIVE_VARIANTS.items():
            agree &= same_pulses(naive_batch(df, first, geometry, trunc, event_doms), packed)
            wall, cpu, n_naive = best_of(
                args.repeats,
                lambda f=event_doms: naive_epoch(inputs, geometry, args.batch_size, trunc, f),
            )
            naives.append(Timing(name, n_naive, wall, cpu))
    # Speed-ups are against the faster naive variant (the conservative choice).
    naive = max(naives, key=lambda t: t.events_per_s)

    rows = [project, fitted, reading, *naives]
    print(markdown_table(rows, naive))
    per_event_in = stats.pulses_in / stats.events
    per_event_kept = stats.pulses_kept / stats.events
    print(
        f"\ndata: {stats.events:,} events in {data_dir if args.data else 'a fresh synthetic set'}; "
        f"mean pulses per event {per_event_in:.1f} raw, {per_event_kept:.1f} after truncation "
        f"({stats.events_truncated:,} events over {trunc.max_pulses_per_event:,} pulses, "
        f"{stats.doms_dropped:,} DOMs dropped); batch size {args.batch_size}; one core "
        f"(torch threads {torch.get_num_threads()}, pyarrow threads {pa.cpu_count()}); "
        f"best of {args.repeats}; files in the page cache."
    )
    print(
        f"speed-ups are against the faster naive variant; both naive outputs hold the same pulses "
        f"as the EventLoader's: {'yes' if agree else 'NO'}"
    )
    rate = project.events_per_cpu_s
    speedup = rate / naive.events_per_cpu_s
    meets_rate = rate >= TARGET_EVENTS_PER_S
    meets_speedup = speedup >= TARGET_SPEEDUP
    print(
        f"target >= {TARGET_EVENTS_PER_S:,} events/s per core (CPU time): "
        f"{'met' if meets_rate else 'MISSED'} ({rate:,.0f}; wall {project.events_per_s:,.0f}); "
        f"target >= {TARGET_SPEEDUP:.0f}x naive: {'met' if meets_speedup else 'MISSED'} "
        f"({speedup:.1f}x; wall {project.events_per_s / naive.events_per_s:.1f}x)"
    )
    if project.seconds > 1.5 * project.cpu_seconds:
        print(
            f"note: wall time is {project.seconds / project.cpu_seconds:.1f}x the CPU time of a "
            f"single-threaded run: the machine is shared (load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs), so rates use CPU time."
        )

    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {
            "events": n_events,
            "data": str(args.data) if args.data else "synthetic",
            "seed": args.seed,
            "batch_size": args.batch_size,
            "naive_events": args.naive_events,
            "repeats": args.repeats,
            "truncation": asdict(trunc),
        },
        "data": {
            "mean_pulses_per_event_raw": per_event_in,
            "mean_pulses_per_event_kept": per_event_kept,
            **asdict(stats),
        },
        "results": [
            asdict(r)
            | {
                "events_per_s": r.events_per_s,
                "speedup_vs_naive": r.events_per_s / naive.events_per_s,
            }
            for r in rows
        ],
        "naive_matches_project": agree,
        "targets": {
            "events_per_s": TARGET_EVENTS_PER_S,
            "events_per_s_measured_on": "process CPU time (one thread)",
            "events_per_s_met": meets_rate,
            "speedup_vs_naive": TARGET_SPEEDUP,
            "speedup_met": meets_speedup,
        },
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "numpy": np.__version__,
            "pandas": pd.__version__,
            "pyarrow": pa.__version__,
            "torch": torch.__version__,
        },
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.json}")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
