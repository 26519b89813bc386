"""Reader for the Kaggle "IceCube - Neutrinos in Deep Ice" layout, with validation.

A dataset is a folder holding ``sensor_geometry.csv``, ``train_meta.parquet`` and
``train/batch_<k>.parquet`` (see DESIGN.md section 3). This module opens such a
folder, checks it, and reads one batch file at a time as numpy arrays:

    ds = KaggleDataset("data/synthetic")
    part = ds.read_batch(ds.batch_ids[0])   # BatchFile: pulses + per-event metadata

Every problem is reported as a :class:`DatasetError` whose message names the
file, the column and the offending value and says what to do. Nothing is
silently dropped: a batch file either validates completely or is refused.

The folder may be a URI, ``s3://bucket/prefix`` (:mod:`iceaggr.data.remote`). Opening reads
``sensor_geometry.csv``, fetches ``train_meta.parquet`` into this node's
:class:`~iceaggr.data.cache.FileCache` (once per node; every reader needs its rows) and lists
``train/``; :meth:`KaggleDataset.preflight` reads each batch file's footer with ranged
requests; :meth:`KaggleDataset.read_batch` fetches the batch file it reads into the cache
(once per node). Errors name the ``s3://`` object as they name a file of a folder.

The metadata of the real competition (132M rows) is never loaded whole: only
the rows of the batch files in use are read, with a pyarrow filter on
``batch_id``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iceaggr.data.cache import FileCache
from iceaggr.data.remote import DataPath, UriPath, data_path

log = logging.getLogger(__name__)

GEOMETRY_FILE = "sensor_geometry.csv"
META_FILE = "train_meta.parquet"
BATCH_DIR = "train"
_BATCH_RE = re.compile(r"^batch_(\d+)\.parquet$")

GEOMETRY_COLUMNS = ("sensor_id", "x", "y", "z")
# Expected arrow types of the competition files (written by pandas).
META_SCHEMA: dict[str, pa.DataType] = {
    "batch_id": pa.int64(),
    "event_id": pa.int64(),
    "first_pulse_index": pa.int64(),
    "last_pulse_index": pa.int64(),
    "azimuth": pa.float64(),
    "zenith": pa.float64(),
}
PULSE_SCHEMA: dict[str, pa.DataType] = {
    "event_id": pa.int64(),  # the pandas index
    "sensor_id": pa.int16(),
    "time": pa.int64(),
    "charge": pa.float64(),
    "auxiliary": pa.bool_(),
}
# A geometry coordinate beyond this is not IceCube in metres (the detector spans ~+-600 m).
MAX_ABS_COORDINATE_M = 5_000.0


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used, with what to do about it."""


@dataclass
class BatchFile:
    """One validated ``train/batch_<k>.parquet`` with its metadata rows, as numpy arrays."""

    batch_id: int
    path: DataPath
    sensor_id: np.ndarray  # (P,) int16
    time: np.ndarray  # (P,) int64, ns
    charge: np.ndarray  # (P,) float64, p.e.
    auxiliary: np.ndarray  # (P,) bool
    event_id: np.ndarray  # (E,) int64
    first_pulse_index: np.ndarray  # (E,) int64, inclusive row position
    last_pulse_index: np.ndarray  # (E,) int64, inclusive row position
    azimuth: np.ndarray | None  # (E,) float64 rad, None for test metadata
    zenith: np.ndarray | None  # (E,) float64 rad

    @property
    def num_events(self) -> int:
        return int(self.event_id.shape[0])

    @property
    def num_pulses(self) -> int:
        return int(self.time.shape[0])


def _check_columns(path: DataPath, schema: pa.Schema, expected: dict[str, pa.DataType]) -> None:
    names = set(schema.names)
    missing = [c for c in expected if c not in names]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {missing}; found {schema.names}. "
            f"A Kaggle-layout file needs {list(expected)}."
        )
    for name, dtype in expected.items():
        actual = schema.field(name).type
        if actual != dtype:
            raise DatasetError(
                f"{path}: column '{name}' has dtype {actual}, expected {dtype}. "
                f"Rewrite the file with '{name}' cast to {dtype} (as in the competition files)."
            )


