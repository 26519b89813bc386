"""Tests for iceaggr.data.loader: sharding, shuffling, truncation, resume, prefetch, packing.

Checked against real parquet files: a small synthetic dataset (6 batch files, made once per
module) and a hand-built batch file holding a 120,000-pulse event. Every yielded batch is compared
with an independent pure-Python reference of the documented truncation rule (earliest pulses per
event, earliest pulses per DOM, brightest DOMs per event, DOMs in sensor order).

Run: ``.venv/bin/python -m pytest tests/test_loader.py -q``
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from iceaggr.data.batch import DomBatch
from iceaggr.data.dataset import DatasetError, KaggleDataset
from iceaggr.data.geometry import make_geometry
from iceaggr.data.loader import EventLoader, LoaderStats, Truncation, assemble_batch, concat_batches
from iceaggr.data.synth import write_synthetic_dataset

N_EVENTS = 1_800
FILE_EVENTS = 300  # -> 6 batch files
BATCH = 32  # smaller than a file's share per rank, so a batch spans at most two files
TIGHT = Truncation(max_pulses_per_event=256, max_pulses_per_dom=8, max_doms_per_event=40)
"""Caps that bite on many synthetic events (the defaults rarely do on 1,800 events)."""


# --- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loader") / "data"
    return write_synthetic_dataset(out, N_EVENTS, batch_size=FILE_EVENTS, seed=5, progress=False)


@pytest.fixture(scope="module")
def ds(root: Path) -> KaggleDataset:
    return KaggleDataset(root)


@pytest.fixture(scope="module")
def meta(root: Path) -> pd.DataFrame:
    return pd.read_parquet(root / "train_meta.parquet").set_index("event_id")


@pytest.fixture(scope="module")
def raw(root: Path) -> dict[int, pd.DataFrame]:
    return {b: pd.read_parquet(root / "train" / f"batch_{b}.parquet") for b in range(1, 7)}


def loader(ds: KaggleDataset, **kwargs: object) -> EventLoader:
    args: dict[str, object] = {"batch_ids": ds.batch_ids, "batch_size": BATCH, "prefetch": 0}
    args.update(kwargs)
    return EventLoader(dataset=ds, **args)  # type: ignore[arg-type]


def ids(batches: list[DomBatch]) -> np.ndarray:
    return torch.cat([b.event_id for b in batches]).numpy()


def assert_batches_equal(a: DomBatch, b: DomBatch) -> None:
    for f in dataclasses.fields(DomBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x is None or y is None:
            assert x is None and y is None, f.name
        else:
            assert x.dtype == y.dtype, f.name
            assert torch.equal(x, y), f.name


def assert_same_stream(a: list[DomBatch], b: list[DomBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert_batches_equal(x, y)


Dom = tuple[int, np.ndarray]  # (sensor_id, (n, 3) float32 pulses: time, charge, auxiliary)


def reference_rows(sensor: np.ndarray, trunc: Truncation) -> dict[int, list[int]]:
    """Every DOM of an event before the DOM cap: sensor -> the rows (in the event) it keeps.

    The documented rule, written plainly: the event's first rows (= earliest pulses, rows are
    time-ordered), then each DOM's first ``max_pulses_per_dom`` of those.
    """
    n = min(len(sensor), trunc.max_pulses_per_event)
    rows_of: dict[int, list[int]] = {}
    for i, s in enumerate(sensor[:n].tolist()):
        rows_of.setdefault(s, []).append(i)
    return {s: rows[: trunc.max_pulses_per_dom] for s, rows in rows_of.items()}


def brightness(q: np.ndarray, rows_of: dict[int, list[int]]) -> dict[int, float]:
    """Charge (p.e.) of the pulses each DOM keeps."""
    qs = q.tolist()
    return {s: sum(qs[i] for i in rows) for s, rows in rows_of.items()}


Event = tuple[np.ndarray, np.ndarray, np.ndarray]
"""One event of a batch: sensor ids (D,), pulses per DOM (D,), pulses (P, 3) float32."""


def check_event(
    got: Event, sensor: np.ndarray, t: np.ndarray, q: np.ndarray, aux: np.ndarray, trunc: Truncation
) -> int:
    """Assert that ``got`` follows the truncation rule for this raw event; return DOMs dropped.

    The kept DOMs must be the brightest. Equal brightness is left open: synthetic (and Kaggle)
    charges are multiples of 0.025 p.e., so exact ties happen, and the float rounding of the
    library's summation order (``a0 + pairwise(a1..)``) decides them.
    """
    sids, lengths, pulses = got
    rows_of = reference_rows(sensor, trunc)
    sid_list = sids.tolist()
    assert np.all(np.diff(sids) > 0), "DOMs must be unique and in sensor order"
    assert len(sid_list) == min(len(rows_of), trunc.max_doms_per_event)
    assert set(sid_list) <= set(rows_of), "a kept DOM has no pulse in the event's first rows"
    assert lengths.tolist() == [len(rows_of[s]) for s in sid_list]
    rows = list(itertools.chain.from_iterable(rows_of[s] for s in sid_list))
    want = np.stack([t[rows], q[rows], aux[rows]], axis=1).astype(np.float32)
    np.testing.assert_array_equal(pulses, want)
    dropped = set(rows_of) - set(sid_list)
    if dropped:
        bright = brightness(q, rows_of)
        tol = 1e-9 * max(bright.values())
        assert min(bright[s] for s in sid_list) >= max(bright[s] for s in dropped) - tol
    return len(dropped)


def packed_event(batch: DomBatch, e: int) -> Event:
    cu_d = batch.cu_doms
    d0, d1 = int(cu_d[e]), int(cu_d[e + 1])
    cu_p = batch.cu_pulses[d0 : d1 + 1]
    return (
        batch.sensor_id[d0:d1].numpy(),
        (cu_p[1:] - cu_p[:-1]).numpy(),
        batch.pulses[int(cu_p[0]) : int(cu_p[-1])].numpy(),
    )


def assert_event_matches(got: list[Dom], want: list[Dom]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (s, g), (_, w) in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w, err_msg=f"sensor {s}")


def batch_event(batch: DomBatch, e: int) -> list[Dom]:
    cu_p, cu_d = batch.cu_pulses.numpy(), batch.cu_doms.numpy()
    return [
        (int(batch.sensor_id[d]), batch.pulses[cu_p[d] : cu_p[d + 1]].numpy())
        for d in range(cu_d[e], cu_d[e + 1])
    ]


def check_invariants(b: DomBatch, geometry: np.ndarray, trunc: Truncation) -> None:
    """What the model relies on, for any batch."""
    p, d, n = b.num_pulses, b.num_doms, b.num_events
    assert b.pulses.shape == (p, 3) and b.pulses.dtype == torch.float32
    assert b.dom_xyz.shape == (d, 3) and b.dom_xyz.dtype == torch.float32
    assert b.sensor_id.shape == (d,) and b.sensor_id.dtype == torch.int64
    assert b.event_id.shape == (n,) and b.event_id.dtype == torch.int64
    for cu, total in ((b.cu_pulses, p), (b.cu_doms, d)):
        assert cu.dtype == torch.int64
        assert int(cu[0]) == 0 and int(cu[-1]) == total
        assert bool(torch.all(cu[1:] > cu[:-1]))  # no empty DOM, no empty event
    dom_len = b.dom_lengths().numpy()
    assert dom_len.max() <= trunc.max_pulses_per_dom
    assert b.event_lengths().max() <= trunc.max_doms_per_event
    pulses_per_event = np.add.reduceat(dom_len, b.cu_doms[:-1].numpy())
    assert pulses_per_event.max() <= trunc.max_pulses_per_event
    # Pulses time-ordered inside each DOM.
    dom_of_pulse = np.repeat(np.arange(d), dom_len)
    t = b.pulses[:, 0].numpy()
    assert np.all((t[1:] >= t[:-1]) | (dom_of_pulse[1:] != dom_of_pulse[:-1]))
    # DOMs of an event in strictly increasing sensor order (each DOM once).
    ev_of_dom = np.repeat(np.arange(n), b.event_lengths().numpy())
    sid = b.sensor_id.numpy()
    assert np.all((sid[1:] > sid[:-1]) | (ev_of_dom[1:] != ev_of_dom[:-1]))
    assert sid.min() >= 0 and sid.max() < len(geometry)
    np.testing.assert_array_equal(b.dom_xyz.numpy(), geometry[sid])
    assert bool(torch.all(b.pulses[:, 1] > 0))
    assert set(np.unique(b.pulses[:, 2].numpy()).tolist()) <= {0.0, 1.0}
    assert b.direction is not None and b.direction.shape == (n, 3)
    torch.testing.assert_close(
        b.direction.norm(dim=1), torch.ones(n), atol=1e-6, rtol=0, check_dtype=False
    )


# --- sharding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 3])
def test_disjoint_shards(ds: KaggleDataset, meta: pd.DataFrame, world_size: int) -> None:
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world_size):
            ld = loader(ds, rank=rank, world_size=world_size, seed=11)
            batches = list(ld.iter_epoch(epoch))
            assert len(batches) == len(ld)
            assert all(b.num_events == BATCH for b in batches)
            per_rank.append(ids(batches))
        assert len({len(r) for r in per_rank}) == 1  # same number of batches on every rank
        for r in per_rank:
            assert len(np.unique(r)) == len(r)  # no event twice on a rank
            assert set(r.tolist()) <= set(meta.index.tolist())
        for a, b in itertools.combinations(per_rank, 2):
            assert not set(a.tolist()) & set(b.tolist())
        union = np.concatenate(per_rank)
        # Each rank gets n_file // world_size events of every file, minus the drop_last tail.
        per_rank_events = sum(FILE_EVENTS // world_size for _ in range(6))
        assert len(union) == world_size * (per_rank_events // BATCH) * BATCH


def test_each_event_once_per_epoch(ds: KaggleDataset, meta: pd.DataFrame) -> None:
    ld = loader(ds, drop_last=False, seed=3)
    for epoch in range(3):
        seen = ids(list(ld.iter_epoch(epoch)))
        assert len(seen) == len(np.unique(seen)) == N_EVENTS
        assert set(seen.tolist()) == set(meta.index.tolist())


def test_max_events(ds: KaggleDataset) -> None:
    a = ids(list(loader(ds, rank=0, world_size=2, max_events=400).iter_epoch(0)))
    b = ids(list(loader(ds, rank=1, world_size=2, max_events=400).iter_epoch(0)))
    assert len(a) == len(b) == (200 // BATCH) * BATCH
    assert not set(a.tolist()) & set(b.tolist())


# --- order ---------------------------------------------------------------------------------------
def test_shuffle_is_per_epoch_and_reproducible(ds: KaggleDataset) -> None:
    e0 = ids(list(loader(ds, seed=1, drop_last=False).iter_epoch(0)))
    e1 = ids(list(loader(ds, seed=1, drop_last=False).iter_epoch(1)))
    e0_again = ids(list(loader(ds, seed=1, drop_last=False).iter_epoch(0)))
    other_seed = ids(list(loader(ds, seed=2, drop_last=False).iter_epoch(0)))
    np.testing.assert_array_equal(e0, e0_again)
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, other_seed)
    assert sorted(e0.tolist()) == sorted(e1.tolist())
    # set_epoch + __iter__ is the same as iter_epoch.
    ld = loader(ds, seed=1, drop_last=False)
    ld.set_epoch(1)
    np.testing.assert_array_equal(ids(list(ld)), e1)


def test_shuffle_is_file_aware(ds: KaggleDataset, meta: pd.DataFrame) -> None:
    file_of = meta["batch_id"]
    orders = []
    for epoch in (0, 1):
        batches = list(loader(ds, seed=4).iter_epoch(epoch))
        for b in batches:
            files = file_of.loc[b.event_id.numpy()].to_numpy()
            runs = 1 + int(np.sum(files[1:] != files[:-1]))
            assert runs == len(np.unique(files)) <= 2  # each file one contiguous block
        stream = file_of.loc[ids(batches)].to_numpy()
        run_files = stream[np.r_[True, stream[1:] != stream[:-1]]]
        assert len(run_files) == len(set(run_files.tolist())) == 6  # each file read once
        first_run = ids(batches)[: int(np.sum(stream == stream[0]))]
        assert not np.all(np.diff(first_run) > 0)  # events shuffled inside the file
        orders.append(run_files.tolist())
    assert orders[0] != orders[1]  # the file order changes between epochs


def test_no_shuffle_keeps_file_order(ds: KaggleDataset, meta: pd.DataFrame) -> None:
    expected = meta.reset_index().sort_values(["batch_id", "first_pulse_index"])["event_id"]
    for epoch in (0, 5):
        got = ids(list(loader(ds, shuffle=False, drop_last=False).iter_epoch(epoch)))
        np.testing.assert_array_equal(got, expected.to_numpy())


# --- content -------------------------------------------------------------------------------------
@pytest.mark.parametrize("trunc", [Truncation(), TIGHT], ids=["default", "tight"])
def test_batches_match_reference(
    ds: KaggleDataset,
    root: Path,
    meta: pd.DataFrame,
    raw: dict[int, pd.DataFrame],
    trunc: Truncation,
) -> None:
    """Every event of a shuffled epoch follows the plain reference; DomBatch invariants hold."""
    geometry = pd.read_csv(root / "sensor_geometry.csv")[["x", "y", "z"]].to_numpy(np.float32)
    ld = loader(ds, truncation=trunc, seed=9, drop_last=False)
    cols = {
        b: (
            df["sensor_id"].to_numpy(),
            df["time"].to_numpy(),
            df["charge"].to_numpy(),
            df["auxiliary"].to_numpy(),
        )
        for b, df in raw.items()
    }
    n_events = n_kept = n_in = n_truncated = n_dropped = 0
    for batch in ld.iter_epoch(0):
        check_invariants(batch, geometry, trunc)
        ev = batch.event_id.numpy()
        m = meta.loc[ev]
        az, zen = m["azimuth"].to_numpy(), m["zenith"].to_numpy()
        want_dir = np.stack([np.cos(az) * np.sin(zen), np.sin(az) * np.sin(zen), np.cos(zen)], 1)
        assert batch.direction is not None
        np.testing.assert_allclose(batch.direction.numpy(), want_dir, atol=1e-6)
        n_raw = (m["last_pulse_index"] - m["first_pulse_index"] + 1).to_numpy()
        assert batch.n_pulses_raw is not None
        np.testing.assert_array_equal(batch.n_pulses_raw.numpy(), n_raw)
        for e in range(batch.num_events):
            row = m.iloc[e]
            sl = slice(int(row["first_pulse_index"]), int(row["last_pulse_index"]) + 1)
            s, t, q, a = (c[sl] for c in cols[int(row["batch_id"])])
            n_dropped += check_event(packed_event(batch, e), s, t, q, a, trunc)
        n_events += batch.num_events
        n_kept += batch.num_pulses
        n_in += int(n_raw.sum())
        n_truncated += int(np.sum(n_raw > trunc.max_pulses_per_event))
    assert n_events == N_EVENTS
    assert ld.stats == LoaderStats(
        events=n_events,
        pulses_in=n_in,
        pulses_kept=n_kept,
        events_truncated=n_truncated,
        doms_dropped=n_dropped,
    )
    if trunc == TIGHT:  # the tight caps really were exercised
        assert n_truncated > 0 and n_dropped > 0 and n_kept < n_in


def _write_big_event_dataset(root: Path) -> tuple[pd.DataFrame, list[int]]:
    """One batch file: a small event, a 120,000-pulse event, and an event with one busy DOM."""
    rng = np.random.default_rng(0)
    parts = []
    # Event 10: 6 pulses on 3 DOMs.
    parts.append((10, [5, 7, 5, 9, 5, 7], np.arange(6) * 10 + 10_000))
    # Event 11: half the pulses on 8 bright DOMs, half spread over the whole detector.
    n = 120_000
    bright = np.array([1000, 1001, 1002, 2500, 2501, 4000, 4001, 4002])
    sensor = np.where(rng.random(n) < 0.5, bright[rng.integers(0, 8, n)], rng.integers(0, 5160, n))
    parts.append((11, sensor, np.sort(rng.integers(9_000, 80_000, n))))
    # Event 12: 70 pulses on sensor 100, 10 elsewhere.
    sensor = np.r_[np.full(70, 100), rng.integers(0, 5160, 10)]
    rng.shuffle(sensor)
    parts.append((12, sensor, np.sort(rng.integers(10_000, 20_000, 80))))

    event_ids = [e for e, _, _ in parts]
    counts = [len(s) for _, s, _ in parts]
    total = sum(counts)
    df = pd.DataFrame(
        {
            "sensor_id": np.concatenate([s for _, s, _ in parts]).astype(np.int16),
            "time": np.concatenate([t for _, _, t in parts]).astype(np.int64),
            "charge": rng.uniform(0.1, 5.0, total),  # continuous: no ties in DOM brightness
            "auxiliary": rng.random(total) < 0.3,
        },
        index=pd.Index(np.repeat(event_ids, counts).astype(np.int64), name="event_id"),
    )
    (root / "train").mkdir(parents=True)
    make_geometry().to_csv(root / "sensor_geometry.csv", index=False, float_format="%.2f")
    df.to_parquet(root / "train" / "batch_1.parquet")
    last = np.cumsum(counts) - 1
    pd.DataFrame(
        {
            "batch_id": np.ones(3, dtype=np.int64),
            "event_id": np.array(event_ids, dtype=np.int64),
            "first_pulse_index": last - np.array(counts) + 1,
            "last_pulse_index": last,
            "azimuth": [0.5, 3.0, 6.0],
            "zenith": [0.1, 1.5, 3.0],
        }
    ).to_parquet(root / "train_meta.parquet", index=False)
    return df, counts


@pytest.mark.parametrize(
    "trunc",
    [
        Truncation(max_pulses_per_event=3000, max_pulses_per_dom=64, max_doms_per_event=100),
        Truncation(max_pulses_per_event=200_000, max_pulses_per_dom=300, max_doms_per_event=2048),
    ],
    ids=["event-cap", "no-event-cap"],
)
def test_truncation_of_a_huge_event(tmp_path: Path, trunc: Truncation) -> None:
    df, counts = _write_big_event_dataset(tmp_path / "big")
    big = df.loc[11]
    s, t, q = big["sensor_id"].to_numpy(), big["time"].to_numpy(), big["charge"].to_numpy()
    a = big["auxiliary"].to_numpy()
    window = min(len(s), trunc.max_pulses_per_event)
    per_dom_in_window = np.bincount(s[:window].astype(np.int64), minlength=5160)
    hit_in_window = int(np.sum(per_dom_in_window > 0))
    # The file is what the test intends: the caps bite on the big event.
    assert counts[1] >= 100_000
    assert int(np.sum(per_dom_in_window > trunc.max_pulses_per_dom)) >= 5
    assert hit_in_window > trunc.max_doms_per_event

    ds = KaggleDataset(tmp_path / "big")
    ld = EventLoader(
        dataset=ds, batch_ids=[1], batch_size=3, truncation=trunc, shuffle=False, prefetch=0
    )
    (batch,) = list(ld.iter_epoch(0))
    geometry = pd.read_csv(tmp_path / "big" / "sensor_geometry.csv")[["x", "y", "z"]]
    check_invariants(batch, geometry.to_numpy(np.float32), trunc)
    assert batch.event_id.tolist() == [10, 11, 12]
    assert batch.n_pulses_raw is not None and batch.n_pulses_raw.tolist() == counts

    # Caps hold exactly on the big event.
    got = batch_event(batch, 1)
    assert len(got) == trunc.max_doms_per_event
    lengths = np.array([len(p) for _, p in got])
    assert lengths.max() == trunc.max_pulses_per_dom
    assert lengths.sum() <= trunc.max_pulses_per_event
    # Kept pulses are each DOM's earliest (of the whole event, not only of the window).
    for sid, pulses in got:
        own = np.sort(t[s == sid])
        assert len(pulses) == min(per_dom_in_window[sid], trunc.max_pulses_per_dom)
        np.testing.assert_array_equal(pulses[:, 0], own[: len(pulses)].astype(np.float32))
    assert max(float(p[:, 0].max()) for _, p in got) <= t[window - 1]  # none after the window
    # Kept DOMs are the brightest (charge of the pulses each DOM keeps); charges here are
    # continuous, so there are no ties and the kept set is unique.
    bright = brightness(q, reference_rows(s, trunc))
    kept = {sid for sid, _ in got}
    kept_q = [c for sid, c in bright.items() if sid in kept]
    dropped_q = [c for sid, c in bright.items() if sid not in kept]
    assert len(dropped_q) == hit_in_window - trunc.max_doms_per_event
    assert min(kept_q) > max(dropped_q)
    assert check_event(packed_event(batch, 1), s, t, q, a, trunc) == len(dropped_q)
    # The small events around it are intact (event 12's busy DOM keeps its earliest pulses).
    for e, event_id in ((0, 10), (2, 12)):
        small = df.loc[event_id]
        cols = [small[c].to_numpy() for c in ("sensor_id", "time", "charge", "auxiliary")]
        assert check_event(packed_event(batch, e), *cols, trunc) == 0
    busy = batch_event(batch, 2)
    assert max(len(p) for _, p in busy) == min(70, trunc.max_pulses_per_dom)

    # Bounded tensors and honest bookkeeping.
    bound = sum(
        min(c, trunc.max_pulses_per_event, trunc.max_doms_per_event * trunc.max_pulses_per_dom)
        for c in counts
    )
    assert batch.num_pulses <= bound
    assert batch.num_doms <= 3 * trunc.max_doms_per_event
    assert ld.stats == LoaderStats(
        events=3,
        pulses_in=sum(counts),
        pulses_kept=batch.num_pulses,
        events_truncated=int(sum(c > trunc.max_pulses_per_event for c in counts)),
        doms_dropped=hit_in_window - trunc.max_doms_per_event,
    )


def test_truncation_rejects_bad_caps() -> None:
    with pytest.raises(ValueError, match="max_pulses_per_dom must be a positive integer, got 0"):
        Truncation(max_pulses_per_dom=0)
    with pytest.raises(ValueError, match="max_doms_per_event must be a positive integer"):
        Truncation(max_doms_per_event=2.5)  # type: ignore[arg-type]


def test_loader_rejects_bad_arguments(ds: KaggleDataset) -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        loader(ds, batch_size=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        loader(ds, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size 5000 is larger than the 1800 events"):
        loader(ds, batch_size=5000)


# --- resume and prefetch -------------------------------------------------------------------------
def test_resume_mid_epoch(ds: KaggleDataset) -> None:
    ld = loader(ds, seed=6, prefetch=2)
    full = list(ld.iter_epoch(2))
    assert len(full) == len(ld) == N_EVENTS // BATCH
    for k in (0, 1, 17, len(full) - 1, len(full)):
        assert_same_stream(list(ld.iter_epoch(2, start_batch=k)), full[k:])


@pytest.mark.parametrize("trunc", [Truncation(), TIGHT], ids=["default", "tight"])
def test_prefetch_does_not_change_batches(ds: KaggleDataset, trunc: Truncation) -> None:
    sync = loader(ds, seed=8, truncation=trunc, prefetch=0, drop_last=False)
    ahead = loader(ds, seed=8, truncation=trunc, prefetch=3, drop_last=False)
    for epoch in (0, 1):
        assert_same_stream(list(ahead.iter_epoch(epoch)), list(sync.iter_epoch(epoch)))
    assert ahead.stats == sync.stats


def test_read_error_surfaces_with_prefetch(root: Path, tmp_path: Path) -> None:
    data = Path(shutil.copytree(root, tmp_path / "data"))
    bad = data / "train" / "batch_6.parquet"
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    ld = loader(KaggleDataset(data), shuffle=False, prefetch=2)
    got = []
    expected = re.escape(f"{bad}: not a readable parquet file")
    with pytest.raises(DatasetError, match=expected):
        for b in ld.iter_epoch(0):
            got.append(b)
    assert len(got) == 5 * FILE_EVENTS // BATCH  # every batch made of files 1-5 came first


def test_prefetch_thread_ends_when_consumer_stops(ds: KaggleDataset) -> None:
    """Abandoning an epoch with the queue full must not leave the worker blocked for good."""
    before = set(threading.enumerate())
    ld = loader(ds, prefetch=1, max_events=2 * BATCH)
    assert len(ld) == 2
    it = ld.iter_epoch(0)
    next(it)
    time.sleep(0.5)  # the worker queues the second batch, then waits to queue "done"
    it.close()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        started = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not any(t.name == "iceaggr-loader" for t in started):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the prefetch thread is still alive 5 s after the consumer stopped")


# --- packing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("trunc", [Truncation(), TIGHT], ids=["default", "tight"])
def test_concat_equals_assembling_at_once(ds: KaggleDataset, trunc: Truncation) -> None:
    part = ds.read_batch(2)
    events = np.random.default_rng(1).permutation(part.num_events)
    whole_stats, split_stats = LoaderStats(), LoaderStats()
    whole = assemble_batch(part, events, ds.geometry, trunc, whole_stats)
    pieces = [events[:1], events[1:120], events[120:]]
    joined = concat_batches(
        [assemble_batch(part, p, ds.geometry, trunc, split_stats) for p in pieces]
    )
    assert_batches_equal(joined, whole)
    assert split_stats == whole_stats
    assert whole.num_events == part.num_events
    # A batch that spans two files is the concatenation of its two parts.
    other = ds.read_batch(5)
    a = assemble_batch(part, events[:10], ds.geometry, trunc)
    b = assemble_batch(other, np.arange(7), ds.geometry, trunc)
    ab = concat_batches([a, b])
    assert ab.num_events == 17
    assert ab.event_id.tolist() == a.event_id.tolist() + b.event_id.tolist()
    check_invariants(ab, ds.geometry, trunc)
    for e in range(7):
        assert_event_matches(batch_event(ab, 10 + e), batch_event(b, e))
