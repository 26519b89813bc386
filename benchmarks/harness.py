"""The shared benchmark harness: synthetic batches, timing, device ceilings and peak memory.

What the measurements (:mod:`benchmarks.throughput`, :mod:`benchmarks.concurrency`,
:mod:`benchmarks.gpu_check`) share:

- synthetic :class:`~iceaggr.data.batch.DomBatch`es built in memory whose lengths follow the real
  distribution after the 3,000-pulse cap (:func:`sample_lengths`, :func:`synthetic_batches`);
- :func:`time_training`: training events/s of ``Trainer.train_step`` on such batches (warm-up
  excluded, median and best repeat), with the peak memory (:class:`CpuPeakMemory` on the CPU);
- the device's ceilings measured in the same run (a large matmul and a large copy,
  :func:`measure_ceilings`), the memory budget, and the loader's time per batch
  (:func:`time_loader`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import math
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iceaggr.data.batch import DomBatch
from iceaggr.data.geometry import NUM_SENSORS
from iceaggr.data.loader import Truncation
from iceaggr.models.model import ModelConfig
from iceaggr.training.config import ExperimentConfig
from iceaggr.training.trainer import Trainer

H200_SPEC: dict[str, float] = {
    "bf16_flops_per_s": 780e12,
    "fp32_flops_per_s": 60e12,
    "copy_bytes_per_s": 4.2e12,
}
"""Assumed H200 ceilings (dense bf16 tensor-core and fp32 non-tensor-core matmul, device copy
bandwidth counting read + write); the same run also measures a matmul and a copy."""


@dataclass(frozen=True, kw_only=True)
class LengthModel:
    """Pulse-count distribution of real events, calibrated so that after the 3,000-pulse cap
    the mean is ~109 pulses and ~65 hit DOMs per event, ~78% of DOMs hold one pulse, and the
    uncapped pulses per event have percentiles near the real P50 63, P90 144, P99 1,177."""

    doms_median: float = 38.0
    """Median hit DOMs of an ordinary event (log-normal)."""
    doms_sigma: float = 0.5
    """Log-normal width of hit DOMs per ordinary event."""
    bright_fraction: float = 0.067
    """Share of bright events (high energy, many DOMs): the heavy tail up to ~2,000 DOMs."""
    bright_doms_median: float = 230.0
    bright_doms_sigma: float = 1.1
    single_pulse_fraction: float = 0.78
    """Share of hit DOMs with one pulse (before the event cap, which barely changes it)."""
    multi_tail_alpha: float = 1.5
    """A multi-pulse DOM holds ``2 + floor(scale * Lomax(alpha))`` pulses: mean ~4, tail to
    hundreds (capped at ``max_pulses_per_dom``)."""
    multi_tail_scale: float = 1.25


def sample_lengths(
    n_events: int,
    rng: np.random.Generator,
    truncation: Truncation,
    model: LengthModel = LengthModel(),  # frozen dataclass: a safe default
) -> tuple[np.ndarray, np.ndarray]:
    """(doms per event (B,), pulses per DOM (D,)) int64, after the loader's caps.

    An event keeps its first ``max_pulses_per_event`` pulses in DOM order (the DOM at the
    boundary keeps part of its pulses, later DOMs are dropped), so no event is empty.
    """
    bright = rng.random(n_events) < model.bright_fraction
    median = np.where(bright, model.bright_doms_median, model.doms_median)
    sigma = np.where(bright, model.bright_doms_sigma, model.doms_sigma)
    doms = np.ceil(median * np.exp(sigma * rng.standard_normal(n_events)))
    doms = np.clip(doms, 1, truncation.max_doms_per_event).astype(np.int64)  # (B,)
    n_doms = int(doms.sum())
    multi = rng.random(n_doms) >= model.single_pulse_fraction
    extra = np.floor(model.multi_tail_scale * rng.pareto(model.multi_tail_alpha, n_doms))
    per_dom = np.where(multi, 2 + extra.astype(np.int64), 1)
    per_dom = np.minimum(per_dom, truncation.max_pulses_per_dom)  # (D,)
    event_of_dom = np.repeat(np.arange(n_events), doms)  # (D,)
    per_event = np.bincount(event_of_dom, weights=per_dom, minlength=n_events).astype(np.int64)
    pulses_before_event = np.cumsum(per_event) - per_event  # (B,)
    before = np.cumsum(per_dom) - per_dom - pulses_before_event[event_of_dom]  # (D,) in-event
    kept = np.clip(truncation.max_pulses_per_event - before, 0, per_dom)  # (D,)
    keep = kept > 0
    return np.bincount(event_of_dom[keep], minlength=n_events), kept[keep]


def length_stats(doms_per_event: np.ndarray, pulses_per_dom: np.ndarray) -> dict[str, float]:
    """The statistics DESIGN.md section 3 quotes for the capped real data, for these lengths."""
    starts = np.cumsum(doms_per_event) - doms_per_event
    pulses_per_event = np.add.reduceat(pulses_per_dom, starts)
    p50, p90, p99 = np.percentile(pulses_per_event, [50, 90, 99])
    return {
        "events": int(doms_per_event.size),
        "mean_pulses_per_event": float(pulses_per_event.mean()),
        "mean_doms_per_event": float(doms_per_event.mean()),
        "mean_pulses_per_dom": float(pulses_per_dom.mean()),
        "single_pulse_fraction": float((pulses_per_dom == 1).mean()),
        "pulses_per_event_p50": float(p50),
        "pulses_per_event_p90": float(p90),
        "pulses_per_event_p99": float(p99),
        "min_doms_per_event": int(doms_per_event.min()),
        "max_doms_per_event": int(doms_per_event.max()),
        "max_pulses_per_dom": int(pulses_per_dom.max()),
    }


def make_batch(
    doms_per_event: np.ndarray, pulses_per_dom: np.ndarray, rng: np.random.Generator
) -> DomBatch:
    """A raw-scale :class:`DomBatch` with these lengths: event start ~1e4 ns, DOM hits spread
    over 4 us, pulses within a DOM time-ordered ~20 ns apart; charge log-normal around 1 p.e.
    in [0.025, 3000]; 28% auxiliary; DOMs uniform in a +-500 m cube; random true directions."""
    n_events, n_doms = doms_per_event.size, pulses_per_dom.size
    n_pulses = int(pulses_per_dom.sum())
    event_of_dom = np.repeat(np.arange(n_events), doms_per_event)  # (D,)
    dom_of_pulse = np.repeat(np.arange(n_doms), pulses_per_dom)  # (P,)
    first_pulse = np.cumsum(pulses_per_dom) - pulses_per_dom  # (D,)
    event_t0 = rng.uniform(1.0e4, 1.2e4, n_events)  # ns
    dom_t0 = event_t0[event_of_dom] + rng.uniform(0.0, 4.0e3, n_doms)  # ns
    gaps = rng.exponential(20.0, n_pulses)  # ns between successive pulses of a DOM
    gaps[first_pulse] = 0.0
    since_first = np.cumsum(gaps)
    since_first -= since_first[first_pulse][dom_of_pulse]  # (P,) ns after the DOM's first pulse
    time_ns = dom_t0[dom_of_pulse] + since_first
    charge = np.exp(rng.normal(0.0, 0.9, n_pulses))
    bright = rng.random(n_pulses) < 1e-3
    charge[bright] *= 10.0 ** rng.uniform(1.0, 3.5, int(bright.sum()))
    charge = np.clip(charge, 0.025, 3000.0)  # p.e.
    aux = (rng.random(n_pulses) < 0.28).astype(np.float64)
    direction = rng.standard_normal((n_events, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)

    def offsets(lengths: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    return DomBatch(
        pulses=torch.from_numpy(np.stack([time_ns, charge, aux], axis=1).astype(np.float32)),
        cu_pulses=offsets(pulses_per_dom),
        dom_xyz=torch.from_numpy(rng.uniform(-500.0, 500.0, (n_doms, 3)).astype(np.float32)),
        sensor_id=torch.from_numpy(rng.integers(0, NUM_SENSORS, n_doms).astype(np.int64)),
        cu_doms=offsets(doms_per_event),
        event_id=torch.arange(n_events, dtype=torch.int64),
        direction=torch.from_numpy(direction.astype(np.float32)),
    )


def synthetic_batches(
    n_batches: int, batch_size: int, seed: int, truncation: Truncation
) -> list[DomBatch]:
    """``n_batches`` independent synthetic batches of ``batch_size`` events (seeded)."""
    rng = np.random.default_rng([seed, batch_size])
    batches = []
    for _ in range(n_batches):
        doms, pulses = sample_lengths(batch_size, rng, truncation)
        batches.append(make_batch(doms, pulses, rng))
    return batches


def batches_stats(batches: Sequence[DomBatch]) -> dict[str, float]:
    doms = np.concatenate([b.event_lengths().numpy() for b in batches])
    pulses = np.concatenate([b.dom_lengths().numpy() for b in batches])
    return length_stats(doms, pulses)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (after one untimed call)."""
    fn()
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul in ``dtype``, best of ``repeats``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = best_seconds(lambda: torch.mm(a, b), device, repeats)
    return 2 * n**3 / seconds


