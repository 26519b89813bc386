"""Tests for iceaggr.data.dataset: the Kaggle-layout reader accepts good folders, refuses bad ones.

Every malformed case is a real file: a small synthetic dataset is written once per module, each
test copies it and rewrites one file (pandas/pyarrow, or raw bytes for corruption), then checks
that the :class:`DatasetError` names the file and the column or value at fault.

Run: ``.venv/bin/python -m pytest tests/test_dataset.py -q``
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import REFERENCE_GEOMETRY

from iceaggr.data.dataset import (
    GEOMETRY_FILE,
    META_FILE,
    DatasetError,
    KaggleDataset,
    read_geometry,
    split_batch_ids,
)
from iceaggr.data.synth import write_synthetic_dataset

N_EVENTS = 900
FILE_EVENTS = 300  # -> batch_1, batch_2, batch_3
NUM_SENSORS = 5160


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "data"
    return write_synthetic_dataset(out, N_EVENTS, batch_size=FILE_EVENTS, seed=3, progress=False)


@pytest.fixture
def data(clean: Path, tmp_path: Path) -> Path:
    """A private copy of the clean dataset that a test may break."""
    return Path(shutil.copytree(clean, tmp_path / "data"))


def batch_path(root: Path, batch_id: int) -> Path:
    return root / "train" / f"batch_{batch_id}.parquet"


def rewrite_batch(root: Path, batch_id: int, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    """Read a batch file with pandas, apply ``edit``, write it back (event_id stays the index)."""
    path = batch_path(root, batch_id)
    df = pd.read_parquet(path)
    edit(df.copy()).to_parquet(path)
    return path


def rewrite_meta(root: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    path = root / META_FILE
    edit(pd.read_parquet(path)).to_parquet(path, index=False)
    return path


def meta_of(root: Path, batch_id: int) -> pd.DataFrame:
    meta = pd.read_parquet(root / META_FILE)
    return meta[meta["batch_id"] == batch_id].reset_index(drop=True)


def names(path: Path, *parts: str) -> str:
    """A regex requiring the path, then each part (escaped), in this order (across newlines)."""
    return "(?s)" + ".*".join(re.escape(p) for p in (str(path), *parts))


# --- a good dataset ------------------------------------------------------------------------------
def test_reads_synthetic_dataset(clean: Path) -> None:
    ds = KaggleDataset(clean)
    assert ds.batch_ids == [1, 2, 3]
    assert ds.has_angles
    assert ds.geometry.shape == (NUM_SENSORS, 3)
    assert ds.geometry.dtype == np.float32
    geo = pd.read_csv(clean / GEOMETRY_FILE)
    np.testing.assert_allclose(ds.geometry, geo[["x", "y", "z"]].to_numpy(), atol=1e-4)

    n_seen = 0
    for b in ds.batch_ids:
        part = ds.read_batch(b)
        raw = pd.read_parquet(batch_path(clean, b))
        meta = meta_of(clean, b)
        assert part.batch_id == b
        assert part.sensor_id.dtype == np.int16
        assert part.time.dtype == np.int64
        assert part.charge.dtype == np.float64
        assert part.auxiliary.dtype == np.bool_
        for arr in (part.event_id, part.first_pulse_index, part.last_pulse_index):
            assert arr.dtype == np.int64
        assert part.azimuth is not None and part.zenith is not None
        assert part.azimuth.dtype == part.zenith.dtype == np.float64
        assert part.num_events == len(meta) == ds.num_events(b)
        assert part.num_pulses == len(raw)
        # Consistent indices: events tile the file, and every row belongs to its metadata event.
        assert part.first_pulse_index[0] == 0
        assert part.last_pulse_index[-1] == part.num_pulses - 1
        np.testing.assert_array_equal(part.first_pulse_index[1:], part.last_pulse_index[:-1] + 1)
        counts = part.last_pulse_index - part.first_pulse_index + 1
        np.testing.assert_array_equal(np.repeat(part.event_id, counts), raw.index.to_numpy())
        # Values are the file's values and the metadata's values.
        np.testing.assert_array_equal(part.sensor_id, raw["sensor_id"].to_numpy())
        np.testing.assert_array_equal(part.time, raw["time"].to_numpy())
        np.testing.assert_array_equal(part.charge, raw["charge"].to_numpy())
        np.testing.assert_array_equal(part.auxiliary, raw["auxiliary"].to_numpy())
        np.testing.assert_array_equal(part.event_id, meta["event_id"].to_numpy())
        np.testing.assert_array_equal(part.azimuth, meta["azimuth"].to_numpy())
        np.testing.assert_array_equal(part.zenith, meta["zenith"].to_numpy())
        n_seen += part.num_events
    assert n_seen == N_EVENTS


def test_metadata_without_angles(data: Path) -> None:
    """Test metadata (no azimuth/zenith) is valid; the angles come back as None."""
    rewrite_meta(data, lambda m: m.drop(columns=["azimuth", "zenith"]))
    ds = KaggleDataset(data)
    assert not ds.has_angles
    part = ds.read_batch(2)
    assert part.azimuth is None and part.zenith is None
    assert part.num_events == FILE_EVENTS


# --- the folder ----------------------------------------------------------------------------------
def test_missing_folder(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=names(root, "does not exist", "iceaggr synth")):
        KaggleDataset(root)


def test_missing_geometry(data: Path) -> None:
    (data / GEOMETRY_FILE).unlink()
    with pytest.raises(DatasetError, match=names(data / GEOMETRY_FILE, "missing file")):
        KaggleDataset(data)


def test_missing_meta(data: Path) -> None:
    (data / META_FILE).unlink()
    with pytest.raises(DatasetError, match=names(data / META_FILE, "missing file")):
        KaggleDataset(data)


def test_missing_batch_folder(data: Path) -> None:
    shutil.rmtree(data / "train")
    with pytest.raises(DatasetError, match=names(data / "train", "missing folder")):
        KaggleDataset(data)


def test_metadata_listing_a_missing_batch_file(data: Path) -> None:
    """The metadata lists batch 2 but its file is gone: its events would be lost silently."""
    batch_path(data, 2).unlink()
    with pytest.raises(
        DatasetError,
        match=names(
            data / META_FILE,
            f"lists batch_id 2 ({FILE_EVENTS:,} events)",
            f"{batch_path(data, 2)} does not exist",
            "Restore the batch file(s), or remove their rows from the metadata",
        ),
    ):
        KaggleDataset(data)
    # Without its rows in the metadata, the rest is a valid dataset.
    rewrite_meta(data, lambda m: m[m["batch_id"] != 2])
    assert 2 not in KaggleDataset(data).batch_ids


def test_no_batch_files(data: Path) -> None:
    for p in (data / "train").iterdir():
        p.rename(p.with_suffix(".bak"))
    with pytest.raises(DatasetError, match=names(data / "train", "no batch_<k>.parquet")):
        KaggleDataset(data)


def test_batch_file_without_metadata_rows(data: Path) -> None:
    shutil.copy(batch_path(data, 3), batch_path(data, 4))
    ds = KaggleDataset(data)
    assert ds.batch_ids == [1, 2, 3, 4]
    ds.read_batch(3)  # the original is fine
    with pytest.raises(
        DatasetError,
        match=names(data / META_FILE, "no rows with batch_id == 4", str(batch_path(data, 4))),
    ):
        ds.read_batch(4)


def test_unknown_batch_id(clean: Path) -> None:
    with pytest.raises(DatasetError, match=names(clean / "train", "batch_9.parquet does not")):
        KaggleDataset(clean).read_batch(9)


# --- the geometry --------------------------------------------------------------------------------
def _drop_z(g: pd.DataFrame) -> pd.DataFrame:
    return g.drop(columns=["z"])


def _swap_ids(g: pd.DataFrame) -> pd.DataFrame:
    g.loc[[3, 4], "sensor_id"] = [4, 3]
    return g


def _mm(g: pd.DataFrame) -> pd.DataFrame:
    g.loc[17, "x"] *= 1000.0  # millimetres
    return g


def _nan(g: pd.DataFrame) -> pd.DataFrame:
    g.loc[17, "y"] = np.nan
    return g


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_drop_z, "missing column(s) ['z']"),
        (_swap_ids, "column 'sensor_id' must be the integers 0..5159 in order"),
        (_mm, "column 'x' value"),
        (_nan, "column 'y' value nan at sensor_id 17"),
    ],
    ids=["missing-column", "ids-out-of-order", "millimetres", "nan"],
)
def test_bad_geometry(
    data: Path, edit: Callable[[pd.DataFrame], pd.DataFrame], expected: str
) -> None:
    path = data / GEOMETRY_FILE
    edit(pd.read_csv(path)).to_csv(path, index=False)
    with pytest.raises(DatasetError, match=names(path, expected)):
        KaggleDataset(data)


def test_reference_geometry_reads(tmp_path: Path) -> None:
    """The real IceCube-86 geometry passes ``read_geometry`` and has the DESIGN.md shape/extent."""
    if not REFERENCE_GEOMETRY.is_file():
        pytest.skip(f"real detector geometry not available at {REFERENCE_GEOMETRY}")
    path = tmp_path / GEOMETRY_FILE
    shutil.copy(REFERENCE_GEOMETRY, path)
    xyz = read_geometry(path)
    assert xyz.shape == (NUM_SENSORS, 3)
    assert xyz.dtype == np.float32
    # DESIGN.md section 3: x in about [-571, 576], y [-521, 510], z [-513, 525] metres.
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    np.testing.assert_allclose(lo, [-571.0, -521.0, -513.0], atol=2.0)
    np.testing.assert_allclose(hi, [576.0, 510.0, 525.0], atol=2.0)
    # 86 strings of 60 DOMs: each string is vertical (one x, y per 60 consecutive sensor ids).
    per_string = xyz.reshape(86, 60, 3)
    assert np.all(np.ptp(per_string[:, :, :2], axis=1) < 1.0)


# --- the metadata --------------------------------------------------------------------------------
def test_meta_wrong_dtype(data: Path) -> None:
    path = rewrite_meta(data, lambda m: m.astype({"event_id": np.float64}))
    with pytest.raises(
        DatasetError, match=names(path, "column 'event_id' has dtype double, expected int64")
    ):
        KaggleDataset(data)


@pytest.mark.parametrize(
    ("column", "value"),
    [("azimuth", 7.0), ("azimuth", -0.5), ("zenith", 3.5), ("zenith", np.nan)],
)
def test_meta_angle_out_of_range(data: Path, column: str, value: float) -> None:
    meta = pd.read_parquet(data / META_FILE)
    row = int(np.flatnonzero(meta["batch_id"].to_numpy() == 2)[7])
    event = int(meta.loc[row, "event_id"])

    def edit(m: pd.DataFrame) -> pd.DataFrame:
        m.loc[row, column] = value
        return m

    path = rewrite_meta(data, edit)
    ds = KaggleDataset(data)
    ds.read_batch(1)  # other batch files are unaffected
    with pytest.raises(
        DatasetError,
        match=names(path, f"column '{column}', batch_id 2, event_id {event}: value {value}"),
    ):
        ds.read_batch(2)


def test_meta_last_before_first(data: Path) -> None:
    meta = meta_of(data, 1)
    event = int(meta.loc[4, "event_id"])

    def edit(m: pd.DataFrame) -> pd.DataFrame:
        row = m.index[(m["batch_id"] == 1) & (m["event_id"] == event)][0]
        m.loc[row, "last_pulse_index"] = m.loc[row, "first_pulse_index"] - 1
        return m

    path = rewrite_meta(data, edit)
    with pytest.raises(
        DatasetError, match=names(path, f"event_id {event}: last_pulse_index", "< first")
    ):
        KaggleDataset(data).read_batch(1)


# --- the batch files -----------------------------------------------------------------------------
def test_missing_column(data: Path) -> None:
    path = rewrite_batch(data, 2, lambda df: df.drop(columns=["charge"]))
    ds = KaggleDataset(data)
    with pytest.raises(DatasetError, match=names(path, "missing column(s) ['charge']")):
        ds.read_batch(2)


def test_event_id_not_the_index(data: Path) -> None:
    """A file written without the ``event_id`` index is missing that column."""
    path = rewrite_batch(data, 1, lambda df: df.reset_index(drop=True))
    with pytest.raises(DatasetError, match=names(path, "missing column(s) ['event_id']")):
        KaggleDataset(data).read_batch(1)


@pytest.mark.parametrize(
    ("column", "dtype", "arrow_name", "expected"),
    [
        ("sensor_id", np.int64, "int64", "int16"),
        ("time", np.float64, "double", "int64"),
        ("time", np.int32, "int32", "int64"),
        ("charge", np.float32, "float", "double"),
        ("auxiliary", np.int8, "int8", "bool"),
    ],
)
def test_wrong_dtype(data: Path, column: str, dtype: type, arrow_name: str, expected: str) -> None:
    path = rewrite_batch(data, 3, lambda df: df.astype({column: dtype}))
    with pytest.raises(
        DatasetError,
        match=names(path, f"column '{column}' has dtype {arrow_name}, expected {expected}"),
    ):
        KaggleDataset(data).read_batch(3)


def test_event_id_not_in_metadata(data: Path) -> None:
    meta = meta_of(data, 2)
    old = int(meta.loc[10, "event_id"])
    first = int(meta.loc[10, "first_pulse_index"])
    new = 10**12

    def edit(df: pd.DataFrame) -> pd.DataFrame:
        ids = df.index.to_numpy().copy()
        ids[ids == old] = new
        df.index = pd.Index(ids, name="event_id")
        return df

    path = rewrite_batch(data, 2, edit)
    with pytest.raises(
        DatasetError,
        match=names(path, f"row {first} has event_id {new}", f"puts event {old} there"),
    ):
        KaggleDataset(data).read_batch(2)


def test_batch_file_missing_rows(data: Path) -> None:
    """The batch file lost its last row: the metadata describes one row more."""
    n = len(pd.read_parquet(batch_path(data, 1)))
    path = rewrite_batch(data, 1, lambda df: df.iloc[:-1])
    with pytest.raises(
        DatasetError, match=names(path, f"has {n - 1} rows", f"pulse rows 0..{n - 1}")
    ):
        KaggleDataset(data).read_batch(1)


def test_meta_indices_do_not_tile(data: Path) -> None:
    """One event's last_pulse_index moved by one: same row count, but the events overlap."""
    meta = meta_of(data, 1)
    event = int(meta.loc[20, "event_id"])

    def edit(m: pd.DataFrame) -> pd.DataFrame:
        row = m.index[(m["batch_id"] == 1) & (m["event_id"] == event)][0]
        m.loc[row, "last_pulse_index"] += 1
        return m

    rewrite_meta(data, edit)
    with pytest.raises(
        DatasetError, match=names(batch_path(data, 1), META_FILE, "do not tile the file")
    ):
        KaggleDataset(data).read_batch(1)


