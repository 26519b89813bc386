"""The untrained model's held-out score, shared by runs that start from the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iceaggr.training.config import debug_config
from iceaggr.training.held_out import HeldOutCache, HeldOutMismatch, state_hash
from iceaggr.training.probe import probe_config
from iceaggr.training.results import TrainResult
from iceaggr.training.trainer import train

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def cell(data: Path, lr: float, cache: Path | None, seed: int = 0) -> TrainResult:
    cfg = probe_config(debug_config(str(data)), lr, True, 2, 16, seed=seed, eval_events=48)
    return train(cfg, track_fixed_batch=True, progress=False, held_out_cache=cache)


def test_cells_of_a_column_share_the_initial_score_and_measure_the_same(
    small_dataset: Path, tmp_path: Path
) -> None:
    alone = [cell(small_dataset, lr, None) for lr in (1e-4, 1e-3)]
    shared = [cell(small_dataset, lr, tmp_path / "cache") for lr in (1e-4, 1e-3)]
    assert [r.fixed_batch_initial_shared for r in shared] == [False, True]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    for a, s in zip(alone, shared, strict=True):
        # Same numbers with and without sharing: the score, the training, the paired stderr.
        assert s.fixed_batch_loss_initial == a.fixed_batch_loss_initial
        assert s.fixed_batch_loss_final == a.fixed_batch_loss_final
        assert s.fixed_batch_change_stderr == a.fixed_batch_change_stderr
        assert s.first_loss == a.first_loss and s.last_loss == a.last_loss
        assert s.fixed_collapse_initial == a.fixed_collapse_initial
    # Another seed is another initialisation: its own score, not the stored one.
    other = cell(small_dataset, 1e-4, tmp_path / "cache", seed=1)
    assert not other.fixed_batch_initial_shared
    assert other.fixed_batch_loss_initial != shared[0].fixed_batch_loss_initial


def test_a_score_of_other_initial_weights_is_refused(tmp_path: Path) -> None:
    cache = HeldOutCache(tmp_path)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert state_hash(a) != state_hash(b)
    score, shared = cache.initial_score("k", state_hash(a), lambda: (torch.ones(4), torch.ones(2)))
    assert not shared and torch.equal(score[0], torch.ones(4))
    again, shared = cache.initial_score("k", state_hash(a), lambda: (torch.zeros(4),))
    assert shared and torch.equal(again[0], torch.ones(4)) and torch.equal(again[1], torch.ones(2))
    with pytest.raises(HeldOutMismatch, match="initial weights"):
        cache.initial_score("k", state_hash(b), lambda: (torch.zeros(4),))