def measure_copy_bytes(device: torch.device, n_bytes: int, repeats: int) -> float:
    """Bytes/s (read + write) of copying an ``n_bytes`` buffer on the device, best of repeats."""
    src = torch.ones(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / seconds


def _meminfo_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class CpuPeakMemory:
    """Peak RSS of this process over a ``with`` block, above the RSS when the block began."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.method = "VmHWM reset via /proc/self/clear_refs, minus RSS at start"

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self) -> CpuPeakMemory:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # return freed heap (glibc only)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            self._start = self._status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._hwm = True
        except (OSError, KeyError):
            self._hwm = False
            self._start = 0
            self.method = "getrusage max RSS (whole process, not reset)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hwm:
            self.peak_bytes = max(0, self._status("VmHWM") - self._start)
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Timing:
    step_s: list[float]
    """Mean step time of each timed repeat (s)."""
    peak_bytes: int
    compile_s: float | None = None
    warmup_s: float = 0.0


def _timed_steps(
    cfg: ExperimentConfig,
    model_cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    batches: Sequence[DomBatch],
    device: torch.device,
    precision: str,
    n_warm: int,
    repeats: int,
    compile_model: bool,
) -> tuple[float, list[float]]:
    """(warm-up seconds, mean seconds of each repeat) of ``Trainer.train_step``; the trainer
    (model ``model_cfg`` with parameters ``state``) dies on return."""
    train_cfg = dataclasses.replace(cfg.train, precision=precision)
    trainer = Trainer(
        dataclasses.replace(cfg, model=model_cfg, train=train_cfg), device=device, build_data=False
    )
    trainer.model.load_state_dict(state)
    if compile_model:
        trainer.train_model = torch.compile(trainer.model)
    trainer.train_model.train()
    step = trainer.train_step

    t0 = time.perf_counter()
    for i in range(n_warm):
        step(batches[i % len(batches)])
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    step_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for batch in batches:
            step(batch)
        synchronize(device)
        step_s.append((time.perf_counter() - t0) / len(batches))
    return warmup_s, step_s


def time_training(
    cfg: ExperimentConfig,
    model_cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    batches: Sequence[DomBatch],
    device: torch.device,
    precision: str,
    warmup: int,
    repeats: int,
    compile_model: bool = False,
) -> Timing:
    """Time training steps of a fresh model (parameters ``state``) on ``batches``.

    Each repeat runs one step per batch; ``warmup`` untimed steps come first (with
    ``compile_model`` every batch is warmed up at least once, so recompilation is not timed,
    and the warm-up time minus as many median steps is reported as the compile time). Peak
    memory covers building the model and optimizer and all steps.
    """
    n_warm = max(warmup, len(batches)) if compile_model else warmup
    args = (cfg, model_cfg, state, batches, device, precision, n_warm, repeats, compile_model)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        warmup_s, step_s = _timed_steps(*args)
        peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        with CpuPeakMemory() as peak:
            warmup_s, step_s = _timed_steps(*args)
        peak_bytes = peak.peak_bytes
    compile_s = warmup_s - n_warm * statistics.median(step_s) if compile_model else None
    return Timing(step_s=step_s, peak_bytes=peak_bytes, compile_s=compile_s, warmup_s=warmup_s)


@dataclass
class Ceiling:
    device: str
    precision: str
    matmul_flops_per_s: float
    """Measured in this run: an (n x n) matmul."""
    copy_bytes_per_s: float
    """Measured in this run: a device copy (read + write)."""
    spec_flops_per_s: float | None = None
    """Assumed vendor-class number (CUDA only)."""
    spec_bytes_per_s: float | None = None
    matmul_n: int = 0
    copy_mb: float = 0.0


def devices_for(choice: str) -> list[torch.device]:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (try --device cpu)")
    names = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"]}[choice]
    if choice == "all" and torch.cuda.is_available():
        names.append("cuda")
    return [torch.device(n) for n in names]


def memory_budget_bytes(device: torch.device, override_gb: float | None) -> int:
    """What a configuration may use: half the available RAM (CPU), 85% of free memory (CUDA)."""
    if override_gb is not None:
        return int(override_gb * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.85 * free)
    available = _meminfo_bytes("MemAvailable")
    return int(0.5 * available) if available else 4 * 2**30


def measure_ceilings(device: torch.device, precision: str, quick: bool) -> Ceiling:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        n, copy_bytes, repeats = 8192, 2**30, 10
        spec_flops = H200_SPEC[f"{precision}_flops_per_s"]
        spec_bytes: float | None = H200_SPEC["copy_bytes_per_s"]
    else:
        n, copy_bytes, repeats = (1024, 2**26, 5) if quick else (2048, 2**28, 10)
        spec_flops, spec_bytes = None, None
    return Ceiling(
        device=device.type,
        precision=precision,
        matmul_flops_per_s=measure_matmul_flops(device, dtype, n, repeats),
        copy_bytes_per_s=measure_copy_bytes(device, copy_bytes, repeats),
        spec_flops_per_s=spec_flops if device.type == "cuda" else None,
        spec_bytes_per_s=spec_bytes,
        matmul_n=n,
        copy_mb=copy_bytes / 2**20,
    )


def halvings(start: int) -> Iterator[int]:
    """start, then powers of two below it, down to 1."""
    yield start
    b = 2 ** (max(start - 1, 1).bit_length() - 1)
    while b >= 1:
        if b < start:
            yield b
        b //= 2


def time_loader(
    data_dir: Path, cfg: ExperimentConfig, batch_size: int, n_batches: int
) -> dict[str, Any]:
    """Milliseconds per batch of EventLoader (one thread, prefetch 0) on ``data_dir``'s files.

    The first batch also reads and validates a batch file; the steady per-batch cost is the
    median of the later ones, and the file read (first minus steady) is amortized over the
    events of a file: ``batch_ms`` = steady + read * batch_size / events per file.
    """
    from iceaggr.data.dataset import KaggleDataset
    from iceaggr.data.loader import EventLoader

    t_open = time.perf_counter()
    ds = KaggleDataset(data_dir)
    loader = EventLoader(
        dataset=ds,
        batch_ids=ds.batch_ids,
        batch_size=batch_size,
        truncation=cfg.data.truncation(),
        shuffle=True,
        seed=0,
        prefetch=0,
        line_fit=cfg.model.uses_line_fit,
    )
    open_s = time.perf_counter() - t_open
    wall, cpu, batches = [], [], []
    it = loader.iter_epoch(0)
    for _ in range(min(n_batches + 1, len(loader))):
        t0, c0 = time.perf_counter(), time.process_time()
        batches.append(next(it))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    steady = statistics.median(wall[1:]) if len(wall) > 1 else wall[0]
    steady_cpu = statistics.median(cpu[1:]) if len(cpu) > 1 else cpu[0]
    events_per_file = statistics.fmean(ds.num_events(b) for b in ds.batch_ids)
    read_s = max(0.0, wall[0] - steady)
    batch_s = steady + read_s * batch_size / events_per_file
    return {
        "data": str(data_dir),
        "batch_size": batch_size,
        "batches": len(wall),
        "open_s": open_s,
        "first_batch_ms": 1e3 * wall[0],
        "steady_batch_ms": 1e3 * steady,
        "steady_batch_cpu_ms": 1e3 * steady_cpu,
        "file_read_ms": 1e3 * read_s,
        "file_read_cpu_ms": 1e3 * max(0.0, cpu[0] - steady_cpu),
        "events_per_file": events_per_file,
        "batch_ms": 1e3 * batch_s,
        "events_per_s": batch_size / batch_s,
        "data_stats": batches_stats(batches),
    }
