"""The training loop: one process, or one rank of a data-parallel job.

:class:`Trainer` runs AdamW with linear warm-up and cosine decay, clips the global gradient
norm (recording the norm before clipping, and every parameter's), uses bf16 autocast on CUDA,
validates on held-out batch files with the competition metric, checkpoints
(:class:`TrainState`) so a run resumes exactly, and tells its :mod:`hooks <iceaggr.hooks>`
(MLflow, a progress bar, Ray Tune) what happened. ``train(cfg)`` builds one and fits it.

Two guards come with it:

* **input audit**: before the first step, the magnitudes of every model input
  feature are measured on the first batches; a feature larger than
  ``train.input_audit_threshold`` (100) was not normalized and is reported loudly.
* **divergence guard** (:class:`DivergenceGuard`): the first non-finite loss, prediction or
  gradient ends the run with a :class:`DivergenceReport` (step, first parameter whose gradient
  went non-finite, largest pre-clip gradient norm so far, largest absolute model input per
  feature). The checks stay on the device and are read every step on CPU, every
  ``log_every`` steps on CUDA (the flags remember the *first* bad step, so the report is
  exact; at most ``log_every - 1`` wasted steps follow it).

Nothing here imports Ray: a Ray Train worker passes ``rank``, ``world_size``, ``device`` and
its hooks (see ``iceaggr_tune.trial``). Run standalone with
``iceaggr train experiments/baseline_1m/config_fixed.yaml``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iceaggr.data.batch import DomBatch
from iceaggr.data.dataset import KaggleDataset, split_batch_ids
from iceaggr.data.loader import EventLoader
from iceaggr.models.builder import build_model, param_groups
from iceaggr.models.losses import angular_distance, training_loss, vmf_nll
from iceaggr.training.collapse import CollapseStats, best_constant, collapse_stats
from iceaggr.training.config import ExperimentConfig, to_dict
from iceaggr.training.held_out import HeldOutCache, score_key, state_hash
from iceaggr.training.hooks import CallbackHook, Hook, ProgressHook, ReportFn
from iceaggr.training.mlflow_hook import MlflowHook

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
DIVERGENCE_KINDS = {1: "non-finite loss", 2: "non-finite prediction", 3: "non-finite gradient"}
"""What the guard found at the first bad step (the first that applies, in this order)."""


@dataclass
class DivergenceReport:
    step: int
    """1-based optimizer step at which the first non-finite value appeared."""
    reason: str
    """``non-finite loss``, ``non-finite prediction`` or ``non-finite gradient``."""
    first_bad_parameter: str | None
    """First parameter (in ``named_parameters`` order) whose gradient was non-finite (if the
    per-parameter norms were finite and only their total overflowed: the largest one)."""
    max_grad_norm: float
    """Largest finite pre-clip global gradient norm seen before divergence."""
    max_abs_input: dict[str, float]
    """Largest absolute value of every model input feature seen so far."""
    last_finite_loss: float | None

    def summary(self) -> str:
        worst = max(self.max_abs_input.items(), key=lambda kv: kv[1], default=("-", 0.0))
        return (
            f"diverged at step {self.step}: {self.reason}"
            + (f" (first in {self.first_bad_parameter})" if self.first_bad_parameter else "")
            + f"; max pre-clip grad norm {self.max_grad_norm:.3g}; largest input "
            f"{worst[0]}={worst[1]:.3g}"
        )


@dataclass
class TrainResult:
    steps: int
    diverged: DivergenceReport | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    max_grad_norm: float = 0.0
    fixed_batch_loss_initial: float | None = None
    """Mean training loss of the fixed held-out set (``track_fixed_batch``: every event of the
    validation loader, at most ``data.max_val_events``) before the first step."""
    fixed_batch_loss_final: float | None = None
    """The same after the last step (None when the run diverged)."""
    fixed_batch_events: int = 0
    """Events in the fixed held-out set."""
    fixed_batch_initial_shared: bool = False
    """``fixed_batch_loss_initial`` was read from a held-out cache (computed by another run
    from the same initial weights; :mod:`iceaggr.held_out`)."""
    fixed_batch_change_stderr: float | None = None
    """Standard error of the final-minus-initial loss change over those events (paired: the
    spread of the per-event changes / sqrt(events)); None after a resume or a divergence."""
    stopped_early: bool = False
    """A hook (e.g. an early-stopping rule) asked the run to stop before ``max_steps``."""
    val_angle: float | None = None
    """Mean angular error (rad) on the validation files: the competition metric."""
    val_collapse: dict[str, float] | None = None
    """Collapse signals of the last validation (:class:`~iceaggr.collapse.CollapseStats`: R of
    the predictions, the best constant direction's error on the same events...)."""
    collapsed: bool | None = None
    """The last validation's R >= ``train.collapse_resultant`` (None: never validated)."""
    fixed_collapse_initial: dict[str, float] | None = None
    """Collapse signals of the fixed held-out set before the first step (``track_fixed_batch``)."""
    fixed_collapse_final: dict[str, float] | None = None
    """The same after the last step (None when the run diverged)."""
    input_audit: dict[str, dict[str, float]] = field(default_factory=dict)
    train_seconds: float = 0.0
    """Wall time spent inside training steps (excludes set-up, validation, checkpoints)."""
    events_per_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    max_param_grad_norm: float = 0.0
    """Largest finite pre-clip gradient norm of a single parameter over the run."""
    max_param_grad_name: str | None = None
    """The parameter (``named_parameters`` name) that had it."""
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds of this process outside the training steps: ``setup_s`` (dataset open,
    loaders, model, optimizer, input audit), ``held_out_s`` (the fixed held-out set, read and
    scored before and after), ``validation_s``, ``checkpoint_s`` and ``report_s`` (hooks at
    reports: MLflow, Ray Train reports, early stopping); ``first_step_s``: from the start of
    set-up to the end of the first step (with an ``s3://`` dataset and a cold node cache,
    includes fetching the metadata and the first files)."""

    def add_time(self, key: str, since: float) -> None:
        """Add the ``time.perf_counter()`` seconds elapsed ``since`` to ``timings[key]``."""
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - since

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


def audit_inputs(
    model: nn.Module, batches: list[DomBatch], threshold: float
) -> dict[str, dict[str, float]]:
    """Per-feature min/max/mean/absmax of what enters the network; warns above ``threshold``."""
    stats: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for b in batches:
            for name, t in model.input_features(b).items():
                t = t.float()
                s = stats.setdefault(
                    name, {"min": math.inf, "max": -math.inf, "sum": 0.0, "n": 0.0}
                )
                s["min"] = min(s["min"], t.min().item())
                s["max"] = max(s["max"], t.max().item())
                s["sum"] += t.sum().item()
                s["n"] += t.numel()
    out = {}
    for name, s in stats.items():
        absmax = max(abs(s["min"]), abs(s["max"]))
        out[name] = {
            "min": s["min"],
            "max": s["max"],
            "mean": s["sum"] / max(1.0, s["n"]),
            "absmax": absmax,
        }
        if absmax > threshold:
            log.warning(
                "INPUT AUDIT: model input feature '%s' reaches %.4g (threshold %g): it is not "
                "normalized. Raw-scale inputs like this made the original run sit at ~1.5 rad "
                "and die with NaN; set model.normalize=true.",
                name,
                absmax,
                threshold,
            )
    return out


def _cycle_epochs(
    loader: EventLoader, epoch: int, start_batch: int
) -> Iterator[tuple[int, int, DomBatch]]:
    """Yields (epoch, batch index in epoch, batch) forever, starting at a resume point."""
    for e in itertools.count(epoch):
        first = start_batch if e == epoch else 0
        for i, b in enumerate(loader.iter_epoch(e, first), start=first):
            yield e, i, b


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


@dataclass
class StepOutput:
    """What one optimizer step measured; every tensor stays on the device (no host sync)."""

    loss: torch.Tensor
    """() training loss of the batch."""
    grad_norm: torch.Tensor
    """() global gradient norm before clipping."""
    param_grad_norms: torch.Tensor
    """(n_params,) per-parameter gradient norms before clipping, in ``Trainer.param_names``
    order (a parameter without a gradient counts as zero)."""
    prediction: torch.Tensor
    """(B, 3) predicted directions."""
    input_absmax: dict[str, torch.Tensor]
    """() largest absolute value of each model input feature in the batch."""
    lr: float
    """The learning rate the step used."""
    events: int
    """Events in the batch."""


class DivergenceGuard:
    """Device-side watch for the first non-finite loss, prediction or gradient.

    :meth:`observe` updates flags on the device after every step (no host sync); they keep
    the *first* bad step, its kind and its first bad parameter, so :meth:`report`, which reads
    them (a sync), is exact however rarely it is called. The guard also keeps the largest
    finite pre-clip global and per-parameter gradient norms and the largest absolute model
    input per feature.
    """

    def __init__(
        self,
        param_names: list[str],
        device: torch.device,
        *,
        max_grad_norm: float = 0.0,
        max_param_grad_norm: float = 0.0,
        max_param_grad_name: str | None = None,
    ) -> None:
        self.param_names = param_names
        self.last_finite_loss: float | None = None
        """The loss of the latest step :meth:`report` saw finite (host float)."""
        self._last_loss: torch.Tensor | None = None
        # -1 / 0: nothing bad yet; kinds are the keys of DIVERGENCE_KINDS.
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._first_bad_kind = torch.zeros((), dtype=torch.long, device=device)
        self._first_bad_param = torch.full((), -1, dtype=torch.long, device=device)
        self._max_norm = torch.full((), max_grad_norm, dtype=torch.float32, device=device)
        self._max_param_norm = torch.full(
            (), max_param_grad_norm, dtype=torch.float32, device=device
        )
        index = param_names.index(max_param_grad_name) if max_param_grad_name else -1
        self._max_param_index = torch.full((), index, dtype=torch.long, device=device)
        self._input_absmax: dict[str, torch.Tensor] = {}

    def observe(self, out: StepOutput, step: int) -> None:
        """Take in optimizer step ``step`` (1-based); device work only."""
        self._last_loss = out.loss
        for name, m in out.input_absmax.items():
            seen = self._input_absmax.get(name)
            self._input_absmax[name] = m if seen is None else torch.maximum(seen, m)
        bad_loss = ~torch.isfinite(out.loss)
        bad_pred = ~torch.isfinite(out.prediction).all()
        bad_grad = ~torch.isfinite(out.grad_norm)
        newly = (bad_loss | bad_pred | bad_grad) & (self._first_bad_step < 0)
        at_step = torch.full_like(self._first_bad_step, step)
        self._first_bad_step = torch.where(newly, at_step, self._first_bad_step)
        kind = torch.where(bad_loss, 1, torch.where(bad_pred, 2, 3))
        self._first_bad_kind = torch.where(newly, kind, self._first_bad_kind)
        # First parameter with a non-finite gradient norm; when every per-parameter norm is
        # finite but their total overflowed, the one with the largest norm (argmax: first max).
        norms = out.param_grad_norms
        bad_idx = torch.argmax(torch.nan_to_num(norms, nan=math.inf, posinf=math.inf))
        self._first_bad_param = torch.where(newly & bad_grad, bad_idx, self._first_bad_param)
        total = out.grad_norm
        finite_total = torch.maximum(self._max_norm, total.float())
        self._max_norm = torch.where(torch.isfinite(total), finite_total, self._max_norm)
        finite = torch.where(torch.isfinite(norms), norms, -1.0)  # (n_params,)
        larger = finite.amax() > self._max_param_norm
        self._max_param_norm = torch.where(larger, finite.amax(), self._max_param_norm)
        self._max_param_index = torch.where(larger, finite.argmax(), self._max_param_index)

    def report(self) -> DivergenceReport | None:
        """Reads the flags (a host sync): the divergence, or None while every step was finite
        (then the latest observed loss becomes :attr:`last_finite_loss`)."""
        bad_step = int(self._first_bad_step)
        if bad_step < 0:
            if self._last_loss is not None:
                self.last_finite_loss = float(self._last_loss)
            return None
        pidx = int(self._first_bad_param)
        return DivergenceReport(
            step=bad_step,
            reason=DIVERGENCE_KINDS[int(self._first_bad_kind)],
            first_bad_parameter=self.param_names[pidx] if pidx >= 0 else None,
            max_grad_norm=self.max_grad_norm,
            max_abs_input={k: float(v) for k, v in self._input_absmax.items()},
            last_finite_loss=self.last_finite_loss,
        )

    @property
    def max_grad_norm(self) -> float:
        """Largest finite pre-clip global gradient norm so far (a host sync)."""
        return float(self._max_norm)

    @property
    def max_param_grad(self) -> tuple[float, str | None]:
        """Largest finite pre-clip per-parameter gradient norm so far and its parameter."""
        index = int(self._max_param_index)
        return float(self._max_param_norm), self.param_names[index] if index >= 0 else None


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


class Trainer:
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
    :class:`~iceaggr.tracking.MlflowHook`, first) when ``train.mlflow_tracking_uri`` is set
    and ``hooks`` holds none, and shows a progress bar when ``progress``.
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


def write_result(result: TrainResult, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result.to_json(), indent=2))
