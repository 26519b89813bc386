"""The hierarchical DOM/event transformer that reconstructs a neutrino's arrival direction.

Pulses -> :class:`~iceaggr.models.normalization.InputNormalizer` -> pulse embedding -> DOM
transformer over each DOM's pulses -> masked-mean pool -> + geometry embedding + DOM-summary
embedding -> event transformer over the event's DOMs -> masked-mean pool (+ an embedding of the
event-mean DOM summaries) -> MLP head, plus a linear readout of the event's prior direction
(``ModelConfig.prior_direction``: the improved line fit by default, or the moment direction; the
readout keeps its name ``moment_readout``, see ``IceAggrModel.__init__``) -> unit direction and
a von Mises-Fisher concentration ``kappa``.

Sequences vary wildly in length (~78% of DOMs hold one pulse, a few hold hundreds; events hold 1
to thousands of DOMs), so attention is "packed": sequences are grouped into power-of-two length
buckets (1, 2, 3-4, 5-8, ...), padded only within their bucket, run through
``scaled_dot_product_attention`` with a key-padding mask and scattered back. Length-1 sequences
skip the softmax (attending to one token returns its value). ``attention="padded"`` is the naive
reference with the same parameters: every sequence padded to the batch maximum, all layers run
on the padded tensor. There are no positional encodings (time is a feature), so the model is
invariant to the order of pulses within a DOM and of DOMs within an event.

Usage (``build_model`` and ``param_groups`` are in :mod:`iceaggr.models.builder`)::

    model = build_model(baseline_model_config())   # IceAggrModel; arch="original": OriginalModel
    out = model(batch)                # out.direction (B, 3), out.kappa (B,)
    optim = torch.optim.AdamW(param_groups(model, weight_decay=0.01), lr=3e-4)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from iceaggr.data.batch import PULSE_FEATURES, DomBatch
from iceaggr.models.line_fit import line_fit_direction
from iceaggr.models.normalization import NUM_SUMMARY_FEATURES, SUMMARY_TRANSFORMS, InputNormalizer

logger = logging.getLogger(__name__)

KAPPA_FLOOR = 1e-3
"""Added to softplus so kappa stays > 0 (the vMF NLL has -log kappa)."""
HEAD_INIT_STD = 1e-2
"""Output-layer init: small so early predictions are not saturated, nonzero so direction exists."""
PULSE_BIAS_INIT_STD = 0.02
"""Init std of the pulse-embedding bias (not zero: see IceAggrModel.__init__)."""
MOMENT_COLUMNS = tuple(
    i for i, row in enumerate(SUMMARY_TRANSFORMS) if row.name.startswith("dom_moment_")
)
"""Columns of the DOM summaries holding the x, y, z position-time moments."""
assert len(MOMENT_COLUMNS) == 3


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of the network :func:`~iceaggr.models.builder.build_model` makes (``arch``)
    and its sizes."""

    arch: Literal["iceaggr", "original"] = "iceaggr"
    """"iceaggr": :class:`IceAggrModel`, this project's pre-LN hierarchical transformer with DOM
    summaries and a kappa head. "original": :class:`~iceaggr.models.original.OriginalModel`, the
    original project's first hierarchical network (post-LN DOM layers fed the four raw pulse
    features through one Linear; no kappa head), on which the stability table was measured."""

    d_model: int = 128
    """Width of pulse, DOM and event tokens; ~1.6M parameters at the defaults."""
    dom_heads: int = 4
    """Attention heads in the DOM transformer (head dim = d_model / dom_heads)."""
    dom_layers: int = 4
    """Blocks in the DOM transformer (over one DOM's pulses)."""
    event_heads: int = 4
    """Attention heads in the event transformer."""
    event_layers: int = 4
    """Blocks in the event transformer (over one event's DOMs)."""
    mlp_ratio: float = 4.0
    """Hidden width of each block's MLP relative to d_model (the usual transformer 4x)."""
    dropout: float = 0.0
    """Dropout on residual branches and the head; 0 by default, searched by Tune."""
    normalize: bool = True
    """Normalize every input (each architecture's table of per-feature transforms). False feeds
    raw units (time ~1e4 ns, charge up to thousands of p.e., metres), the table's "before" column.
    On arch "original" that is the original failure: its post-LN DOM layers take raw scales
    straight into attention, and at lr 1e-3 its first-layer gradients spike (tests/
    test_original.py). IceAggrModel's pre-LN blocks largely absorb raw scales: on the same raw
    batches its largest per-parameter gradient stays below 100 (~20 over 120 steps, 3 seeds),
    so on it False is not the original failure."""
    attention: Literal["packed", "padded"] = "packed"
    """"packed" (length buckets) or "padded" (naive reference, same parameters)."""
    moment_prior: float = 1.0
    """Initial weight of the event's prior direction (``prior_direction``) in the direction
    logits: the readout starts as ``moment_prior * identity``, so the untrained prediction is
    ``normalize(moment_prior * prior_dir + head)`` with the head's output ~0.02: the model
    starts from the prior and learns a correction, as seeded reconstructions do. 0 is the
    earlier zero init, under which every trial sat at ~1.58 rad for ~60 steps (the flat start;
    benchmarks/learning.py, lr 1e-3, batch 64, 500 held-out events, one thread on a 2-core CPU:
    1.5968 rad at step 20, 1.3031 at 100; 1 with the moment direction: 1.2123 and 1.2068; the
    line fit 1.1962). 0.3 (moment direction) let the head's shared direction back in at first
    (1.2452 rad at step 10, 1.2180 at 20; 1.2069 at 60, 1: 1.2096). Ignored by arch
    "original"."""
    prior_direction: Literal["moment", "line_fit"] = "line_fit"
    """The per-event direction that ``moment_prior`` weighs. "line_fit" (the default): the
    improved line fit of the whole event, the baseline printed beside every sweep, made by the
    loader from all the event's pulses (``DomBatch.line_fit``; for a batch made otherwise,
    :func:`iceaggr.models.line_fit.line_fit_direction` on its kept pulses). "moment": the
    direction of the event's mean position-time moment from the DOM summaries, a line fit
    without its hit selection and reweighting: the untrained model from it scored 1.2079 rad on
    500 synthetic held-out events, the line fit 1.1962 (see the README, "the moment prior and
    the line-fit prior").
    Ignored by arch "original"."""

    @property
    def uses_line_fit(self) -> bool:
        """Whether the loader must fit each event's line for this model (``DomBatch.line_fit``)."""
        return self.arch == "iceaggr" and self.prior_direction == "line_fit"

    def __post_init__(self) -> None:
        if self.arch not in ("iceaggr", "original"):
            raise ValueError(
                f"arch must be 'iceaggr' (this project's model) or 'original' (the original "
                f"project's first network), got {self.arch!r}"
            )
        for name in ("d_model", "dom_heads", "event_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dom_layers", "event_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dom_heads", "event_heads"):
            if self.d_model % getattr(self, name):
                raise ValueError(
                    f"d_model must be divisible by {name}, got d_model={self.d_model}, "
                    f"{name}={getattr(self, name)}"
                )
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ("packed", "padded"):
            raise ValueError(f"attention must be 'packed' or 'padded', got {self.attention!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        if self.prior_direction not in ("moment", "line_fit"):
            raise ValueError(
                "prior_direction must be 'moment' (the event's mean position-time moment) or "
                f"'line_fit' (the improved line fit), got {self.prior_direction!r}"
            )
        if not (math.isfinite(self.moment_prior) and self.moment_prior >= 0):
            raise ValueError(
                f"moment_prior must be a finite number >= 0 (0: no prior), got {self.moment_prior}"
            )


def debug_model_config(**overrides: object) -> ModelConfig:
    """Tiny model for tests: d_model 16, one DOM and one event layer, 2 heads."""
    base: dict[str, object] = dict(
        d_model=16, dom_heads=2, dom_layers=1, event_heads=2, event_layers=1
    )
    return ModelConfig(**(base | overrides))  # type: ignore[arg-type]


def baseline_model_config(**overrides: object) -> ModelConfig:
    """The defaults above: IceAggrModel at the original project's baseline size."""
    return ModelConfig(**overrides)  # type: ignore[arg-type]


@dataclass
class ModelOutput:
    direction: torch.Tensor
    """(B, 3) unit vector pointing to where the neutrino came from."""
    kappa: torch.Tensor
    """(B,) > 0 von Mises-Fisher concentration (1/rad^2 scale)."""


@dataclass
class EventFeatures:
    """What :meth:`IceAggrModel.forward_features` hands to the head."""

    pooled: torch.Tensor
    """(B, d) pooled event transformer output plus the embedded event-mean DOM summaries."""
    prior_dir: torch.Tensor
    """(B, 3) the event's prior direction (``ModelConfig.prior_direction``): a unit vector
    opposite to its mean position-time moment (0: no moment), or the line fit's direction."""


class SeqLayout:
    """Index plan for attention over ``N`` variable-length sequences of ``T`` packed tokens.

    Built once per forward from ``cu`` offsets and reused by every layer. Only the bucket
    composition is read on the host (one device->host copy of the lengths).
    """

    def __init__(self, cu: torch.Tensor, padded: bool) -> None:
        lengths = cu[1:] - cu[:-1]  # (N,)
        lengths_host = lengths.cpu()
        if lengths_host.numel() == 0 or int(lengths_host.min()) < 1:
            raise ValueError(
                f"got {lengths_host.numel()} sequences with min length "
                f"{lengths_host.min().item() if lengths_host.numel() else None}: every DOM needs "
                ">= 1 pulse and every event >= 1 DOM (drop empty ones in the loader)"
            )
        device = cu.device
        self.padded = padded
        self.num_tokens = int(lengths_host.sum())
        n_seq = lengths.numel()
        self.seq_index = torch.repeat_interleave(
            torch.arange(n_seq, device=device), lengths, output_size=self.num_tokens
        )  # (T,) sequence of each token
        self.lengths = lengths
        if padded:  # one bucket: every sequence, padded to the longest
            seqs = [torch.arange(n_seq, device=device)]
            max_lens = [int(lengths_host.max())]
        else:  # bucket b holds lengths in (2^(b-1), 2^b]; bucket 0 (length 1) skips attention
            bucket_host = torch.ceil(torch.log2(lengths_host.double())).long()  # (N,)
            counts = torch.bincount(bucket_host).tolist()
            max_per_bucket = torch.zeros(len(counts), dtype=torch.long).scatter_reduce(
                0, bucket_host, lengths_host, reduce="amax"
            )
            order = torch.argsort(bucket_host.to(device), stable=True)  # (N,)
            seqs, max_lens, start = [], [], 0
            for b, n in enumerate(counts):
                if n and b > 0:
                    seqs.append(order[start : start + n])
                    max_lens.append(int(max_per_bucket[b]))
                start += n
        # Per bucket: gather index into packed tokens (padding -> token 0, masked out) and scatter
        # index (padding -> a dummy row T that is dropped), plus the key-padding mask.
        self.buckets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for seq, max_len in zip(seqs, max_lens, strict=True):
            pos = torch.arange(max_len, device=device)  # (L,)
            mask = pos < lengths[seq, None]  # (n, L)
            idx = cu[seq, None] + pos  # (n, L)
            gather = torch.where(mask, idx, 0)  # (n, L)
            scatter = torch.where(mask, idx, self.num_tokens)  # (n, L)
            self.buckets.append((gather, scatter, mask))
        if self.buckets:
            self.scatter_all = torch.cat([s.flatten() for _, s, _ in self.buckets])  # (sum n*L,)
        if padded:
            # Position of each packed token in the (N, L) padded layout.
            self.token_pos = torch.arange(self.num_tokens, device=device) - cu[self.seq_index]

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Packed (T, d) -> the layout the blocks run on: (T, d) or padded (N, L, d)."""
        if not self.padded:
            return x
        gather, _, mask = self.buckets[0]
        return x[gather] * mask[..., None]  # (N, L, d), zeros at padding

    def to_packed(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_layout`: back to (T, d)."""
        return x[self.seq_index, self.token_pos] if self.padded else x

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Multi-head attention within each sequence. q, k, v: (T, h, hd) or (N, L, h, hd)."""
        if self.padded:
            _, _, mask = self.buckets[0]
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),  # (N, h, L, hd)
                attn_mask=mask[:, None, None, :],  # (N, 1, 1, L) key padding
            )  # (N, h, L, hd)
            return o.transpose(1, 2)  # (N, L, h, hd)
        if not self.buckets:  # all sequences have length 1: attention returns the value
            return v
        outs = []
        for gather, _, mask in self.buckets:
            o = F.scaled_dot_product_attention(
                q[gather].transpose(1, 2),  # (n, h, L, hd)
                k[gather].transpose(1, 2),
                v[gather].transpose(1, 2),
                attn_mask=mask[:, None, None, :],  # (n, 1, 1, L)
            )  # (n, h, L, hd)
            outs.append(o.transpose(1, 2).flatten(0, 1))  # (n * L, h, hd)
        base = torch.cat([v, v.new_zeros(1, *v.shape[1:])])  # (T + 1, h, hd); length-1 tokens = v
        out = base.index_put((self.scatter_all,), torch.cat(outs))  # (T + 1, h, hd)
        return out[:-1]  # (T, h, hd)

    def mean_pool(self, x: torch.Tensor) -> torch.Tensor:
        """Packed tokens (T, d) -> per-sequence mean (N, d); permutation invariant."""
        summed = x.new_zeros(self.lengths.numel(), x.shape[-1]).index_add(0, self.seq_index, x)
        return summed / self.lengths[:, None].to(x.dtype)  # (N, d)


class Block(nn.Module):
    """Pre-LayerNorm transformer block (attention + GELU MLP) over a :class:`SeqLayout`.

    Dropout acts on the residual branches only, not on attention probabilities, so the
    length-1 shortcut (output = value) is exact in training as well.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        hidden = int(mlp_ratio * d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
        # x: (T, d) packed or (N, L, d) padded; "..." below stands for either leading shape.
        qkv = self.qkv(self.ln1(x)).unflatten(-1, (3, self.n_heads, -1))  # (..., 3, h, hd)
        q, k, v = qkv.unbind(-3)  # each (..., h, hd)
        a = layout.attend(q, k, v).flatten(-2)  # (..., d)
        x = x + self.drop(self.proj(a))
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    """A stack of blocks plus a final LayerNorm, pooled to one vector per sequence."""

    def __init__(self, cfg: ModelConfig, n_heads: int, n_layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, n_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
        h = layout.to_layout(x)  # (T, d) or (N, L, d)
        for block in self.blocks:
            h = block(h, layout)
        # Pool, then normalize (timm's fc_norm): a mean of per-token LayerNorm outputs over
        # tens of DOMs averages towards one vector for every event, and the head then sees
        # almost no event-to-event variation (the model collapsed to the mean direction).
        return self.norm(layout.mean_pool(layout.to_packed(h)))  # (N, d)


class IceAggrModel(nn.Module):
    """Hierarchical transformer: pulses -> DOM tokens -> event vector -> direction and kappa."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.normalizer = InputNormalizer(cfg.normalize)
        self.pulse_embed = nn.Linear(len(PULSE_FEATURES), d)
        self.dom_encoder = Encoder(cfg, cfg.dom_heads, cfg.dom_layers)
        self.geometry_embed = nn.Sequential(nn.Linear(3, d), nn.GELU(), nn.Linear(d, d))
        self.summary_embed = nn.Linear(NUM_SUMMARY_FEATURES, d)
        self.moment_embed = nn.Sequential(
            nn.Linear(NUM_SUMMARY_FEATURES, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d)
        )  # the LayerNorm puts this path on the scale of the pooled transformer output
        self.event_encoder = Encoder(cfg, cfg.event_heads, cfg.event_layers)
        self.head = nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, 4)
        )  # 3 direction components + 1 kappa logit
        self.apply(self._init_weights)
        nn.init.normal_(self.head[-1].weight, std=HEAD_INIT_STD)
        # A pulse whose normalized features are all exactly 0 (t = 1e4 ns, q = 1 p.e., not
        # auxiliary: it happens in real data) would embed to an all-zero token with a zero
        # bias, stay exactly zero through every block, and hit each LayerNorm at zero
        # variance, where its gradient is 1/sqrt(eps) ~ 316 per norm (~5e9 pre-clip seen).
        # A non-zero learned bias gives every pulse token a spread over channels.
        nn.init.normal_(self.pulse_embed.bias, std=PULSE_BIAS_INIT_STD)
        # The direction of an event's mean position-time moment is, up to its sign, the line
        # fit's direction (the covariance of hit position and time): on 1,024 held-out
        # synthetic events -normalize(mean moment) alone scores 1.205 rad. The paths above never
        # learned to use it in 300 steps (lr 1e-3, batch 64: 1.508 rad, a constant direction
        # scores ~1.52-1.54): the mean moments are ~0.06 in size and Adam grows a weight by
        # about lr per step, so the head gets the moment's unit vector (scale-free: raw inputs,
        # normalize=false, give it the same size) through a linear map of its own, made last
        # (the other parameters draw the same random numbers as without it).
        # That map starts at moment_prior * identity, not at zero. From zero, Adam grows its 9
        # weights by ~lr per step while the head's last layer moves 128 weights per logit by
        # ~lr each, all the same way (its input is nearly the same vector for every event: at
        # init the head alone gives R ~0.94), so for ~60 steps the head's shared, batch-mean
        # direction outgrew the moment readout and every event got one direction (~1.58 rad;
        # R of the held-out predictions 0.999 at step 10, benchmarks/learning.py).
        # Started at the identity, the untrained model is the prior direction (the head adds
        # ~0.02) and training learns a correction, as seeded reconstructions do. The prior is
        # the line fit itself by default (cfg.prior_direction), the moment direction on request;
        # the map is the same either way.
        self.moment_readout = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.moment_readout.weight.copy_(cfg.moment_prior * torch.eye(3))
        logger.debug("IceAggrModel: %d parameters, %s", self.num_parameters(), cfg)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def input_features(self, batch: DomBatch) -> dict[str, torch.Tensor]:
        """Per-feature 1-D tensors exactly as they enter the network (after the normalizer)."""
        return self.normalizer(batch).as_dict()

    def forward_features(self, batch: DomBatch) -> EventFeatures:
        """Pooled event representation (B, d) and prior direction (B, 3)."""
        padded = self.cfg.attention == "padded"
        inputs = self.normalizer(batch)
        dom_layout = SeqLayout(batch.cu_pulses, padded)  # over pulses, one sequence per DOM
        event_layout = SeqLayout(batch.cu_doms, padded)  # over DOMs, one sequence per event
        x = self.pulse_embed(inputs.pulses)  # (P, d)
        dom = self.dom_encoder(x, dom_layout)  # (D, d)
        dom = dom + self.geometry_embed(inputs.dom_xyz) + self.summary_embed(inputs.dom_summary)
        pooled = self.event_encoder(dom, event_layout)  # (B, d)
        # Event moments: the mean of the DOM summaries over the event (its position-time
        # moments are what a line fit regresses), given to the head next to the transformer.
        moments = event_layout.mean_pool(inputs.dom_summary)  # (B, S)
        # The muon travels along the moment, the neutrino came from the opposite side. An event
        # without one (a single DOM) gets the zero vector.
        if self.cfg.prior_direction == "line_fit":
            # The loader's fit of the whole event; else the same fit on the kept pulses.
            prior_dir = batch.line_fit if batch.line_fit is not None else line_fit_direction(batch)
        else:
            prior_dir = -F.normalize(moments[:, MOMENT_COLUMNS], dim=-1, eps=1e-12)  # (B, 3)
        return EventFeatures(pooled=pooled + self.moment_embed(moments), prior_dir=prior_dir)

    def forward_head(self, features: EventFeatures) -> ModelOutput:
        raw = self.head(features.pooled)  # (B, 4)
        logits = raw[:, :3] + self.moment_readout(features.prior_dir)  # (B, 3)
        direction = F.normalize(logits, dim=-1, eps=1e-12)  # (B, 3)
        kappa = F.softplus(raw[:, 3]) + KAPPA_FLOOR  # (B,)
        return ModelOutput(direction=direction, kappa=kappa)

    def forward(self, batch: DomBatch) -> ModelOutput:
        return self.forward_head(self.forward_features(batch))
