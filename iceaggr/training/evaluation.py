"""Validation of a training run: the competition metric on the validation files, and the
fixed held-out set (its loss before and after training, paired per event, and its collapse
signals).

:func:`evaluate` scores a model over one pass of a loader; :class:`Validation` is the part of
:class:`~iceaggr.training.trainer.Trainer` that validates (the trainer derives from it, and
builds the attributes it reads).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iceaggr.data.batch import DomBatch
from iceaggr.data.loader import EventLoader
from iceaggr.models.losses import angular_distance, vmf_nll
from iceaggr.training.checkpoint import TrainState
from iceaggr.training.collapse import CollapseStats, best_constant, collapse_stats
from iceaggr.training.config import ExperimentConfig
from iceaggr.training.held_out import HeldOutCache, score_key, state_hash
from iceaggr.training.results import TrainResult


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: EventLoader,
    device: torch.device,
    autocast: Any,
    collect: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[float, int]:
    """(sum of per-event angular errors in rad, number of events) over one pass of ``loader``;
    each batch's (predictions (B, 3), true directions (B, 3)) is appended to ``collect``
    (on the CPU) when it is given."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for b in loader.iter_epoch(0):
        b = b.to(device, non_blocking=True)
        with autocast():
            out = model(b)
        direction = out.direction.float()  # (B, 3)
        total += angular_distance(direction, b.direction).double().sum()
        n += b.num_events
        if collect is not None:
            collect.append((direction.cpu(), b.direction.float().cpu()))
    model.train(was_training)
    return float(total), n


