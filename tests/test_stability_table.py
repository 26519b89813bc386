"""The stability table's two views (iceaggr.training.stability_table), pinned with exact texts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iceaggr.training.probe import PROBE_LRS, Cell
from iceaggr.training.stability_table import (
    PUBLISHED,
    format_learning,
    format_reproduction,
    learning_cell,
    lr_label,
    reproduction_score,
    seeds_note,
    status_text,
    table_json,
    write_table,
)

# DESIGN.md section 1 / 6, verbatim: the published table.
DESIGN_TABLE = """\
| Learning Rate | Before Normalization | After Normalization |
|---------------|---------------------|---------------------|
| 1e-5 | ❌ Loss +0.023 | ✅ Loss -0.058 |
| 3e-5 | ✅ Loss -0.040 | ✅ Loss -0.067 |
| 1e-4 | ✅ Loss -0.024 | ✅ Loss -0.067 |
| 3e-4 | ⚠️ Loss -0.049 | ✅ Loss -0.093 |
| 1e-3 | ❌ EXPLODES | ✅ Loss -0.097 |"""


def cell(lr: float, normalize: bool, **kw: object) -> Cell:
    base: dict[str, object] = dict(
        lr=lr,
        normalize=normalize,
        status="no_decrease",
        loss_change=0.01,
        loss_initial=1.6,
        loss_final=1.61,
        max_grad_norm=1.0,
        model="original",
        stable=True,
        max_param_grad_norm=0.8,
    )
    return Cell(**(base | kw))  # type: ignore[arg-type]


def published_cells() -> list[Cell]:
    """Cells whose training-batch numbers are exactly the published ones."""
    return [
        cell(lr, norm, original_status=st, train_loss_change=ch)
        for (lr, norm), (st, ch) in PUBLISHED.items()
    ]


def test_the_published_table_is_the_design_table() -> None:
    rows = [
        f"| {lr_label(lr)} | {status_text(*PUBLISHED[(lr, False)])} | "
        f"{status_text(*PUBLISHED[(lr, True)])} |"
        for lr in PROBE_LRS
    ]
    assert "\n".join(DESIGN_TABLE.splitlines()[:2] + rows) == DESIGN_TABLE


def test_reproduction_of_the_published_numbers_matches_every_cell() -> None:
    text = format_reproduction(published_cells()[::-1], grad_norm_warn=100)
    lines = text.splitlines()
    assert lines[0] == (
        "| Learning Rate | Before Normalization | published | After Normalization | published |"
    )
    assert (
        lines[2] == "| 1e-5 | ❌ Loss +0.023 | ❌ Loss +0.023 | ✅ Loss -0.058 | ✅ Loss -0.058 |"
    )
    assert lines[6] == "| 1e-3 | ❌ EXPLODES | ❌ EXPLODES | ✅ Loss -0.097 | ✅ Loss -0.097 |"
    assert lines[8] == "10 of 10 cells have the original's status."
    assert "exceeded 100;" in lines[10]


def test_reproduction_counts_cells_whose_status_differs() -> None:
    cells = published_cells()
    cells[0] = cell(1e-5, False, original_status="ok", train_loss_change=-0.011)
    cells[9] = cell(1e-3, True, original_status="no_decrease", train_loss_change=0.004)
    assert reproduction_score(cells) == (8, 10)
    lines = format_reproduction(cells).splitlines()
    assert lines[2].startswith("| 1e-5 | ✅ Loss -0.011 | ❌ Loss +0.023 |")
    # This project's network has no published values: it is not part of the count.
    ours = cell(1e-4, True, model="iceaggr", original_status="ok", train_loss_change=-0.3)
    assert reproduction_score([*cells, ours]) == (8, 10)


def test_reproduction_shows_the_worst_seed() -> None:
    seeds = [
        cell(3e-4, False, seed=0, original_status="warn", train_loss_change=-0.02),
        cell(3e-4, False, seed=1, original_status="explodes", train_loss_change=None),
        cell(3e-4, False, seed=2, original_status="warn", train_loss_change=-0.04),
    ]
    lines = format_reproduction(seeds).splitlines()
    assert lines[2] == "| 3e-4 | ❌ EXPLODES (1/3 seeds) | ⚠️ Loss -0.049 |"
    assert reproduction_score(seeds) == (0, 1)
    assert seeds_note(seeds).startswith("3 seeds per cell")
    assert "depends on the seed" in seeds_note(seeds[:1])


def test_learning_view_says_stable_but_collapsed_learned_and_exploded() -> None:
    collapsed = cell(1e-3, True, resultant_final=0.99999, vs_const=0.0123, collapsed=True)
    learned = cell(
        1e-3,
        True,
        model="iceaggr",
        resultant_final=0.061,
        vs_const=-0.2151,
        learned=True,
        improved=True,
        loss_change=-0.12,
    )
    prior = cell(
        1e-4, False, model="iceaggr", resultant_final=0.025, vs_const=-0.3216, learned=True,
        loss_change=0.0016,
    )  # fmt: skip
    exploded = cell(1e-3, False, status="explodes", stable=False, diverged_at_step=13)
    unstable = cell(
        1e-4, False, stable=False, max_param_grad_norm=309.4, resultant_final=0.983,
        vs_const=0.004,
    )  # fmt: skip
    lines = format_learning([collapsed, learned, exploded, unstable, prior], grad_norm_warn=100)
    rows = lines.splitlines()
    assert rows[0] == (
        "| Learning Rate | Before Normalization | After Normalization "
        "| This project's model, raw inputs | This project's model, normalized |"
    )
    assert rows[2] == (
        "| 1e-4 | ⚠️ max param grad 3.1e+02 · not learned, +0.004 vs constant, held-out +0.010 "
        "(no fall), R 0.983 | — | ✅ stable · learned, -0.322 vs constant, held-out +0.002 "
        "(no fall), R 0.025 | — |"
    )
    assert rows[3] == (
        "| 1e-3 | ❌ EXPLODES at step 13 | ✅ stable · collapsed, R 1.000 | — "
        "| ✅ stable · learned, -0.215 vs constant, held-out -0.120 (fell), R 0.061 |"
    )
    assert "by more than 2 paired standard errors" in rows[5]


def test_learning_cell_over_seeds() -> None:
    lc = learning_cell(
        [
            cell(
                1e-4, True, seed=0, learned=True, improved=True, vs_const=-0.1, resultant_final=0.1
            ),
            cell(1e-4, True, seed=1, vs_const=0.02, resultant_final=0.3),
            cell(1e-4, True, seed=2, status="explodes", stable=False, diverged_at_step=9),
        ]
    )
    assert (lc.stability, lc.learning) == ("explodes", "mixed")
    assert lc.text == (
        "❌ EXPLODES (1/3 seeds) · learned (1/2 seeds), -0.040 vs constant, held-out +0.010 "
        "(fell in 1/2 seeds), R 0.200"
    )


def test_table_json_holds_both_views_and_the_published_table(tmp_path: Path) -> None:
    cells = published_cells()
    md, js = write_table(cells, tmp_path, meta={"grad_norm_warn": 100, "eval_events": 1024})
    data = json.loads(js.read_text())
    assert data == json.loads(json.dumps(table_json(cells, data["meta"])))
    assert (data["reproduction"]["matches"], data["reproduction"]["of"]) == (10, 10)
    assert (
        len(data["published"]["cells"]) == 10 and "original project" in data["published"]["source"]
    )
    assert {row["learning"] for row in data["learning"]} == {"not learned"}
    assert "1,024 held-out events" in md.read_text()


def test_lr_label() -> None:
    assert [lr_label(lr) for lr in PROBE_LRS] == ["1e-5", "3e-5", "1e-4", "3e-4", "1e-3"]
    assert lr_label(1.2e-4) == "1.2e-4"  # not rounded onto the 1e-4 row
    assert lr_label(0.01) == "1e-2"


@pytest.mark.parametrize("with_original", [True, False])
def test_stability_png_draws_both_views(tmp_path: Path, with_original: bool) -> None:
    from iceaggr_tune.plots import plot_stability_table

    cells = published_cells() if with_original else []
    cells.append(
        cell(1e-3, True, model="iceaggr", learned=True, vs_const=-0.2, resultant_final=0.05)
    )
    png = plot_stability_table(cells, tmp_path / "t.png", {"steps": 20, "seeds": 1})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
