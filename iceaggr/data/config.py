"""The ``data`` section of an experiment config: which dataset, how it is split and truncated.

Read from YAML by :func:`iceaggr.training.config.load_config` like the other sections; kept
here, next to the dataset and the loader it opens, so the data layer needs nothing above it.
"""

from __future__ import annotations

from dataclasses import dataclass

from iceaggr.data.cache import DEFAULT_CACHE_DIR, DEFAULT_CACHE_GB, FileCache
from iceaggr.data.dataset import KaggleDataset
from iceaggr.data.loader import Truncation
from iceaggr.data.remote import is_uri


@dataclass(kw_only=True)
class DataConfig:
    path: str = "data/synthetic"
    """Kaggle-layout folder (``sensor_geometry.csv``, ``train_meta.parquet``, ``train/``), or
    the same layout in object storage, ``s3://bucket/prefix`` (``AWS_ENDPOINT_URL`` names an
    S3-compatible server; credentials from the AWS standard chain)."""
    val_files: int = 1
    """The last ``val_files`` batch files validate; training never sees them."""
    max_train_events: int | None = None
    """Cap on training events per epoch (None: all events of the training files)."""
    max_val_events: int = 10_000
    """Events of the validation files scored at each evaluation."""
    max_pulses_per_event: int = 3000
    """An event keeps its earliest pulses (bounds the memory of a 178,250-pulse event)."""
    max_pulses_per_dom: int = 512
    """A DOM keeps its earliest pulses (the DOM transformer's longest sequence)."""
    max_doms_per_event: int = 2048
    """An event keeps its brightest DOMs (the event transformer's longest sequence)."""
    prefetch: int = 2
    """Batches assembled ahead in a background thread."""
    cache_dir: str = DEFAULT_CACHE_DIR
    """Where a node keeps the files of an ``s3://`` dataset (shared by the trials on the node,
    fetched once each); unused for a folder."""
    cache_gb: float = DEFAULT_CACHE_GB
    """Size limit of ``cache_dir`` in GB (10^9 bytes); least recently used files go first."""

    def __post_init__(self) -> None:
        if self.val_files < 0:
            raise ValueError(f"data.val_files must be >= 0, got {self.val_files}")
        if self.max_train_events is not None and self.max_train_events < 1:
            raise ValueError(f"data.max_train_events must be >= 1, got {self.max_train_events}")
        if self.max_val_events < 1:
            raise ValueError(f"data.max_val_events must be >= 1, got {self.max_val_events}")
        self.truncation()  # validates the caps
        if not self.cache_gb > 0:
            raise ValueError(f"data.cache_gb must be > 0, got {self.cache_gb}")

    def open(self) -> KaggleDataset:
        """The dataset at :attr:`path`; an ``s3://`` one cached in :attr:`cache_dir`."""
        cache = FileCache(self.cache_dir, self.cache_gb) if is_uri(self.path) else None
        return KaggleDataset(self.path, cache=cache)

    def truncation(self) -> Truncation:
        return Truncation(
            max_pulses_per_event=self.max_pulses_per_event,
            max_pulses_per_dom=self.max_pulses_per_dom,
            max_doms_per_event=self.max_doms_per_event,
        )
