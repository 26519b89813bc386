"""Tests for iceaggr.models.losses against float64 closed forms, gradients included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iceaggr.models.losses import (
    angles_to_vector,
    angular_distance,
    angular_distance_loss,
    competition_metric,
    training_loss,
    vector_to_angles,
    vmf_loss,
    vmf_nll,
)

F64 = torch.float64


def random_unit(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=F64), dim=-1)


def test_angular_distance_known_angles() -> None:
    x, y = torch.tensor([[1.0, 0, 0]], dtype=F64), torch.tensor([[0.0, 1, 0]], dtype=F64)
    assert angular_distance(x, y).item() == pytest.approx(math.pi / 2, abs=1e-12)
    assert angular_distance(x, -x).item() == pytest.approx(math.pi, abs=1e-12)
    assert angular_distance(x, x).item() == 0.0
    # Not-unit predictions: only the direction counts.
    assert angular_distance(7.5 * x, y).item() == pytest.approx(math.pi / 2, abs=1e-12)
    # A small angle that acos(dot) would round to 0 in float32.
    eps = 1e-4
    pred = torch.tensor([[math.cos(eps), math.sin(eps), 0.0]], dtype=torch.float32)
    assert angular_distance(pred, x.float()).item() == pytest.approx(eps, rel=1e-3)


def test_angular_distance_matches_acos_reference() -> None:
    a, b = random_unit(64, 0), random_unit(64, 1)
    scale = torch.rand(64, 1, dtype=F64) * 10 + 0.1
    ref = torch.arccos((a * b).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(angular_distance(scale * a, b), ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(angular_distance_loss(a, b), ref.mean())


def test_angular_distance_gradcheck() -> None:
    a = (random_unit(8, 2) * 2.0).requires_grad_()
    b = random_unit(8, 3)
    assert torch.autograd.gradcheck(lambda p: angular_distance(p, b), (a,))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_angular_distance_gradient_finite_at_equal_and_opposite(sign: float) -> None:
    # Axis-aligned and simple vectors make the cross product exactly zero (random ones may not).
    target = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, -1, 0], [0.5, 0.5, 0.5**0.5]], dtype=F64)
    assert (torch.linalg.cross(target, target) == 0).all()
    for dtype in (torch.float32, F64):
        pred = (sign * target).to(dtype).clone().requires_grad_()
        angular_distance(pred, target.to(dtype)).sum().backward()
        assert torch.isfinite(pred.grad).all()


def vmf_nll_reference(mu: torch.Tensor, kappa: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The textbook form ``-log(kappa / (4 pi sinh kappa)) - kappa mu . x`` (moderate kappa)."""
    return -torch.log(kappa / (4 * math.pi * torch.sinh(kappa))) - kappa * (mu * x).sum(-1)


def test_vmf_matches_textbook_form() -> None:
    mu, x = random_unit(32, 5), random_unit(32, 6)
    kappa = torch.logspace(-2, 2, 32, dtype=F64)
    torch.testing.assert_close(vmf_nll(mu, kappa, x), vmf_nll_reference(mu, kappa, x))
    torch.testing.assert_close(vmf_loss(mu, kappa, x), vmf_nll_reference(mu, kappa, x).mean())


def test_vmf_is_normalized_density() -> None:
    # Monte Carlo over the sphere: E_uniform[p(x)] * 4 pi == 1.
    x = random_unit(400_000, 7)
    mu = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64).expand_as(x)
    kappa = torch.full((x.shape[0],), 3.0, dtype=F64)
    integral = torch.exp(-vmf_nll(mu, kappa, x)).mean() * 4 * math.pi
    assert integral.item() == pytest.approx(1.0, abs=0.02)


