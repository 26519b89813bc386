"""Unit tests for ``benchmarks/rung_fidelity.py``: its rank correlation, grid and ASHA replay.

The benchmark's trials themselves are too long for a test (8 x 100 steps of the baseline model).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from iceaggr_tune.options import SearchOptions

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "rung_fidelity.py"


@pytest.fixture(scope="module")
def rf() -> Iterator[ModuleType]:
    """benchmarks/rung_fidelity.py imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_rung_fidelity", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_spearman_matches_the_closed_form(rf: ModuleType) -> None:
    x = [0.3, 1.2, 0.7, 2.0, 1.5]
    assert rf.spearman(x, [10, 40, 20, 90, 50]) == pytest.approx(1.0)
    assert rf.spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    # No ties: 1 - 6 sum d^2 / (n (n^2 - 1)); ranks of x: 1 3 2 5 4, of y: 2 1 3 5 4.
    y = [2.0, 1.0, 3.0, 9.0, 5.0]
    assert rf.spearman(x, y) == pytest.approx(1 - 6 * (1 + 4 + 1 + 0 + 0) / (5 * 24))
    # Ties get average ranks: x ranks 1.5 1.5 3 4 against 1 2 3 4 -> Pearson of the ranks.
    expected = np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1]
    assert rf.spearman([1.0, 1.0, 2.0, 3.0], [1, 2, 3, 4]) == pytest.approx(expected)
    assert math.isnan(rf.spearman([1.0, 1.0, 1.0], [1, 2, 3]))  # a constant side
    assert math.isnan(rf.spearman([1.0, math.nan], [1, 2]))  # one finite pair


def test_latin_grid_puts_one_trial_in_each_stratum(rf: ModuleType) -> None:
    search = SearchOptions()
    points = rf.latin_grid(search, 8, seed=0)
    log_lr = (np.log([p["lr"] for p in points]) - math.log(search.lr_min)) / math.log(
        search.lr_max / search.lr_min
    )
    drop = (np.array([p["dropout"] for p in points]) - search.dropout_min) / (
        search.dropout_max - search.dropout_min
    )
    for u in (log_lr, drop):
        assert sorted(np.floor(u * 8).astype(int).tolist()) == list(range(8))
    assert points == rf.latin_grid(search, 8, seed=0)
    assert points != rf.latin_grid(search, 8, seed=1)


def test_replay_stops_trials_below_the_best_half_at_the_rung(rf: ModuleType) -> None:
    # Reports every 20 steps, first rung at report 3 (step 60), halving: the second trial is
    # worse than the first at step 60 and stops; the third is better and runs on.
    values = [
        {20: 1.5, 40: 1.4, 60: 1.30, 80: 1.2, 100: 1.1},
        {20: 1.5, 40: 1.4, 60: 1.35, 80: 1.0, 100: 0.9},
        {20: 1.5, 40: 1.4, 60: 1.20, 80: 1.2, 100: 1.2},
    ]
    assert rf.replay_asha(values, 20, 3, 2, 5) == [None, 60, None]
