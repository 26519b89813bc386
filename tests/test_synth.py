"""Tests for iceaggr.data.synth: the Kaggle layout on disk, determinism, physics statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iceaggr.data import synth
from iceaggr.data.geometry import NUM_SENSORS, make_geometry
from iceaggr.data.synth import photons, writer

N_EVENTS = 1_500
BATCH_SIZE = 600  # -> batch files of 600, 600 and 300 events


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    return synth.write_synthetic_dataset(
        out, N_EVENTS, batch_size=BATCH_SIZE, seed=7, progress=False
    )


@pytest.fixture(scope="module")
def chunk() -> tuple[pd.DataFrame, pd.DataFrame]:
    return synth.generate_events(np.random.default_rng(11), make_geometry(), 3_000, 100)


def read_batches(root: Path) -> dict[int, pd.DataFrame]:
    return {
        int(p.stem.split("_")[1]): pd.read_parquet(p) for p in sorted((root / "train").iterdir())
    }


def test_layout(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == [
        "sensor_geometry.csv",
        "train",
        "train_meta.parquet",
    ]
    assert sorted(p.name for p in (dataset / "train").iterdir()) == [
        "batch_1.parquet",
        "batch_2.parquet",
        "batch_3.parquet",
    ]
    # No temporary folder is left next to the dataset.
    assert [p.name for p in dataset.parent.iterdir()] == ["data"]
    geo = pd.read_csv(dataset / "sensor_geometry.csv")
    assert list(geo.columns) == ["sensor_id", "x", "y", "z"]
    pd.testing.assert_frame_equal(geo, make_geometry())


def test_meta_schema(dataset: Path) -> None:
    schema = pq.read_schema(dataset / "train_meta.parquet")
    expected = [
        ("batch_id", pa.int64()),
        ("event_id", pa.int64()),
        ("first_pulse_index", pa.int64()),
        ("last_pulse_index", pa.int64()),
        ("azimuth", pa.float64()),
        ("zenith", pa.float64()),
    ]
    assert [(f.name, f.type) for f in schema] == expected
    meta = pd.read_parquet(dataset / "train_meta.parquet")
    assert len(meta) == N_EVENTS
    assert meta.groupby("batch_id").size().to_dict() == {1: 600, 2: 600, 3: 300}
    assert np.all(np.diff(meta["event_id"].to_numpy()) > 0)  # strictly increasing overall
    assert meta["azimuth"].between(0, 2 * np.pi).all() and (meta["azimuth"] < 2 * np.pi).all()
    assert meta["zenith"].between(0, np.pi).all()
    # Isotropic directions: cos(zenith) roughly uniform, azimuth roughly uniform.
    assert abs(np.cos(meta["zenith"]).mean()) < 0.1
    assert 0.2 < (np.cos(meta["zenith"]) > 0.5).mean() < 0.3  # isotropic: 0.25


def test_pulse_schema(dataset: Path) -> None:
    pf = pq.ParquetFile(dataset / "train" / "batch_1.parquet")
    types = {f.name: f.type for f in pf.schema_arrow}
    assert types == {
        "sensor_id": pa.int16(),
        "time": pa.int64(),
        "charge": pa.float64(),
        "auxiliary": pa.bool_(),
        "event_id": pa.int64(),
    }
    pandas_meta = json.loads(pf.schema_arrow.metadata[b"pandas"])
    assert pandas_meta["index_columns"] == ["event_id"]
    df = pd.read_parquet(dataset / "train" / "batch_1.parquet")
    assert df.index.name == "event_id" and df.index.dtype == np.int64
    assert list(df.columns) == ["sensor_id", "time", "charge", "auxiliary"]
    assert df.dtypes.astype(str).tolist() == ["int16", "int64", "float64", "bool"]


def test_pulse_indices_match_rows(dataset: Path) -> None:
    meta = pd.read_parquet(dataset / "train_meta.parquet")
    for batch_id, df in read_batches(dataset).items():
        m = meta[meta["batch_id"] == batch_id]
        first = m["first_pulse_index"].to_numpy()
        last = m["last_pulse_index"].to_numpy()
        assert first[0] == 0 and last[-1] == len(df) - 1
        np.testing.assert_array_equal(first[1:], last[:-1] + 1)  # contiguous, no gaps
        assert np.all(last >= first)
        expected = np.repeat(m["event_id"].to_numpy(), last - first + 1)
        np.testing.assert_array_equal(df.index.to_numpy(), expected)


def test_rows_time_ordered_and_sensors_valid(dataset: Path) -> None:
    for df in read_batches(dataset).values():
        ev = df.index.to_numpy()
        same_event = ev[1:] == ev[:-1]
        assert np.all(np.diff(df["time"].to_numpy())[same_event] >= 0)
        assert df["sensor_id"].between(0, NUM_SENSORS - 1).all()
        assert (df["charge"] > 0).all()


def test_deterministic_for_a_seed(tmp_path: Path, dataset: Path) -> None:
    again = synth.write_synthetic_dataset(
        tmp_path / "again", N_EVENTS, batch_size=BATCH_SIZE, seed=7, progress=False
    )
    for rel in ["sensor_geometry.csv", "train_meta.parquet", "train/batch_2.parquet"]:
        assert (again / rel).read_bytes() == (dataset / rel).read_bytes(), rel


def test_seeds_differ(tmp_path: Path, dataset: Path) -> None:
    other = synth.write_synthetic_dataset(
        tmp_path / "other", 300, batch_size=BATCH_SIZE, seed=8, progress=False
    )
    a = pd.read_parquet(dataset / "train_meta.parquet").iloc[:300]
    b = pd.read_parquet(other / "train_meta.parquet")
    assert not np.allclose(a["zenith"].to_numpy(), b["zenith"].to_numpy())
    rng_a = synth.generate_events(np.random.default_rng(1), make_geometry(), 50)[0]
    rng_b = synth.generate_events(np.random.default_rng(2), make_geometry(), 50)[0]
    assert len(rng_a) != len(rng_b) or not rng_a.equals(rng_b)


def test_generate_events_in_memory(chunk: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    pulses, meta = chunk
    assert len(meta) == 3_000
    assert list(meta.columns) == ["event_id", "azimuth", "zenith", "n_pulses"]
    assert meta["event_id"].iloc[0] >= 100 and np.all(np.diff(meta["event_id"]) > 0)
    assert pulses.index.name == "event_id"
    sizes = pulses.groupby(level=0, sort=False).size()
    np.testing.assert_array_equal(sizes.index.to_numpy(), meta["event_id"].to_numpy())
    np.testing.assert_array_equal(sizes.to_numpy(), meta["n_pulses"].to_numpy())


def pulse_stats(pulses: pd.DataFrame, meta: pd.DataFrame) -> dict[str, float]:
    n = meta["n_pulses"].to_numpy()
    per_dom = pulses.groupby([pulses.index, "sensor_id"]).size().to_numpy()
    return {
        "median": float(np.median(n)),
        "p90": float(np.percentile(n, 90)),
        "max": float(n.max()),
        "single": float(np.mean(per_dom == 1)),
        "aux": float(pulses["auxiliary"].mean()),
        "doms": per_dom.shape[0] / len(meta),
    }


def test_pulse_statistics_like_real_data(chunk: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """Loose bounds around the real data (median 63, P90 144, 78% single-pulse DOMs, aux 28%)."""
    pulses, meta = chunk
    s = pulse_stats(pulses, meta)
    assert 30 <= s["median"] <= 120, s
    assert 80 <= s["p90"] <= 400, s
    assert 0.65 <= s["single"] <= 0.9, s
    assert 0.1 <= s["aux"] <= 0.5, s
    assert 25 <= s["doms"] <= 150, s
    assert s["max"] >= 1_000, s  # a heavy tail: the brightest events have thousands of pulses
    # Raw feature scales of the real files.
    assert 5_000 <= pulses["time"].min() <= 7_000
    assert 15_000 <= pulses["time"].max() <= 200_000
    assert pulses["charge"].min() == pytest.approx(0.025)
    assert pulses["charge"].max() >= 300
    q = pulses["charge"].to_numpy()
    np.testing.assert_allclose(q / 0.025, np.round(q / 0.025), atol=1e-6)  # 0.025 p.e. steps
    assert 0.7 <= np.median(q) <= 1.3  # mostly single photoelectrons


def test_trigger_and_time_offset(chunk: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    pulses, meta = chunk
    hlc = pulses[~pulses["auxiliary"]]
    n_hlc_doms = hlc.groupby(level=0)["sensor_id"].nunique().reindex(meta["event_id"], fill_value=0)
    assert (n_hlc_doms >= synth.SMT_MULTIPLICITY).mean() > 0.98
    # The first HLC launch sits at the ~1e4 ns trigger time.
    first_hlc = hlc.groupby(level=0)["time"].min()
    assert (first_hlc == int(synth.TRIGGER_TIME_NS)).mean() > 0.95
    # Noise: auxiliary pulses come early (before the trigger) too; HLC ones rarely.
    early = pulses[pulses["time"] < synth.TRIGGER_TIME_NS - 1_000]
    assert len(early) > 0 and early["auxiliary"].mean() > 0.9


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an empty folder"):
        synth.write_synthetic_dataset(out, 10, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"
    # An existing empty folder is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    synth.write_synthetic_dataset(empty, 5, progress=False)
    assert (empty / "train_meta.parquet").is_file()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_events": 0}, "n_events must be >= 1"), ({"batch_size": 0}, "batch_size must be >= 1")],
)
def test_rejects_bad_sizes(tmp_path: Path, kwargs: dict[str, int], match: str) -> None:
    args = {"n_events": 10, "batch_size": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        synth.write_synthetic_dataset(tmp_path / "x", progress=False, **args)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_run_leaves_no_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    out = tmp_path / "data"
    real = synth.generate_events
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
        calls.append(1)
        # While generating, nothing at out_dir looks like a dataset.
        assert not out.exists()
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".data.partial-")]
        assert len(partial) == 1
        if len(calls) == 2:
            raise error("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "generate_events", flaky)
    with pytest.raises(error):
        synth.write_synthetic_dataset(out, 30, batch_size=10, progress=False)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor the partial folder remains


class _HalfRng:
    """A generator stand-in: every uniform draw is 0.5, every Poisson draw is 1."""

    def random(self, n: int) -> np.ndarray:
        return np.full(n, 0.5)

    def poisson(self, lam: np.ndarray) -> np.ndarray:
        return np.ones(np.shape(lam), dtype=np.int64)


def _hit_set(hits: list[synth._Hits]) -> set[tuple[int, int]]:
    return {(int(e), int(s)) for h in hits for e, s in zip(h.event, h.sensor, strict=True)}


def test_search_radius_misses_no_dom_above_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The closed-form DOM search finds every DOM expecting >= MIN_EXPECTED_PE, as brute force.

    With u = 0.5 for every DOM, the sparse Poisson sampler 'hits' exactly the DOMs with
    1 - exp(-mu) > 0.5; we lower that bar to MIN_EXPECTED_PE by scaling mu, and compare against
    a search radius so large that it covers the whole detector.
    """
    det = synth._detector(make_geometry())
    _, _, tracks, cascades = synth._sample_events(np.random.default_rng(5), 300)
    tracks = synth._Tracks.concat(
        [tracks, synth._sample_coincident_muons(np.random.default_rng(6), 300)]
    )
    scale = np.log(2.0) / synth.MIN_EXPECTED_PE  # mu >= MIN_EXPECTED_PE <=> 1 - e^(-mu s) > 0.5
    real_sampler = synth._poisson_nonzero
    monkeypatch.setattr(photons, "_poisson_nonzero", lambda rng, mu: real_sampler(rng, mu * scale))
    fake = _HalfRng()
    found = _hit_set(
        synth._track_hits(fake, det, tracks) + synth._cascade_hits(fake, det, cascades)
    )
    monkeypatch.setattr(photons, "MIN_EXPECTED_PE", 1e-30)  # search everything
    truth = _hit_set(
        synth._track_hits(fake, det, tracks) + synth._cascade_hits(fake, det, cascades)
    )
    assert len(truth) > 1_000
    assert truth == found


