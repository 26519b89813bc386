"""A run's checkpoint: :class:`TrainState` saves and restores where a run stands.

One file, ``CHECKPOINT_NAME`` in the run's checkpoint folder, so a resumed run (or a Ray Train
worker restarted on another node) continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(kw_only=True)
class TrainState:
    """Where a run stands; with the model, optimizer and schedule it is the checkpoint.

    One file (``checkpoint.pt``) holds the model, optimizer and scheduler state dicts, the
    fields below, the torch (and CUDA) RNG states and the run's config; :meth:`save` writes
    it atomically, :meth:`restore` loads it back so a resumed run continues as the
    uninterrupted one would (bit for bit on the CPU, see tests/test_train.py).
    """

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    batch_in_epoch: int = 0
    """The next batch of ``epoch`` to train on."""
    max_grad_norm: float = 0.0
    max_param_grad_norm: float = 0.0
    max_param_grad_name: str | None = None
    first_loss: float | None = None
    fixed_batch_loss_initial: float | None = None

    def save(
        self,
        path: Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        config: dict[str, Any],
        device: torch.device,
    ) -> None:
        """Atomic write (a killed writer never leaves a half checkpoint behind)."""
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "config": config,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    @classmethod
    def restore(
        cls,
        path: Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
    ) -> TrainState:
        """Load ``path`` (a checkpoint file or the folder holding one) into the model,
        optimizer, scheduler and the RNGs; returns the progress fields."""
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        state = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        log.info("resumed from %s at step %d", path, state["step"])
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})