def test_meta_row_missing(data: Path) -> None:
    """One event of batch 2 has no metadata row: the described rows no longer tile the file."""
    meta = meta_of(data, 2)
    event = int(meta.loc[5, "event_id"])
    rewrite_meta(data, lambda m: m[~((m["batch_id"] == 2) & (m["event_id"] == event))])
    ds = KaggleDataset(data)
    assert ds.num_events(2) == FILE_EVENTS - 1
    with pytest.raises(DatasetError, match=names(batch_path(data, 2), "do not tile the file")):
        ds.read_batch(2)


@pytest.mark.parametrize(
    ("column", "value"),
    [("time", np.nan), ("time", np.inf), ("charge", np.nan), ("charge", np.inf)],
)
def test_non_finite(data: Path, column: str, value: float) -> None:
    row = 123

    def edit(df: pd.DataFrame) -> pd.DataFrame:
        values = df[column].to_numpy(dtype=np.float64).copy()
        values[row] = value
        df[column] = values
        return df

    path = rewrite_batch(data, 2, edit)
    with pytest.raises(
        DatasetError,
        match=names(path, f"column '{column}' has a non-finite value ({value}) at row {row}"),
    ):
        KaggleDataset(data).read_batch(2)


@pytest.mark.parametrize("value", [0.0, -1.5])
def test_charge_not_positive(data: Path, value: float) -> None:
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df.iloc[50, df.columns.get_loc("charge")] = value
        return df

    path = rewrite_batch(data, 1, edit)
    with pytest.raises(DatasetError, match=names(path, f"column 'charge' value {value} at row 50")):
        KaggleDataset(data).read_batch(1)


