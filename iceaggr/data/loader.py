"""From validated batch files to packed, model-ready :class:`~iceaggr.data.batch.DomBatch`es.

Order and sharding (per epoch, all derived from ``seed`` and the epoch number):

1. *File-aware shuffling*: the batch files are permuted, then the events inside
   each file; there is no global random access, so a file is read once per epoch.
2. *Disjoint sharding*: inside each file, the shuffled events are dealt to the
   ``world_size`` ranks round-robin and each rank keeps ``n_file // world_size``
   of them, so ranks never share an event and all take the same number of steps.
3. Events stream into batches of ``batch_size``; a batch may span two files.

Truncation (documented, deterministic, counted in ``LoaderStats``):

* ``max_pulses_per_event``: an event keeps its first pulses in time (rows are
  time-ordered in the files). This is applied while gathering rows, so a
  178,250-pulse event costs no more memory than a 3,000-pulse one.
* ``max_pulses_per_dom``: a DOM keeps its first pulses in time.
* ``max_doms_per_event``: an event keeps its brightest DOMs (largest kept charge),
  in sensor order.

Run ``python benchmarks/loader.py`` for throughput numbers.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from iceaggr.data.batch import DomBatch
from iceaggr.data.dataset import BatchFile, KaggleDataset
from iceaggr.data.linefit import line_fit, select_hits

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Truncation:
    """Caps that bound the memory of one event (see module docstring for the rule)."""

    max_pulses_per_event: int = 3000
    """Earliest pulses an event keeps; the original project's cap (mean ~109 pulses kept)."""
    max_pulses_per_dom: int = 512
    """Earliest pulses a DOM keeps; the DOM transformer's longest sequence."""
    max_doms_per_event: int = 2048
    """Brightest DOMs an event keeps; the event transformer's longest sequence."""

    def __post_init__(self) -> None:
        for name in ("max_pulses_per_event", "max_pulses_per_dom", "max_doms_per_event"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class LoaderStats:
    """What truncation did so far (events and pulses are never dropped silently)."""

    events: int = 0
    pulses_in: int = 0
    pulses_kept: int = 0
    events_truncated: int = 0
    doms_dropped: int = 0


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), vectorized."""
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths  # (E,) where each range starts in the output
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)


def _brightest_doms(
    dom_charge: np.ndarray, dom_event: np.ndarray, doms_per_event: np.ndarray, cap: int
) -> np.ndarray:
    """(D,) bool: the ``cap`` brightest DOMs of each event (DOMs grouped by event)."""
    by_brightness = np.lexsort((-dom_charge, dom_event))  # event-major, brightest first
    first_dom = np.cumsum(doms_per_event) - doms_per_event
    rank_in_event = np.empty(len(dom_charge), dtype=np.int64)
    rank_in_event[by_brightness] = np.arange(len(dom_charge)) - np.repeat(first_dom, doms_per_event)
    return rank_in_event < cap


def _unit_vectors(az: np.ndarray, zen: np.ndarray) -> np.ndarray:
    """(B, 3) float32 ``(cos az sin zen, sin az sin zen, cos zen)``."""
    sz = np.sin(zen)
    return np.stack([np.cos(az) * sz, np.sin(az) * sz, np.cos(zen)], axis=1).astype(np.float32)


def _directions(part: BatchFile, events: np.ndarray) -> torch.Tensor | None:
    """(B, 3) float32 unit vectors of the events' true directions; None without angles."""
    if part.azimuth is None or part.zenith is None:
        return None
    return torch.from_numpy(_unit_vectors(part.azimuth[events], part.zenith[events]))