def test_vmf_gradcheck() -> None:
    mu, x = random_unit(6, 8).requires_grad_(), random_unit(6, 9)
    kappa = torch.tensor([0.05, 0.5, 1.0, 3.0, 10.0, 40.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, k: vmf_nll(m, k, x), (mu, kappa))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_vmf_finite_for_extreme_kappa(dtype: torch.dtype) -> None:
    kappa = torch.logspace(-4, 5, 10, dtype=dtype).requires_grad_()
    mu = random_unit(10, 10).to(dtype).requires_grad_()
    x = random_unit(10, 11).to(dtype)
    nll = vmf_nll(mu, kappa, x)
    nll.sum().backward()
    assert torch.isfinite(nll).all()
    assert torch.isfinite(kappa.grad).all() and torch.isfinite(mu.grad).all()
    # Accurate, not just finite: float32 vs the float64 textbook form down to kappa 1e-6.
    small_kappa = torch.logspace(-6, 1, 10, dtype=F64)
    torch.testing.assert_close(
        vmf_nll(mu.detach(), small_kappa.to(dtype), x).double(),
        vmf_nll_reference(mu.detach().double(), small_kappa, x.double()),
        rtol=1e-5,
        atol=1e-5,
    )
    # Limits: kappa -> 0 is the uniform density 1 / (4 pi); large kappa at mu == x is
    # -log(kappa / (2 pi)).
    small = vmf_nll(mu[:1].detach(), torch.tensor([1e-4], dtype=dtype), x[:1])
    assert small.item() == pytest.approx(math.log(4 * math.pi), abs=1e-3)
    big = vmf_nll(x[:1], torch.tensor([1e5], dtype=dtype), x[:1])
    assert big.item() == pytest.approx(-math.log(1e5 / (2 * math.pi)), abs=1e-2)


def test_angles_round_trip() -> None:
    g = torch.Generator().manual_seed(12)
    az = torch.rand(1000, generator=g, dtype=F64) * 2 * math.pi
    zen = torch.rand(1000, generator=g, dtype=F64) * math.pi
    v = angles_to_vector(az, zen)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(1000, dtype=F64))
    az2, zen2 = vector_to_angles(3.0 * v)
    torch.testing.assert_close(az2, az)
    torch.testing.assert_close(zen2, zen)


def test_angle_conventions() -> None:
    up = angles_to_vector(torch.tensor(0.3), torch.tensor(0.0))
    torch.testing.assert_close(up, torch.tensor([0.0, 0.0, 1.0]))
    az, zen = vector_to_angles(torch.tensor([[0.0, -1.0, 0.0], [1.0, -1e-9, -1.0]]))
    torch.testing.assert_close(az[0], torch.tensor(1.5 * math.pi))
    assert 0.0 <= az[1].item() < 2 * math.pi
    torch.testing.assert_close(zen, torch.tensor([math.pi / 2, 0.75 * math.pi]))


def test_competition_metric_matches_numpy_reference() -> None:
    rng = np.random.default_rng(13)
    az_t, az_p = rng.uniform(0, 2 * np.pi, (2, 500))
    zen_t, zen_p = rng.uniform(0, np.pi, (2, 500))

    def vec(az: np.ndarray, zen: np.ndarray) -> np.ndarray:
        return np.stack([np.cos(az) * np.sin(zen), np.sin(az) * np.sin(zen), np.cos(zen)], -1)

    ref = np.mean(np.arccos(np.clip((vec(az_t, zen_t) * vec(az_p, zen_p)).sum(-1), -1, 1)))
    assert competition_metric(az_t, zen_t, az_p, zen_p) == pytest.approx(ref, abs=1e-12)
    assert competition_metric(az_t, zen_t, az_t, zen_t) == pytest.approx(0.0, abs=1e-6)
    # Random guessing scores ~pi / 2 (uniform directions on the sphere).
    v = random_unit(20_000, 14)
    az, zen = vector_to_angles(v)
    score = competition_metric(az_t[:1].repeat(20_000), zen_t[:1].repeat(20_000), az, zen)
    assert score == pytest.approx(math.pi / 2, abs=0.02)


def test_training_loss_chooses_by_kind() -> None:
    direction, target = random_unit(5, 0), random_unit(5, 1)
    kappa = torch.linspace(0.5, 50.0, 5, dtype=F64)
    angular = training_loss("angular", direction, kappa, target)
    assert torch.equal(angular, angular_distance(direction, target).mean())
    assert torch.equal(
        training_loss("vmf", direction, kappa, target), vmf_loss(direction, kappa, target)
    )
    with pytest.raises(ValueError, match=r"unknown loss 'mse'; use one of \['angular', 'vmf'\]"):
        training_loss("mse", direction, kappa, target)  # type: ignore[arg-type]