@pytest.mark.parametrize("value", [NUM_SENSORS, -1, 32_000])
def test_sensor_outside_geometry(data: Path, value: int) -> None:
    row = 77
    event = int(pd.read_parquet(batch_path(data, 3)).index[row])

    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df.iloc[row, df.columns.get_loc("sensor_id")] = value
        return df

    path = rewrite_batch(data, 3, edit)
    with pytest.raises(
        DatasetError,
        match=names(
            path,
            f"column 'sensor_id' value {value} at row {row} (event {event})",
            "0..5159",
            GEOMETRY_FILE,
        ),
    ):
        KaggleDataset(data).read_batch(3)


def test_time_not_ordered_within_event(data: Path) -> None:
    """Truncation keeps an event's first rows as its earliest pulses, so order is checked."""
    meta = meta_of(data, 1)
    first = int(meta.loc[3, "first_pulse_index"])
    event = int(meta.loc[3, "event_id"])

    def edit(df: pd.DataFrame) -> pd.DataFrame:
        t = df["time"].to_numpy().copy()
        t[first], t[first + 1] = t[first + 1] + 5, t[first]  # strictly decreasing now
        df["time"] = t
        return df

    path = rewrite_batch(data, 1, edit)
    with pytest.raises(
        DatasetError,
        match=names(path, f"column 'time' decreases at row {first + 1} (event {event}"),
    ):
        KaggleDataset(data).read_batch(1)


