"""A per-node disk cache of dataset files read from object storage (``s3://...``).

A GPU node that the autoscaler just started has an empty disk. The first trial there that
needs ``train/batch_7.parquet`` downloads it once into the cache folder; every later trial
on that node (and every concurrent one: they share the folder) reads the local copy::

    cache = FileCache("~/.cache/iceaggr/data", max_gb=100)
    with cache.local_copy(UriPath("s3://bucket/icecube/train/batch_7.parquet")) as path:
        table = pq.read_table(path)

How a file enters the cache, safely with several processes on one node:

1. The entry's name holds the object's size and mtime, so a re-uploaded object is a new
   entry (the stale one ages out). ETags are not exposed by ``pyarrow.fs``, so size and
   mtime are what is checked.
2. An exclusive ``fcntl.flock`` on the entry's lock file: one process downloads, the others
   wait for it, then find the file (a *hit*).
3. The download goes to a temporary name, its size is checked against the listing, then it
   is renamed into place atomically. A download that dies half-way leaves only a temporary
   file, which is never read and is removed by the next eviction pass; a cached file whose
   size is not the object's (cut off on disk) is discarded and fetched again.
4. While a process reads an entry it holds a shared lock on it; eviction (least recently used
   first, by mtime, which every hit refreshes) skips entries in use.

Counters (:class:`CacheStats`: hits, misses, bytes downloaded, seconds spent downloading,
evictions) are per process; the trainer logs them with each report as ``data_cache_*``
metrics in the run's MLflow record.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs

from iceaggr.data.remote import UriPath

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/iceaggr/data"
DEFAULT_CACHE_GB = 100.0
"""Default size limit: the real training set (~110 GB) does not fit, but a trial reads only the
validation files and the training files its steps reach (~172 MB each)."""
_CHUNK = 8 << 20  # bytes per read while downloading
_LOCK_DIR = ".locks"
_TMP_MARK = ".part-"
_STALE_TMP_S = 6 * 3600.0
"""A temporary download older than this has no live writer (a download of one ~172 MB file
takes seconds to minutes) and is removed by eviction."""


class CacheError(OSError):
    """A download that did not yield the whole object (the cache keeps nothing of it)."""


@dataclass
class CacheStats:
    """What this process's cache did so far."""

    hits: int = 0
    misses: int = 0
    bytes_downloaded: int = 0
    download_seconds: float = 0.0
    evictions: int = 0

    def metrics(self) -> dict[str, float]:
        """As MLflow metrics (``data_cache_hits`` ...)."""
        return {f"data_cache_{k}": float(v) for k, v in asdict(self).items()}


class FileCache:
    """A size-limited, least-recently-used cache folder shared by the processes of one node."""

    def __init__(self, root: str | Path = DEFAULT_CACHE_DIR, max_gb: float = DEFAULT_CACHE_GB):
        if not max_gb > 0:
            raise ValueError(f"data cache size limit must be > 0 GB, got {max_gb}")
        self.root = Path(root).expanduser()
        self.max_bytes = round(max_gb * 1e9)
        self.stats = CacheStats()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / _LOCK_DIR).mkdir(exist_ok=True)

    def entry_name(self, uri: str, info: pafs.FileInfo) -> str:
        """``<hash of uri>-<size>-<mtime ns>-<file name>``: a changed object is a new entry."""
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        return f"{digest}-{info.size}-{mtime}-{uri.rsplit('/', 1)[-1]}"

    @contextlib.contextmanager
    def _lock(self, name: str, mode: int) -> Iterator[None]:
        with open(self.root / _LOCK_DIR / f"{name}.lock", "a+b") as fh:
            fcntl.flock(fh, mode)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def local_copy(self, src: UriPath) -> Iterator[Path]:
        """The cached copy of ``src`` (downloaded first if needed), kept while in the block."""
        info = src.info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{src}: no such object")
        name = self.entry_name(src.uri, info)
        path = self.root / name
        with self._lock(name, fcntl.LOCK_EX):
            if path.is_file() and path.stat().st_size != info.size:
                log.warning("%s: cached copy %s is cut off; fetching it again", src, path)
                path.unlink()
            if path.is_file():
                self.stats.hits += 1
                _touch(path)
            else:
                self.stats.misses += 1
                self._download(src, info, path)
        # Shared while read: eviction in another process skips it.
        with self._lock(name, fcntl.LOCK_SH):
            if not path.is_file():  # evicted between the two locks: rare; fetch again
                with self.local_copy(src) as again:
                    yield again
                return
            yield path
        self.evict(keep=path)

    def fetch(self, src: UriPath) -> Path:
        """Make sure ``src`` is cached; its path (it may be evicted later: prefer
        :meth:`local_copy` to read it)."""
        with self.local_copy(src) as path:
            return path

    def _download(self, src: UriPath, info: pafs.FileInfo, path: Path) -> None:
        tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        t0 = time.perf_counter()
        written = 0
        try:
            with src.filesystem.open_input_stream(src.fs_path) as inp, open(tmp, "wb") as out:
                while chunk := inp.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if written != info.size:
                raise CacheError(
                    f"{src}: downloaded {written} bytes but the object has {info.size}; "
                    f"the transfer was cut off (nothing was cached; retry)"
                )
            os.replace(tmp, path)  # atomic: readers see the whole file or none
            _touch(path)
        finally:
            tmp.unlink(missing_ok=True)
        seconds = time.perf_counter() - t0
        self.stats.bytes_downloaded += written
        self.stats.download_seconds += seconds
        log.info("cached %s (%.1f MB in %.1f s) as %s", src, written / 1e6, seconds, path)

    def entries(self) -> list[Path]:
        """Cached files (not temporary downloads, not locks)."""
        return [p for p in self.root.iterdir() if p.is_file() and _TMP_MARK not in p.name]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.entries())

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries until the cache fits its limit (entries that a
        process is reading are skipped), and temporary files of dead downloads. Returns the
        number of entries removed."""
        now = time.time()
        for tmp in self.root.glob(f"*{_TMP_MARK}*"):
            with contextlib.suppress(FileNotFoundError):
                if now - tmp.stat().st_mtime > _STALE_TMP_S:
                    tmp.unlink()
        stat = {}
        for p in self.entries():
            with contextlib.suppress(FileNotFoundError):
                stat[p] = p.stat()
        total = sum(s.st_size for s in stat.values())
        removed = 0
        for p in sorted(stat, key=lambda q: stat[q].st_mtime_ns):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            lock = self.root / _LOCK_DIR / f"{p.name}.lock"
            with open(lock, "a+b") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use
                try:
                    p.unlink(missing_ok=True)
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
            total -= stat[p].st_size
            removed += 1
            log.info("evicted %s from the data cache (%.1f MB)", p.name, stat[p].st_size / 1e6)
        self.stats.evictions += removed
        return removed


def _touch(path: Path) -> None:
    """Mark ``path`` as the most recently used entry.

    The time is set explicitly from ``time.time_ns()``. The time that ``os.utime(path)`` or a
    write leaves may come from the kernel's coarse clock: on ext4 under Linux 6.18
    two back-to-back ``os.utime`` calls on two files gave both the same mtime in 2,000 of 2,000
    tries, so the order of two uses close together was lost and eviction picked either one.
    """
    now = time.time_ns()
    os.utime(path, ns=(now, now))