class Validation:
    """Validation and the fixed held-out set of a :class:`~iceaggr.training.trainer.Trainer`.

    The trainer derives from this class and sets every attribute annotated below; the methods
    here read them.
    """

    cfg: ExperimentConfig
    rank: int
    world_size: int
    distributed: bool
    device: torch.device
    model: nn.Module
    train_model: nn.Module
    use_bf16: bool
    val_loader: EventLoader | None
    state: TrainState
    result: TrainResult
    held_out_cache: HeldOutCache | None
    fixed_batches: list[DomBatch]
    _fixed_initial: torch.Tensor | None
    _val_const: tuple[torch.Tensor, float] | None
    _fixed_const: tuple[torch.Tensor, float] | None
    _held_out_final: dict[str, float] | None
    autocast: Callable[[], AbstractContextManager[Any]]

    def _track_fixed_batch(self) -> None:
        if self.val_loader is None:
            raise ValueError("track_fixed_batch needs validation files (data.val_files >= 1)")
        self.fixed_batches = [b.to(self.device) for b in self.val_loader.iter_epoch(0)]
        self.result.fixed_batch_events = sum(b.num_events for b in self.fixed_batches)
        if self.result.fixed_batch_loss_initial is None:
            if self.held_out_cache is None:
                self._fixed_initial, directions = self._fixed_set_eval()
            else:
                (self._fixed_initial, directions), shared = self.held_out_cache.initial_score(
                    score_key(self._held_out_identity()),
                    state_hash(self.model),
                    self._fixed_set_eval,
                )
                self.result.fixed_batch_initial_shared = shared
            self.result.fixed_batch_loss_initial = float(self._fixed_initial.mean())
            self.result.fixed_collapse_initial = self._fixed_collapse(directions)

    def _held_out_identity(self) -> dict[str, Any]:
        """What the untrained model's held-out score depends on: the model (its initial
        weights are also hashed), the held-out events, the loss and the arithmetic. Not the
        learning rate or anything else of the optimizer, which act only from the first step."""
        cfg, tc = self.cfg, self.cfg.train
        return {
            "model": asdict(cfg.model),
            "seed": tc.seed,
            "loss": tc.loss,
            "bf16": self.use_bf16,
            "device": self.device.type,
            "data": str(Path(cfg.data.path).resolve()),
            "val_files": cfg.data.val_files,
            "max_val_events": cfg.data.max_val_events,
            "truncation": asdict(cfg.data.truncation()),
            "rank": self.rank,
            "world_size": self.world_size,
            "events": self.result.fixed_batch_events,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean angular error (rad) over the validation files, all ranks together."""
        assert self.val_loader is not None
        s, n = evaluate(self.train_model, self.val_loader, self.device, self.autocast)
        if self.distributed:
            t = torch.tensor([s, n], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            s, n = float(t[0]), int(t[1])
        return s / max(1, n)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """One validation pass, all ranks together: ``val_angle`` (the competition metric) and
        the collapse signals of :meth:`CollapseStats.metrics` (``val_resultant``,
        ``val_const_angle``...); also recorded in the result (``val_collapse``, ``collapsed``)."""
        assert self.val_loader is not None
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        evaluate(self.train_model, self.val_loader, self.device, self.autocast, collect=pairs)
        if self.distributed:  # every rank scores the events of all ranks
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, pairs)
            pairs = [p for part in gathered for p in part]
        pred = torch.cat([p for p, _ in pairs])  # (N, 3)
        target = torch.cat([t for _, t in pairs])  # (N, 3)
        if self._val_const is None:  # the validation events never change within a run
            self._val_const = best_constant(target)
        stats = collapse_stats(pred, target, self._val_const)
        self._record_collapse(stats)
        self.result.val_angle = stats.angle
        return {"val_angle": stats.angle, **stats.metrics()}

    def _record_collapse(self, stats: CollapseStats) -> None:
        self.result.val_collapse = stats.to_dict()
        self.result.collapsed = stats.collapsed(self.cfg.train.collapse_resultant)

    def _fixed_collapse(self, directions: torch.Tensor) -> dict[str, float]:
        targets = torch.cat([b.direction.float().cpu() for b in self.fixed_batches])  # (N, 3)
        if self._fixed_const is None:
            self._fixed_const = best_constant(targets)
        return collapse_stats(directions, targets, self._fixed_const).to_dict()

    @torch.no_grad()
    def fixed_set_losses(self) -> torch.Tensor:
        """(N,) float64 per-event training loss of the fixed held-out set, in eval mode (no
        dropout); a non-finite prediction gives a non-finite loss, never an error."""
        return self._fixed_set_eval()[0]

    @torch.no_grad()
    def _fixed_set_eval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-event losses (N,) float64, predicted directions (N, 3)) of the fixed set."""
        assert self.fixed_batches, "track_fixed_batch=True builds the fixed held-out set"
        model, kind = self.train_model, self.cfg.train.loss
        was = model.training
        model.eval()
        parts, directions = [], []
        for batch in self.fixed_batches:
            with self.autocast():
                out = model(batch)
            direction = out.direction.float()  # (B, 3)
            if kind == "angular":
                per_event = angular_distance(direction, batch.direction)  # (B,) rad
            else:
                per_event = vmf_nll(direction, out.kappa.float(), batch.direction)  # (B,)
            parts.append(per_event.double().cpu())
            directions.append(direction.cpu())
        model.train(was)
        return torch.cat(parts), torch.cat(directions)  # (N,), (N, 3)

    def fixed_batch_loss(self) -> float:
        """Mean training loss of the fixed held-out set (see :meth:`fixed_set_losses`)."""
        return float(self.fixed_set_losses().mean())

    def _held_out_is_validation(self) -> bool:
        """The fixed held-out set holds every validation event this run scores (one process)
        and its loss is the angular error: the last step's validation is its final score."""
        angular = self.cfg.train.loss == "angular"
        return bool(self.fixed_batches) and not self.distributed and angular

    def _score_held_out_final(self) -> dict[str, float]:
        """Score the fixed held-out set after training (once): its final loss and paired
        stderr and collapse signals; when it is the run's last validation, also ``val_angle``
        and the collapse metrics, returned for the last report."""
        r, tc = self.result, self.cfg.train
        if self._held_out_final is None:
            t0 = time.perf_counter()
            final, directions = self._fixed_set_eval()
            r.fixed_collapse_final = self._fixed_collapse(directions)
            r.add_time("held_out_s", t0)
            metrics: dict[str, float] = {}
            if self._held_out_is_validation() and self.state.step == tc.max_steps:
                stats = CollapseStats.from_dict(r.fixed_collapse_final)
                r.val_angle = float(final.mean())  # the last validation, scored once
                self._record_collapse(stats)
                metrics = {"val_angle": r.val_angle, **stats.metrics()}
            r.fixed_batch_loss_final = float(final.mean())
            if self._fixed_initial is not None and final.numel() > 1:
                change = final - self._fixed_initial  # (N,) paired per-event changes
                r.fixed_batch_change_stderr = float(change.std() / math.sqrt(change.numel()))
            self._held_out_final = metrics
        return self._held_out_final