def assemble_batch(
    part: BatchFile,
    events: np.ndarray,
    geometry: np.ndarray,
    trunc: Truncation,
    stats: LoaderStats | None = None,
    with_line_fit: bool = False,
) -> DomBatch:
    """Pack the events at positions ``events`` (indices into ``part``'s metadata) into a batch;
    ``with_line_fit``: also fit each whole event's line (``DomBatch.line_fit``)."""
    first = part.first_pulse_index[events]
    n_raw = part.last_pulse_index[events] - first + 1  # (B,)
    n_kept = np.minimum(n_raw, trunc.max_pulses_per_event)
    rows = _ranges(first, n_kept)  # (P,) row positions in the file, event-major, time-ordered
    n_events = len(events)
    ev_local = np.repeat(np.arange(n_events, dtype=np.int64), n_kept)  # (P,)
    sensor = part.sensor_id[rows].astype(np.int64)
    # Group by (event, sensor); a stable sort keeps pulses of a DOM in time order.
    key = ev_local * geometry.shape[0] + sensor
    order = np.argsort(key, kind="stable")
    key = key[order]
    rows = rows[order]
    p = len(rows)
    new_dom = np.empty(p, dtype=bool)
    new_dom[:1] = True
    np.not_equal(key[1:], key[:-1], out=new_dom[1:])
    dom_start = np.flatnonzero(new_dom)  # (D,) first pulse of each DOM
    dom_of_pulse = np.cumsum(new_dom) - 1  # (P,)
    rank_in_dom = np.arange(p) - dom_start[dom_of_pulse]
    keep = rank_in_dom < trunc.max_pulses_per_dom
    dom_event = key[dom_start] // geometry.shape[0]  # (D,)
    doms_per_event = np.bincount(dom_event, minlength=n_events)
    dropped_doms = 0
    if doms_per_event.max(initial=0) > trunc.max_doms_per_event:
        # Keep the brightest DOMs of over-full events (charge of the pulses kept so far).
        dom_charge = np.add.reduceat(np.where(keep, part.charge[rows], 0.0), dom_start)
        keep_dom = _brightest_doms(dom_charge, dom_event, doms_per_event, trunc.max_doms_per_event)
        dropped_doms = int((~keep_dom).sum())
        keep &= keep_dom[dom_of_pulse]
    if not keep.all():
        rows = rows[keep]
        # A kept DOM always keeps its first pulse, so DOM starts survive the mask.
        key = key[keep]
        dom_start = np.flatnonzero(new_dom[keep])
        dom_event = key[dom_start] // geometry.shape[0]
        doms_per_event = np.bincount(dom_event, minlength=n_events)
    sensor_of_dom = key[dom_start] % geometry.shape[0]  # (D,)
    pulses = np.empty((len(rows), 3), dtype=np.float32)  # (P, 3): time ns, charge p.e., aux
    pulses[:, 0] = part.time[rows]
    pulses[:, 1] = part.charge[rows]
    pulses[:, 2] = part.auxiliary[rows]
    cu_pulses = np.empty(len(dom_start) + 1, dtype=np.int64)
    cu_pulses[:-1] = dom_start
    cu_pulses[-1] = len(rows)
    cu_doms = np.zeros(n_events + 1, dtype=np.int64)
    np.cumsum(doms_per_event, out=cu_doms[1:])
    direction = _directions(part, events)
    fit = _whole_event_line_fit(part, first, n_raw, geometry) if with_line_fit else None
    if stats is not None:
        stats.events += n_events
        stats.pulses_in += int(n_raw.sum())
        stats.pulses_kept += len(rows)
        stats.events_truncated += int((n_raw > n_kept).sum())
        stats.doms_dropped += dropped_doms
    return DomBatch(
        pulses=torch.from_numpy(pulses),
        cu_pulses=torch.from_numpy(cu_pulses),
        dom_xyz=torch.from_numpy(geometry[sensor_of_dom]),
        sensor_id=torch.from_numpy(sensor_of_dom),
        cu_doms=torch.from_numpy(cu_doms),
        event_id=torch.from_numpy(part.event_id[events].astype(np.int64)),
        direction=direction,
        n_pulses_raw=torch.from_numpy(n_raw.astype(np.int64)),
        line_fit=fit,
    )


def _whole_event_line_fit(
    part: BatchFile, first: np.ndarray, n_raw: np.ndarray, geometry: np.ndarray
) -> torch.Tensor:
    """(B, 3) the improved line fit of each event from all its pulses (before truncation), as
    the baseline scores it: the seed direction of ``model.prior_direction=line_fit``. It costs
    more than the packing (``python benchmarks/loader.py``, second row)."""
    rows = _ranges(first, n_raw)
    sensors = part.sensor_id[rows].astype(np.int64)
    cu = np.zeros(len(first) + 1, dtype=np.int64)
    np.cumsum(n_raw, out=cu[1:])
    hits, cu_hits = select_hits(sensors, part.auxiliary[rows], cu)
    az, zen = line_fit(part.time[rows[hits]], geometry[sensors[hits]], None, cu_hits)
    return torch.from_numpy(_unit_vectors(az, zen))


@dataclass
class _Piece:
    batch_id: int
    events: np.ndarray  # indices into the file's metadata rows


