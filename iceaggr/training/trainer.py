"""The training loop: one process, or one rank of a data-parallel job.

:class:`Trainer` runs AdamW with linear warm-up and cosine decay, clips the global gradient
norm (recording the norm before clipping, and every parameter's), uses bf16 autocast on CUDA,
validates on held-out batch files with the competition metric, checkpoints
(:class:`~iceaggr.training.checkpoint.TrainState`) so a run resumes exactly, and tells its
:mod:`hooks <iceaggr.training.hooks>` (MLflow, a progress bar, Ray Tune) what happened.
``train(cfg)`` builds one and fits it.

Beside it: the input audit and the divergence guard (:mod:`iceaggr.training.guard`),
validation and the fixed held-out set (:mod:`iceaggr.training.evaluation`), the checkpoint
(:mod:`iceaggr.training.checkpoint`) and the result (:mod:`iceaggr.training.results`).

Nothing here imports Ray: a Ray Train worker passes ``rank``, ``world_size``, ``device`` and
its hooks (see ``iceaggr_tune.trial``). Run standalone with
``iceaggr train experiments/baseline_1m/config_fixed.yaml``.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iceaggr.data.batch import DomBatch
from iceaggr.data.dataset import KaggleDataset, split_batch_ids
from iceaggr.data.loader import EventLoader
from iceaggr.models.builder import build_model, param_groups
from iceaggr.models.losses import training_loss
from iceaggr.training.checkpoint import CHECKPOINT_NAME, TrainState
from iceaggr.training.config import ExperimentConfig, to_dict
from iceaggr.training.evaluation import Validation
from iceaggr.training.guard import DivergenceGuard, StepOutput, audit_inputs
from iceaggr.training.held_out import HeldOutCache
from iceaggr.training.hooks import CallbackHook, Hook, ProgressHook, ReportFn
from iceaggr.training.mlflow_hook import MlflowHook
from iceaggr.training.results import TrainResult

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up, then cosine decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cycle_epochs(
    loader: EventLoader, epoch: int, start_batch: int
) -> Iterator[tuple[int, int, DomBatch]]:
    """Yields (epoch, batch index in epoch, batch) forever, starting at a resume point."""
    for e in itertools.count(epoch):
        first = start_batch if e == epoch else 0
        for i, b in enumerate(loader.iter_epoch(e, first), start=first):
            yield e, i, b


class Trainer(Validation):
    """One training run (or one rank of a data-parallel run) of ``cfg``.

    ``__init__`` builds the loaders, the model, AdamW with its warm-up + cosine schedule and
    the autocast, resumes from ``resume_from`` when given, audits the model inputs on the
    first batches and (``track_fixed_batch``) measures the loss of a fixed held-out set.
    :meth:`fit` then runs the loop::

        batch -> train_step -> guard.observe -> [every log_every steps: metrics, validation,
        checkpoint, hooks.on_report] -> ... -> hooks.on_end(result)

    ``build_data=False`` builds no dataset or loaders (only :meth:`train_step` can run then,
    e.g. to time it on batches made in memory).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        hooks: Sequence[Hook] = (),
        resume_from: str | Path | None = None,
        checkpoint_dir: str | Path | None = None,
        track_fixed_batch: bool = False,
        build_data: bool = True,
        held_out_cache: str | Path | None = None,
    ) -> None:
        t_setup = time.perf_counter()
        tc = cfg.train
        self.cfg, self.rank, self.world_size, self.hooks = cfg, rank, world_size, list(hooks)
        self.device = torch.device(device) if device is not None else resolve_device(tc.device)
        self.distributed = (
            world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        )
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else Path(tc.out_dir)
        self._t_setup = t_setup
        self.dataset: KaggleDataset | None = None
        _seed_everything(tc.seed)
        self.loader, self.val_loader = self._build_loaders() if build_data else (None, None)
        self.model = build_model(cfg.model).to(self.device)
        self.train_model = self._wrap_data_parallel(self.model)
        """What the step calls: the model, or its DistributedDataParallel wrapper."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer, self.scheduler = self._build_optimizer()
        self.use_bf16 = tc.precision == "bf16" or (
            tc.precision == "auto" and self.device.type == "cuda"
        )
        self.state = self._restore(resume_from) if resume_from is not None else TrainState()
        self.start_step = self.state.step
        self.result = TrainResult(
            steps=0,
            first_loss=self.state.first_loss,
            max_grad_norm=self.state.max_grad_norm,
            fixed_batch_loss_initial=self.state.fixed_batch_loss_initial,
        )
        self.guard = DivergenceGuard(
            self.param_names,
            self.device,
            max_grad_norm=self.state.max_grad_norm,
            max_param_grad_norm=self.state.max_param_grad_norm,
            max_param_grad_name=self.state.max_param_grad_name,
        )
        self.fixed_batches: list[DomBatch] = []
        self._fixed_initial: torch.Tensor | None = None  # (N,) per-event losses before step 1
        self._val_const: tuple[torch.Tensor, float] | None = None  # best constant, validation
        self._fixed_const: tuple[torch.Tensor, float] | None = None  # and on the fixed set
        self._held_out_final: dict[str, float] | None = None  # metrics of its final score
        self.held_out_cache = HeldOutCache(held_out_cache) if held_out_cache else None
        if build_data:
            self._batches = self._audited_batches()
        self.result.add_time("setup_s", t_setup)
        if track_fixed_batch:
            t_held_out = time.perf_counter()
            self._track_fixed_batch()
            self.result.add_time("held_out_s", t_held_out)

    # ------------------------------------------------------------------ building

    def _build_loaders(self) -> tuple[EventLoader, EventLoader | None]:
        """The training loader (this rank's share, shuffled) and the validation one (or None)."""
        cfg, tc = self.cfg, self.cfg.train
        dataset = self.dataset = cfg.data.open()
        train_ids, val_ids = split_batch_ids(dataset.batch_ids, cfg.data.val_files)
        common: dict[str, Any] = dict(
            dataset=dataset,
            truncation=cfg.data.truncation(),
            rank=self.rank,
            world_size=self.world_size,
            prefetch=cfg.data.prefetch,
            pin_memory=self.device.type == "cuda",
            line_fit=cfg.model.uses_line_fit,
        )
        loader = EventLoader(
            batch_ids=train_ids,
            batch_size=tc.batch_size,
            seed=tc.seed,
            max_events=cfg.data.max_train_events,
            **common,
        )
        if not val_ids:
            return loader, None
        val_loader = EventLoader(
            batch_ids=val_ids,
            batch_size=min(tc.batch_size, cfg.data.max_val_events),
            shuffle=False,
            drop_last=False,
            max_events=cfg.data.max_val_events,
            **common,
        )
        return loader, val_loader

    def _wrap_data_parallel(self, model: nn.Module) -> nn.Module:
        if not self.distributed:
            return model
        dev = self.device
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )

    def _build_optimizer(
        self,
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW (decay on matrices only) and its warm-up + cosine schedule."""
        tc = self.cfg.train
        optimizer = torch.optim.AdamW(
            param_groups(self.model, tc.weight_decay),
            lr=tc.lr,
            betas=tc.betas,
            fused=self.device.type == "cuda",
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_lambda(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio),
        )
        return optimizer, scheduler

    def _restore(self, path: str | Path) -> TrainState:
        return TrainState.restore(
            Path(path),
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            device=self.device,
        )

    def _audited_batches(self) -> Iterator[tuple[int, int, DomBatch]]:
        """The training stream from the resume point; its first batches are audited first
        (and trained on afterwards, not consumed)."""
        tc = self.cfg.train
        assert self.loader is not None
        stream = _cycle_epochs(self.loader, self.state.epoch, self.state.batch_in_epoch)
        peek = [next(stream) for _ in range(min(tc.input_audit_batches, len(self.loader)))]
        self.result.input_audit = audit_inputs(
            self.model, [b.to(self.device) for _, _, b in peek], tc.input_audit_threshold
        )
        return itertools.chain(peek, stream)

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast when ``train.precision`` asks for it (``auto``: on CUDA)."""
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ------------------------------------------------------------------ the step

    def train_step(self, batch: DomBatch) -> StepOutput:
        """One optimizer step on ``batch`` (already on the device); no host sync.

        Forward (autocast), loss, backward, per-parameter and global gradient norms, clipping
        with that global norm, AdamW step, schedule step.
        """
        with torch.no_grad():
            features = self.model.input_features(batch)
            absmax = {name: t.detach().abs().amax().float() for name, t in features.items()}
        with self.autocast():
            out = self.train_model(batch)
        loss = training_loss(
            self.cfg.train.loss, out.direction.float(), out.kappa.float(), batch.direction
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        per_param = torch.stack(torch._foreach_norm(grads))  # (n_params,)
        total_norm = torch.linalg.vector_norm(per_param)
        # Clip with the norm computed above; a non-finite norm leaves the step to the guard.
        clip = torch.clamp(self.cfg.train.grad_clip / (total_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, clip)
        lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses (host float)
        self.optimizer.step()
        self.scheduler.step()
        return StepOutput(
            loss=loss.detach(),
            grad_norm=total_norm.detach(),
            param_grad_norms=per_param.detach(),
            prediction=out.direction.detach(),
            input_absmax=absmax,
            lr=lr,
            events=batch.num_events,
        )

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        """Train to ``train.max_steps`` (or divergence, or a hook's stop); never raises on NaN."""
        if self.loader is None:
            raise RuntimeError(
                "this Trainer was built with build_data=False: it has no data to fit"
            )
        for hook in self.hooks:
            hook.on_start(self)
        self.train_model.train()
        self._window = _MetricWindow(self.device)
        while self.state.step < self.cfg.train.max_steps:
            t0 = time.perf_counter()
            self.state.epoch, index, batch = next(self._batches)
            self.state.batch_in_epoch = index + 1
            out = self.train_step(batch.to(self.device, non_blocking=True))
            self.state.step += 1
            step = self.state.step
            if step == self.start_step + 1:  # the data, model and first step, from scratch
                self.result.timings["first_step_s"] = time.perf_counter() - self._t_setup
            self.guard.observe(out, step)
            self._window.add(out)
            self.result.train_seconds += time.perf_counter() - t0
            for hook in self.hooks:
                hook.on_step(step)
            if self._sync_due(step) and self._diverged(out, step):
                break
            if self._report_due(step) and self._report(out, step):
                break
            self.result.steps = step
        return self._finish()

    def _report_due(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def _sync_due(self, step: int) -> bool:
        """When the guard is read: every step on the CPU, at reports on other devices."""
        every = 1 if self.device.type == "cpu" else self.cfg.train.log_every
        return step % every == 0 or self._report_due(step) or step == self.start_step + 1

    def _diverged(self, out: StepOutput, step: int) -> bool:
        """Read the guard; on divergence record it, tell the hooks and return True."""
        report = self.guard.report()
        if report is None:
            if self.result.first_loss is None:
                self.result.first_loss = self.guard.last_finite_loss
            return False
        self.result.diverged = report
        self.result.steps = report.step
        log.warning("training %s", report.summary())
        metrics = {"loss": float(out.loss), "grad_norm": float(out.grad_norm), "diverged": 1.0}
        self.result.history.append({"step": float(step), **metrics})
        for hook in self.hooks:
            hook.on_diverged(report, metrics, step)
        return True

    def _report(self, out: StepOutput, step: int) -> bool:
        """Metrics, validation and checkpoint of a report step; True when a hook says stop."""
        tc, stats = self.cfg.train, self.loader.stats  # type: ignore[union-attr]
        loss, grad_norm, events_per_s = self._window.take(self.world_size)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "max_grad_norm": self.guard.max_grad_norm,
            "lr": out.lr,
            "events_per_s": events_per_s,
            "epoch": float(self.state.epoch),
            "diverged": 0.0,
            # Truncation is counted, never silent: events cut to the pulse/DOM caps so far.
            "events_truncated": float(stats.events_truncated),
            "pulses_dropped": float(stats.pulses_in - stats.pulses_kept),
        }
        if self.dataset is not None and self.dataset.cache is not None:
            # An s3:// dataset: this process's node-cache hits, misses and bytes fetched.
            metrics |= self.dataset.cache.stats.metrics()
        held_out_last = step == tc.max_steps and self._held_out_is_validation()
        last = step == tc.max_steps and not held_out_last
        due = (tc.eval_every and step % tc.eval_every == 0) or step in tc.eval_steps or last
        if held_out_last:  # the held-out set is the last validation: scored once, reported
            metrics.update(self._score_held_out_final())
        elif self.val_loader is not None and due:
            t0 = time.perf_counter()
            metrics.update(self.validate())
            self.result.add_time("validation_s", t0)
        self.result.history.append({"step": float(step), **metrics})
        t0 = time.perf_counter()
        checkpoint = self._checkpoint(step)
        self.result.add_time("checkpoint_s", t0)
        t0 = time.perf_counter()
        stop = [hook.on_report(metrics, step, checkpoint) for hook in self.hooks]
        self.result.add_time("report_s", t0)
        if any(stop) and step < tc.max_steps:
            self.result.steps = step
            self.result.stopped_early = True
            log.info("stopping early at step %d (asked by a hook)", step)
            return True
        return False

    def _checkpoint(self, step: int) -> Path | None:
        """Rank 0 writes the checkpoint when one is due; every rank returns its folder."""
        every = self.cfg.train.checkpoint_every
        if not (every > 0 and (step % every == 0 or step == self.cfg.train.max_steps)):
            return None
        if self.rank == 0:
            self.state.max_grad_norm = self.guard.max_grad_norm
            self.state.max_param_grad_norm, self.state.max_param_grad_name = (
                self.guard.max_param_grad
            )
            self.state.first_loss = self.result.first_loss
            self.state.fixed_batch_loss_initial = self.result.fixed_batch_loss_initial
            self.state.save(
                self.checkpoint_dir / CHECKPOINT_NAME,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                config=to_dict(self.cfg),
                device=self.device,
            )
        return self.checkpoint_dir

    def _finish(self) -> TrainResult:
        r, tc = self.result, self.cfg.train
        r.max_grad_norm = self.guard.max_grad_norm
        r.max_param_grad_norm, r.max_param_grad_name = self.guard.max_param_grad
        r.last_loss = self.guard.last_finite_loss
        n_steps = r.steps - self.start_step
        r.events_per_s = n_steps * tc.batch_size * self.world_size / max(1e-9, r.train_seconds)
        if self.fixed_batches and r.diverged is None:
            self._score_held_out_final()
        for hook in self.hooks:
            hook.on_end(r)
        return r


class _MetricWindow:
    """Sums of the steps since the last report, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0
        self.events = 0
        self.since = time.perf_counter()

    def add(self, out: StepOutput) -> None:
        self.loss += out.loss.double()
        self.grad_norm += out.grad_norm.double()
        self.steps += 1
        self.events += out.events

    def take(self, world_size: int) -> tuple[float, float, float]:
        """(mean loss, mean pre-clip gradient norm, events/s of all ranks); then starts over."""
        now = time.perf_counter()
        means = float(self.loss) / self.steps, float(self.grad_norm) / self.steps
        events_per_s = self.events * world_size / max(1e-9, now - self.since)
        self.loss.zero_()
        self.grad_norm.zero_()
        self.steps, self.events, self.since = 0, 0, now
        return means[0], means[1], events_per_s


def train(
    cfg: ExperimentConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    hooks: Sequence[Hook] = (),
    report: ReportFn | None = None,
    resume_from: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    track_fixed_batch: bool = False,
    progress: bool = True,
    held_out_cache: str | Path | None = None,
) -> TrainResult:
    """Train ``cfg``; returns a :class:`TrainResult` (diverged runs return, never raise).

    ``report`` is a plain callback run as a hook after ``hooks``; rank 0 logs to MLflow (an
    :class:`~iceaggr.training.mlflow_hook.MlflowHook`, first) when ``train.mlflow_tracking_uri`` is
    set and ``hooks`` holds none, and shows a progress bar when ``progress``.
    """
    all_hooks = list(hooks)
    if report is not None:
        all_hooks.append(CallbackHook(report))
    if rank == 0:
        has_mlflow = any(isinstance(h, MlflowHook) for h in all_hooks)
        if cfg.train.mlflow_tracking_uri and not has_mlflow:
            all_hooks.insert(0, MlflowHook.for_config(cfg))
        if progress:
            all_hooks.append(ProgressHook())
    return Trainer(
        cfg,
        rank=rank,
        world_size=world_size,
        device=device,
        hooks=all_hooks,
        resume_from=resume_from,
        checkpoint_dir=checkpoint_dir,
        track_fixed_batch=track_fixed_batch,
        held_out_cache=held_out_cache,
    ).fit()
