"""Tests for iceaggr.data.linefit: exact tracks, outliers, degenerate events, synthetic score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from iceaggr.data.linefit import (
    FALLBACK_DIRECTION,
    angular_error,
    line_fit,
    line_fit_dataset,
    select_hits,
)
from iceaggr.data.synth import write_synthetic_dataset

C_M_PER_NS = 0.299792458


def direction(az: np.ndarray, zen: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(az) * np.sin(zen), np.sin(az) * np.sin(zen), np.cos(zen)], axis=-1)


def straight_tracks(
    rng: np.random.Generator, n_hits: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hits exactly on light-speed muon lines; the muon travels along -v(az, zen)."""
    n = n_hits.shape[0]
    az = rng.uniform(0, 2 * np.pi, n)
    zen = np.arccos(rng.uniform(-1, 1, n))
    travel = -direction(az, zen)  # (n, 3)
    anchor = rng.uniform(-300, 300, (n, 3))
    ev = np.repeat(np.arange(n), n_hits)
    t = rng.uniform(-2_000, 2_000, ev.shape[0])  # ns
    xyz = anchor[ev] + C_M_PER_NS * t[:, None] * travel[ev]
    cu = np.concatenate([[0], np.cumsum(n_hits)])
    return t + 10_000.0, xyz, cu, az, zen


def test_recovers_exact_straight_tracks() -> None:
    rng = np.random.default_rng(0)
    n_hits = rng.integers(2, 40, 200)
    t, xyz, cu, az, zen = straight_tracks(rng, n_hits)
    az_fit, zen_fit = line_fit(t, xyz, None, cu)
    err = angular_error(az, zen, az_fit, zen_fit)
    assert err.max() < 0.05
    assert np.all((az_fit >= 0) & (az_fit < 2 * np.pi)) and np.all(
        (zen_fit >= 0) & (zen_fit <= np.pi)
    )


def test_vectorized_equals_per_event() -> None:
    rng = np.random.default_rng(1)
    n_hits = rng.integers(3, 30, 25)
    t, xyz, cu, _, _ = straight_tracks(rng, n_hits)
    t = t + rng.normal(0, 200, t.shape)  # noisy, so the Huber refits matter
    charge = rng.uniform(0.2, 5, t.shape)
    az, zen = line_fit(t, xyz, charge, cu, charge_weighted=True)
    for e in range(n_hits.shape[0]):
        sl = slice(cu[e], cu[e + 1])
        a1, z1 = line_fit(
            t[sl], xyz[sl], charge[sl], np.array([0, n_hits[e]]), charge_weighted=True
        )
        assert a1[0] == pytest.approx(az[e], abs=1e-9) and z1[0] == pytest.approx(zen[e], abs=1e-9)


def test_huber_refits_resist_an_outlier() -> None:
    rng = np.random.default_rng(2)
    t, xyz, cu, az, zen = straight_tracks(rng, np.full(50, 20))
    # One late, far-away hit per event (scattered light or noise).
    xyz[cu[:-1]] += rng.normal(0, 1, (50, 3)) * 600.0
    plain = angular_error(az, zen, *line_fit(t, xyz, None, cu, iterations=0))
    improved = angular_error(az, zen, *line_fit(t, xyz, None, cu))
    assert improved.mean() < 0.5 * plain.mean()
    assert np.median(improved) < 0.05


def test_degenerate_events_are_finite() -> None:
    xyz = np.array([[0.0, 0, 0], [10, 0, 0], [0, 20, 0], [5, 5, 5], [1, 2, 3]])
    t = np.array([100.0, 100, 100, 50, 0])
    cu = np.array([0, 3, 3, 4, 5])  # same-time hits; no hits; one hit; one hit
    az, zen = line_fit(t, xyz, None, cu)
    assert np.all(np.isfinite(az)) and np.all(np.isfinite(zen))
    np.testing.assert_array_equal(az, FALLBACK_DIRECTION[0])
    np.testing.assert_array_equal(zen, FALLBACK_DIRECTION[1])


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="xyz_m must be"):
        line_fit(np.zeros(3), np.zeros((3, 2)), None, np.array([0, 3]))
    with pytest.raises(ValueError, match="last offset must equal"):
        line_fit(np.zeros(3), np.zeros((3, 3)), None, np.array([0, 2]))
    with pytest.raises(ValueError, match="charge_weighted"):
        line_fit(np.zeros(3), np.zeros((3, 3)), None, np.array([0, 3]), charge_weighted=True)


def test_angular_error_known_values() -> None:
    az = np.array([0.0, 0.0, 0.0, 1.0, 2 * np.pi - 1e-3])
    zen = np.array([0.5, np.pi / 2, 0.0, 1.0, np.pi / 2])
    az_p = np.array([0.0, np.pi, 0.0, 1.0 + np.pi, 1e-3])
    zen_p = np.array([0.5, np.pi / 2, np.pi / 2, np.pi - 1.0, np.pi / 2])
    err = angular_error(az, zen, az_p, zen_p)
    np.testing.assert_allclose(err, [0.0, np.pi, np.pi / 2, np.pi, 2e-3], atol=1e-6)