@pytest.mark.parametrize("mu", [0.02, 0.7, 3.0, 12.0])
def test_sparse_poisson_sampler_is_poisson(mu: float) -> None:
    n = 200_000
    hit, k = synth._poisson_nonzero(np.random.default_rng(3), np.full(n, mu, dtype=np.float32))
    counts = np.zeros(n, dtype=np.int64)
    counts[hit] = k
    assert np.all(k >= 1)
    mu32 = float(np.float32(mu))
    assert counts.mean() == pytest.approx(mu32, rel=0.02, abs=1e-3)
    assert counts.var() == pytest.approx(mu32, rel=0.03, abs=1e-3)
    p0 = np.exp(-mu32)
    assert (counts == 0).mean() == pytest.approx(p0, abs=4 * np.sqrt(p0 * (1 - p0) / n) + 1e-4)


# -------------------------------------------------------------------------------------------------
# Afterpulses, DOM launches, local coincidence, trigger and readout windows
# -------------------------------------------------------------------------------------------------
def _sorted_pulses(
    event: list[int], sensor: list[int], time: list[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ev, sid, t = np.array(event), np.array(sensor), np.array(time, dtype=np.float64)
    order = np.argsort(synth._sort_key(ev, sid, t), kind="stable")
    return ev[order], sid[order], t[order]


def test_afterpulses_follow_their_dom_light_with_pmt_delays() -> None:
    """400 isolated DOMs, 200 photoelectrons each at t = 0 from 1 mm (no scattering delay):
    every pulse after the prompt light is an afterpulse; count, delays, charge and flags are the
    PMT's."""
    n_dom, n_pe = 400, 200
    hits = synth._Hits(
        event=np.arange(n_dom, dtype=np.int64),
        sensor=np.full(n_dom, 5 * 60 + 30, dtype=np.int64),  # one DOM per event
        n_pe=np.full(n_dom, n_pe, dtype=np.int64),
        time=np.zeros(n_dom),
        dist=np.full(n_dom, 1e-3),
    )
    ev, sid, t, q, co = synth._merge_photons(*synth._photons(np.random.default_rng(4), [hits]))
    assert not co.any() and np.all(sid == 5 * 60 + 30)
    late = t > 50.0  # the prompt light arrives within the PMT jitter (2 ns) of t = 0
    assert np.mean(np.abs(t[~late]) < 10.0) > 0.99
    delay = t[late]
    expected = synth.AFTERPULSE_PROBABILITY * n_pe * n_dom  # 4,800
    assert abs(delay.shape[0] - expected) < 4 * np.sqrt(expected), delay.shape[0]
    assert delay.min() > 100.0 and delay.max() < 12_000.0  # ~0.5-10 us after the light
    # The three delay groups of AFTERPULSE_GROUPS: ~0.6 us (20%), ~2 us (50%), ~8 us (30%).
    shares = np.histogram(delay, [50, 1_200, 4_000, 12_000])[0] / delay.shape[0]
    np.testing.assert_allclose(shares, [0.2, 0.5, 0.3], atol=0.03)
    assert 0.8 <= np.mean(q[late]) <= 1.0  # single photoelectrons (mean of the SPE charge 0.89)
    # Afterpulses more than a launch window after the light open a launch of their own; with no
    # neighbour launching near them they are soft-local-coincidence (auxiliary) pulses.
    hlc = synth._hlc_pulses(synth._detector(make_geometry()), ev, sid, t)
    assert not hlc.any()
    starts = synth._launch_starts(ev, sid, t)
    first_t = np.full(n_dom, np.inf)
    np.minimum.at(first_t, ev, t)
    after = np.flatnonzero(t - first_t[ev] > synth.LAUNCH_WINDOW_NS)
    first_after = after[np.r_[True, ev[after][1:] != ev[after][:-1]]]
    assert first_after.shape[0] > 0.9 * n_dom and starts[first_after].all()
    assert starts.sum() == n_dom + first_after.shape[0]  # no DOM launches a third time


def test_launch_starts() -> None:
    # One DOM: a launch at 0 holds pulses up to 6,400 ns after it; 6,401 opens the next launch,
    # 13,000 (6,599 after that) the next, and so on. A new DOM or event always opens one.
    ev, sid, t = _sorted_pulses(
        [0, 0, 0, 0, 0, 0, 0, 1],
        [7, 7, 7, 7, 7, 7, 8, 8],
        [0.0, 100.0, 6_400.0, 6_401.0, 13_000.0, 19_400.5, 50.0, 60.0],
    )
    starts = synth._launch_starts(ev, sid, t)
    assert starts.tolist() == [True, False, False, True, True, True, True, True]


def test_local_coincidence_is_per_launch() -> None:
    det = synth._detector(make_geometry())
    # String 1: DOM 10 launches at 0 (with a later pulse at 3,000 in the same launch) and again
    # at 9,000; DOM 11 at 500; DOM 13 (three away from 10, two from 11) at 9,100. Sensors 59
    # and 60 fire together but sit on different strings.
    ev, sid, t = _sorted_pulses(
        [0] * 7,
        [10, 10, 10, 11, 13, 59, 60],
        [0.0, 3_000.0, 9_000.0, 500.0, 9_100.0, 20_000.0, 20_000.0],
    )
    hlc = synth._hlc_pulses(det, ev, sid, t)
    got = {(int(s), float(x)): bool(h) for s, x, h in zip(sid, t, hlc, strict=True)}
    assert got == {
        (10, 0.0): True,  # with DOM 11 at 500
        (10, 3_000.0): True,  # same launch as 0
        (10, 9_000.0): False,  # a new launch: DOM 11 launched 8.5 us earlier, DOM 13 is 3 away
        (11, 500.0): True,
        (13, 9_100.0): False,  # DOM 11 (two away) launched 8.6 us earlier
        (59, 20_000.0): False,
        (60, 20_000.0): False,
    }


def test_smt_trigger_needs_eight_hlc_launches_within_its_window() -> None:
    w = synth.SMT_WINDOW_NS
    ev = np.array([0] * 8 + [1] * 8 + [2] * 10)
    t = np.concatenate(
        [
            np.linspace(0.0, w, 8),  # exactly in the window: a trigger
            np.linspace(0.0, w + 1.0, 8),  # 1 ns too long: none
            [-20_000.0, 0.0],  # two lone launches, then eight in 4 us
            np.linspace(10.0, 4_010.0, 8),
        ]
    )
    covered = synth._smt_trigger(ev, t)
    assert covered.tolist() == [True] * 8 + [False] * 8 + [False] + [True] * 9


def _cluster(event: int, string: int, t0: float, n: int = 8) -> tuple[list[int], list[int], list]:
    """``n`` neighbouring DOMs of a string launching 100 ns apart from ``t0``: all HLC."""
    return [event] * n, [string * 60 + k for k in range(n)], [t0 + 100.0 * k for k in range(n)]


def test_readout_windows_merge_overlapping_triggers_and_keep_far_ones() -> None:
    det = synth._detector(make_geometry())
    pre, post = synth.READOUT_PRE_TRIGGER_NS, synth.READOUT_POST_TRIGGER_NS
    parts = [
        (_cluster(0, 0, 0.0), False),  # event 0: the neutrino triggers at 0-700 ns,
        (_cluster(0, 1, 8_000.0), True),  # a muon 8 us later (its readout overlaps): merged,
        (_cluster(0, 2, 30_000.0), True),  # a muon 30 us later: a window of its own
        (_cluster(1, 0, 0.0), True),  # event 1: only a coincident muon triggers
        (_cluster(2, 0, 0.0, n=7), False),  # event 2: seven HLC launches do not trigger
    ]
    ev = np.concatenate([c[0] for c, _ in parts])
    sid = np.concatenate([c[1] for c, _ in parts])
    t = np.concatenate([c[2] for c, _ in parts]).astype(np.float64)
    co = np.concatenate([np.full(len(c[0]), muon) for c, muon in parts])
    order = np.argsort(synth._sort_key(ev, sid, t), kind="stable")
    readout = synth._readout(det, ev[order], sid[order], t[order], co[order])
    assert readout.kept.tolist() == [0]
    assert readout.event.tolist() == [0, 0]
    np.testing.assert_allclose(readout.lo, [0.0 - pre, 30_000.0 - pre])
    np.testing.assert_allclose(readout.hi, [8_700.0 + post, 30_700.0 + post])
    inside = readout.contains(
        np.array([0, 0, 0, 0, 0, 1]), np.array([-pre - 1, -pre, 14_700.0, 20_000.0, 36_700.0, 0.0])
    )
    assert inside.tolist() == [False, True, True, False, True, False]


@pytest.fixture(scope="module")
def candidates() -> list[synth._Chunk]:
    """Six rounds of 2,048 candidates (~3,700 kept events), with the coincident-muon flags."""
    det = synth._detector(make_geometry())
    rng = np.random.default_rng(21)
    return [synth._simulate_candidates(rng, det, 2_048) for _ in range(6)]


def _per_event(chunk: synth._Chunk) -> dict[str, np.ndarray]:
    """Per kept event: first and last raw time, coincident-muon pulses, first HLC pulse of the
    neutrino and of anything, a gap longer than a readout's pre + post time."""
    ev, t = chunk.event, chunk.time
    n = int(ev.max()) + 1
    first, last = np.full(n, np.inf), np.full(n, -np.inf)
    np.minimum.at(first, ev, t)
    np.maximum.at(last, ev, t)
    hlc, own = ~chunk.auxiliary, ~chunk.coincident
    first_hlc, first_own_hlc = np.full(n, np.inf), np.full(n, np.inf)
    np.minimum.at(first_hlc, ev[hlc], t[hlc])
    np.minimum.at(first_own_hlc, ev[hlc & own], t[hlc & own])
    same = ev[1:] == ev[:-1]
    long_gap = same & (np.diff(t) > synth.READOUT_PRE_TRIGGER_NS + synth.READOUT_POST_TRIGGER_NS)
    k = chunk.kept
    return {
        "first": first[k],
        "last": last[k],
        "coincident": np.bincount(ev, chunk.coincident, minlength=n)[k] > 0,
        "first_hlc": first_hlc[k],
        "first_own_hlc": first_own_hlc[k],
        "gap": np.bincount(ev[1:], long_gap, minlength=n)[k] > 0,
    }


def test_coincident_muons_stretch_events_to_the_real_time_scale(
    candidates: list[synth._Chunk],
) -> None:
    per = [_per_event(c) for c in candidates]
    s = {key: np.concatenate([p[key] for p in per]) for key in per[0]}
    n = s["last"].shape[0]
    assert n > 2_500
    # ~7% of the events hold pulses of a coincident muon (at most the share with >= 1 muon).
    share = s["coincident"].mean()
    mean_muons = synth.COINCIDENT_MUON_RATE_HZ * 1e-9 * 2 * synth.COINCIDENCE_WINDOW_NS
    assert 0.05 <= share <= 0.10 < 1 - np.exp(-mean_muons), share
    # Times count from the event's first trigger: nothing before its readout opens; the largest
    # raw times come from muons at the ends of the window, no later than two windows on.
    opens = synth.TRIGGER_TIME_NS - synth.READOUT_PRE_TRIGGER_NS
    assert opens <= s["first"].min() <= opens + 10
    bound = synth.TRIGGER_TIME_NS + 2 * synth.COINCIDENCE_WINDOW_NS + synth.READOUT_POST_TRIGGER_NS
    assert s["last"].max() <= bound + 5_000
    # ~1% of the events reach beyond 40 us, all of them through a coincident muon (without
    # one, an event ends before ~30 us: its trigger plus late light and afterpulses that keep
    # triggering bright events, plus the 6 us post-trigger readout).
    late = s["last"] > 40_000
    assert 0.006 <= late.mean() <= 0.025, late.mean()
    assert s["coincident"][late].all()
    assert s["last"][~s["coincident"]].max() < 35_000
    # Where a muon triggered first, the neutrino's own light comes microseconds later.
    late_own = s["first_own_hlc"] > synth.TRIGGER_TIME_NS + 5_000
    assert 0.01 <= late_own.mean() <= 0.05, late_own.mean()
    assert s["coincident"][late_own].all()
    assert np.all(s["first_hlc"][late_own] < s["first_own_hlc"][late_own])
    # A muon far from the neutrino is read out in a window of its own: a gap with no pulses.
    assert 0.005 <= s["gap"].mean() <= 0.04 and s["coincident"][s["gap"]].all()


def test_simulation_is_a_function_of_the_generator_state() -> None:
    det = synth._detector(make_geometry())
    a = synth._simulate_candidates(np.random.default_rng(9), det, 512)
    b = synth._simulate_candidates(np.random.default_rng(9), det, 512)
    for field in synth._Chunk.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.coincident.any()  # the comparison covers coincident-muon pulses too
