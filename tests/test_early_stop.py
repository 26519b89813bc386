"""The in-trial ASHA rule (pure Python; the sweep tests run it inside real trials)."""

from __future__ import annotations

import math

import pytest

from iceaggr_tune.early_stop import RungBoard


def test_rungs_grow_geometrically_below_the_last_report():
    assert RungBoard(grace=2, reduction_factor=2, max_reports=20).rungs == [2, 4, 8, 16]
    assert RungBoard(grace=1, reduction_factor=3, max_reports=10).rungs == [1, 3, 9]
    assert RungBoard(grace=5, reduction_factor=2, max_reports=5).rungs == []


def test_only_the_best_fraction_continues_at_a_rung():
    board = RungBoard(grace=1, reduction_factor=2, max_reports=8)
    assert board.should_stop("a", 1, 1.40) is False  # first at the rung: nothing to compare
    assert board.should_stop("b", 1, 1.50) is True  # worse than the best half of [1.40]
    assert board.should_stop("c", 1, 1.30) is False  # better than the cutoff 1.40
    # 3 recorded -> the best 3 // 2 = 1 continue: cutoff 1.30
    assert board.should_stop("d", 1, 1.35) is True
    # 4 recorded -> the best 2 continue: cutoff is the 2nd best of [1.40, 1.50, 1.30, 1.35]
    assert board.should_stop("e", 1, 1.38) is True
    assert board.should_stop("g", 1, 1.34) is False
    assert board.should_stop("f", 3, 9.0) is False  # report 3 is not a rung


def test_decisions_are_cached_per_trial_and_report():
    board = RungBoard(grace=1, reduction_factor=2, max_reports=8)
    board.should_stop("a", 1, 1.0)
    first = board.should_stop("b", 1, 2.0)
    # Another rank of trial b asks again with a different local value: same answer, not recorded.
    assert board.should_stop("b", 1, 0.5) is first is True
    assert board.recorded[1] == [1.0, 2.0]


def test_non_finite_metric_stops_and_is_not_recorded():
    board = RungBoard(grace=1, reduction_factor=2, max_reports=4)
    assert board.should_stop("a", 1, math.nan) is True
    assert board.recorded[1] == []


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="reduction_factor >= 2"):
        RungBoard(grace=1, reduction_factor=1, max_reports=4)
