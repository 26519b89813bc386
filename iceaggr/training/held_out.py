"""The untrained model's score on the fixed held-out set, computed once and shared.

Every cell of one table column (a network, its normalization and a seed) starts from the same
initial weights and is scored on the same held-out events before its first step; only the
learning rate differs, and it plays no part before the first step. :class:`HeldOutCache`
keeps that score (the per-event losses, float64, which the paired standard error needs, and the
predicted directions, which the collapse statistics need) in a
folder shared by the cells: the first cell of a column computes and stores it under a file
lock, the others wait for it and read it. Each stored score carries the hash of the initial
``state_dict`` it was computed with (:func:`state_hash`); a cell whose own initial weights hash
differently refuses the stored score (:class:`HeldOutMismatch`) rather than use another
model's score.

Used by :class:`iceaggr.training.trainer.Trainer` (``held_out_cache``), so both ``iceaggr probe``
and the sweep's table trials (cells in separate processes) share it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class HeldOutMismatch(RuntimeError):
    """A stored initial score belongs to other initial weights than this run's."""


def state_hash(model: nn.Module) -> str:
    """SHA-256 of the model's ``state_dict`` (names, dtypes, shapes and values, on the CPU)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def score_key(parts: dict[str, Any]) -> str:
    """A file name for the score of what ``parts`` describes (JSON-able values)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class HeldOutCache:
    """Initial held-out scores in ``folder``, one file per key (see the module doc)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()

    def initial_score(
        self, key: str, init_hash: str, compute: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[tuple[torch.Tensor, ...], bool]:
        """(the score's tensors, whether they were read from the cache): the stored ones for
        ``key`` when present (their initial weights must hash to ``init_hash``), else
        ``compute()`` (e.g. per-event losses and predicted directions), stored for the next
        cell."""
        path = self.folder / f"{key}.pt"
        with _locked(self.folder / f"{key}.lock"):
            if path.exists():
                stored = torch.load(path, weights_only=True)
                if stored["init_hash"] != init_hash:
                    raise HeldOutMismatch(
                        f"{path}: the stored initial held-out score was computed with initial "
                        f"weights {stored['init_hash'][:12]}..., this run starts from "
                        f"{init_hash[:12]}...; delete {self.folder} or give the run its own "
                        "cache folder"
                    )
                log.info("initial held-out score shared from %s", path)
                return tuple(stored["score"]), True
            score = tuple(compute())
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"init_hash": init_hash, "score": [t.cpu() for t in score]}, tmp)
            os.replace(tmp, path)
            return score, False