def test_time_may_drop_between_events(clean: Path) -> None:
    """Each event has its own time window: time going down at an event boundary is fine."""
    part = KaggleDataset(clean).read_batch(1)
    boundary = part.first_pulse_index[1:]
    assert np.any(part.time[boundary] < part.time[boundary - 1])


def test_truncated_parquet(data: Path) -> None:
    path = batch_path(data, 2)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    ds = KaggleDataset(data)
    with pytest.raises(DatasetError, match=names(path, "not a readable parquet file", "truncated")):
        ds.read_batch(2)


@pytest.mark.parametrize("column", ["time", "charge"])
def test_corrupt_column_chunk(data: Path, column: str) -> None:
    """Footer intact but one column's pages overwritten: still a DatasetError, not an OSError."""
    path = batch_path(data, 1)
    md = pq.ParquetFile(path).metadata
    names_in_file = [md.schema.column(i).name for i in range(md.num_columns)]
    chunk = md.row_group(0).column(names_in_file.index(column))
    start = chunk.data_page_offset
    if chunk.has_dictionary_page and chunk.dictionary_page_offset is not None:
        start = min(start, chunk.dictionary_page_offset)
    blob = bytearray(path.read_bytes())
    blob[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match=names(path, "failed to read", "the file may be")):
        KaggleDataset(data).read_batch(1)


