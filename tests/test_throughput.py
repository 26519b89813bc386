"""Smoke and unit tests for ``benchmarks/throughput.py`` (no timing is asserted).

The benchmark runs in-process at CI size (one step, batch 8, the padded reference at batch 4,
CPU, fp32); the tests check the JSON it writes, the synthetic length generator's statistics
and the analytic FLOP count.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from iceaggr.data.loader import Truncation
from iceaggr.models.model import baseline_model_config

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    """benchmarks/throughput.py imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_throughput", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_run_writes_rows_ratio_and_counts(
    throughput: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "throughput.json"
    argv = ["--quick", "--device", "cpu", "--precision", "fp32", "--batch-size", "8"]
    argv += ["--padded-batch-size", "4", "--steps", "1", "--warmup", "1", "--repeats", "1"]
    argv += ["--memory-budget-gb", "4", "--json", str(out)]
    assert throughput.main(argv) == 0

    doc = json.loads(out.read_text())
    rows = {(r["attention"], r["batch_size"]): r for r in doc["rows"]}
    assert set(rows) == {("packed", 8), ("padded", 4), ("packed", 4)}
    for row in rows.values():
        assert row["device"] == "cpu" and row["precision"] == "fp32"
        for key in ("events_per_s", "step_ms", "gflop_per_s", "gb_per_s", "flop_fraction"):
            assert row[key] > 0, key
        assert row["flops_per_event"] > 0 and row["bytes_per_event"] > 0
        assert row["peak_mb"] >= 0
    # The useful FLOPs are the same for both implementations; padding only adds executed ones.
    padded, packed = rows[("padded", 4)], rows[("packed", 4)]
    assert padded["flops_per_event"] == packed["flops_per_event"]
    assert padded["executed_flops_per_event"] > packed["executed_flops_per_event"]

    (ratio,) = doc["ratios"]
    assert ratio["batch_size"] == 4 and ratio["speedup"] > 0
    assert ratio["line"].startswith("speed-up packed/padded (cpu fp32, batch 4): ")
    assert doc["per_event"]["fp32"]["flops"] > 0 and doc["per_event"]["fp32"]["bytes"] > 0
    assert doc["per_event"]["bf16"]["bytes"] < doc["per_event"]["fp32"]["bytes"]
    assert doc["command"][-len(argv) :] == argv

    printed = capsys.readouterr().out
    assert "| device | precision | attention | batch | events/s |" in printed
    assert ratio["line"] in printed


def test_length_generator_hits_real_statistics(throughput: ModuleType) -> None:
    rng = np.random.default_rng(0)
    doms, pulses = throughput.sample_lengths(20_000, rng, Truncation())
    stats = throughput.length_stats(doms, pulses)
    assert 80 <= stats["mean_pulses_per_event"] <= 140
    assert 0.7 <= stats["single_pulse_fraction"] <= 0.85
    assert 45 <= stats["mean_doms_per_event"] <= 85
    assert stats["max_doms_per_event"] >= 1_000  # the heavy tail of bright events
    assert stats["max_pulses_per_dom"] >= 100
    assert doms.min() >= 1 and pulses.min() >= 1


def test_length_generator_respects_caps(throughput: ModuleType) -> None:
    caps = Truncation(max_pulses_per_event=200, max_pulses_per_dom=16, max_doms_per_event=50)
    doms, pulses = throughput.sample_lengths(2_000, np.random.default_rng(1), caps)
    per_event = np.add.reduceat(pulses, np.cumsum(doms) - doms)
    assert per_event.max() <= 200 and pulses.max() <= 16 and doms.max() <= 50
    assert doms.sum() == pulses.size and doms.min() >= 1


def test_synthetic_batch_is_raw_scale(throughput: ModuleType) -> None:
    (batch,) = throughput.synthetic_batches(1, 64, seed=0, truncation=Truncation())
    time_ns, charge, aux = batch.pulses.unbind(-1)
    assert float(time_ns.min()) >= 1e4 and float(time_ns.max()) <= 4e4
    assert float(charge.min()) >= 0.025 and float(charge.max()) <= 3000.0
    assert set(aux.unique().tolist()) <= {0.0, 1.0}
    assert float(batch.dom_xyz.abs().max()) <= 500.0
    assert batch.num_events == 64 and int(batch.cu_pulses[-1]) == batch.num_pulses


def test_flop_count_is_linear_in_layers(throughput: ModuleType) -> None:
    (batch,) = throughput.synthetic_batches(1, 32, seed=0, truncation=Truncation())
    pulses, doms = batch.dom_lengths().numpy(), batch.event_lengths().numpy()
    base = baseline_model_config()

    def count(layers: int):
        cfg = dataclasses.replace(base, dom_layers=layers, event_layers=layers)
        return throughput.count_flops(cfg, pulses, doms)

    four, eight, zero = count(4), count(8), count(0)
    assert eight.blocks == 2 * four.blocks  # exact: Python integers
    assert eight.total - four.total == four.total - zero.total == four.blocks
    assert zero.blocks == 0 and zero.embed_head == four.embed_head > 0


def test_flop_count_matches_hand_count(throughput: ModuleType) -> None:
    """One event of five DOMs (1, 3, 4, 2, 5 pulses), d_model 8, one layer each, MLP ratio 4."""
    cfg = baseline_model_config(d_model=8, dom_heads=2, event_heads=2, dom_layers=1, event_layers=1)
    pulses, doms = np.array([1, 3, 4, 2, 5]), np.array([5])
    weights = 3 * 64 + 64 + 2 * 8 * 32  # QKV, projection, MLP
    useful = throughput.count_flops(cfg, pulses, doms)
    assert useful.dom_blocks == 2 * weights * 15  # 15 pulses
    assert useful.event_blocks == 2 * weights * 5  # 5 DOMs
    assert useful.dom_attention == 4 * 8 * (3**2 + 4**2 + 2**2 + 5**2)  # length 1 needs none
    assert useful.event_attention == 4 * 8 * 5**2
    # Packed: buckets (1, 2] {2}, (2, 4] {3, 4} padded to 4, (4, 8] {5}; length 1 skipped.
    packed = throughput.count_flops(cfg, pulses, doms, "packed")
    assert packed.dom_attention == 4 * 8 * (2**2 + 2 * 4**2 + 5**2)
    assert packed.dom_blocks == useful.dom_blocks
    # Padded: all five DOMs padded to 5 pulses, blocks included.
    padded = throughput.count_flops(cfg, pulses, doms, "padded")
    assert padded.dom_attention == 4 * 8 * 5 * 5**2
    assert padded.dom_blocks == 2 * weights * 25


def test_min_bytes_amortize_parameters_over_the_batch(throughput: ModuleType) -> None:
    cfg = baseline_model_config()
    small = throughput.count_min_bytes(cfg, 100, 60, 1, 1_000_000, "fp32")
    assert small["parameters_optimizer"] == throughput.ADAMW_BYTES_PER_PARAM * 1_000_000
    per_token_block = 5 * (6 * 128 + 512) * 4
    assert small["activations"] == per_token_block * (100 * 4 + 60 * 4)
    bf16 = throughput.count_min_bytes(cfg, 100, 60, 1, 1_000_000, "bf16")
    assert 2 * bf16["activations"] == small["activations"]
