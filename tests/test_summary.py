"""The search summary: its Markdown table and the reference errors on the validation events."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from iceaggr.data.dataset import KaggleDataset, split_batch_ids
from iceaggr.data.linefit import line_fit_dataset
from iceaggr_tune.summary import RANDOM_GUESS_RAD, format_search_table, reference_errors


def _row(trial: str, best: float | None, **kw: object) -> dict[str, object]:
    row = dict(trial=trial, lr=3e-4, dropout=0.1, steps=60, best_val=best)
    row.update(stopped_early=False, diverged=False, error=None)
    return row | kw


def test_format_search_table_sorts_by_best_validation_error() -> None:
    rows = [
        _row("t1", 1.45, stopped_early=True, steps=20),
        _row("t2", None, diverged=True, lr=3e-3, steps=7),
        _row("t3", 1.3712, dropout=0.25, resultant=0.0412, collapsed=False, vs_const=-0.2113),
        _row("t4", 1.5801, resultant=0.99998, collapsed=True, vs_const=0.0007),
    ]
    lines = format_search_table(rows).splitlines()
    assert lines[0] == (
        "| trial | lr | dropout | steps | best val (rad) | vs best constant (rad) | R | "
        "collapsed | stopped early | diverged |"
    )
    assert lines[2:6] == [
        "| t3 | 0.0003 | 0.250 | 60 | 1.3712 | -0.2113 | 0.041 | no | no | no |",
        "| t1 | 0.0003 | 0.100 | 20 | 1.4500 | — | — | — | yes | no |",
        "| t4 | 0.0003 | 0.100 | 60 | 1.5801 | +0.0007 | 1.000 | yes | no | no |",
        "| t2 | 0.003 | 0.100 | 7 | — | — | — | — | no | yes |",
    ]
    assert "collapsed: R >= 0.9" in lines[-1]


def test_reference_errors_score_the_validation_events(small_dataset: Path) -> None:
    _, val_ids = split_batch_ids(KaggleDataset(small_dataset).batch_ids, 1)
    refs = reference_errors(small_dataset, val_ids, 200)
    only_val = line_fit_dataset(small_dataset, max_events=200, batch_ids=val_ids)
    assert only_val["n_events"] == 200
    assert refs == {"line fit": only_val["mean_angular_error"], "random": RANDOM_GUESS_RAD}
    first_file = line_fit_dataset(small_dataset, max_events=200)
    assert refs["line fit"] != first_file["mean_angular_error"]  # other events
    assert 0.3 < refs["line fit"] < math.pi / 2
    with pytest.raises(ValueError, match=r"has no events of batch_id \[99\]"):
        line_fit_dataset(small_dataset, max_events=10, batch_ids=[99])


def test_ui_links_open_the_runs_table_and_compare_the_search_trials() -> None:
    from urllib.parse import unquote

    from iceaggr_tune.mlflow_runs import format_links, ui_base, ui_links

    assert ui_base("sqlite:////tmp/mlflow.db") == "http://127.0.0.1:5000"
    assert ui_base("http://10.0.0.5:5000/") == "http://10.0.0.5:5000"
    links = ui_links("http://127.0.0.1:5000", "3", "p1", ["a1", "b2"])
    assert links["runs"] == "http://127.0.0.1:5000/#/experiments/3/runs"
    assert links["parent"] == "http://127.0.0.1:5000/#/experiments/3/runs/p1"
    assert unquote(links["compare"]) == (
        'http://127.0.0.1:5000/#/compare-runs?runs=["a1","b2"]&experiments=["3"]'
    )
    curves = unquote(links["curves"])
    assert curves.startswith('http://127.0.0.1:5000/#/metric?runs=["a1","b2"]&metric="val_angle"')
    assert 'plot_metric_keys=["val_angle","val_resultant"]' in curves
    # No search trials: nothing to compare.
    assert set(ui_links("http://h", "3", "p1", [])) == {"runs", "parent"}
    printed = format_links("sqlite:////tmp/mlflow.db", links)
    assert "iceaggr mlflow-server --backend-store-uri sqlite:////tmp/mlflow.db" in printed
    assert all(f"  {url}" in printed.splitlines() for url in links.values())