def _open_parquet(path: DataPath, local: Path | None = None) -> pq.ParquetFile:
    """Open a batch file (reads its footer; from ``local``, a cached copy, when given); a
    cut-off or corrupt file is a DatasetError."""
    try:
        if local is None and isinstance(path, UriPath):
            return pq.ParquetFile(path.open_input_file())
        return pq.ParquetFile(local if local is not None else path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(
            f"{path}: not a readable parquet file ({err}). It may be truncated or corrupt; "
            f"re-download or regenerate it."
        ) from err


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_finite_floats(path: DataPath, pf: pq.ParquetFile) -> None:
    """Non-finite time or charge values, reported before dtypes (a float column full of NaN
    is the more specific problem)."""
    schema = pf.schema_arrow
    for col in ("time", "charge"):
        if col in schema.names and pa.types.is_floating(schema.field(col).type):
            try:
                values = pf.read(columns=[col]).column(col).to_numpy()
            except (pa.ArrowInvalid, OSError) as err:
                raise DatasetError(
                    f"{path}: failed to read column '{col}' ({err}); the file may be corrupt."
                ) from err
            bad = ~np.isfinite(values)
            if np.any(bad):
                i = _first_bad(bad)
                raise DatasetError(
                    f"{path}: column '{col}' has a non-finite value ({values[i]}) at row {i} "
                    f"({int(bad.sum())} such rows). Fix the file or drop those events."
                )


class KaggleDataset:
    """A validated Kaggle-layout dataset folder.

    Opening checks the folder, the geometry and the metadata schema; each batch
    file is checked in full when it is read (:meth:`read_batch`). ``root`` may be an
    ``s3://`` URI; ``cache`` is where its files are kept on this node (default:
    :class:`~iceaggr.data.cache.FileCache`'s folder and limit; unused for a folder).
    """

    def __init__(
        self, root: str | Path | UriPath, split: str = "train", cache: FileCache | None = None
    ) -> None:
        self.root = data_path(root)
        self.split = split
        self.cache = (cache or FileCache()) if isinstance(self.root, UriPath) else None
        if not self.root.is_dir():
            make = (
                f"Upload one with `aws s3 sync <folder> {self.root}`"
                if isinstance(self.root, UriPath)
                else f"Create one with `iceaggr synth --out {self.root} --events 50000`"
            )
            raise DatasetError(
                f"{self.root}: dataset folder does not exist. {make} or point to the Kaggle data."
            )
        self.geometry = read_geometry(self.root / GEOMETRY_FILE)
        self.meta_path = self.root / f"{split}_meta.parquet"
        if not self.meta_path.is_file():
            raise DatasetError(
                f"{self.meta_path}: missing file; a dataset needs {split}_meta.parquet."
            )
        self._meta_source = self._local(self.meta_path)  # a URI's file: fetched once, here
        meta_schema = pq.read_schema(self._meta_source)
        expected = dict(META_SCHEMA)
        self.has_angles = "azimuth" in meta_schema.names or "zenith" in meta_schema.names
        if not self.has_angles:
            expected.pop("azimuth")
            expected.pop("zenith")
        _check_columns(self.meta_path, meta_schema, expected)
        self.batch_dir = self.root / split
        if not self.batch_dir.is_dir():
            raise DatasetError(f"{self.batch_dir}: missing folder of batch_<k>.parquet files.")
        found = {}
        for p in self.batch_dir.iterdir():
            m = _BATCH_RE.match(p.name)
            if m:
                found[int(m.group(1))] = p
        if not found:
            raise DatasetError(f"{self.batch_dir}: no batch_<k>.parquet files found.")
        self.batch_ids: list[int] = sorted(found)
        self._paths = found
        self._meta_cache: dict[int, dict[str, np.ndarray]] = {}
        self._check_listed_files()

    def _check_listed_files(self) -> None:
        """Every batch id the metadata lists has its batch file: otherwise its events would
        be lost without a word. Reads only the ``batch_id`` column, one row group at a time."""
        listed: dict[int, int] = {}
        meta = pq.ParquetFile(self._meta_source)
        for chunk in meta.iter_batches(columns=["batch_id"], batch_size=1 << 20):
            ids, counts = np.unique(chunk.column(0).to_numpy(), return_counts=True)
            for b, n in zip(ids.tolist(), counts.tolist(), strict=True):
                listed[b] = listed.get(b, 0) + n
        missing = sorted(set(listed) - set(self._paths))
        if missing:
            b = missing[0]
            more = f" (and {len(missing) - 1} more batch ids: {missing[1:6]}" + (
                "...)" if len(missing) > 6 else ")"
            ) if len(missing) > 1 else ""  # fmt: skip
            raise DatasetError(
                f"{self.meta_path}: lists batch_id {b} ({listed[b]:,} events), but "
                f"{self.batch_dir / f'batch_{b}.parquet'} does not exist{more}: those events "
                "would be lost. Restore the batch file(s), or remove their rows from the metadata."
            )

    def _local(self, path: DataPath) -> Path:
        """``path`` itself, or for a URI its copy in this node's cache (fetched once)."""
        if isinstance(path, UriPath):
            assert self.cache is not None  # set for every URI root
            try:
                return self.cache.fetch(path)
            except OSError as err:
                raise DatasetError(
                    f"{path}: could not fetch it ({err}); check the URI, the "
                    "credentials and the endpoint (AWS_ENDPOINT_URL)"
                ) from err
        return path

    @property
    def num_sensors(self) -> int:
        return int(self.geometry.shape[0])

    def batch_path(self, batch_id: int) -> DataPath:
        if batch_id not in self._paths:
            raise DatasetError(
                f"{self.batch_dir}: batch_{batch_id}.parquet does not exist; "
                f"available batch ids: {self.batch_ids[:10]}"
                f"{'...' if len(self.batch_ids) > 10 else ''}"
            )
        return self._paths[batch_id]

    def load_meta(self, batch_ids: list[int]) -> None:
        """Read (and cache) the metadata rows of ``batch_ids`` with one filtered scan."""
        todo = [b for b in batch_ids if b not in self._meta_cache]
        if not todo:
            return
        columns = list(META_SCHEMA) if self.has_angles else list(META_SCHEMA)[:4]
        table = pq.read_table(
            self._meta_source, columns=columns, filters=[("batch_id", "in", todo)]
        )
        batch_col = table.column("batch_id").to_numpy()
        order = np.argsort(batch_col, kind="stable")
        sorted_ids = batch_col[order]
        arrays = {c: table.column(c).to_numpy()[order] for c in columns}
        for b in todo:
            lo, hi = np.searchsorted(sorted_ids, [b, b + 1])
            if hi == lo:
                raise DatasetError(
                    f"{self.meta_path}: no rows with batch_id == {b}, but "
                    f"{self.batch_path(b)} exists. Regenerate the metadata or remove the file."
                )
            self._meta_cache[b] = {c: arrays[c][lo:hi] for c in columns}

    def meta(self, batch_id: int) -> dict[str, np.ndarray]:
        """Metadata rows of one batch file (validated for value sanity)."""
        self.load_meta([batch_id])
        m = self._meta_cache[batch_id]
        if "checked" not in m:
            self._check_meta(batch_id, m)
            m["checked"] = np.ones(1, dtype=bool)
        return m

    def num_events(self, batch_id: int) -> int:
        self.load_meta([batch_id])
        return int(self._meta_cache[batch_id]["event_id"].shape[0])

    def _check_meta(self, batch_id: int, m: dict[str, np.ndarray]) -> None:
        path = self.meta_path
        first, last = m["first_pulse_index"], m["last_pulse_index"]
        if np.any(last < first):
            i = _first_bad(last < first)
            raise DatasetError(
                f"{path}: batch_id {batch_id}, event_id {m['event_id'][i]}: last_pulse_index "
                f"{last[i]} < first_pulse_index {first[i]}. The metadata is corrupt; regenerate it."
            )
        if self.has_angles:
            for col, hi in (("azimuth", 2 * np.pi), ("zenith", np.pi)):
                v = m[col]
                bad = ~np.isfinite(v) | (v < 0) | (v > hi + 1e-9)
                if np.any(bad):
                    i = _first_bad(bad)
                    raise DatasetError(
                        f"{path}: column '{col}', batch_id {batch_id}, "
                        f"event_id {m['event_id'][i]}: "
                        f"value {v[i]} outside [0, {hi:.4f}] rad. Fix or drop that event."
                    )

    def preflight(self, batch_ids: list[int] | None = None) -> int:
        """Cheap checks of every batch file before a long job: readable footer, columns and
        dtypes, row count matching the metadata. Returns the number of pulses in them.

        Values (NaN, sensor ids, time order) are checked when a file is read in full.
        """
        ids = self.batch_ids if batch_ids is None else batch_ids
        self.load_meta(ids)
        total = 0
        for b in ids:
            path = self.batch_path(b)
            meta = self.meta(b)
            pf = _open_parquet(path)
            _check_columns(path, pf.schema_arrow, PULSE_SCHEMA)
            rows, expected = pf.metadata.num_rows, int(meta["last_pulse_index"][-1]) + 1
            if rows != expected:
                raise DatasetError(
                    f"{path}: has {rows} rows but {self.meta_path} (batch_id {b}) describes "
                    f"{expected}. The metadata and the batch file disagree; regenerate one."
                )
            total += rows
        return total

    def _check_sensor_and_charge(self, path: DataPath, cols: dict[str, np.ndarray]) -> None:
        """Sensor ids inside the geometry and positive finite charges, or an error naming the
        row and event."""
        ev, sensor, charge = cols["event_id"], cols["sensor_id"], cols["charge"]
        bad = (sensor < 0) | (sensor >= self.num_sensors)
        if np.any(bad):
            i = _first_bad(bad)
            raise DatasetError(
                f"{path}: column 'sensor_id' value {sensor[i]} at row {i} (event {ev[i]}) is "
                f"outside "
                f"the geometry (0..{self.num_sensors - 1} in {self.root / GEOMETRY_FILE})."
            )
        bad = ~np.isfinite(charge) | (charge <= 0)
        if np.any(bad):
            i = _first_bad(bad)
            raise DatasetError(
                f"{path}: column 'charge' value {charge[i]} at row {i} (event {ev[i]}) is not a "
                f"positive finite charge in p.e. Fix the file or drop that event."
            )

    def read_batch(self, batch_id: int) -> BatchFile:
        """Read and fully validate one batch file."""
        path = self.batch_path(batch_id)
        meta = self.meta(batch_id)
        pf = _open_parquet(path, self._local(path) if isinstance(path, UriPath) else None)
        schema = pf.schema_arrow
        _check_finite_floats(path, pf)
        _check_columns(path, schema, PULSE_SCHEMA)
        try:
            table = pf.read(columns=list(PULSE_SCHEMA))
        except (pa.ArrowInvalid, OSError) as err:
            raise DatasetError(
                f"{path}: failed to read ({err}); the file may be truncated."
            ) from err
        cols = {c: table.column(c).to_numpy() for c in PULSE_SCHEMA}
        n_rows = table.num_rows
        event_id = meta["event_id"]
        first = meta["first_pulse_index"]
        last = meta["last_pulse_index"]
        if n_rows != int(last[-1]) + 1 or int(first[0]) != 0 or np.any(first[1:] != last[:-1] + 1):
            raise DatasetError(
                f"{path}: has {n_rows} rows but {self.meta_path} (batch_id {batch_id}) describes "
                f"pulse rows 0..{int(last[-1])} in {len(event_id)} events that "
                f"{'do not tile the file' if n_rows == int(last[-1]) + 1 else 'do not match'}. "
                f"The metadata and the batch file disagree; regenerate one of them."
            )
        ev = cols["event_id"]
        # Each row's event id must equal its metadata event: compare on the first and last row
        # of every event and require the column to be constant inside (non-decreasing steps).
        expected_rows = np.repeat(event_id, last - first + 1)
        mismatch = ev != expected_rows
        if np.any(mismatch):
            i = _first_bad(mismatch)
            raise DatasetError(
                f"{path}: row {i} has event_id {ev[i]} but {self.meta_path} puts event "
                f"{expected_rows[i]} there (batch_id {batch_id}). Event ids do not match the "
                f"metadata; regenerate the metadata or the batch file."
            )
        # The loader's truncation keeps an event's first rows as its earliest pulses.
        time = cols["time"]
        same_event = np.ones(max(n_rows - 1, 0), dtype=bool)
        same_event[last[:-1]] = False  # row last[e] -> last[e] + 1 crosses into event e + 1
        bad = (time[1:] < time[:-1]) & same_event
        if np.any(bad):
            i = _first_bad(bad) + 1
            raise DatasetError(
                f"{path}: column 'time' decreases at row {i} (event {ev[i]}: {time[i - 1]} then "
                f"{time[i]} ns); rows of an event must be time-ordered. Sort each event's rows "
                f"by time and rewrite the file."
            )
        self._check_sensor_and_charge(path, cols)
        return BatchFile(
            batch_id=batch_id,
            path=path,
            sensor_id=cols["sensor_id"],
            time=time,
            charge=cols["charge"],
            auxiliary=cols["auxiliary"],
            event_id=event_id,
            first_pulse_index=first,
            last_pulse_index=last,
            azimuth=meta.get("azimuth"),
            zenith=meta.get("zenith"),
        )


def read_geometry(path: DataPath) -> np.ndarray:
    """Read ``sensor_geometry.csv`` into a (N, 3) float32 array of x, y, z in metres."""
    import pandas as pd

    if not path.is_file():
        raise DatasetError(f"{path}: missing file; a dataset needs sensor_geometry.csv.")
    try:
        df = pd.read_csv(path.open_input_file() if isinstance(path, UriPath) else path)
    except Exception as err:  # pandas raises several types for bad CSV
        raise DatasetError(f"{path}: not a readable CSV ({err}).") from err
    missing = [c for c in GEOMETRY_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; found {list(df.columns)}.")
    sid = df["sensor_id"].to_numpy()
    if not np.issubdtype(sid.dtype, np.integer) or not np.array_equal(sid, np.arange(len(df))):
        raise DatasetError(
            f"{path}: column 'sensor_id' must be the integers 0..{len(df) - 1} in order "
            f"(sensor_id = (string - 1) * 60 + (dom - 1))."
        )
    xyz = df[["x", "y", "z"]].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(xyz) | (np.abs(xyz) > MAX_ABS_COORDINATE_M)
    if np.any(bad):
        r, c = np.argwhere(bad)[0]
        raise DatasetError(
            f"{path}: column '{'xyz'[c]}' value {xyz[r, c]} at sensor_id {r} is not a finite "
            f"position in metres within +-{MAX_ABS_COORDINATE_M:g} m."
        )
    return xyz.astype(np.float32)


def split_batch_ids(batch_ids: list[int], val_files: int) -> tuple[list[int], list[int]]:
    """Split batch files into train and validation (never overlapping): the last files validate."""
    ids = sorted(batch_ids)
    if val_files < 0:
        raise ValueError(f"val_files must be >= 0, got {val_files}")
    if val_files >= len(ids):
        raise DatasetError(
            f"val_files={val_files} leaves no training file among {len(ids)} batch files; "
            f"generate more files (smaller --batch-size) or lower val_files."
        )
    if val_files == 0:
        return ids, []
    return ids[:-val_files], ids[-val_files:]
