"""The original project's first hierarchical network, on which the stability table was measured.

DESIGN.md section 7 describes it; this module rebuilds it so that the table's "before
normalization" column can be reproduced on the network that produced it. It differs from
:class:`~iceaggr.models.model.IceAggrModel` where that matters for stability:

- **T1, the DOM transformer**: the four raw pulse features ``[time ns, charge p.e., sensor_id,
  auxiliary]`` go through one ``Linear(4 -> d_model)`` straight into attention. Its layers are
  **post-LN**, ``x = LN1(x + Attn(x)); x = LN2(x + FFN(x))``: nothing normalizes the first
  layer's q/k/v input, so raw 1e4-scale times reach ``t1.layers.0.qkv_proj`` as they are.
  Attention runs among the pulses of one DOM; a final LayerNorm, then the mean over the DOM's
  pulses.
- **T2, the event transformer**: a geometry MLP on the DOM's x, y, z is added to each DOM
  embedding; pre-LN layers (``nn.TransformerEncoderLayer(norm_first=True)`` semantics) over the
  event's DOMs with a key-padding mask; masked mean over DOMs; an MLP head; the output divided
  by its norm. There is no kappa head: :data:`CONSTANT_KAPPA` is returned, and the config
  refuses the vMF loss for this architecture.

Module and parameter names follow the original's ``named_parameters()``
(``t1.input_projection.weight``, ``t1.layers.0.qkv_proj.weight``, ``t2.geometry_encoder.0.weight``,
``t2.transformer.layers.0.self_attn.in_proj_weight``, ``t2.prediction_head.3.bias``...), so
per-parameter gradient reports read like the original diagnosis. Linear layers keep PyTorch's
default initialization, as in the original.

Inputs pass through :class:`OriginalInputNormalizer`, a table of per-feature transforms
(:data:`ORIGINAL_PULSE_TRANSFORMS`, and :data:`~iceaggr.models.normalization.GEOMETRY_TRANSFORMS`)
behind the ``normalize`` switch: the original's fix. Every input of the network goes through
it; there is no second path (the original's chunked T1 path kept feeding raw features after the
fix).

Attention reuses :class:`~iceaggr.models.model.SeqLayout` (length buckets; ``attention="padded"`` is
the plain reference, every sequence padded to the batch maximum). Dropout acts on residual
branches and the FFN hidden layer, not on attention probabilities (the original's T2 also
dropped attention weights): the length-1 shortcut of the packed layout stays exact.

Usage::

    model = build_model(ModelConfig(arch="original", normalize=False))   # ~1.6M parameters
    out = model(batch)                # out.direction (B, 3), out.kappa (B,) constant
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from iceaggr.data.batch import DomBatch
from iceaggr.models.model import ModelConfig, ModelOutput, SeqLayout
from iceaggr.models.normalization import (
    CHARGE_LOG10_SCALE,
    GEOMETRY_TRANSFORMS,
    FeatureTransform,
    identity,
    normalize_time,
    pulse_dom_index,
)

logger = logging.getLogger(__name__)

# --- the original's fix: constants (each named once, with its origin) -------------------------
SENSOR_ID_SCALE = 5160.0
"""Rows of ``sensor_geometry.csv`` (86 strings x 60 DOMs): ``sensor_id / 5160`` is in [0, 1)."""
ORIGINAL_CHARGE_EPS_PE = 1.0e-8
"""Added to the charge before the log in the original's fix, ``log10(q + 1e-8) / 3``."""
OUTPUT_NORM_EPS = 1.0e-8
"""The original head divides its 3-vector by ``norm + 1e-8``."""
CONSTANT_KAPPA = 1.0
"""The original predicts no concentration; this constant fills ``ModelOutput.kappa``."""


def normalize_charge_original(q_pe: torch.Tensor) -> torch.Tensor:
    """Charge (p.e.) -> ``log10(q + 1e-8) / 3`` (the original's form; ours clamps instead)."""
    return torch.log10(q_pe + ORIGINAL_CHARGE_EPS_PE) / CHARGE_LOG10_SCALE


