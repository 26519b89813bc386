"""Tests for iceaggr.data.geometry: the IceCube-86-like detector built from named constants."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import REFERENCE_GEOMETRY

from iceaggr.data.geometry import (
    DOMS_PER_STRING,
    NUM_SENSORS,
    NUM_STANDARD_STRINGS,
    NUM_STRINGS,
    make_geometry,
)


@pytest.fixture(scope="module")
def geo() -> pd.DataFrame:
    return make_geometry()


def string_xy(geo: pd.DataFrame) -> np.ndarray:
    return geo[["x", "y"]].to_numpy()[::DOMS_PER_STRING]  # (86, 2)


def test_schema_and_ids(geo: pd.DataFrame) -> None:
    assert list(geo.columns) == ["sensor_id", "x", "y", "z"]
    assert geo.shape == (NUM_SENSORS, 4) == (5160, 4)
    assert geo["sensor_id"].dtype == np.int64
    assert all(geo[c].dtype == np.float64 for c in "xyz")
    np.testing.assert_array_equal(geo["sensor_id"], np.arange(5160))


def test_strings_are_vertical_with_dom_1_on_top(geo: pd.DataFrame) -> None:
    xyz = geo[["x", "y", "z"]].to_numpy().reshape(NUM_STRINGS, DOMS_PER_STRING, 3)
    assert np.all(xyz[:, :, :2] == xyz[:, :1, :2])  # one (x, y) per string
    assert np.all(np.diff(xyz[:, :, 2], axis=1) < 0)  # z falls from DOM 1 down
    assert len(np.unique(string_xy(geo), axis=0)) == NUM_STRINGS


def test_vertical_spacing(geo: pd.DataFrame) -> None:
    z = geo["z"].to_numpy().reshape(NUM_STRINGS, DOMS_PER_STRING)
    standard = np.diff(z[:NUM_STANDARD_STRINGS], axis=1)
    np.testing.assert_allclose(standard, -17.0, atol=0.02)
    assert z[:NUM_STANDARD_STRINGS, 0].max() <= 500.0
    assert z[:NUM_STANDARD_STRINGS, -1].min() >= -505.0
    # DeepCore: 7 m apart in the clear deep ice below the dust layer.
    deep = np.diff(z[NUM_STANDARD_STRINGS:, 10:], axis=1)
    np.testing.assert_allclose(deep, -7.0, atol=0.02)
    assert np.all(z[NUM_STANDARD_STRINGS:, 10:] < -150.0)


def test_triangular_grid_spacing(geo: pd.DataFrame) -> None:
    xy = string_xy(geo)[:NUM_STANDARD_STRINGS]
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.min(axis=1)
    np.testing.assert_allclose(nearest, 125.0, atol=0.1)
    # Interior strings of a triangular lattice have six neighbours at the spacing.
    n_neighbours = (dist < 126.0).sum(axis=1)
    assert n_neighbours.max() == 6
    assert (n_neighbours == 6).sum() >= 40


def test_deepcore_is_denser_and_central(geo: pd.DataFrame) -> None:
    xy = string_xy(geo)
    deepcore = xy[NUM_STANDARD_STRINGS:]
    centre = xy[35]  # string 36
    r = np.linalg.norm(deepcore - centre, axis=1)
    assert np.all((r > 35.0) & (r < 80.0))
    d = np.linalg.norm(xy[:, None] - deepcore[None], axis=-1)
    d[NUM_STANDARD_STRINGS + np.arange(8), np.arange(8)] = np.inf
    assert np.all(d.min(axis=0) < 80.0)  # every DeepCore string has a neighbour closer than 80 m


def test_extent_like_icecube(geo: pd.DataFrame) -> None:
    # Real detector: x in about [-571, 576], y in [-521, 510] (DESIGN.md section 3).
    assert -590 < geo["x"].min() < -550 and 560 < geo["x"].max() < 600
    assert -540 < geo["y"].min() < -500 and 490 < geo["y"].max() < 530
    assert abs(geo["x"].mean()) < 30 and abs(geo["y"].mean()) < 30


def test_matches_reference_geometry(geo: pd.DataFrame) -> None:
    """Compare with the real IceCube-86 positions (development workspace only)."""
    if not REFERENCE_GEOMETRY.is_file():
        pytest.skip(
            f"reference geometry {REFERENCE_GEOMETRY} not present (it is development-only "
            "material, not shipped with the package)"
        )
    ref = pd.read_csv(REFERENCE_GEOMETRY)
    assert ref.shape == geo.shape
    d_xy = np.linalg.norm(string_xy(geo) - string_xy(ref), axis=1)
    assert np.median(d_xy) < 3.0  # the lattice reproduces the real strings
    assert d_xy.max() < 35.0  # the few irregular real strings are off by tens of metres at most
    d_z = np.abs(geo["z"].to_numpy() - ref["z"].to_numpy())
    assert np.median(d_z) < 5.0 and d_z.max() < 30.0
    for col in "xyz":
        assert abs(geo[col].min() - ref[col].min()) < 15.0
        assert abs(geo[col].max() - ref[col].max()) < 30.0