def test_select_hits_first_pulse_per_dom_prefers_hlc() -> None:
    # Event 0: DOM 5 twice (HLC), DOM 6 (HLC), DOM 7 (HLC), DOM 9 (aux) -> 3 HLC DOMs, aux dropped.
    # Event 1: two aux DOMs only -> kept (fewer than 3 HLC DOMs).
    sensor = np.array([5, 6, 5, 7, 9, 1, 2])
    aux = np.array([False, False, False, False, True, True, True])
    rows, cu = select_hits(sensor, aux, np.array([0, 5, 7]))
    np.testing.assert_array_equal(rows, [0, 1, 3, 5, 6])
    np.testing.assert_array_equal(cu, [0, 3, 5])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("linefit") / "data"
    return write_synthetic_dataset(out, 3_000, batch_size=1_000, seed=3, progress=False)


def test_score_on_synthetic_events(synthetic: Path) -> None:
    """Better than random (1.571 rad), but not far better than on real data (~1.18-1.21 rad)."""
    res = line_fit_dataset(synthetic)
    assert res["n_events"] == 3_000
    assert 0.9 < res["mean_angular_error"] < 1.45, res
    assert res["random_baseline"] == pytest.approx(np.pi / 2)
    part = line_fit_dataset(synthetic, max_events=500)
    assert part["n_events"] == 500


def test_dataset_errors(tmp_path: Path, synthetic: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a Kaggle-layout dataset"):
        line_fit_dataset(tmp_path)
    with pytest.raises(ValueError, match="max_events must be >= 1"):
        line_fit_dataset(synthetic, max_events=0)


# ------------------------------------------- the same fit on a packed batch (the model's prior)


def test_line_fits_of_a_loader_batch_equal_the_baseline(synthetic: Path) -> None:
    """The loader's fit of each whole event (``DomBatch.line_fit``) is the baseline's fit, and
    ``iceaggr.models.line_fit`` on the packed batch is too on every event that the loader did not
    truncate (float32 times and positions in the batch: < 1e-3 rad); the synthetic events carry
    auxiliary pulses, so the HLC rule is exercised."""
    import pandas as pd
    import torch

    from iceaggr.data.dataset import KaggleDataset
    from iceaggr.data.loader import EventLoader, Truncation
    from iceaggr.models.line_fit import line_fit_direction

    trunc = Truncation(max_pulses_per_event=400)  # a few events truncated
    args = dict(dataset=KaggleDataset(synthetic), batch_ids=[2], shuffle=False, prefetch=0)
    loader = EventLoader(batch_size=1_000, truncation=trunc, line_fit=True, **args)
    (batch,) = list(loader.iter_epoch(0))
    assert batch.line_fit is not None and batch.line_fit.shape == (1_000, 3)
    assert next(iter(EventLoader(batch_size=500, **args).iter_epoch(0))).line_fit is None
    # A batch spanning two files is joined from two parts; the fits follow their events.
    spanning = list(
        EventLoader(batch_size=700, line_fit=True, **{**args, "batch_ids": [1, 2]}).iter_epoch(0)
    )[1]
    assert spanning.line_fit is not None
    from_2 = np.isin(spanning.event_id.numpy(), batch.event_id.numpy())
    assert 0 < from_2.sum() < len(from_2)
    torch.testing.assert_close(spanning.line_fit[from_2], batch.line_fit[: int(from_2.sum())])

    meta = pd.read_parquet(synthetic / "train_meta.parquet")
    meta = meta[meta["batch_id"] == 2].sort_values("first_pulse_index")
    np.testing.assert_array_equal(meta["event_id"].to_numpy(), batch.event_id.numpy())
    pulses = pd.read_parquet(synthetic / "train" / "batch_2.parquet")
    geo = pd.read_csv(synthetic / "sensor_geometry.csv").set_index("sensor_id")
    first, last = meta["first_pulse_index"].to_numpy(), meta["last_pulse_index"].to_numpy()
    take = np.concatenate([np.arange(f, g + 1) for f, g in zip(first, last, strict=True)])
    cu = np.concatenate([[0], np.cumsum(last - first + 1)])
    sid = pulses["sensor_id"].to_numpy()[take].astype(np.int64)
    rows, cu_sel = select_hits(sid, pulses["auxiliary"].to_numpy()[take], cu)
    az, zen = line_fit(
        pulses["time"].to_numpy(np.float64)[take][rows],
        geo.loc[sid[rows], ["x", "y", "z"]].to_numpy(np.float64),
        None,
        cu_sel,
    )
    want = direction(az, zen)

    def angle(got: np.ndarray) -> np.ndarray:
        return np.arccos(np.clip(np.sum(want * got, axis=1), -1.0, 1.0))

    # Every event, truncated ones too (the loader holds positions in float32).
    np.testing.assert_allclose(batch.line_fit.double().numpy(), want, rtol=0, atol=2e-5)
    packed = angle(line_fit_direction(batch).double().numpy())
    whole = (batch.n_pulses_raw <= trunc.max_pulses_per_event).numpy()
    assert 0 < (~whole).sum() < 0.1 * len(whole)
    assert packed[whole].max() < 1e-3, packed[whole].max()
    assert packed[~whole].max() > 1e-2  # truncation changed the hits the packed fit sees
