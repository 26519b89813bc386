"""What a sweep's search found, at a glance: one row per trial and the references beside it.

:func:`search_rows` turns Tune's results into rows (trial, lr, dropout, steps reached, best
validation error, stopped early, diverged); :func:`reference_errors` scores the line fit and
random guessing on the same held-out events the trials validate on; :func:`format_search_table`
prints the rows as Markdown. The sweep prints them, writes ``search_trials.json`` and draws
``search_landscape.png`` (:func:`iceaggr_tune.plots.plot_search_landscape`) from them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iceaggr.training.collapse import COLLAPSE_RESULTANT
from iceaggr_tune.trial import DIVERGED_PENALTY, METRIC

if TYPE_CHECKING:
    from iceaggr.data.cache import FileCache

RANDOM_GUESS_RAD = math.pi / 2
"""Mean angular error of a random direction (rad)."""


def _best_val(result: Any) -> float | None:
    """Lowest finite validation error a trial reported (the diverged penalty excluded)."""
    values: list[float] = []
    df = getattr(result, "metrics_dataframe", None)
    if df is not None and METRIC in df.columns:
        values = [float(v) for v in df[METRIC].dropna()]
    last = (result.metrics or {}).get(METRIC)
    if last is not None:
        values.append(float(last))
    finite = [v for v in values if math.isfinite(v) and v < DIVERGED_PENALTY]
    return min(finite) if finite else None


def finite_or_none(x: Any) -> float | None:
    """``x`` as a float when it is a finite number, else None."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def search_rows(results: Any) -> list[dict[str, Any]]:
    """One row per search trial, in the order Optuna proposed them."""
    rows = []
    for r in results:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or Path(str(r.path)).name
        rows.append(
            {
                "trial": str(trial_id),
                "lr": float(r.config["lr"]),
                "dropout": float(r.config["dropout"]),
                "steps": int(m.get("step", 0) or 0),
                "best_val": _best_val(r),
                "stopped_early": bool(m.get("stopped_early")),
                "diverged": bool(m.get("diverged")),
                "resultant": finite_or_none(m.get("val_resultant")),
                "collapsed": None if m.get("collapsed") is None else bool(m.get("collapsed")),
                "vs_const": finite_or_none(m.get("val_vs_const")),
                "error": None if r.error is None else type(r.error).__name__,
            }
        )
    return sorted(rows, key=lambda row: row["trial"])


def reference_errors(
    data: str | Path, val_batch_ids: list[int], events: int, cache: FileCache | None = None
) -> dict[str, float]:
    """The line fit's and random guessing's mean angular error (rad) on the first ``events``
    events of the validation files (the trials' validation events). An ``s3://`` dataset is
    read through ``cache`` (the node's data cache, where the trials read it too)."""
    from iceaggr.data.linefit import line_fit_dataset

    fit = line_fit_dataset(data, max_events=events, batch_ids=val_batch_ids, cache=cache)
    return {"line fit": fit["mean_angular_error"], "random": RANDOM_GUESS_RAD}


def format_search_table(rows: list[dict[str, Any]]) -> str:
    """The search's trials as Markdown, best validation error first."""
    lines = [
        "| trial | lr | dropout | steps | best val (rad) | vs best constant (rad) | R | "
        "collapsed | stopped early | diverged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda row: (row["best_val"] is None, row["best_val"] or 0.0)  # noqa: E731
    for row in sorted(rows, key=key):
        best = "—" if row["best_val"] is None else f"{row['best_val']:.4f}"
        vs = "—" if row.get("vs_const") is None else f"{row['vs_const']:+.4f}"
        r = "—" if row.get("resultant") is None else f"{row['resultant']:.3f}"
        collapsed = {None: "—", True: "yes", False: "no"}[row.get("collapsed")]
        lines.append(
            f"| {row['trial']} | {row['lr']:.3g} | {row['dropout']:.3f} | {row['steps']} | "
            f"{best} | {vs} | {r} | {collapsed} | {'yes' if row['stopped_early'] else 'no'} | "
            f"{'yes' if row['diverged'] else ('error' if row['error'] else 'no')} |"
        )
    lines += [
        "",
        "vs best constant: the last validation's mean error minus that of the best constant "
        "direction on the same events (below zero: the model beats every constant); R: the "
        "mean resultant length of its predictions (1: one direction for every event); "
        f"collapsed: R >= {COLLAPSE_RESULTANT:g} (the trial's config can change the threshold).",
    ]
    return "\n".join(lines)