def normalize_sensor_id(sensor_id: torch.Tensor) -> torch.Tensor:
    """Sensor index (0..5159) -> ``sensor_id / 5160``."""
    return sensor_id / SENSOR_ID_SCALE


ORIGINAL_PULSE_TRANSFORMS: tuple[FeatureTransform, ...] = (
    FeatureTransform("pulse_time", "ns", normalize_time),  # (t - 1e4) / 3e4
    FeatureTransform("pulse_charge", "p.e.", normalize_charge_original),
    FeatureTransform("pulse_sensor_id", "index", normalize_sensor_id),
    FeatureTransform("pulse_auxiliary", "0/1", identity),
)
"""Columns of the original's per-pulse input, in its order."""


def _apply_table(
    table: tuple[FeatureTransform, ...], x: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """Column-wise transform of ``x`` (N, len(table)); the raw values when ``normalize`` is off."""
    if not normalize:
        return x
    cols = [row.normalized(col) for row, col in zip(table, x.unbind(-1), strict=True)]
    return torch.stack(cols, dim=-1)


@dataclass
class OriginalInputs:
    """Exactly the tensors the original network sees."""

    pulses: torch.Tensor
    """(P, 4) time, charge, sensor_id, auxiliary (ORIGINAL_PULSE_TRANSFORMS order)."""
    dom_xyz: torch.Tensor
    """(D, 3) DOM position."""

    def as_dict(self) -> dict[str, torch.Tensor]:
        """One 1-D tensor per feature, e.g. ``{"pulse_time": (P,), ..., "dom_z": (D,)}``."""
        out: dict[str, torch.Tensor] = {}
        for table, x in (
            (ORIGINAL_PULSE_TRANSFORMS, self.pulses),
            (GEOMETRY_TRANSFORMS, self.dom_xyz),
        ):
            for row, col in zip(table, x.unbind(-1), strict=True):
                out[row.name] = col
        return out


class OriginalInputNormalizer(nn.Module):
    """Parameter-free: a raw :class:`DomBatch` -> the original network's inputs."""

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, batch: DomBatch, dtype: torch.dtype = torch.float32) -> OriginalInputs:
        pulses = batch.pulses.to(dtype)  # (P, 3) time, charge, auxiliary
        time, charge, aux = pulses.unbind(-1)  # each (P,)
        sensor = batch.sensor_id[pulse_dom_index(batch)].to(dtype)  # (P,) the pulse's DOM
        raw = torch.stack([time, charge, sensor, aux], dim=-1)  # (P, 4)
        return OriginalInputs(
            pulses=_apply_table(ORIGINAL_PULSE_TRANSFORMS, raw, self.normalize),
            dom_xyz=_apply_table(GEOMETRY_TRANSFORMS, batch.dom_xyz.to(dtype), self.normalize),
        )

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


# --- T1: the DOM transformer ----------------------------------------------------------------


