"""The training loop: one process, or one rank of a data-parallel job.

``train(cfg)`` runs AdamW with linear warm-up and cosine decay, clips the global
gradient norm (recording the norm before clipping), uses bf16 autocast on CUDA,
validates on held-out batch files with the competition metric, checkpoints so a
run resumes exactly, and logs to MLflow when a tracking URI is configured.

Two guards come with it:

* **input audit**: before the first step, the magnitudes of every model input
  feature are measured on the first batches; a feature larger than
  ``train.input_audit_threshold`` (100) was not normalized and is reported loudly.
* **divergence guard**: the first non-finite loss, prediction or gradient ends
  the run with a :class:`DivergenceReport` (step, first parameter whose gradient
  went non-finite, largest pre-clip gradient norm so far, largest absolute model
  input per feature). The checks stay on the device and are read every step on
  CPU, every ``log_every`` steps on CUDA (the flags remember the *first* bad step,
  so the report is exact; at most ``log_every - 1`` wasted steps follow it).

Nothing here imports Ray: a Ray Train worker passes ``rank``, ``world_size``,
``device`` and a ``report`` callback (see ``iceaggr_tune``). Run standalone with
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
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iceaggr.batch import DomBatch
from iceaggr.config import ExperimentConfig, to_dict
from iceaggr.dataset import KaggleDataset, split_batch_ids
from iceaggr.loader import EventLoader
from iceaggr.losses import angular_distance, vmf_nll
from iceaggr.model import IceAggrModel, build_model, param_groups

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"

ReportFn = Callable[[dict[str, float], int, "Path | None"], "bool | None"]
"""``report(metrics, step, checkpoint_dir_or_None)``, called every ``log_every`` steps; a true
return value asks the run to stop early (e.g. an early-stopping rule said so)."""


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
    fixed_batch_loss_final: float | None = None
    stopped_early: bool = False
    """The report callback asked the run to stop before ``max_steps``."""
    val_angle: float | None = None
    """Mean angular error (rad) on the validation files: the competition metric."""
    input_audit: dict[str, dict[str, float]] = field(default_factory=dict)
    train_seconds: float = 0.0
    """Wall time spent inside training steps (excludes set-up, validation, checkpoints)."""
    events_per_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

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


def compute_loss(kind: str, direction: torch.Tensor, kappa: torch.Tensor, target: torch.Tensor):
    """Mean training loss over the batch."""
    if kind == "angular":
        return angular_distance(direction, target).mean()
    return vmf_nll(direction, kappa, target).mean()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def audit_inputs(
    model: IceAggrModel, batches: list[DomBatch], threshold: float
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
) -> tuple[float, int]:
    """(sum of per-event angular errors in rad, number of events) over one pass of ``loader``."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for b in loader.iter_epoch(0):
        b = b.to(device, non_blocking=True)
        with autocast():
            out = model(b)
        total += angular_distance(out.direction.float(), b.direction).double().sum()
        n += b.num_events
    model.train(was_training)
    return float(total), n


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write (a killed writer never leaves a half checkpoint behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    cfg: ExperimentConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    report: ReportFn | None = None,
    resume_from: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    mlflow_run_id: str | None = None,
    mlflow_tags: dict[str, str] | None = None,
    track_fixed_batch: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg``; returns a :class:`TrainResult` (diverged runs return, never raise)."""
    tc = cfg.train
    dev = torch.device(device) if device is not None else resolve_device(tc.device)
    distributed = (
        world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    )
    _seed_everything(tc.seed)
    dataset = KaggleDataset(cfg.data.path)
    train_ids, val_ids = split_batch_ids(dataset.batch_ids, cfg.data.val_files)
    trunc = cfg.data.truncation()
    loader = EventLoader(
        dataset=dataset,
        batch_ids=train_ids,
        batch_size=tc.batch_size,
        truncation=trunc,
        seed=tc.seed,
        rank=rank,
        world_size=world_size,
        prefetch=cfg.data.prefetch,
        pin_memory=dev.type == "cuda",
        max_events=cfg.data.max_train_events,
    )
    val_loader = None
    if val_ids:
        val_loader = EventLoader(
            dataset=dataset,
            batch_ids=val_ids,
            batch_size=min(tc.batch_size, cfg.data.max_val_events),
            truncation=trunc,
            shuffle=False,
            rank=rank,
            world_size=world_size,
            drop_last=False,
            prefetch=cfg.data.prefetch,
            pin_memory=dev.type == "cuda",
            max_events=cfg.data.max_val_events,
        )
    model = build_model(cfg.model).to(dev)
    core = model
    if distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(
        param_groups(core, tc.weight_decay), lr=tc.lr, betas=tc.betas, fused=dev.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_lambda(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio),
    )
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and dev.type == "cuda")

    def autocast():
        if use_bf16:
            return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
        return nullcontext()

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else Path(tc.out_dir)
    result = TrainResult(steps=0)
    start_step, epoch, batch_in_epoch = 0, 0, 0
    if resume_from is not None:
        ckpt_path = Path(resume_from)
        if ckpt_path.is_dir():
            ckpt_path = ckpt_path / CHECKPOINT_NAME
        state = torch.load(ckpt_path, map_location=dev, weights_only=False)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
        result.max_grad_norm = state.get("max_grad_norm", 0.0)
        result.first_loss = state.get("first_loss")
        result.fixed_batch_loss_initial = state.get("fixed_batch_loss_initial")
        log.info("resumed from %s at step %d", ckpt_path, start_step)

    mlog = None
    if tc.mlflow_tracking_uri and rank == 0:
        from iceaggr.tracking import TAG_RESUMED_FROM_STEP, RunLogger

        mlog = RunLogger(
            tc.mlflow_tracking_uri,
            run_id=mlflow_run_id,
            experiment=tc.mlflow_experiment,
            run_name=cfg.name,
            spool_dir=Path(tc.mlflow_spool_dir).expanduser() if tc.mlflow_spool_dir else ckpt_dir,
            wait_s=tc.mlflow_wait_s,
        )
        tags = dict(mlflow_tags or {})
        if start_step > 0:  # a resumed run says from where (its curve continues from there)
            tags[TAG_RESUMED_FROM_STEP] = str(start_step)
        if tags:
            mlog.set_tags(tags)
        mlog.log_params({**to_dict(cfg), "world_size": world_size})

    stream = _cycle_epochs(loader, epoch, batch_in_epoch)
    # Input audit on the first batches (they are trained on afterwards, not consumed).
    peek = [next(stream) for _ in range(min(tc.input_audit_batches, len(loader)))]
    result.input_audit = audit_inputs(
        core, [b.to(dev) for _, _, b in peek], tc.input_audit_threshold
    )
    if mlog is not None:
        mlog.log_params(
            {f"input_audit.{k}.absmax": f"{v['absmax']:.4g}" for k, v in result.input_audit.items()}
        )
    stream = itertools.chain(peek, stream)

    fixed_batch = None
    if track_fixed_batch:
        if val_loader is None:
            raise ValueError("track_fixed_batch needs validation files (data.val_files >= 1)")
        fixed_batch = next(val_loader.iter_epoch(0)).to(dev)
        if result.fixed_batch_loss_initial is None:
            result.fixed_batch_loss_initial = _fixed_loss(model, fixed_batch, tc.loss, autocast)

    params = [(n, p) for n, p in core.named_parameters() if p.requires_grad]
    sync_every = 1 if dev.type == "cpu" else tc.log_every
    # Device-side guard state: the first bad step and what was bad there (-1: none yet).
    first_bad_step = torch.full((), -1, dtype=torch.long, device=dev)
    first_bad_kind = torch.zeros((), dtype=torch.long, device=dev)  # 1 loss, 2 pred, 3 grad
    first_bad_param = torch.full((), -1, dtype=torch.long, device=dev)
    max_norm_dev = torch.full((), result.max_grad_norm, dtype=torch.float32, device=dev)
    input_absmax: dict[str, torch.Tensor] = {}
    acc_loss = torch.zeros((), dtype=torch.float64, device=dev)
    acc_norm = torch.zeros((), dtype=torch.float64, device=dev)
    acc_n = 0
    last_finite_loss: float | None = None
    events_since, t_since = 0, time.perf_counter()

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.max_steps, initial=start_step, desc=cfg.name, unit="step", leave=False)

    model.train()
    step = start_step
    t_train = 0.0
    while step < tc.max_steps:
        t0 = time.perf_counter()
        epoch, batch_in_epoch, batch = next(stream)
        batch = batch.to(dev, non_blocking=True)
        with torch.no_grad():
            for name, t in core.input_features(batch).items():
                m = t.detach().abs().amax().float()
                input_absmax[name] = (
                    torch.maximum(input_absmax[name], m) if name in input_absmax else m
                )
        with autocast():
            out = model(batch)
        loss = compute_loss(tc.loss, out.direction.float(), out.kappa.float(), batch.direction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in params]
        per_param = torch.stack(torch._foreach_norm(grads))  # (n_params,)
        total_norm = torch.linalg.vector_norm(per_param)
        bad_loss = ~torch.isfinite(loss)
        bad_pred = ~torch.isfinite(out.direction).all()
        bad_grad = ~torch.isfinite(total_norm)
        bad = bad_loss | bad_pred | bad_grad
        newly = bad & (first_bad_step < 0)
        step += 1
        first_bad_step = torch.where(newly, torch.full_like(first_bad_step, step), first_bad_step)
        kind = torch.where(bad_loss, 1, torch.where(bad_pred, 2, 3))
        first_bad_kind = torch.where(newly, kind, first_bad_kind)
        # First parameter with a non-finite gradient norm; when every per-parameter norm is
        # finite but their total overflowed, the one with the largest norm (argmax: first max).
        bad_idx = torch.argmax(torch.nan_to_num(per_param, nan=math.inf, posinf=math.inf))
        first_bad_param = torch.where(newly & bad_grad, bad_idx, first_bad_param)
        # Clip with the norm computed above; a non-finite norm leaves the step to the guard.
        clip = torch.clamp(tc.grad_clip / (total_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, clip)
        max_norm_dev = torch.where(
            torch.isfinite(total_norm),
            torch.maximum(max_norm_dev, total_norm.float()),
            max_norm_dev,
        )
        step_lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (host float)
        optimizer.step()
        scheduler.step()
        acc_loss += loss.detach().double()
        acc_norm += total_norm.detach().double()
        acc_n += 1
        events_since += batch.num_events
        t_train += time.perf_counter() - t0
        if bar is not None:
            bar.update(1)

        is_report = step % tc.log_every == 0 or step == tc.max_steps
        if step % sync_every == 0 or is_report or step == start_step + 1:
            if int(first_bad_step) >= 0:
                bad_step = int(first_bad_step)
                kind_name = {
                    1: "non-finite loss",
                    2: "non-finite prediction",
                    3: "non-finite gradient",
                }[int(first_bad_kind)]
                pidx = int(first_bad_param)
                result.diverged = DivergenceReport(
                    step=bad_step,
                    reason=kind_name,
                    first_bad_parameter=params[pidx][0] if pidx >= 0 else None,
                    max_grad_norm=float(max_norm_dev),
                    max_abs_input={k: float(v) for k, v in input_absmax.items()},
                    last_finite_loss=last_finite_loss,
                )
                result.steps = bad_step
                log.warning("training %s", result.diverged.summary())
                metrics = {
                    "loss": float(loss.detach()),
                    "grad_norm": float(total_norm),
                    "diverged": 1.0,
                }
                result.history.append({"step": float(step), **metrics})
                if mlog is not None:
                    mlog.log_metrics(metrics, step)
                    mlog.set_tags(
                        {
                            "diverged": "true",
                            "diverged_at_step": bad_step,
                            "divergence_reason": result.diverged.summary(),
                        }
                    )
                if report is not None:
                    report(metrics | {"diverged_at_step": float(bad_step)}, step, None)
                break
            cur = float(loss.detach())
            if result.first_loss is None:
                result.first_loss = cur
            last_finite_loss = cur
        if is_report:
            now = time.perf_counter()
            metrics = {
                "loss": float(acc_loss) / acc_n,
                "grad_norm": float(acc_norm) / acc_n,
                "max_grad_norm": float(max_norm_dev),
                "lr": step_lr,
                "events_per_s": events_since * world_size / max(1e-9, now - t_since),
                "epoch": float(epoch),
                "diverged": 0.0,
                # Truncation is counted, never silent: events cut to the pulse/DOM caps so far.
                "events_truncated": float(loader.stats.events_truncated),
                "pulses_dropped": float(loader.stats.pulses_in - loader.stats.pulses_kept),
            }
            acc_loss.zero_()
            acc_norm.zero_()
            acc_n, events_since, t_since = 0, 0, now
            do_eval = val_loader is not None and (
                (tc.eval_every and step % tc.eval_every == 0) or step == tc.max_steps
            )
            if do_eval:
                s, n = evaluate(model, val_loader, dev, autocast)  # type: ignore[arg-type]
                if distributed:
                    t = torch.tensor([s, n], dtype=torch.float64, device=dev)
                    torch.distributed.all_reduce(t)
                    s, n = float(t[0]), int(t[1])
                metrics["val_angle"] = s / max(1, n)
                result.val_angle = metrics["val_angle"]
            result.history.append({"step": float(step), **metrics})
            if mlog is not None:
                mlog.log_metrics(metrics, step)
            ckpt = None
            do_ckpt = tc.checkpoint_every > 0 and (
                step % tc.checkpoint_every == 0 or step == tc.max_steps
            )
            if do_ckpt:
                ckpt = ckpt_dir
                if rank == 0:
                    save_checkpoint(
                        ckpt_dir / CHECKPOINT_NAME,
                        {
                            "model": core.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "step": step,
                            "epoch": epoch,
                            "batch_in_epoch": batch_in_epoch + 1,
                            "torch_rng": torch.get_rng_state(),
                            "cuda_rng": torch.cuda.get_rng_state(dev)
                            if dev.type == "cuda"
                            else None,
                            "max_grad_norm": float(max_norm_dev),
                            "first_loss": result.first_loss,
                            "fixed_batch_loss_initial": result.fixed_batch_loss_initial,
                            "config": to_dict(cfg),
                        },
                    )
            if report is not None and report(metrics, step, ckpt) and step < tc.max_steps:
                result.steps = step  # the loop's own update below is skipped by the break
                result.stopped_early = True
                log.info("stopping early at step %d (asked by the report callback)", step)
                break
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", gnorm=f"{metrics['grad_norm']:.3g}")
        result.steps = step
    if bar is not None:
        bar.close()

    result.max_grad_norm = float(max_norm_dev)
    result.last_loss = last_finite_loss
    result.train_seconds = t_train
    n_steps = result.steps - start_step
    result.events_per_s = n_steps * tc.batch_size * world_size / max(1e-9, t_train)
    if fixed_batch is not None and result.diverged is None:
        result.fixed_batch_loss_final = _fixed_loss(model, fixed_batch, tc.loss, autocast)
    if mlog is not None:
        if mlflow_run_id is None:  # a run this function made; otherwise its owner ends it
            mlog.terminate("FAILED" if result.diverged else "FINISHED")
        else:
            mlog.flush(block=True)  # the owner ends the run; the records must be there first
    return result


@torch.no_grad()
def _fixed_loss(model: nn.Module, batch: DomBatch, kind: str, autocast: Any) -> float:
    was = model.training
    model.eval()
    with autocast():
        out = model(batch)
    loss = compute_loss(kind, out.direction.float(), out.kappa.float(), batch.direction)
    model.train(was)
    return float(loss)


def write_result(result: TrainResult, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result.to_json(), indent=2))
