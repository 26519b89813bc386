"""Collapse signals: the mean resultant length and the best constant direction, exactly."""

from __future__ import annotations

import math

import pytest
import torch

from iceaggr.models.losses import angular_distance
from iceaggr.training.collapse import (
    CollapseStats,
    best_constant,
    collapse_stats,
    learned,
    resultant_length,
    unit,
)


def _random_unit(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return unit(torch.randn(n, 3, generator=g, dtype=torch.float64))


def test_resultant_of_a_constant_predictor_is_one() -> None:
    v = torch.tensor([[0.3, -0.2, 0.9]]).repeat(500, 1)
    assert resultant_length(v) == pytest.approx(1.0, abs=1e-12)
    # Length does not matter: the predictions are made unit first.
    assert resultant_length(v * torch.rand(500, 1) + 0 * v) == pytest.approx(1.0, abs=1e-12)


def test_resultant_of_opposite_pairs_is_zero() -> None:
    u = _random_unit(100, 0)
    assert resultant_length(torch.cat([u, -u])) == pytest.approx(0.0, abs=1e-12)


def test_resultant_of_two_orthogonal_directions_is_one_over_root_two() -> None:
    v = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert resultant_length(v) == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_resultant_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"expected \(N, 3\) directions.*\(4, 2\)"):
        resultant_length(torch.zeros(4, 2))


def test_best_constant_of_identical_targets_is_that_target_with_zero_error() -> None:
    t = unit(torch.tensor([[1.0, 2.0, -2.0]], dtype=torch.float64)).repeat(50, 1)
    direction, err = best_constant(t)
    assert err == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(direction, t[0], atol=1e-6)


def test_best_constant_of_isotropic_targets_costs_about_half_pi() -> None:
    # On the whole sphere every constant direction scores pi/2 on average; the best one for a
    # finite sample leans into its fluctuations and does a little better, never worse.
    _, err = best_constant(_random_unit(20000, 1))
    assert math.pi / 2 - 0.03 < err < math.pi / 2


def test_best_constant_beats_every_grid_direction_and_is_a_local_minimum() -> None:
    t = unit(_random_unit(400, 2) + torch.tensor([0.0, 0.0, 0.8], dtype=torch.float64))
    direction, err = best_constant(t)
    mean_err = float(angular_distance(direction.expand_as(t), t).mean())
    assert mean_err == pytest.approx(err, abs=1e-12)
    # No small rotation of the answer does better (a spherical median).
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        moved = unit((direction + 0.01 * torch.randn(3, generator=g, dtype=torch.float64))[None])
        assert float(angular_distance(moved.expand_as(t), t).mean()) >= err - 1e-9
    # And the mean direction, a different estimator, is no better.
    mean_dir = unit(t.mean(0, keepdim=True))
    assert float(angular_distance(mean_dir.expand_as(t), t).mean()) >= err - 1e-12


def test_a_collapsed_model_pointing_at_the_best_constant_has_not_learned() -> None:
    t = unit(_random_unit(1024, 4) + torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64))
    direction, const_err = best_constant(t)
    stats = collapse_stats(direction.expand_as(t).clone(), t)
    assert stats.resultant == pytest.approx(1.0, abs=1e-12)
    assert stats.collapsed()
    assert stats.margin == pytest.approx(0.0, abs=1e-9)
    assert stats.const_angle == pytest.approx(const_err, abs=1e-12)
    assert not stats.learned


def test_a_model_close_to_the_truth_has_learned_and_is_not_collapsed() -> None:
    t = _random_unit(1024, 5)
    pred = unit(t + 0.2 * _random_unit(1024, 6))
    stats = collapse_stats(pred, t)
    assert stats.resultant == pytest.approx(resultant_length(pred))
    assert stats.target_resultant == pytest.approx(resultant_length(t))
    assert stats.resultant < 0.1 and not stats.collapsed()
    assert stats.margin < -1.0 and stats.learned
    assert stats.metrics()["val_vs_const"] == pytest.approx(stats.margin)
    assert CollapseStats.from_dict(stats.to_dict()) == stats


def test_learned_needs_more_than_the_standard_errors() -> None:
    assert learned(-0.05, 0.02)  # 2.5 standard errors below
    assert not learned(-0.03, 0.02)  # 1.5: within the noise
    assert not learned(0.01, 0.0)
    assert not learned(None, 0.01)
    assert not learned(float("nan"), 0.01)
