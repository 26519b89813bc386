"""Writes a synthetic dataset in the Kaggle layout, batch file by batch file.

``sensor_geometry.csv``, ``train/batch_<k>.parquet`` and ``train_meta.parquet``, written into a
hidden ``.<name>.partial-*`` sibling folder and renamed into place at the end, so an
interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from iceaggr.data.geometry import make_geometry
from iceaggr.data.synth.events import generate_events

log = logging.getLogger(__name__)

CHUNK_EVENTS = 10_000
"""Events generated per vectorized chunk (bounds memory; a batch file is written chunk by chunk)."""
META_COLUMNS: tuple[str, ...] = (
    "batch_id",
    "event_id",
    "first_pulse_index",
    "last_pulse_index",
    "azimuth",
    "zenith",
)


def _chunk_rng(seed: int, batch: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, batch, chunk]))


def write_synthetic_dataset(
    out_dir: str | Path,
    n_events: int,
    batch_size: int = 200_000,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a synthetic dataset in the Kaggle layout and return its folder.

    Writes ``sensor_geometry.csv``, ``train/batch_<k>.parquet`` (k = 1, 2, ...; ``batch_size``
    events each, the last one possibly fewer) and ``train_meta.parquet``. Batches are generated in
    chunks of ``CHUNK_EVENTS`` and streamed to disk, so memory does not grow with ``n_events``.
    The result depends only on ``(n_events, batch_size, seed)``. Everything is written into a
    hidden sibling folder that is renamed to ``out_dir`` at the end.

    Raises:
        ValueError: ``n_events`` or ``batch_size`` < 1, or ``out_dir`` exists and is not an empty
            folder.
    """
    if n_events < 1:
        raise ValueError(f"n_events must be >= 1, got {n_events}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"out_dir {out} already exists and is not an empty folder; refusing to overwrite it. "
            "Pass a new or empty folder, or delete this one first."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_into(tmp, n_events, batch_size, seed, progress)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d synthetic events to %s", n_events, out)
    return out


def _batch_meta(meta: pd.DataFrame, batch_id: int, first_row: int) -> pd.DataFrame:
    """``train_meta`` rows of one chunk whose pulses start at row ``first_row`` of the batch."""
    n_pulses = meta["n_pulses"].to_numpy(np.int64)
    first = first_row + np.cumsum(n_pulses) - n_pulses  # inclusive row positions
    out = pd.DataFrame(
        {
            "batch_id": np.full(n_pulses.shape[0], batch_id, dtype=np.int64),
            "event_id": meta["event_id"].to_numpy(np.int64),
            "first_pulse_index": first,
            "last_pulse_index": first + n_pulses - 1,
            "azimuth": meta["azimuth"].to_numpy(np.float64),
            "zenith": meta["zenith"].to_numpy(np.float64),
        }
    )
    return out[list(META_COLUMNS)]


def _write_into(tmp: Path, n_events: int, batch_size: int, seed: int, progress: bool) -> None:
    geometry = make_geometry()
    geometry.to_csv(tmp / "sensor_geometry.csv", index=False, float_format="%.2f")
    (tmp / "train").mkdir()
    metas: list[pd.DataFrame] = []
    n_batches = -(-n_events // batch_size)
    next_id = 0
    with tqdm(total=n_events, unit="ev", desc="synthetic events", disable=not progress) as bar:
        for b in range(n_batches):
            batch_id = b + 1  # Kaggle numbering starts at 1
            n_b = min(batch_size, n_events - b * batch_size)
            path = tmp / "train" / f"batch_{batch_id}.parquet"
            writer: pq.ParquetWriter | None = None
            row = 0
            try:
                for c, start in enumerate(range(0, n_b, CHUNK_EVENTS)):
                    n_c = min(CHUNK_EVENTS, n_b - start)
                    rng = _chunk_rng(seed, b, c)
                    pulses, meta = generate_events(rng, geometry, n_c, first_event_id=next_id)
                    table = pa.Table.from_pandas(pulses, preserve_index=True)
                    if writer is None:
                        writer = pq.ParquetWriter(path, table.schema)
                    writer.write_table(table)  # one row group per chunk: memory stays bounded
                    metas.append(_batch_meta(meta, batch_id, row))
                    row += table.num_rows
                    next_id = int(meta["event_id"].iloc[-1]) + 1
                    bar.update(n_c)
            finally:
                if writer is not None:
                    writer.close()
            log.debug("batch %d: %d events, %d pulses", batch_id, n_b, row)
    pd.concat(metas, ignore_index=True).to_parquet(tmp / "train_meta.parquet", index=False)