# --- train/validation split ----------------------------------------------------------------------
@pytest.mark.parametrize("val_files", [0, 1, 2, 5])
def test_split_batch_ids(val_files: int) -> None:
    ids = [7, 1, 3, 12, 5, 9]
    train, val = split_batch_ids(ids, val_files)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(ids)
    assert len(val) == val_files
    assert len(train) == len(ids) - val_files >= 1
    assert val == sorted(ids)[len(ids) - val_files :]  # the last files validate


@pytest.mark.parametrize("val_files", [6, 7])
def test_split_leaves_no_training_file(val_files: int) -> None:
    with pytest.raises(
        DatasetError, match=f"val_files={val_files} leaves no training file among 6 batch files"
    ):
        split_batch_ids([1, 2, 3, 4, 5, 6], val_files)


def test_split_negative() -> None:
    with pytest.raises(ValueError, match="val_files must be >= 0, got -1"):
        split_batch_ids([1, 2, 3], -1)


def test_preflight_checks_every_file_cheaply(data: Path) -> None:
    ds = KaggleDataset(data)
    assert ds.preflight() == sum(
        pq.ParquetFile(batch_path(data, b)).metadata.num_rows for b in ds.batch_ids
    )
    path = rewrite_batch(data, 3, lambda df: df.iloc[:-5])
    with pytest.raises(DatasetError, match=names(path, "rows", "describes")):
        KaggleDataset(data).preflight()
