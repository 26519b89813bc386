"""Where a trial's Ray worker-group start goes, and a torch backend that skips what one
worker does not need.

A trial's ``TorchTrainer.fit()`` starts Ray Train's controller actor, books the workers'
placement group, starts each worker's process, imports the training function's module there,
sets up ``torch.distributed`` (Ray's ``_TorchBackend.on_start``) and only then calls
:func:`iceaggr_tune.trial.train_fn_per_worker`. The worker measures that start from timestamps
(wall clock, one node) kept in this module:

* the worker process's start time (``/proc/self/stat``; Linux),
* the import of :mod:`iceaggr_tune.trial` (begin and end, set by that module),
* the torch backend's ``on_start`` (begin and end, run on the workers by
  :class:`TimedTorchConfig`'s backend),

and :func:`start_parts` turns them into the parts of the printed summary (``t_ray_*_s``).

:class:`TimedTorchConfig` is Ray's ``TorchConfig`` whose backend, for a one-worker group
(``skip_single_worker``), sets the ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` variables as Ray does
but creates no ``gloo``/``nccl`` process group: a single worker never communicates, and
:class:`iceaggr.training.trainer.Trainer` only uses ``torch.distributed`` when ``world_size > 1``.
Ray's own shutdown destroys a process group only for groups of more than one worker, so nothing
is left to clean up. Groups of two or more workers get Ray's set-up unchanged (timed).

This module imports only Ray Train's torch config (the controller actor imports it anyway).
"""

# ruff: noqa: E402  (the import of Ray Train's torch config below is timed)
from __future__ import annotations

import time

_IMPORT_START = time.time()

import logging
import os
from dataclasses import dataclass
from typing import Any

from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

log = logging.getLogger(__name__)

MARKS: dict[str, float] = {"backend_import_start": _IMPORT_START, "backend_import_end": time.time()}
"""Wall-clock timestamps (``time.time()``) of this worker process's start-up steps."""


def mark(name: str, at: float | None = None) -> None:
    """Record ``name`` at ``at`` (default: now) in this process's :data:`MARKS`."""
    MARKS[name] = time.time() if at is None else at


def process_start_time() -> float | None:
    """Wall-clock start of this process (Linux ``/proc``), or None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5), counted after the ")"
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _mark_on_worker(name: str) -> None:
    mark(name)


class _TimedTorchBackend(_TorchBackend):
    """Ray's torch backend, timed on the workers; no process group for a lone worker."""

    def on_start(self, worker_group: Any, backend_config: TimedTorchConfig) -> None:  # type: ignore[override]
        worker_group.execute(_mark_on_worker, "backend_start")
        if backend_config.skip_single_worker and len(worker_group) == 1:
            worker_group.execute(_set_torch_distributed_env_vars)
        else:
            super().on_start(worker_group, backend_config)
        worker_group.execute(_mark_on_worker, "backend_end")


@dataclass
class TimedTorchConfig(TorchConfig):
    """``TorchConfig`` whose backend records its start on the workers and, with
    ``skip_single_worker``, sets up no process group for a one-worker group."""

    skip_single_worker: bool = True

    @property
    def backend_cls(self):  # type: ignore[override]
        return _TimedTorchBackend


def start_parts(fit_start: float, train_fn_start: float) -> dict[str, float]:
    """The worker-group start (``fit_start`` in the trial driver to ``train_fn_start`` in the
    worker) in parts, seconds, from this process's :data:`MARKS`:

    * ``t_ray_schedule_s``: controller actor, placement group, until the worker process
      existed (0 when Ray gave the worker a process it had started before);
    * ``t_ray_process_s``: the worker process's start until it first ran code of ours (an
      import of this module or of the training function's): Ray's own worker start-up;
    * ``t_ray_imports_s``: importing this module (Ray Train's torch config, torch) and
      :mod:`iceaggr_tune.trial` (Ray Train, iceaggr);
    * ``t_ray_dist_init_s``: the torch backend's ``on_start`` (the process group);
    * ``t_ray_other_s``: what is left (Ray Train's context, the training function's dispatch).

    Parts without marks are left out; ``t_ray_other_s`` holds their time then.
    """
    total = max(0.0, train_fn_start - fit_start)
    parts: dict[str, float] = {}
    proc = process_start_time()
    # Our imports: this module's (Ray Train's torch config, so torch) and the training
    # function's module's, which may hold this one; an import before the fit (a process Ray
    # started earlier) costs this trial nothing.
    spans = [
        (MARKS[f"{name}_start"], MARKS[f"{name}_end"])
        for name in ("backend_import", "import")
        if f"{name}_start" in MARKS and f"{name}_end" in MARKS
    ]
    b0, b1 = MARKS.get("backend_start"), MARKS.get("backend_end")
    firsts = [a for a, _ in spans] + ([b0] if b0 is not None else [])
    if proc is not None:
        parts["t_ray_schedule_s"] = max(0.0, proc - fit_start)
        if firsts:
            parts["t_ray_process_s"] = max(0.0, min(firsts) - max(proc, fit_start))
    if spans:
        parts["t_ray_imports_s"] = _union_length(spans, fit_start)
    if b0 is not None and b1 is not None:
        parts["t_ray_dist_init_s"] = max(0.0, b1 - b0)
    parts["t_ray_other_s"] = max(0.0, total - sum(parts.values()))
    return parts


def _union_length(spans: list[tuple[float, float]], since: float) -> float:
    """Seconds covered by the (start, end) ``spans`` after ``since``."""
    covered, reach = 0.0, since
    for a, b in sorted(spans):
        a = max(a, reach)
        if b > a:
            covered += b - a
            reach = b
    return covered