class PostLNLayer(nn.Module):
    """Post-LN block: ``x = LN1(x + Attn(x)); x = LN2(x + FFN(x))``.

    FFN is Linear-GELU-Dropout-Linear; dropout also acts on both residual branches.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
        # x: (T, d) packed or (N, L, d) padded; "..." stands for either leading shape.
        qkv = self.qkv_proj(x).unflatten(-1, (3, self.n_heads, -1))  # (..., 3, h, hd)
        q, k, v = qkv.unbind(-3)  # each (..., h, hd)
        a = layout.attend(q, k, v).flatten(-2)  # (..., d)
        x = self.norm1(x + self.dropout(self.out_proj(a)))
        return self.norm2(x + self.dropout(self.ff(x)))


class DomTransformer(nn.Module):
    """T1: pulses (P, 4) -> one embedding per DOM (D, d)."""

    def __init__(self, cfg: ModelConfig, n_features: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.input_projection = nn.Linear(n_features, d)
        self.layers = nn.ModuleList(
            PostLNLayer(d, cfg.dom_heads, int(cfg.mlp_ratio * d), cfg.dropout)
            for _ in range(cfg.dom_layers)
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, pulses: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
        h = layout.to_layout(self.input_projection(pulses))  # (P, d) or (D, L, d)
        for layer in self.layers:
            h = layer(h, layout)
        # LayerNorm per pulse, then the mean over the DOM's pulses (the original's order).
        return layout.mean_pool(layout.to_packed(self.norm(h)))  # (D, d)


# --- T2: the event transformer --------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters and their init."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (..., 3d)
        q, k, v = qkv.unflatten(-1, (3, self.n_heads, -1)).unbind(-3)  # each (..., h, hd)
        return self.out_proj(layout.attend(q, k, v).flatten(-2))  # (..., d)


class PreLNLayer(nn.Module):
    """``nn.TransformerEncoderLayer(norm_first=True)``: ``x + Attn(LN1(x))``, ``x + FFN(LN2(x))``.

    The activation is ReLU, ``nn.TransformerEncoderLayer``'s default: a choice, since
    DESIGN.md section 7 does not name T2's activation.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, n_heads)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
        x = x + self.dropout1(self.self_attn(self.norm1(x), layout))
        ff = self.linear2(self.dropout(F.relu(self.linear1(self.norm2(x)))))
        return x + self.dropout2(ff)


class LayerStack(nn.Module):
    """Holds ``layers`` so that names read ``t2.transformer.layers.N...`` as in the original."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, layout)
        return x


class EventTransformer(nn.Module):
    """T2: DOM embeddings (D, d) + DOM positions (D, 3) -> pooled event vector (B, d); the head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        hidden = max(1, d // 2)  # 64 at d_model 128, as in the original
        self.geometry_encoder = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.transformer = LayerStack(
            [
                PreLNLayer(d, cfg.event_heads, int(cfg.mlp_ratio * d), cfg.dropout)
                for _ in range(cfg.event_layers)
            ]
        )
        self.prediction_head = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(d, 3)
        )

    def forward(self, dom: torch.Tensor, dom_xyz: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
        x = dom + self.geometry_encoder(dom_xyz)  # (D, d)
        h = self.transformer(layout.to_layout(x), layout)  # (D, d) or (B, L, d)
        return layout.mean_pool(layout.to_packed(h))  # (B, d), mean over the event's DOMs


class OriginalModel(nn.Module):
    """The original hierarchical network: T1 over each DOM's pulses, T2 over the event's DOMs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.normalizer = OriginalInputNormalizer(cfg.normalize)
        self.t1 = DomTransformer(cfg, len(ORIGINAL_PULSE_TRANSFORMS))
        self.t2 = EventTransformer(cfg)
        logger.debug("OriginalModel: %d parameters, %s", self.num_parameters(), cfg)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _inputs(self, batch: DomBatch) -> OriginalInputs:
        return self.normalizer(batch, self.t1.input_projection.weight.dtype)

    def input_features(self, batch: DomBatch) -> dict[str, torch.Tensor]:
        """Per-feature 1-D tensors exactly as they enter the network (after the normalizer)."""
        return self._inputs(batch).as_dict()

    def forward_features(self, batch: DomBatch) -> torch.Tensor:
        """(B, d) pooled event representation."""
        padded = self.cfg.attention == "padded"
        inputs = self._inputs(batch)  # the only source of the network's inputs
        dom = self.t1(inputs.pulses, SeqLayout(batch.cu_pulses, padded))  # (D, d)
        return self.t2(dom, inputs.dom_xyz, SeqLayout(batch.cu_doms, padded))  # (B, d)

    def forward_head(self, features: torch.Tensor) -> ModelOutput:
        v = self.t2.prediction_head(features)  # (B, 3)
        direction = v / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) + OUTPUT_NORM_EPS)
        kappa = direction.new_full((direction.shape[0],), CONSTANT_KAPPA)  # (B,)
        return ModelOutput(direction=direction, kappa=kappa)

    def forward(self, batch: DomBatch) -> ModelOutput:
        return self.forward_head(self.forward_features(batch))
