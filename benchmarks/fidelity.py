"""How close is the synthetic data to the real IceCube Kaggle data? Statistics side by side.

Makes a synthetic dataset (or reads any Kaggle-layout folder), computes the statistics DESIGN.md
section 3 lists for the real competition data, and prints them as a Markdown table next to the
real values, with the line-fit score next to the real line fit's ~1.18-1.21 rad. The same numbers
go to a JSON file.

Run from the repository root::

    python benchmarks/fidelity.py                          # 20,000 fresh events, seed 0
    python benchmarks/fidelity.py --events 50000 --seed 1
    python benchmarks/fidelity.py --data data/synthetic    # an existing folder (also real data)
    python benchmarks/fidelity.py --json /tmp/fidelity.json

Definitions: "capped" statistics keep the first 3,000 pulses (in time order) of each event, as a
model with a 3,000-pulse limit sees them; the single-pulse fraction is over the hit DOMs of the
capped events; time, charge and auxiliary fractions are over all pulses (the auxiliary fraction
of the capped events is listed too). The time rows describe the readout: percentiles of the raw
pulse times (over all pulses, from a 10 ns histogram), of each event's last raw time and of each
event's time span (last minus first pulse), and the share of events whose last pulse lies beyond
60,000 ns. The real data's values of those are not known here (only its overall minimum and
maximum), so their "real" column is empty.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from iceaggr.data.linefit import line_fit_dataset
from iceaggr.data.synth import write_synthetic_dataset

PULSE_CAP = 3_000
"""Pulses per event kept by the capped statistics."""
LATE_TIME_NS = 60_000
"""Events whose last raw pulse time exceeds this are counted as late (real maximum: ~7.8e4 ns)."""
_TIME_BIN_NS = 10
"""Bin width of the raw-time histogram the pulse-time percentiles are read from."""
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "fidelity.json"

REAL: dict[str, float | str] = {
    "pulses_p50": 63,
    "pulses_p90": 144,
    "pulses_p99": 1_177,
    "pulses_p99_9": 19_605,
    "pulses_max": 178_250,
    "mean_pulses_capped": 109,
    "mean_hit_doms_capped": 65,
    "single_pulse_dom_fraction": 0.78,
    "time_min_ns": 5.7e3,
    "time_max_ns": 7.8e4,
    "charge_min_pe": 0.025,
    "charge_max_pe": 2.8e3,
    "auxiliary_fraction": 0.28,
    "auxiliary_fraction_capped": "n/a",
    "line_fit_mean_angular_error_rad": "1.18-1.21",
}
"""The real data (DESIGN.md section 3: 132M training events; percentiles and max over all)."""

LABELS: dict[str, str] = {
    "n_events": "events",
    "pulses_p50": "pulses per event P50",
    "pulses_p90": "pulses per event P90",
    "pulses_p99": "pulses per event P99",
    "pulses_p99_9": "pulses per event P99.9",
    "pulses_max": "pulses per event max",
    "mean_pulses_capped": "mean pulses per event (cap 3,000)",
    "mean_hit_doms_capped": "mean hit DOMs per event (cap 3,000)",
    "single_pulse_dom_fraction": "hit DOMs with a single pulse (cap 3,000)",
    "time_min_ns": "raw time min (ns)",
    "time_max_ns": "raw time max (ns)",
    "time_p50_ns": "raw time P50, all pulses (ns)",
    "time_p99_ns": "raw time P99, all pulses (ns)",
    "time_p99_9_ns": "raw time P99.9, all pulses (ns)",
    "event_last_time_p50_ns": "last raw time of an event, P50 (ns)",
    "event_last_time_p99_ns": "last raw time of an event, P99 (ns)",
    "event_span_p50_ns": "time span of an event, P50 (ns)",
    "event_span_p90_ns": "time span of an event, P90 (ns)",
    "event_span_p99_ns": "time span of an event, P99 (ns)",
    "late_event_fraction": "events with a pulse after 60,000 ns",
    "charge_min_pe": "charge min (p.e.)",
    "charge_max_pe": "charge max (p.e.)",
    "auxiliary_fraction": "auxiliary fraction (all pulses)",
    "auxiliary_fraction_capped": "auxiliary fraction (cap 3,000)",
    "line_fit_mean_angular_error_rad": "improved line fit, mean angular error (rad)",
}


def dataset_statistics(data_dir: Path) -> dict[str, float]:
    """The DESIGN.md section 3 statistics of a Kaggle-layout folder, batch by batch."""
    meta = pd.read_parquet(data_dir / "train_meta.parquet")
    n_pulses: list[np.ndarray] = []
    capped_pulses = capped_doms = capped_single = capped_aux = 0
    n_all = n_aux = 0
    t_min, t_max = np.inf, -np.inf
    time_hist = np.zeros(1, dtype=np.int64)
    last_times: list[np.ndarray] = []
    spans: list[np.ndarray] = []
    q_min, q_max = np.inf, -np.inf
    for batch_id, m in meta.groupby("batch_id", sort=True):
        table = pq.read_table(
            data_dir / "train" / f"batch_{batch_id}.parquet",
            columns=["sensor_id", "time", "charge", "auxiliary"],
        )
        sid = table.column("sensor_id").to_numpy().astype(np.int64)
        t = table.column("time").to_numpy()
        q = table.column("charge").to_numpy()
        aux = table.column("auxiliary").to_numpy(zero_copy_only=False).astype(bool)
        first = m["first_pulse_index"].to_numpy(np.int64)
        count = m["last_pulse_index"].to_numpy(np.int64) - first + 1
        n_pulses.append(count)
        n_all += int(count.sum())
        n_aux += int(aux.sum())
        t_min, t_max = min(t_min, float(t.min())), max(t_max, float(t.max()))
        hist = np.bincount(np.maximum(t, 0) // _TIME_BIN_NS)
        if hist.shape[0] > time_hist.shape[0]:
            hist[: time_hist.shape[0]] += time_hist
            time_hist = hist
        else:
            time_hist[: hist.shape[0]] += hist
        first_t = np.minimum.reduceat(t, first)  # events are contiguous, in meta order
        last_t = np.maximum.reduceat(t, first)
        last_times.append(last_t)
        spans.append(last_t - first_t)
        q_min, q_max = min(q_min, float(q.min())), max(q_max, float(q.max()))

        # The first PULSE_CAP rows of every event (rows are time-ordered within an event).
        kept = np.minimum(count, PULSE_CAP)
        event = np.repeat(np.arange(count.shape[0]), kept)
        rows = np.repeat(first, kept) + (
            np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept)
        )
        _, per_dom = np.unique(event * 8192 + sid[rows], return_counts=True)
        capped_pulses += int(kept.sum())
        capped_doms += int(per_dom.shape[0])
        capped_single += int(np.sum(per_dom == 1))
        capped_aux += int(aux[rows].sum())

    counts = np.concatenate(n_pulses)
    n_events = int(counts.shape[0])
    p50, p90, p99, p999 = np.percentile(counts, [50, 90, 99, 99.9])
    cdf = np.cumsum(time_hist) / time_hist.sum()
    t50, t99, t999 = (np.searchsorted(cdf, q) * _TIME_BIN_NS for q in (0.5, 0.99, 0.999))
    last = np.concatenate(last_times)
    span = np.concatenate(spans)
    last50, last99 = np.percentile(last, [50, 99])
    span50, span90, span99 = np.percentile(span, [50, 90, 99])
    return {
        "n_events": n_events,
        "pulses_p50": float(p50),
        "pulses_p90": float(p90),
        "pulses_p99": float(p99),
        "pulses_p99_9": float(p999),
        "pulses_max": int(counts.max()),
        "mean_pulses_capped": capped_pulses / n_events,
        "mean_hit_doms_capped": capped_doms / n_events,
        "single_pulse_dom_fraction": capped_single / capped_doms,
        "time_min_ns": t_min,
        "time_max_ns": t_max,
        "time_p50_ns": float(t50),
        "time_p99_ns": float(t99),
        "time_p99_9_ns": float(t999),
        "event_last_time_p50_ns": float(last50),
        "event_last_time_p99_ns": float(last99),
        "event_span_p50_ns": float(span50),
        "event_span_p90_ns": float(span90),
        "event_span_p99_ns": float(span99),
        "late_event_fraction": float(np.mean(last > LATE_TIME_NS)),
        "charge_min_pe": q_min,
        "charge_max_pe": q_max,
        "auxiliary_fraction": n_aux / n_all,
        "auxiliary_fraction_capped": capped_aux / capped_pulses,
    }


def _fmt(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    if abs(value) >= 1_000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def markdown_table(synthetic: dict[str, float]) -> str:
    lines = ["| statistic | synthetic | real |", "|---|---:|---:|"]
    for key, label in LABELS.items():
        real = REAL.get(key, "132M" if key == "n_events" else "")
        lines.append(f"| {label} | {_fmt(synthetic[key])} | {_fmt(real)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="an existing Kaggle-layout folder to measure")
    source.add_argument("--events", type=int, default=20_000, help="events to generate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated dataset")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    args = parser.parse_args(argv)

    info: dict[str, float | int | str] = {}
    with tempfile.TemporaryDirectory(prefix="iceaggr-fidelity-") as tmp:
        if args.data is not None:
            data_dir = args.data
            info["data"] = str(args.data)
        else:
            data_dir = Path(tmp) / "synthetic"
            start = time.perf_counter()
            write_synthetic_dataset(data_dir, args.events, seed=args.seed, progress=False)
            elapsed = time.perf_counter() - start
            info.update(
                seed=args.seed,
                generation_s=round(elapsed, 2),
                generation_events_per_s=round(args.events / elapsed),
            )
        stats = dataset_statistics(data_dir)
        fit = line_fit_dataset(data_dir)
        stats["line_fit_mean_angular_error_rad"] = fit["mean_angular_error"]

    print(markdown_table(stats))
    if "generation_events_per_s" in info:
        print(
            f"\ngenerated {args.events:,} events (seed {args.seed}) in {info['generation_s']} s: "
            f"{info['generation_events_per_s']:,} events/s"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"synthetic": stats, "real": REAL, **info}, indent=2) + "\n")
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