@dataclass(kw_only=True)
class EventLoader:
    """Iterates packed batches over some batch files, shuffled and sharded per epoch.

    ``len(loader)`` is the number of batches one rank takes per epoch. Use
    :meth:`iter_epoch` with ``start_batch`` to resume mid-epoch without reading the
    files that the skipped batches came from.
    """

    dataset: KaggleDataset
    batch_ids: list[int]
    batch_size: int
    truncation: Truncation = field(default_factory=Truncation)
    shuffle: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True
    prefetch: int = 2
    """Batches assembled ahead in a background thread (0: assemble in the caller)."""
    max_events: int | None = None
    """Use at most this many events per epoch (before sharding), for short runs."""
    pin_memory: bool = False
    """Pin each batch in page-locked memory (in the prefetch thread) for async copies to a GPU."""
    line_fit: bool = False
    """Also fit each whole event's line (``DomBatch.line_fit``), for
    ``model.prior_direction=line_fit``."""
    stats: LoaderStats = field(default_factory=LoaderStats)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if not self.batch_ids:
            raise ValueError("EventLoader needs at least one batch file")
        self.dataset.load_meta(self.batch_ids)
        self._epoch = 0
        n = sum(self.dataset.num_events(b) // self.world_size for b in self.batch_ids)
        if self.max_events is not None:
            n = min(n, self.max_events // self.world_size)
        self._events_per_rank = n
        if len(self) == 0:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the {n} events rank {self.rank} "
                f"gets from batch files {self.batch_ids}; lower batch_size or add data."
            )

    def __len__(self) -> int:
        n = self._events_per_rank
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[DomBatch]:
        return self.iter_epoch(self._epoch)

    def plan(self, epoch: int) -> list[list[_Piece]]:
        """The events of every batch of ``epoch`` for this rank, computed from metadata only."""
        rng = np.random.default_rng([self.seed, epoch])
        files = list(self.batch_ids)
        if self.shuffle:
            files = [files[i] for i in rng.permutation(len(files))]
        stream: list[_Piece] = []
        budget = self._events_per_rank
        for b in files:
            n = self.dataset.num_events(b)
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            mine = order[self.rank :: self.world_size][: n // self.world_size][:budget]
            budget -= len(mine)
            if len(mine):
                stream.append(_Piece(b, mine))
            if budget <= 0:
                break
        batches: list[list[_Piece]] = []
        current: list[_Piece] = []
        filled = 0
        for piece in stream:
            pos = 0
            while pos < len(piece.events):
                take = min(self.batch_size - filled, len(piece.events) - pos)
                current.append(_Piece(piece.batch_id, piece.events[pos : pos + take]))
                filled += take
                pos += take
                if filled == self.batch_size:
                    batches.append(current)
                    current, filled = [], 0
        if current and not self.drop_last:
            batches.append(current)
        return batches

    def _generate(self, epoch: int, start_batch: int) -> Iterator[DomBatch]:
        cache: dict[int, BatchFile] = {}
        for pieces in self.plan(epoch)[start_batch:]:
            parts = []
            for piece in pieces:
                if piece.batch_id not in cache:
                    cache.clear()  # one file in memory at a time (plus the next when spanning)
                    cache[piece.batch_id] = self.dataset.read_batch(piece.batch_id)
                parts.append(
                    assemble_batch(
                        cache[piece.batch_id],
                        piece.events,
                        self.dataset.geometry,
                        self.truncation,
                        self.stats,
                        with_line_fit=self.line_fit,
                    )
                )
            batch = parts[0] if len(parts) == 1 else concat_batches(parts)
            yield batch.pin_memory() if self.pin_memory else batch

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[DomBatch]:
        gen = self._generate(epoch, start_batch)
        if self.prefetch <= 0:
            yield from gen
            return
        yield from _prefetch(gen, self.prefetch)


def concat_batches(parts: list[DomBatch]) -> DomBatch:
    """Join packed batches (events of ``parts[1]`` follow those of ``parts[0]``...)."""
    cu_pulses = [parts[0].cu_pulses]
    cu_doms = [parts[0].cu_doms]
    p_off, d_off = parts[0].num_pulses, parts[0].num_doms
    for b in parts[1:]:
        cu_pulses.append(b.cu_pulses[1:] + p_off)
        cu_doms.append(b.cu_doms[1:] + d_off)
        p_off += b.num_pulses
        d_off += b.num_doms
    has_dir = all(b.direction is not None for b in parts)
    has_fit = all(b.line_fit is not None for b in parts)
    return DomBatch(
        pulses=torch.cat([b.pulses for b in parts]),
        cu_pulses=torch.cat(cu_pulses),
        dom_xyz=torch.cat([b.dom_xyz for b in parts]),
        sensor_id=torch.cat([b.sensor_id for b in parts]),
        cu_doms=torch.cat(cu_doms),
        event_id=torch.cat([b.event_id for b in parts]),
        direction=torch.cat([b.direction for b in parts]) if has_dir else None,  # type: ignore[misc]
        n_pulses_raw=torch.cat([b.n_pulses_raw for b in parts]),  # type: ignore[misc]
        line_fit=torch.cat([b.line_fit for b in parts]) if has_fit else None,  # type: ignore[misc]
    )


_DONE = object()


def _prefetch(gen: Iterator[DomBatch], depth: int) -> Iterator[DomBatch]:
    """Run ``gen`` in a daemon thread, ``depth`` items ahead; errors re-raise in the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        # Never block for good: the consumer may have stopped with the queue full.
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in gen:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:  # forwarded to the consumer
            put(err)

    thread = threading.Thread(target=worker, name="iceaggr-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
