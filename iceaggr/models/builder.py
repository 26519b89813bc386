"""The model builder: the network a :class:`~iceaggr.models.model.ModelConfig` names, and its
AdamW parameter groups.

Usage::

    model = build_model(baseline_model_config())   # IceAggrModel; arch="original": OriginalModel
    optim = torch.optim.AdamW(param_groups(model, weight_decay=0.01), lr=3e-4)
"""

from __future__ import annotations

from torch import nn

from iceaggr.models.model import IceAggrModel, ModelConfig
from iceaggr.models.original import OriginalModel


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network ``cfg.arch`` names: :class:`IceAggrModel` or the original project's network.

    Both take a :class:`~iceaggr.data.batch.DomBatch` and return a
    :class:`~iceaggr.models.model.ModelOutput`, and expose
    ``input_features(batch)`` and ``num_parameters()``.
    """
    if cfg.arch == "original":
        return OriginalModel(cfg)
    return IceAggrModel(cfg)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """AdamW groups: matrices (dim >= 2) decay; biases and LayerNorm gains (dim < 2) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
