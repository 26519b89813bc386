"""Tests for the hierarchical transformer (iceaggr.models.model) and its input normalization."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from iceaggr.data.batch import DomBatch
from iceaggr.models.builder import param_groups
from iceaggr.models.line_fit import line_fit_direction
from iceaggr.models.losses import angular_distance
from iceaggr.models.model import (
    IceAggrModel,
    ModelConfig,
    SeqLayout,
    baseline_model_config,
    debug_model_config,
)

# DOM lengths (pulses per DOM) per event: single-pulse DOMs dominate, one long DOM, a one-DOM event.
EVENT_DOM_LENGTHS: list[list[int]] = [
    [1, 1, 3, 1, 2, 1, 1],
    [1],
    [130, 1, 1, 5, 1, 2, 1, 1, 1, 9],
    [2, 1, 1, 17],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 1, 1, 33, 1],
]


def make_batch(event_dom_lengths: list[list[int]], seed: int = 0) -> DomBatch:
    """A random DomBatch with raw-scale features (time ns, charge p.e., xyz m)."""
    g = torch.Generator().manual_seed(seed)
    dom_lengths = torch.tensor([n for ev in event_dom_lengths for n in ev])
    n_doms, n_pulses = dom_lengths.numel(), int(dom_lengths.sum())
    time = 1e4 + 6e4 * torch.rand(n_pulses, generator=g)  # ns
    charge = 10 ** (torch.log10(torch.tensor(0.025)) + 5.08 * torch.rand(n_pulses, generator=g))
    aux = (torch.rand(n_pulses, generator=g) < 0.3).float()
    zero = torch.zeros(1, dtype=torch.long)
    return DomBatch(
        pulses=torch.stack([time, charge, aux], dim=-1),  # (P, 3)
        cu_pulses=torch.cat([zero, dom_lengths.cumsum(0)]),
        dom_xyz=(torch.rand(n_doms, 3, generator=g) * 2 - 1) * 500.0,  # m
        sensor_id=torch.randint(0, 5160, (n_doms,), generator=g),
        cu_doms=torch.cat([zero, torch.tensor([len(ev) for ev in event_dom_lengths]).cumsum(0)]),
        event_id=torch.arange(len(event_dom_lengths)),
        direction=torch.nn.functional.normalize(torch.randn(len(event_dom_lengths), 3), dim=-1),
    )


def reorder(batch: DomBatch, dom_order: torch.Tensor, pulse_perms: list[torch.Tensor]) -> DomBatch:
    """Put DOMs in ``dom_order`` (new -> old DOM) and permute pulses of old DOM d by perm[d]."""
    cu = batch.cu_pulses
    pulse_idx = torch.cat([cu[d] + pulse_perms[d] for d in dom_order.tolist()])
    lengths = batch.dom_lengths()[dom_order]
    return dataclasses.replace(
        batch,
        pulses=batch.pulses[pulse_idx],
        cu_pulses=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        dom_xyz=batch.dom_xyz[dom_order],
        sensor_id=batch.sensor_id[dom_order],
    )


def select_event(batch: DomBatch, e: int) -> DomBatch:
    """The one-event batch holding event ``e`` of ``batch``."""
    d0, d1 = int(batch.cu_doms[e]), int(batch.cu_doms[e + 1])
    p0, p1 = int(batch.cu_pulses[d0]), int(batch.cu_pulses[d1])
    return DomBatch(
        pulses=batch.pulses[p0:p1],
        cu_pulses=batch.cu_pulses[d0 : d1 + 1] - p0,
        dom_xyz=batch.dom_xyz[d0:d1],
        sensor_id=batch.sensor_id[d0:d1],
        cu_doms=torch.tensor([0, d1 - d0]),
        event_id=batch.event_id[e : e + 1],
    )


def make_model(seed: int = 0, **overrides: object) -> IceAggrModel:
    torch.manual_seed(seed)
    return IceAggrModel(debug_model_config(**overrides)).eval()


def test_every_parameter_gets_a_finite_gradient() -> None:
    model = make_model().train()
    batch = make_batch(EVENT_DOM_LENGTHS)
    out = model(batch)
    loss = (1 - (out.direction * batch.direction).sum(-1)).mean() + out.kappa.mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_output_is_unit_direction_and_positive_kappa() -> None:
    for normalize in (True, False):
        out = make_model(normalize=normalize)(make_batch(EVENT_DOM_LENGTHS))
        assert out.direction.shape == (len(EVENT_DOM_LENGTHS), 3)
        assert out.kappa.shape == (len(EVENT_DOM_LENGTHS),)
        torch.testing.assert_close(out.direction.norm(dim=-1), torch.ones(5))
        assert (out.kappa > 0).all()


def test_prediction_is_invariant_to_pulse_and_dom_order() -> None:
    model = make_model()
    batch = make_batch(EVENT_DOM_LENGTHS)
    g = torch.Generator().manual_seed(1)
    dom_order = torch.cat(
        [
            int(batch.cu_doms[e]) + torch.randperm(len(ev), generator=g)
            for e, ev in enumerate(EVENT_DOM_LENGTHS)
        ]
    )
    perms = [torch.randperm(int(n), generator=g) for n in batch.dom_lengths()]
    shuffled = reorder(batch, dom_order, perms)
    assert not torch.equal(shuffled.pulses, batch.pulses)
    with torch.no_grad():
        a, b = model(batch), model(shuffled)
    torch.testing.assert_close(a.direction, b.direction, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.kappa, b.kappa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_packed_equals_padded(normalize: bool) -> None:
    packed = make_model(normalize=normalize)
    padded = IceAggrModel(dataclasses.replace(packed.cfg, attention="padded")).eval()
    padded.load_state_dict(packed.state_dict())
    batch = make_batch(EVENT_DOM_LENGTHS)
    with torch.no_grad():
        a, b = packed(batch), padded(batch)
    torch.testing.assert_close(a.direction, b.direction, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.kappa, b.kappa, atol=1e-5, rtol=1e-5)


def test_packed_layout_pads_within_buckets_only() -> None:
    lengths = torch.tensor([1] * 50 + [2, 3, 4, 7, 300])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    packed = SeqLayout(cu, padded=False)
    slots = sum(mask.numel() for _, _, mask in packed.buckets)
    assert slots < 2 * int(lengths.sum())  # the 50 single-pulse DOMs take no attention slots
    assert max(mask.shape[1] for _, _, mask in packed.buckets) == 300
    padded = SeqLayout(cu, padded=True)
    assert padded.buckets[0][2].shape == (lengths.numel(), 300)


def test_event_alone_equals_event_in_batch() -> None:
    model = make_model()
    batch = make_batch(EVENT_DOM_LENGTHS)
    with torch.no_grad():
        full = model(batch)
        for e in range(batch.num_events):
            alone = model(select_event(batch, e))
            torch.testing.assert_close(alone.direction[0], full.direction[e], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone.kappa[0], full.kappa[e], atol=1e-5, rtol=1e-5)


def test_normalize_switch_changes_network_inputs() -> None:
    batch = make_batch(EVENT_DOM_LENGTHS)
    raw = make_model(normalize=False).input_features(batch)
    norm = make_model(normalize=True).input_features(batch)
    assert raw.keys() == norm.keys()
    for name in ("pulse_time", "pulse_charge", "pulse_auxiliary", "dom_x", "dom_y", "dom_z"):
        assert name in norm
    assert {k for k in norm if k.startswith("dom_")} >= {"dom_first_time", "dom_total_charge"}
    assert max(float(x.abs().max()) for x in raw.values()) > 100
    for name, x in norm.items():
        assert float(x.abs().max()) < 10, name
    # Raw features are the batch's own numbers; normalized ones follow the documented formulas.
    torch.testing.assert_close(raw["pulse_time"], batch.pulses[:, 0])
    torch.testing.assert_close(norm["pulse_time"], (batch.pulses[:, 0] - 1e4) / 3e4)
    torch.testing.assert_close(norm["pulse_charge"], torch.log10(batch.pulses[:, 1]) / 3)
    torch.testing.assert_close(norm["dom_z"], batch.dom_xyz[:, 2] / 500)
    cu = batch.cu_pulses.tolist()
    first = torch.stack([batch.pulses[a:b, 0].min() for a, b in itertools.pairwise(cu)])
    torch.testing.assert_close(raw["dom_first_time"], first)


def test_dropout_changes_train_output_and_eval_is_deterministic() -> None:
    model = make_model(dropout=0.3)
    batch = make_batch(EVENT_DOM_LENGTHS)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).direction, model(batch).direction, atol=0, rtol=0)
        model.train()
        a, b = model(batch).direction, model(batch).direction
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"d_model": 18, "dom_heads": 4}, "d_model must be divisible by dom_heads"),
        ({"d_model": 16, "event_heads": 3}, "d_model must be divisible by event_heads"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dom_layers": -1}, "dom_layers must be >= 0, got -1"),
        ({"d_model": 0}, "d_model must be >= 1, got 0"),
        ({"mlp_ratio": 0.0}, "mlp_ratio must be > 0"),
        ({"attention": "flash"}, "attention must be 'packed' or 'padded', got 'flash'"),
        ({"normalize": "yes"}, "normalize must be true or false"),
        ({"moment_prior": -1.0}, "moment_prior must be a finite number >= 0"),
        ({"moment_prior": float("nan")}, "moment_prior must be a finite number >= 0"),
    ],
)
def test_config_validation(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig(**overrides)  # type: ignore[arg-type]


def test_empty_dom_is_rejected() -> None:
    batch = make_batch([[1, 2]])
    batch.cu_pulses = torch.tensor([0, 0, 3])
    with pytest.raises(ValueError, match="every DOM needs >= 1 pulse"):
        make_model()(batch)


def test_untrained_model_does_not_collapse() -> None:
    model = make_model()
    rng = torch.Generator().manual_seed(3)
    events = [torch.randint(1, 4, (int(n),), generator=rng).tolist() for n in range(3, 43)]
    with torch.no_grad():
        out = model(make_batch(events, seed=3))
    assert out.direction[:, 2].std() > 0.02
    assert out.direction.std(dim=0).sum() > 0.05


def test_param_groups_split_decay() -> None:
    model = make_model()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    n = len(decay["params"]) + len(no_decay["params"])
    assert n == len(list(model.parameters()))


def test_baseline_config_matches_defaults() -> None:
    cfg = baseline_model_config()
    assert (cfg.d_model, cfg.dom_layers, cfg.event_layers, cfg.attention) == (128, 4, 4, "packed")
    assert debug_model_config().d_model == 16


@pytest.mark.parametrize("d_model", [16, 128])
def test_pulse_with_all_zero_normalized_features_keeps_gradients_tame(d_model: int) -> None:
    # t = 1e4 ns, q = 1 p.e., not auxiliary normalizes to exactly (0, 0, 0). With a zero-init
    # embedding bias that token stayed exactly zero through every block and LayerNorm at zero
    # variance blew its gradient up to ~5e9 (seen on the synthetic data at the first step).
    batch = make_batch(EVENT_DOM_LENGTHS)
    batch.pulses[0] = torch.tensor([1e4, 1.0, 0.0])
    batch.pulses[batch.cu_pulses[3]] = torch.tensor([1e4, 1.0, 0.0])
    heads = 2 if d_model == 16 else 4
    model = make_model(d_model=d_model, dom_heads=heads, event_heads=heads).train()
    out = model(batch)
    angular_distance(out.direction, batch.direction).mean().backward()
    total = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    )
    # Below the stability table's warning threshold (train.grad_norm_warn = 1e3).
    assert total < 1e3, f"pre-clip gradient norm {total:.3g}"


def test_moment_prior_zero_makes_the_untrained_model_the_head_alone() -> None:
    # moment_prior=0 is the earlier default (the flat start): the head alone decides.
    model = make_model(moment_prior=0.0)
    batch = make_batch(EVENT_DOM_LENGTHS)
    assert torch.equal(model.moment_readout.weight, torch.zeros(3, 3))
    with torch.no_grad():
        raw = model.head(model.forward_features(batch).pooled)  # (B, 4)
        head_only = torch.nn.functional.normalize(raw[:, :3], dim=-1)
        out = model(batch)
    torch.testing.assert_close(out.direction, head_only, atol=1e-6, rtol=0)


def track_event(came_from: torch.Tensor, spacing_m: float = 30.0) -> DomBatch:
    """One muon event: 7 single-pulse DOMs on the track, hit as the muon passes them.

    The muon travels along ``-came_from`` at 0.3 m/ns; DOM ``k`` sits ``k * spacing_m`` along
    the track and is hit at ``1e4 ns + k * spacing_m / 0.3``; equal charges, no auxiliary hits.
    """
    k = torch.arange(-3, 4, dtype=torch.float32)  # (7,)
    xyz = -came_from[None, :] * (k * spacing_m)[:, None]  # (7, 3) m
    time = 1e4 + k * spacing_m / 0.3  # (7,) ns
    pulses = torch.stack([time, torch.full_like(time, 2.0), torch.zeros_like(time)], dim=-1)
    return DomBatch(
        pulses=pulses,
        cu_pulses=torch.arange(8),
        dom_xyz=xyz,
        sensor_id=torch.arange(7),
        cu_doms=torch.tensor([0, 7]),
        event_id=torch.zeros(1, dtype=torch.long),
        direction=came_from[None, :],
    )


@pytest.mark.parametrize("normalize", [True, False])
def test_moment_direction_points_where_the_muon_came_from(normalize: bool) -> None:
    # With the readout dominating the head, the prediction is the moment direction: for a
    # straight track it is the true origin direction (the sign the metric needs).
    came_from = torch.nn.functional.normalize(torch.tensor([0.3, -0.5, 0.8]), dim=0)
    model = make_model(normalize=normalize, prior_direction="moment")
    with torch.no_grad():
        model.moment_readout.weight.copy_(100.0 * torch.eye(3))
        out = model(track_event(came_from))
    assert angular_distance(out.direction, came_from[None, :]).item() < 2e-3


@pytest.mark.parametrize("normalize", [True, False])
def test_moment_direction_is_unit_length_whatever_the_input_scale(normalize: bool) -> None:
    # Raw moments reach ~1e6 m ns with normalize=false; the readout sees only their direction,
    # so it adds no raw-scale path. A one-DOM event (the second) has no moment: zero vector.
    with torch.no_grad():
        model = make_model(normalize=normalize, prior_direction="moment")
        feats = model.forward_features(make_batch(EVENT_DOM_LENGTHS))
    torch.testing.assert_close(
        feats.prior_dir.norm(dim=-1), torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    )


def track_batch(came_from: torch.Tensor) -> DomBatch:
    """Concatenated :func:`track_event` batches, one event per row of ``came_from`` (E, 3)."""
    events = [track_event(d) for d in came_from]
    zero = torch.zeros(1, dtype=torch.long)
    pulses_per_dom = torch.cat([e.dom_lengths() for e in events])
    doms_per_event = torch.tensor([int(e.cu_doms[-1]) for e in events])
    return DomBatch(
        pulses=torch.cat([e.pulses for e in events]),
        cu_pulses=torch.cat([zero, pulses_per_dom.cumsum(0)]),
        dom_xyz=torch.cat([e.dom_xyz for e in events]),
        sensor_id=torch.cat([e.sensor_id for e in events]),
        cu_doms=torch.cat([zero, doms_per_event.cumsum(0)]),
        event_id=torch.arange(len(events)),
        direction=came_from,
    )


@pytest.mark.parametrize("prior", [1.0, 2.5])
def test_moment_readout_starts_at_the_configured_prior(prior: float) -> None:
    model = make_model(moment_prior=prior)
    torch.testing.assert_close(model.moment_readout.weight, prior * torch.eye(3))
    assert ModelConfig().moment_prior == 1.0  # the default starts from the moment direction


def test_untrained_model_follows_the_moment_direction_not_one_direction() -> None:
    # 32 straight tracks from isotropic directions (their mean unit vector has length ~0.22).
    # With the default prior the untrained model predicts each track's own direction (the head
    # adds ~0.02 to a unit logit), so its predictions are as spread as the truth; with the
    # readout at zero the same network gives every event one direction (R ~1: the collapse
    # behind the flat start).
    g = torch.Generator().manual_seed(1)
    came_from = torch.nn.functional.normalize(torch.randn(32, 3, generator=g), dim=-1)
    batch = track_batch(came_from)
    truth_r = came_from.mean(0).norm().item()
    for seed in range(2):
        with torch.no_grad():
            prior = make_model(seed=seed)(batch).direction  # (32, 3)
            zero = make_model(seed=seed, moment_prior=0.0)(batch).direction
        assert prior.mean(0).norm().item() == pytest.approx(truth_r, abs=0.01)
        assert angular_distance(prior, came_from).max().item() < 0.02
        assert zero.mean(0).norm().item() > 0.99


# -------------------------------------------------------- the line fit as the prior direction


def test_line_fit_direction_of_straight_tracks_and_of_a_degenerate_event() -> None:
    g = torch.Generator().manual_seed(2)
    came_from = torch.nn.functional.normalize(torch.randn(8, 3, generator=g), dim=-1)
    got = line_fit_direction(track_batch(came_from))
    assert angular_distance(got, came_from).max().item() < 1e-4
    # One DOM (no time spread): the baseline's fallback, straight up; never NaN.
    one_dom = line_fit_direction(make_batch([[3], [1, 1, 1]]))
    torch.testing.assert_close(one_dom[0], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(one_dom.norm(dim=-1), torch.ones(2))


def test_line_fit_prior_starts_the_model_at_the_line_fit() -> None:
    # Random hits: the moment direction and the line fit disagree; the untrained model follows
    # its configured prior (the head adds ~0.02 to a unit logit).
    batch = make_batch(EVENT_DOM_LENGTHS, seed=3)
    fit = line_fit_direction(batch)
    with torch.no_grad():
        from_fit = make_model(prior_direction="line_fit")(batch).direction
        from_moment = make_model(prior_direction="moment")(batch).direction
    assert angular_distance(from_fit, fit).max().item() < 0.05
    assert angular_distance(from_moment, fit).max().item() > 0.5
    assert ModelConfig().prior_direction == "line_fit"  # the default
    with pytest.raises(ValueError, match="prior_direction must be 'moment'"):
        ModelConfig(prior_direction="linefit")  # type: ignore[arg-type]
