"""The stability table in two views, from the same probe cells (:mod:`iceaggr.training.probe`).

1. **Reproduction** (:func:`format_reproduction`): the original's own measure, the last minus
   the first training-batch loss, under the original's rule (✅ fell with tame gradients, ⚠️ fell
   but a parameter's pre-clip gradient norm crossed ``train.grad_norm_warn``, ❌ did not fall,
   ❌ EXPLODES), for the original network before and after normalization, each cell beside the
   published value (:data:`PUBLISHED`), and the count of cells that have the published status.
2. **What the 20 steps did** (:func:`format_learning`): for every network and normalization
   the table ran, whether training was *stable* (finite, no parameter's pre-clip gradient norm
   over the threshold), whether the network *learned* (its held-out error beat the best constant
   direction on the same events by more than two standard errors: a collapsed network
   "improves" on any held-out set whose directions lean one way) and whether it *collapsed*
   (mean resultant length R of its predictions >= ``train.collapse_resultant``).

A normalized network that is stable but collapsed is a fix that worked on the gradients and a
model that has not learned yet: the second view says both, where a single ✅/❌ could not.

:func:`write_table` writes ``stability_table.md`` (both views) and ``stability_table.json``
(every seed of every cell, both views and the published table); ``iceaggr_tune.plots`` draws
``stability_table.png`` from the same functions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from iceaggr.training.collapse import COLLAPSE_RESULTANT, LEARNED_Z
from iceaggr.training.probe import COLUMNS, STATUS_ORDER, SYMBOL, Cell, Column, Status

PUBLISHED_SOURCE = (
    "the original project's learning-rate probe (its notes; DESIGN.md section 1): the original "
    "hierarchical network, 20 steps per learning rate, fresh model each, AdamW, gradient clip "
    "1.0, batch 256, angular-distance loss; 'Loss' = last minus first training-batch loss"
)
PUBLISHED: dict[tuple[float, bool], tuple[Status, float | None]] = {
    (1e-5, False): ("no_decrease", +0.023),
    (3e-5, False): ("ok", -0.040),
    (1e-4, False): ("ok", -0.024),
    (3e-4, False): ("warn", -0.049),
    (1e-3, False): ("explodes", None),
    (1e-5, True): ("ok", -0.058),
    (3e-5, True): ("ok", -0.067),
    (1e-4, True): ("ok", -0.067),
    (3e-4, True): ("ok", -0.093),
    (1e-3, True): ("ok", -0.097),
}
"""The published table, keyed by (learning rate, normalized): status and "Loss" (None when
it exploded). The only copy in the code; source: :data:`PUBLISHED_SOURCE`."""
PUBLISHED_ARCH = "original"
"""The network the published table was measured on."""


def status_text(status: Status, change: float | None) -> str:
    """``✅ Loss -0.058``, ``❌ EXPLODES``: a cell in the published format."""
    if status == "explodes" or change is None:
        return "❌ EXPLODES"
    return f"{SYMBOL[status]} Loss {change:+.3f}"


def published_text(lr: float, normalize: bool) -> str | None:
    entry = PUBLISHED.get((lr, normalize))
    return None if entry is None else status_text(*entry)


def column_of(cell: Cell) -> Column | None:
    return next(
        (c for c in COLUMNS if c.arch == cell.model and c.normalize == cell.normalize), None
    )


def seeds_by_cell(cells: list[Cell]) -> dict[tuple[float, Column], list[Cell]]:
    """The seeds of each table cell, keyed by (learning rate, column), in seed order."""
    groups: dict[tuple[float, Column], list[Cell]] = {}
    for cell in cells:
        col = column_of(cell)
        if col is not None:
            groups.setdefault((cell.lr, col), []).append(cell)
    return {key: sorted(g, key=lambda c: c.seed) for key, g in groups.items()}


def _seeds_suffix(k: int, n: int) -> str:
    return f" ({k}/{n} seeds)" if n > 1 else ""


# ---------------------------------------------------------------- view 1: reproduction


@dataclass
class ReproductionCell:
    """One cell of the reproduction: the original's rule on the original's number, worst over
    seeds, beside the published cell."""

    status: Status
    text: str
    published_status: Status | None
    published_text: str | None

    @property
    def matches(self) -> bool:
        return self.published_status == self.status


def reproduction_cell(seed_cells: list[Cell]) -> ReproductionCell:
    """Worst original status over the seeds; "Loss" is the mean training-batch change over the
    seeds with that status."""
    statuses = [c.original_status or "explodes" for c in seed_cells]
    worst: Status = max(statuses, key=STATUS_ORDER.index)  # type: ignore[assignment]
    with_it = [c for c, s in zip(seed_cells, statuses, strict=True) if s == worst]
    changes = [c.train_loss_change for c in with_it if c.train_loss_change is not None]
    mean = sum(changes) / len(changes) if changes else None
    text = status_text(worst, mean) + _seeds_suffix(len(with_it), len(seed_cells))
    first = seed_cells[0]
    published = (
        PUBLISHED.get((first.lr, first.normalize)) if first.model == PUBLISHED_ARCH else None
    )
    return ReproductionCell(
        status=worst,
        text=text,
        published_status=published[0] if published else None,
        published_text=status_text(*published) if published else None,
    )


def reproduction(cells: list[Cell]) -> dict[tuple[float, Column], ReproductionCell]:
    """The reproduction's cells: the published network's columns only."""
    return {
        key: reproduction_cell(group)
        for key, group in seeds_by_cell(cells).items()
        if key[1].arch == PUBLISHED_ARCH
    }


def reproduction_score(cells: list[Cell]) -> tuple[int, int]:
    """(cells with the published status, cells with a published value)."""
    rows = [rc for rc in reproduction(cells).values() if rc.published_status is not None]
    return sum(rc.matches for rc in rows), len(rows)


def format_reproduction(cells: list[Cell], grad_norm_warn: float | None = None) -> str:
    """View 1 as Markdown: each of the original network's columns beside its published value."""
    grouped = reproduction(cells)
    if not grouped:
        return "(the table ran no column of the original network: nothing to compare)"
    cols = [c for c in COLUMNS if any(k[1] == c for k in grouped)]
    header = ["Learning Rate"]
    for col in cols:
        header += [col.title, "published"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for lr in sorted({lr for lr, _ in grouped}):
        row = [lr_label(lr)]
        for col in cols:
            rc = grouped.get((lr, col))
            row += [rc.text, rc.published_text or "—"] if rc else ["—", "—"]
        lines.append("| " + " | ".join(row) + " |")
    k, n = reproduction_score(cells)
    lines += ["", f"{k} of {n} cells have the original's status."]
    warn = f" {grad_norm_warn:g}" if grad_norm_warn is not None else " the threshold"
    lines += [
        "",
        "Loss: the original's own number, last minus first training-batch loss (rad; mean over "
        "the seeds with the status shown). It mixes learning with which events the two batches "
        "hold (~0.05 rad for 256 events), so the second view measures on fixed held-out events. "
        f"✅ it fell and no parameter's pre-clip gradient norm exceeded{warn}; ⚠️ it fell but "
        "one did; ❌ Loss: it did not fall; ❌ EXPLODES: a loss, prediction or gradient went "
        f"non-finite. Published: {PUBLISHED_SOURCE}.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- view 2: what the steps did


@dataclass
class LearningCell:
    """One cell of the second view, over the seeds of one learning rate and column."""

    exploded: int
    """Seeds in which a loss, prediction or gradient went non-finite."""
    unstable: int
    """Seeds that stayed finite but had a parameter's pre-clip norm over the threshold."""
    learned: int
    collapsed: int
    seeds: int
    max_param_grad_norm: float
    resultant: float | None
    """Mean R of the held-out predictions after the last step (finite seeds)."""
    vs_const: float | None
    """Mean held-out error minus the best constant direction's (finite seeds, rad)."""
    diverged_at_step: int | None
    loss_change: float | None = None
    """Mean change of the held-out error over the steps (finite seeds, rad)."""
    improved: int = 0
    """Finite seeds whose held-out error fell over the steps beyond two paired SE."""

    @property
    def stability(self) -> str:
        """``stable``, ``unstable`` or ``explodes`` (the worst seed)."""
        if self.exploded:
            return "explodes"
        return "unstable" if self.unstable else "stable"

    @property
    def learning(self) -> str:
        """``learned``, ``collapsed``, ``not learned`` (all seeds) or ``mixed``; ``—`` when no
        seed stayed finite."""
        finite = self.seeds - self.exploded
        if finite == 0:
            return "—"
        if self.learned == finite:
            return "learned"
        if self.collapsed == finite:
            return "collapsed"
        return "mixed" if self.learned else "not learned"

    @property
    def stability_text(self) -> str:
        n = self.seeds
        if self.exploded:
            at = f" at step {self.diverged_at_step}" if n == 1 and self.diverged_at_step else ""
            return f"❌ EXPLODES{at}{_seeds_suffix(self.exploded, n)}"
        if self.unstable:
            grad = f"⚠️ max param grad {self.max_param_grad_norm:.2g}"
            return grad + _seeds_suffix(self.unstable, n)
        return "✅ stable"

    @property
    def steps_text(self) -> str | None:
        """``held-out -0.120 (fell)``: the held-out error's change over the steps."""
        if self.loss_change is None:
            return None
        finite = self.seeds - self.exploded
        if self.improved == finite:
            tag = "fell"
        elif self.improved == 0:
            tag = "no fall"
        else:
            tag = f"fell in {self.improved}/{finite} seeds"
        return f"held-out {self.loss_change:+.3f} ({tag})"

    @property
    def learning_text(self) -> str:
        """What the finite seeds learned (empty when every seed exploded)."""
        finite = self.seeds - self.exploded
        vs = f"{self.vs_const:+.3f} vs constant" if self.vs_const is not None else None
        steps = self.steps_text
        r = f"R {self.resultant:.3f}" if self.resultant is not None else None
        parts = {
            "learned": ["learned", vs, steps, r],
            "collapsed": ["collapsed", r],
            "mixed": [f"learned{_seeds_suffix(self.learned, finite)}", vs, steps, r],
            "not learned": ["not learned", vs, steps, r],
            "—": [],
        }[self.learning]
        return ", ".join(p for p in parts if p)

    @property
    def text(self) -> str:
        learned = self.learning_text
        return f"{self.stability_text} · {learned}" if learned else self.stability_text


def learning_cell(seed_cells: list[Cell]) -> LearningCell:
    finite = [c for c in seed_cells if c.status != "explodes"]
    resultants = [c.resultant_final for c in finite if c.resultant_final is not None]
    margins = [c.vs_const for c in finite if c.vs_const is not None]
    changes = [c.loss_change for c in finite if c.loss_change is not None]
    exploded = [c for c in seed_cells if c.status == "explodes"]
    return LearningCell(
        exploded=len(exploded),
        unstable=sum(not c.stable for c in finite),
        learned=sum(c.learned for c in finite),
        collapsed=sum(c.collapsed for c in finite),
        seeds=len(seed_cells),
        max_param_grad_norm=max((c.max_param_grad_norm for c in seed_cells), default=0.0),
        resultant=sum(resultants) / len(resultants) if resultants else None,
        vs_const=sum(margins) / len(margins) if margins else None,
        diverged_at_step=min((c.diverged_at_step or 0 for c in exploded), default=None) or None,
        loss_change=sum(changes) / len(changes) if changes else None,
        improved=sum(c.improved for c in finite),
    )


def learning(cells: list[Cell]) -> dict[tuple[float, Column], LearningCell]:
    return {key: learning_cell(group) for key, group in seeds_by_cell(cells).items()}


def format_learning(
    cells: list[Cell], grad_norm_warn: float | None = None, eval_events: int | None = None
) -> str:
    """View 2 as Markdown: every column the table ran, stability and learning per cell."""
    grouped = learning(cells)
    cols = [c for c in COLUMNS if any(k[1] == c for k in grouped)]
    lines = _markdown_rows(grouped, cols, lambda lc: lc.text)
    warn = f"{grad_norm_warn:g}" if grad_norm_warn is not None else "the threshold"
    events = f"{eval_events:,}" if eval_events else "the"
    lines += [
        "",
        f"✅ stable: finite, and no parameter's pre-clip gradient norm exceeded {warn}; ⚠️: one "
        "did; ❌ EXPLODES: a loss, prediction or gradient went non-finite. learned: after the "
        f"steps the mean angular error on {events} held-out events is below that of the best "
        "constant direction on the same events (vs constant: the difference, rad) by more than "
        f"{LEARNED_Z:g} paired standard errors; held-out: the change of that error over the "
        "steps (fell: by more than as many standard errors). This project's model starts from "
        "each event's line fit (model.prior_direction), so it beats the constant before "
        "its first step; for it, held-out says what the steps added. collapsed: the mean "
        f"resultant length R of the predictions is >= {COLLAPSE_RESULTANT:g} (1: one direction "
        "for every event; the "
        "true directions' own R is printed in the JSON as target_resultant).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- both, and the files


def seeds_note(cells: list[Cell]) -> str:
    """How many seeds each cell ran, and what that means for explosions near the edge."""
    counts = {len(g) for g in seeds_by_cell(cells).values()}
    n = max(counts, default=0)
    if n > 1:
        return (
            f"{n} seeds per cell (each a fresh initialisation and batch order): a cell shows "
            "the worst seed and how many seeds had it."
        )
    return (
        "1 seed per cell. Near the edge of stability (raw inputs at 1e-4..3e-4) whether a cell "
        "explodes depends on the seed and on floating-point details of the machine: a single "
        "EXPLODES or ⚠️ there is one draw. Run more seeds (iceaggr probe --seeds 3, or the "
        "sweep's --table-seeds 3) for a count."
    )


REPRODUCTION_TITLE = "### Reproduction of the published table (the original's measure and rule)"
LEARNING_TITLE = "### What the 20 steps did (stable? learned? collapsed?)"


def format_table(
    cells: list[Cell], grad_norm_warn: float | None = None, eval_events: int | None = None
) -> str:
    """Both views as Markdown, with the seeds note."""
    return "\n".join(
        [
            REPRODUCTION_TITLE,
            "",
            format_reproduction(cells, grad_norm_warn),
            "",
            LEARNING_TITLE,
            "",
            format_learning(cells, grad_norm_warn, eval_events),
            "",
            seeds_note(cells),
        ]
    )


def _markdown_rows(grouped: dict, shown: list[Column], text: Any) -> list[str]:
    """Header and one row per learning rate; ``text(value)`` for each present cell."""
    lines = [
        "| Learning Rate | " + " | ".join(c.title for c in shown) + " |",
        "|---------------|" + "|".join("-" * 21 for _ in shown) + "|",  # DESIGN.md's widths
    ]
    for lr in sorted({lr for lr, _ in grouped}):
        texts = [text(grouped[(lr, c)]) if (lr, c) in grouped else "—" for c in shown]
        lines.append(f"| {lr_label(lr)} | " + " | ".join(texts) + " |")
    return lines


def lr_label(lr: float) -> str:
    """``1e-5``, ``3e-4``, ``1.5e-4``: the table's row label, exact for any learning rate."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def table_json(cells: list[Cell], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every seed of every cell, both views as shown, and the published table."""
    key = lambda kv: (kv[0][0], COLUMNS.index(kv[0][1]))  # noqa: E731
    k, n = reproduction_score(cells)
    return {
        "meta": meta or {},
        "columns": [asdict(c) for c in COLUMNS],
        "published": {
            "source": PUBLISHED_SOURCE,
            "network": PUBLISHED_ARCH,
            "cells": [
                {"lr": lr, "normalize": norm, "status": st, "loss_change": ch}
                for (lr, norm), (st, ch) in PUBLISHED.items()
            ],
        },
        "cells": [asdict(c) | {"text": c.text} for c in cells],
        "reproduction": {
            "matches": k,
            "of": n,
            "table": [
                {"lr": lr, "model": col.arch, "normalize": col.normalize, "column": col.title}
                | asdict(rc)
                | {"matches": rc.matches}
                for (lr, col), rc in sorted(reproduction(cells).items(), key=key)
            ],
        },
        "learning": [
            {"lr": lr, "model": col.arch, "normalize": col.normalize, "column": col.title}
            | asdict(lc)
            | {"stability": lc.stability, "learning": lc.learning, "text": lc.text}
            for (lr, col), lc in sorted(learning(cells).items(), key=key)
        ],
        "seeds_note": seeds_note(cells),
    }


def write_table(cells: list[Cell], out_dir: str | Path, meta: dict[str, Any] | None = None):
    """Write ``stability_table.md`` (both views; the thresholds from ``meta``'s
    ``grad_norm_warn`` and ``eval_events`` when given) and ``stability_table.json``; returns
    both paths."""
    meta = meta or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "stability_table.md"
    js = out / "stability_table.json"
    text = format_table(cells, meta.get("grad_norm_warn"), meta.get("eval_events"))
    md.write_text(text + "\n")
    js.write_text(json.dumps(table_json(cells, meta), indent=2))
    return md, js
