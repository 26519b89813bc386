"""Training throughput of the hierarchical transformer: packed (varlen) vs naive padded attention.

Measures, for every device (CPU always, CUDA when available) and precision (fp32, bf16 autocast):

- training events/s of :meth:`iceaggr.train.Trainer.train_step`, the step training runs
  (input magnitudes for the divergence guard, forward, the config's loss, backward,
  per-parameter gradient norms, clipping at the config's ``grad_clip``, AdamW and schedule
  step), of the model in ``experiments/iceaggr_baseline/config.yaml`` (d_model 128, 4 DOM +
  4 event layers), with ``attention="packed"`` and, in the same run, with
  ``attention="padded"`` (the naive reference, same parameters: every DOM padded to the
  longest DOM of the batch, every event to the largest event, a dense key-padding mask). The
  speed-up is the ratio of the two rates at the same batch size. The padded model can need
  hundreds of GB at batch 256; its batch is halved until the estimated memory fits (and, so
  that a CPU run ends, the predicted step time fits ``--max-step-s``); the packed model is
  then also timed at that batch for the ratio, and the configurations that do not fit are
  listed as ``skipped: would need N GB``.
- peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the peak resident set
  size (``VmHWM``, reset through ``/proc/self/clear_refs``) above the RSS before the model was
  built (falls back to ``getrusage`` max RSS, a whole-process peak, where that is not possible).
- FLOPs and minimum bytes per event, counted analytically from the config and the realized
  lengths (see :func:`count_flops` and :func:`count_min_bytes`), turned into achieved FLOP/s and
  bytes/s and a fraction of a ceiling measured in the same run (a large matmul and a large
  copy on the device); on CUDA also against assumed H200 numbers (:data:`H200_SPEC`).
- with ``--compile``, ``torch.compile(model)`` of the packed model (compile time separately;
  a failure is reported with its reason, not raised).
- with ``--data DIR``, the time :class:`~iceaggr.loader.EventLoader` needs to produce a batch
  from a Kaggle-layout folder, next to the step time (does the loader keep up?).

Batches are synthetic :class:`~iceaggr.batch.DomBatch`es built in memory (no files) whose
lengths follow the real distribution after the 3,000-pulse cap (DESIGN.md section 3: mean ~109
pulses and ~65 hit DOMs per event, ~78% single-pulse DOMs, a heavy tail), see
:func:`sample_lengths`; features are raw-scale (time ns, charge p.e., xyz m) because the model
normalizes them. The realized statistics are printed. Batches are on the device before timing
(host-to-device copies are not timed). Warm-up steps are excluded; each repeat times ``--steps``
steps over the same batches; the median and best repeat are reported.

Run from the repository root::

    python benchmarks/throughput.py --quick              # CPU, small batch, < 1 minute
    python benchmarks/throughput.py --device cpu         # batch 256 on the CPU (slow)
    python benchmarks/throughput.py --data data/synthetic --quick   # + loader vs step time

On a GPU box::

    python benchmarks/throughput.py --device cuda --precision fp32 bf16 --compile

Prints a Markdown table and writes JSON (default ``benchmarks/results/throughput.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from iceaggr.data.batch import PULSE_FEATURES, DomBatch
from iceaggr.data.geometry import NUM_SENSORS
from iceaggr.data.loader import Truncation
from iceaggr.models.model import IceAggrModel, ModelConfig
from iceaggr.models.normalization import NUM_SUMMARY_FEATURES
from iceaggr.training.config import ExperimentConfig, load_config
from iceaggr.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "experiments" / "iceaggr_baseline" / "config.yaml"
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "throughput.json"
PRECISIONS = ("fp32", "bf16")

H200_SPEC: dict[str, float] = {
    "bf16_flops_per_s": 780e12,
    "fp32_flops_per_s": 60e12,
    "copy_bytes_per_s": 4.2e12,
}
"""Assumed H200 ceilings (dense bf16 tensor-core and fp32 non-tensor-core matmul, device copy
bandwidth counting read + write); the same run also measures a matmul and a copy."""

ADAMW_BYTES_PER_PARAM = 40
"""fp32 bytes one training step moves per parameter at least: forward read (4), backward read
(4), gradient write (4), AdamW reads parameter, gradient, both moments (16) and writes
parameter and moments (12)."""
STATE_BYTES_PER_PARAM = 16
"""Resident fp32 bytes per parameter during training: parameter, gradient, two AdamW moments."""
PADDED_STEP_EFFICIENCY = 0.25
"""Assumed fraction of the measured matmul ceiling a padded step reaches, used to predict its
step time (``--max-step-s``) only when no packed step was measured to scale from."""


# ------------------------------------------------------------------------ synthetic lengths


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


# ------------------------------------------------------------------------ analytic counts


@dataclass
class FlopCount:
    """Forward FLOPs of one batch (multiply-add = 2 FLOPs), by part. Python ints: exact."""

    dom_blocks: int
    """QKV, projection and MLP matmuls of the DOM transformer: 2 * weights * pulses * layers."""
    event_blocks: int
    """The same for the event transformer, over hit DOMs."""
    dom_attention: int
    """Scores and values: 4 * d * L^2 per sequence and layer (L the length attended over)."""
    event_attention: int
    embed_head: int
    """Pulse, geometry, summary and moment embeddings and the output head."""

    @property
    def total(self) -> int:
        return (
            self.dom_blocks
            + self.event_blocks
            + self.dom_attention
            + self.event_attention
            + self.embed_head
        )

    @property
    def blocks(self) -> int:
        """Everything that scales with the number of layers."""
        return self.dom_blocks + self.event_blocks + self.dom_attention + self.event_attention

    def scaled(self, factor: int) -> FlopCount:
        return FlopCount(**{k: v * factor for k, v in asdict(self).items()})

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(**{k: v + getattr(other, k) for k, v in asdict(self).items()})


TRAIN_FLOP_FACTOR = 3
"""Forward + backward = 3x forward (the backward computes gradients of inputs and weights)."""


def _block_weights(cfg: ModelConfig) -> int:
    """Matmul weights of one block: QKV (d x 3d), projection (d x d), MLP (d x h, h x d)."""
    d, hidden = cfg.d_model, int(cfg.mlp_ratio * cfg.d_model)
    return 3 * d * d + d * d + 2 * d * hidden


def _attention_flops(d_model: int, lengths: np.ndarray, mode: str) -> tuple[int, int]:
    """(attention FLOPs of one layer, tokens the blocks run on) for these sequence lengths.

    ``useful``: the actual lengths; length-1 sequences need no attention (the output is the
    value), so they count 0. ``packed``: what the packed model executes (every sequence of a
    power-of-two bucket padded to the bucket's longest; length 1 skipped). ``padded``: every
    sequence padded to the longest, length 1 included.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if mode == "useful":
        long = lengths[lengths > 1]
        return 4 * d_model * int((long * long).sum()), int(lengths.sum())
    if mode == "padded":
        longest = int(lengths.max())
        return 4 * d_model * lengths.size * longest**2, lengths.size * longest
    if mode == "packed":
        bucket = np.ceil(np.log2(lengths)).astype(np.int64)
        total = 0
        for b in np.unique(bucket[bucket > 0]):
            in_bucket = lengths[bucket == b]
            total += 4 * d_model * in_bucket.size * int(in_bucket.max()) ** 2
        return total, int(lengths.sum())
    raise ValueError(f"mode must be 'useful', 'packed' or 'padded', got {mode!r}")


def count_flops(
    cfg: ModelConfig, pulses_per_dom: np.ndarray, doms_per_event: np.ndarray, mode: str = "useful"
) -> FlopCount:
    """Forward FLOPs of one batch with these lengths (multiply by TRAIN_FLOP_FACTOR to train).

    Matmuls count 2 FLOPs per weight per token (biases, norms, GELU and softmax are not
    counted); ``mode`` chooses the tokens: ``useful`` the real ones (the work the model needs,
    the same for both attention implementations), ``packed``/``padded`` what each executes.
    """
    d = cfg.d_model
    n_pulses, n_doms, n_events = int(pulses_per_dom.sum()), pulses_per_dom.size, doms_per_event.size
    dom_attn, dom_tokens = _attention_flops(d, pulses_per_dom, mode)
    event_attn, event_tokens = _attention_flops(d, doms_per_event, mode)
    if mode == "packed":  # blocks run on the packed tokens; only attention is bucket-padded
        dom_tokens, event_tokens = n_pulses, n_doms
    weights = _block_weights(cfg)
    n_summary = NUM_SUMMARY_FEATURES
    embed_head = 2 * (
        n_pulses * len(PULSE_FEATURES) * d  # pulse embedding
        + n_doms * (3 * d + d * d + n_summary * d)  # geometry MLP + summary embedding
        + n_events * (n_summary * d + d * d + d * d + 4 * d)  # moment MLP + head
    )
    return FlopCount(
        dom_blocks=2 * weights * dom_tokens * cfg.dom_layers,
        event_blocks=2 * weights * event_tokens * cfg.event_layers,
        dom_attention=dom_attn * cfg.dom_layers,
        event_attention=event_attn * cfg.event_layers,
        embed_head=embed_head,
    )


def activation_bytes(precision: str) -> int:
    """Bytes of one activation element: fp32 4; bf16 autocast keeps matmul outputs in bf16."""
    return 2 if precision == "bf16" else 4


def count_min_bytes(
    cfg: ModelConfig,
    n_pulses: int,
    n_doms: int,
    n_events: int,
    n_params: int,
    precision: str,
) -> dict[str, int]:
    """Bytes one training step of this batch must move at least, by part.

    Activations: per token and block, a fused implementation still materializes the block
    input (d), Q/K/V (3d), the attention output (d), the residual after attention (d) and the
    MLP hidden (h), i.e. ``F = 6d + h`` elements (LayerNorm and GELU fused into the matmuls,
    attention scores never stored, as in flash attention). Each is written and read once in
    the forward, read again in the backward, and its gradient written and read once: 5F
    elements of ``activation_bytes(precision)``. Inputs: the raw features read once.
    Parameters and optimizer state: ADAMW_BYTES_PER_PARAM per parameter per step (divide by
    the batch for a per-event share).
    """
    d, hidden = cfg.d_model, int(cfg.mlp_ratio * cfg.d_model)
    per_token_block = 5 * (6 * d + hidden) * activation_bytes(precision)
    return {
        "activations": per_token_block * (n_pulses * cfg.dom_layers + n_doms * cfg.event_layers),
        "inputs": 4 * (n_pulses * len(PULSE_FEATURES) + n_doms * 3 + n_events * 3)
        + 8 * (n_doms + n_events + 2),
        "parameters_optimizer": ADAMW_BYTES_PER_PARAM * n_params,
    }


def estimate_peak_bytes(
    cfg: ModelConfig, pulses_per_dom: np.ndarray, doms_per_event: np.ndarray, n_params: int
) -> int:
    """Rough fp32 peak memory of a training step (used to skip configurations that cannot fit).

    Per block and token the autograd graph keeps ~20 d-sized tensors (inputs and outputs of the
    norms, matmuls and GELU, Q/K/V copies); attention keeps the scores and probabilities of
    every layer (scaled_dot_product_attention's math path, shape (n, heads, L, L)) and needs
    them once more transiently; plus parameters, gradients and AdamW state.
    """
    d = cfg.d_model
    mode = cfg.attention
    total = STATE_BYTES_PER_PARAM * n_params
    for lengths, layers, heads in (
        (pulses_per_dom, cfg.dom_layers, cfg.dom_heads),
        (doms_per_event, cfg.event_layers, cfg.event_heads),
    ):
        lengths = np.asarray(lengths, dtype=np.int64)
        if mode == "padded":
            groups = [(lengths.size, int(lengths.max()))]
            tokens = lengths.size * int(lengths.max())
        else:
            bucket = np.ceil(np.log2(lengths)).astype(np.int64)
            groups = [
                (int((bucket == b).sum()), int(lengths[bucket == b].max()))
                for b in np.unique(bucket[bucket > 0])
            ]
            tokens = int(lengths.sum()) + sum(n * length for n, length in groups)
        scores = sum(n * heads * length * length for n, length in groups)
        total += 4 * (max(layers, 1) * (20 * d * tokens + 2 * scores) + 2 * scores)
    return total


# ------------------------------------------------------------------------ measurement helpers


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


# ------------------------------------------------------------------------ one configuration


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


# ------------------------------------------------------------------------ results


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


@dataclass
class Row:
    device: str
    precision: str
    attention: str
    """``packed``, ``padded`` or ``packed+compile``."""
    batch_size: int
    events_per_s: float
    """Median over repeats."""
    events_per_s_best: float
    step_ms: float
    step_ms_best: float
    peak_mb: float
    flops_per_event: float
    """Useful training FLOPs (forward + backward), the same count for both implementations."""
    executed_flops_per_event: float
    """Training FLOPs this implementation executes (padding included)."""
    bytes_per_event: float
    """Minimum bytes (see count_min_bytes), parameter/optimizer traffic amortized over the batch."""
    gflop_per_s: float
    flop_fraction: float
    """Of the measured matmul ceiling of this device and precision."""
    gb_per_s: float
    byte_fraction: float
    """Of the measured copy bandwidth of this device."""
    flop_fraction_spec: float | None
    byte_fraction_spec: float | None
    estimated_peak_mb: float
    steps_per_repeat: int
    repeats: int
    warmup: int
    compile_s: float | None = None
    data: dict[str, float] = field(default_factory=dict)
    """Realized length statistics of the timed batches."""


def _pool_lengths(batches: Sequence[DomBatch]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(b.dom_lengths().numpy(), b.event_lengths().numpy()) for b in batches]


def per_event_counts(
    model_cfg: ModelConfig, batches: Sequence[DomBatch], n_params: int, precision: str
) -> dict[str, Any]:
    """Useful and executed training FLOPs and minimum bytes per event, averaged over batches."""
    useful = FlopCount(0, 0, 0, 0, 0)
    executed = 0
    min_bytes: dict[str, int] = {}
    n_events = 0
    for pulses, doms in _pool_lengths(batches):
        useful = useful + count_flops(model_cfg, pulses, doms, "useful")
        executed += count_flops(model_cfg, pulses, doms, model_cfg.attention).total
        part = count_min_bytes(
            model_cfg, int(pulses.sum()), pulses.size, doms.size, n_params, precision
        )
        for k, v in part.items():
            min_bytes[k] = min_bytes.get(k, 0) + v
        n_events += doms.size
    train = useful.scaled(TRAIN_FLOP_FACTOR)
    return {
        "flops": train.total / n_events,
        "flops_breakdown": {k: v / n_events for k, v in asdict(train).items()},
        "executed_flops": TRAIN_FLOP_FACTOR * executed / n_events,
        "bytes": sum(min_bytes.values()) / n_events,
        "bytes_breakdown": {k: v / n_events for k, v in min_bytes.items()},
    }


def max_estimated_peak(model_cfg: ModelConfig, batches: Sequence[DomBatch], n_params: int) -> int:
    return max(
        estimate_peak_bytes(model_cfg, pulses, doms, n_params)
        for pulses, doms in _pool_lengths(batches)
    )


def make_row(
    *,
    device: torch.device,
    precision: str,
    attention: str,
    model_cfg: ModelConfig,
    batches: Sequence[DomBatch],
    timing: Timing,
    ceiling: Ceiling,
    n_params: int,
    warmup: int,
) -> Row:
    batch_size = batches[0].num_events
    counts = per_event_counts(model_cfg, batches, n_params, precision)
    med, best = statistics.median(timing.step_s), min(timing.step_s)
    eps = batch_size / med
    flop_s, byte_s = counts["flops"] * eps, counts["bytes"] * eps
    return Row(
        device=device.type,
        precision=precision,
        attention=attention,
        batch_size=batch_size,
        events_per_s=eps,
        events_per_s_best=batch_size / best,
        step_ms=1e3 * med,
        step_ms_best=1e3 * best,
        peak_mb=timing.peak_bytes / 2**20,
        flops_per_event=counts["flops"],
        executed_flops_per_event=counts["executed_flops"],
        bytes_per_event=counts["bytes"],
        gflop_per_s=flop_s / 1e9,
        flop_fraction=flop_s / ceiling.matmul_flops_per_s,
        gb_per_s=byte_s / 1e9,
        byte_fraction=byte_s / ceiling.copy_bytes_per_s,
        flop_fraction_spec=flop_s / ceiling.spec_flops_per_s if ceiling.spec_flops_per_s else None,
        byte_fraction_spec=byte_s / ceiling.spec_bytes_per_s if ceiling.spec_bytes_per_s else None,
        estimated_peak_mb=max_estimated_peak(model_cfg, batches, n_params) / 2**20,
        steps_per_repeat=len(batches),
        repeats=len(timing.step_s),
        warmup=warmup,
        compile_s=timing.compile_s,
        data=batches_stats(batches),
    )


def markdown_table(rows: Sequence[Row]) -> str:
    header = (
        "| device | precision | attention | batch | events/s | best events/s | step ms | peak MB "
        "| GFLOP/s | % FLOP ceiling | GB/s | % byte ceiling |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r.device} | {r.precision} | {r.attention} | {r.batch_size} "
            f"| {r.events_per_s:,.1f} | {r.events_per_s_best:,.1f} | {r.step_ms:,.1f} "
            f"| {r.peak_mb:,.0f} | {r.gflop_per_s:,.1f} | {100 * r.flop_fraction:.1f} "
            f"| {r.gb_per_s:,.2f} | {100 * r.byte_fraction:.1f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------ the run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small batch, few steps (< 1 min, CPU)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="experiment YAML")
    p.add_argument("--batch-size", type=int, help="events per step (default: config; quick 16)")
    p.add_argument(
        "--padded-batch-size",
        type=int,
        help="batch of the padded reference (default: largest power of two <= --batch-size "
        "that fits the memory budget and --max-step-s)",
    )
    p.add_argument("--steps", type=int, help="distinct batches = timed steps per repeat")
    p.add_argument("--warmup", type=int, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, help="timed repeats (median and best reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic batches and model")
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's; --quick: 1, since the ops of a small "
        "batch are too short to share and threads waiting on each other dominate)",
    )
    p.add_argument("--memory-budget-gb", type=float, help="skip configurations estimated above")
    p.add_argument(
        "--max-step-s",
        type=float,
        help="padded batch is halved until its predicted step takes less (default 30; quick 2)",
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    p.add_argument("--data", type=Path, help="Kaggle-layout folder: time EventLoader batches")
    p.add_argument("--loader-batches", type=int, help="batches timed from --data (default 20)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "steps": 2 if quick else 8,
        "warmup": 1 if quick else 2,
        "repeats": 2 if quick else 3,
        "max_step_s": 2.0 if quick else 30.0,
        "loader_batches": 5 if quick else 20,
        "threads": 1 if quick else None,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "repeats", "loader_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("batch_size", "padded_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document (also printed and written)."""
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return Benchmark(args).run()
    finally:
        torch.set_num_threads(threads_before)


class Benchmark:
    """One run: the model, its synthetic batches, and what was measured so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cfg = load_config(args.config)
        if self.cfg.model.arch != "iceaggr":
            raise SystemExit(
                f"{args.config}: model.arch is {self.cfg.model.arch!r}; this benchmark times and "
                "counts the FLOPs of IceAggrModel (model.arch: iceaggr) only"
            )
        self.trunc = self.cfg.data.truncation()
        self.batch_size: int = args.batch_size or (16 if args.quick else self.cfg.train.batch_size)
        self.packed_cfg = dataclasses.replace(self.cfg.model, attention="packed")
        self.padded_cfg = dataclasses.replace(self.cfg.model, attention="padded")
        torch.manual_seed(args.seed)
        model = IceAggrModel(self.packed_cfg)
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.n_params = model.num_parameters()
        self.pools: dict[int, list[DomBatch]] = {}
        self.rows: list[Row] = []
        self.ratios: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.ceilings: list[Ceiling] = []
        self.printed: list[str] = []

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.printed.append(line)

    def pool(self, batch_size: int) -> list[DomBatch]:
        """The ``--steps`` synthetic batches of this size (the same for every configuration)."""
        if batch_size not in self.pools:
            self.pools[batch_size] = synthetic_batches(
                self.args.steps, batch_size, self.args.seed, self.trunc
            )
        return self.pools[batch_size]

    def skip(self, device: torch.device, precision: str, attention: str, b: int, why: str) -> None:
        line = f"skipped: {device.type} {precision} {attention} batch {b}: {why}"
        self.say(line)
        self.skipped.append(
            dict(
                device=device.type,
                precision=precision,
                attention=attention,
                batch_size=b,
                reason=why,
                line=line,
            )
        )

    # -------------------------------------------------------------------- measurement

    def measure(
        self,
        device: torch.device,
        precision: str,
        ceiling: Ceiling,
        budget: int,
        model_cfg: ModelConfig,
        attention: str,
        batches: list[DomBatch],
        compile_model: bool = False,
    ) -> Row | None:
        """Time one configuration and add its row, or record why it was skipped."""
        b = batches[0].num_events
        need = max_estimated_peak(model_cfg, batches, self.n_params)
        if need > budget:
            why = f"would need ~{need / 2**30:.1f} GB (budget {budget / 2**30:.1f} GB)"
            self.skip(device, precision, attention, b, why)
            return None
        on_device = [x.to(device) for x in batches]
        try:
            timing = time_training(
                self.cfg,
                model_cfg,
                self.state,
                on_device,
                device,
                precision,
                self.args.warmup,
                self.args.repeats,
                compile_model,
            )
        except Exception as err:
            oom = isinstance(err, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(
                err
            )
            if oom:
                why = f"out of memory (estimated {need / 2**30:.1f} GB): {err}"
            elif compile_model:
                why = f"torch.compile failed: {type(err).__name__}: {err}"
            else:
                raise
            self.skip(device, precision, attention, b, why.split("\n")[0][:300])
            return None
        row = make_row(
            device=device,
            precision=precision,
            attention=attention,
            model_cfg=model_cfg,
            batches=batches,
            timing=timing,
            ceiling=ceiling,
            n_params=self.n_params,
            warmup=self.args.warmup,
        )
        self.rows.append(row)
        self.say(
            f"  {device.type} {precision} {attention} batch {b}: {row.events_per_s:,.1f} "
            f"events/s, {row.step_ms:,.1f} ms/step, peak {row.peak_mb:,.0f} MB (estimated "
            f"{row.estimated_peak_mb:,.0f} MB)"
            + (f", compile {row.compile_s:.1f} s" if row.compile_s is not None else "")
        )
        return row

    def padded_batch_size(
        self,
        device: torch.device,
        precision: str,
        ceiling: Ceiling,
        budget: int,
        packed: Row | None,
    ) -> int | None:
        """The largest batch (halving from --batch-size) whose padded step fits memory and time.

        The step time is predicted by scaling the measured packed step by the ratio of executed
        FLOPs (or, without one, from the matmul ceiling); every batch passed over is recorded as
        skipped with its reason.
        """
        args = self.args
        for b in [args.padded_batch_size] if args.padded_batch_size else halvings(self.batch_size):
            lengths = _pool_lengths(self.pool(b))
            need = max_estimated_peak(self.padded_cfg, self.pool(b), self.n_params)
            executed = sum(
                count_flops(self.padded_cfg, pulses, doms, "padded").total
                for pulses, doms in lengths
            )
            step_flops = TRAIN_FLOP_FACTOR * executed / len(lengths)
            if packed is not None:
                packed_flops = packed.executed_flops_per_event * packed.batch_size
                predicted_s = packed.step_ms / 1e3 * step_flops / packed_flops
            else:
                predicted_s = step_flops / (PADDED_STEP_EFFICIENCY * ceiling.matmul_flops_per_s)
            too_slow = args.padded_batch_size is None and predicted_s > args.max_step_s
            if need <= budget and not too_slow:
                return b
            why = (
                f"would need ~{need / 2**30:.1f} GB (budget {budget / 2**30:.1f} GB)"
                if need > budget
                else f"predicted {predicted_s:,.1f} s/step > --max-step-s {args.max_step_s:g} "
                f"(memory ~{need / 2**30:.2f} GB would fit)"
            )
            self.skip(device, precision, "padded", b, why)
        return None

    def run_device(self, device: torch.device) -> None:
        args = self.args
        budget = memory_budget_bytes(device, args.memory_budget_gb)
        for precision in args.precision:
            ceiling = measure_ceilings(device, precision, args.quick)
            self.ceilings.append(ceiling)
            spec = (
                f"; assumed H200: {ceiling.spec_flops_per_s / 1e12:.0f} TFLOP/s, "
                f"{ceiling.spec_bytes_per_s / 1e12:.1f} TB/s"
                if ceiling.spec_flops_per_s and ceiling.spec_bytes_per_s
                else ""
            )
            self.say(
                f"ceiling {device.type} {precision}: matmul "
                f"{ceiling.matmul_flops_per_s / 1e9:,.1f} GFLOP/s (n={ceiling.matmul_n}), copy "
                f"{ceiling.copy_bytes_per_s / 1e9:,.1f} GB/s{spec}"
            )
            # One untimed step of each model first, so that one-time costs (lazy kernel
            # initialization, code pages, allocator pools) land in no configuration's numbers.
            tiny = [x.to(device) for x in self.pool(2)[:1]]
            for model_cfg in (self.packed_cfg, self.padded_cfg):
                time_training(self.cfg, model_cfg, self.state, tiny, device, precision, 0, 1)

            common = (device, precision, ceiling, budget)
            packed = self.measure(*common, self.packed_cfg, "packed", self.pool(self.batch_size))
            if args.compile:
                self.measure(
                    *common, self.packed_cfg, "packed+compile", self.pool(self.batch_size), True
                )
            b = self.padded_batch_size(*common, packed)
            if b is None:
                continue
            padded = self.measure(*common, self.padded_cfg, "padded", self.pool(b))
            same = packed if b == self.batch_size else None
            if same is None and padded is not None:
                same = self.measure(*common, self.packed_cfg, "packed", self.pool(b))
            if padded is None or same is None:
                continue
            speedup = same.events_per_s / padded.events_per_s
            line = (
                f"speed-up packed/padded ({device.type} {precision}, batch {b}): {speedup:.1f}x "
                f"({same.events_per_s:,.1f} vs {padded.events_per_s:,.1f} events/s; peak memory "
                f"{same.peak_mb:,.0f} vs {padded.peak_mb:,.0f} MB)"
            )
            self.ratios.append(
                dict(
                    device=device.type,
                    precision=precision,
                    batch_size=b,
                    packed_events_per_s=same.events_per_s,
                    padded_events_per_s=padded.events_per_s,
                    speedup=speedup,
                    line=line,
                )
            )

    def run_loader(self) -> dict[str, Any]:
        data = self.args.data
        if not data.is_dir():
            raise SystemExit(
                f"--data {data}: no such folder; make one with "
                f"`iceaggr synth --out {data} --events 20000`"
            )
        result = time_loader(data, self.cfg, self.batch_size, self.args.loader_batches)
        result["vs_step"] = [
            dict(
                device=r.device,
                precision=r.precision,
                step_ms=r.step_ms,
                loader_over_step=result["batch_ms"] / r.step_ms,
                keeps_up=result["batch_ms"] <= r.step_ms,
            )
            for r in self.rows
            if r.attention == "packed" and r.batch_size == self.batch_size
        ]
        return result

    # -------------------------------------------------------------------- the report

    def describe_data(self) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
        """Print and return the length statistics and the per-event counts."""
        args, trunc = self.args, self.trunc
        pkd = self.packed_cfg
        self.say(
            f"model: {args.config} (d_model {pkd.d_model}, {pkd.dom_layers} DOM + "
            f"{pkd.event_layers} event layers, {self.n_params:,} parameters), torch "
            f"{torch.__version__}, {torch.get_num_threads()} CPU threads"
        )
        rng = np.random.default_rng([args.seed, 1])
        sample = length_stats(*sample_lengths(20_000, rng, trunc))
        self.say(
            f"synthetic lengths (20,000 events, caps {trunc.max_pulses_per_event}/event, "
            f"{trunc.max_pulses_per_dom}/DOM, {trunc.max_doms_per_event} DOMs/event): "
            f"{sample['mean_pulses_per_event']:.1f} pulses and "
            f"{sample['mean_doms_per_event']:.1f} hit DOMs per event, single-pulse DOM fraction "
            f"{sample['single_pulse_fraction']:.3f}, pulses/event P50 "
            f"{sample['pulses_per_event_p50']:.0f} P90 {sample['pulses_per_event_p90']:.0f} P99 "
            f"{sample['pulses_per_event_p99']:.0f}, DOMs/event {sample['min_doms_per_event']}-"
            f"{sample['max_doms_per_event']}, longest DOM {sample['max_pulses_per_dom']} pulses "
            "(real data, DESIGN.md 3: ~109, ~65, ~0.78)"
        )
        main = self.pool(self.batch_size)
        timed = batches_stats(main)
        self.say(
            f"timed batches ({args.steps} x {self.batch_size} events): "
            f"{timed['mean_pulses_per_event']:.1f} pulses and {timed['mean_doms_per_event']:.1f}"
            f" DOMs per event, single-pulse fraction {timed['single_pulse_fraction']:.3f}, "
            f"longest DOM {timed['max_pulses_per_dom']} pulses, largest event "
            f"{timed['max_doms_per_event']} DOMs"
        )
        per_event = {p: per_event_counts(pkd, main, self.n_params, p) for p in PRECISIONS}
        fp32 = per_event["fp32"]
        parts = ", ".join(f"{k} {v / 1e9:.4f}" for k, v in fp32["flops_breakdown"].items())
        self.say(
            f"per event, training step (fwd + bwd = 3x fwd), useful work: "
            f"{fp32['flops'] / 1e9:.3f} GFLOP ({parts}); minimum bytes "
            f"{fp32['bytes'] / 1e6:.2f} MB fp32, {per_event['bf16']['bytes'] / 1e6:.2f} MB bf16 "
            f"(of which parameters + AdamW "
            f"{fp32['bytes_breakdown']['parameters_optimizer'] / 1e6:.2f} MB at batch "
            f"{self.batch_size})"
        )
        return sample, timed, per_event

    def report(self, loader: dict[str, Any] | None) -> None:
        self.say()
        self.say(markdown_table(self.rows))
        self.say()
        for ratio in self.ratios:
            self.say(ratio["line"])
        for s in self.skipped:
            self.say(s["line"])
        for r in self.rows:
            if r.flop_fraction_spec is not None and r.byte_fraction_spec is not None:
                self.say(
                    f"vs assumed H200 ({r.device} {r.precision} {r.attention} batch "
                    f"{r.batch_size}): {100 * r.flop_fraction_spec:.2f}% of FLOP/s, "
                    f"{100 * r.byte_fraction_spec:.2f}% of bytes/s"
                )
        if loader is not None:
            stats = loader["data_stats"]
            self.say(
                f"loader ({loader['data']}, batch {loader['batch_size']}, one thread, no "
                f"prefetch): {loader['batch_ms']:.1f} ms/batch = {loader['steady_batch_ms']:.1f} "
                f"steady (CPU {loader['steady_batch_cpu_ms']:.1f}) + file read "
                f"{loader['file_read_ms']:.0f} ms (CPU {loader['file_read_cpu_ms']:.0f}) amortized "
                "over "
                f"{loader['events_per_file']:,.0f} events/file; {loader['events_per_s']:,.0f} "
                f"events/s; its batches: {stats['mean_pulses_per_event']:.1f} pulses, "
                f"{stats['mean_doms_per_event']:.1f} DOMs per event, single-pulse fraction "
                f"{stats['single_pulse_fraction']:.3f}"
            )
            for v in loader["vs_step"]:
                verdict = "keeps up" if v["keeps_up"] else "does NOT keep up (data-bound)"
                self.say(
                    f"  vs {v['device']} {v['precision']} packed step {v['step_ms']:.1f} ms: "
                    f"loader/step = {v['loader_over_step']:.2f} -> {verdict}"
                )
        cuda = "CUDA: max_memory_allocated; " if any(r.device == "cuda" for r in self.rows) else ""
        self.say(
            f"peak MB: {cuda}CPU: {CpuPeakMemory().method}. Timing: {self.args.warmup} warm-up "
            f"step(s) excluded, {self.args.repeats} repeat(s) of {self.args.steps} step(s); "
            "events/s and step ms are the median repeat."
        )

    def run(self) -> dict[str, Any]:
        args = self.args
        sample, timed, per_event = self.describe_data()
        for device in devices_for(args.device):
            self.run_device(device)
        loader = self.run_loader() if args.data is not None else None
        self.report(loader)
        doc: dict[str, Any] = {
            "command": ["python", "benchmarks/throughput.py", *getattr(args, "argv", [])],
            "config": str(args.config),
            "model": {**asdict(self.packed_cfg), "parameters": self.n_params},
            "batch_size": self.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "quick": args.quick,
            "seed": args.seed,
            "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "synthetic_lengths": sample,
            "timed_batches": timed,
            "per_event": per_event,
            "flop_count_rule": count_flops.__doc__,
            "byte_count_rule": count_min_bytes.__doc__,
            "h200_assumed": H200_SPEC,
            "ceilings": [asdict(c) for c in self.ceilings],
            "rows": [asdict(r) for r in self.rows],
            "ratios": self.ratios,
            "skipped": self.skipped,
            "loader": loader,
            "printed": self.printed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
        return doc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
