"""What a training step costs on paper, and the result rows that set it against measured time.

FLOPs and minimum bytes per event counted analytically from the model config and the realized
lengths (:func:`count_flops`, :func:`count_min_bytes`), the estimated peak memory of a
configuration (:func:`estimate_peak_bytes`), and :class:`Row`, one line of the throughput
table (:func:`make_row`, :func:`markdown_table`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from benchmarks.harness import Ceiling, Timing, batches_stats
from iceaggr.data.batch import PULSE_FEATURES, DomBatch
from iceaggr.models.model import ModelConfig
from iceaggr.models.normalization import NUM_SUMMARY_FEATURES

ADAMW_BYTES_PER_PARAM = 40
"""fp32 bytes one training step moves per parameter at least: forward read (4), backward read
(4), gradient write (4), AdamW reads parameter, gradient, both moments (16) and writes
parameter and moments (12)."""
STATE_BYTES_PER_PARAM = 16
"""Resident fp32 bytes per parameter during training: parameter, gradient, two AdamW moments."""


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
