"""Pictures of a sweep, logged as artifacts of its MLflow parent run.

* ``loss_curves.png``: the training-loss curve of every trial, read back from MLflow; the
  stability table's cells on the left (colour = learning rate, dashed = raw inputs), the
  Optuna trials on the right; a diverged trial ends in a red cross at the step its guard
  fired, an early-stopped one in a grey dot.
* ``stability_table.png``: the table as a coloured grid (green ✅, amber ⚠️, red ❌), so
  the result can be read at a glance in the MLflow UI.

Matplotlib's Agg backend draws them; no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iceaggr.probe import COLUMNS, Cell, column_of, table_cells
from iceaggr.tracking import TAG_DIVERGED, TAG_DIVERGED_AT_STEP
from iceaggr_tune.mlflow_runs import TAG_SWEEP_PART

STATUS_COLOUR = {
    "ok": "#c8e6c9",
    "warn": "#ffe0b2",
    "no_decrease": "#ffcdd2",
    "explodes": "#ef9a9a",
}
STATUS_WORD = {"ok": "OK", "warn": "WARN", "no_decrease": "NO DECREASE", "explodes": "EXPLODES"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    """Lay out, write (making the folder) and close a figure."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def loss_histories(client: Any, runs: Sequence[Any]) -> list[dict[str, Any]]:
    """One record per child run: name, part, lr, dropout, normalize, status, loss curve."""
    out = []
    for r in runs:
        hist = sorted(client.get_metric_history(r.info.run_id, "loss"), key=lambda m: m.step)
        params, tags = r.data.params, r.data.tags
        out.append(
            {
                "name": r.info.run_name,
                "part": tags.get(TAG_SWEEP_PART, "?"),
                "lr": float(params.get("lr", "nan")),
                "dropout": float(params.get("dropout", "nan")),
                "normalize": params.get("normalize") == "True",
                "arch": params.get("arch", "iceaggr"),
                "status": r.info.status,
                "diverged_at_step": int(tags[TAG_DIVERGED_AT_STEP])
                if tags.get(TAG_DIVERGED) == "true" and TAG_DIVERGED_AT_STEP in tags
                else None,
                "steps": [m.step for m in hist],
                "loss": [m.value for m in hist],
            }
        )
    return out


def plot_loss_curves(curves: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Draw every trial's loss curve (see the module docstring) into ``path``."""
    plt = _pyplot()
    import matplotlib
    from matplotlib import colors
    from matplotlib.lines import Line2D

    parts = [p for p in ("table", "search") if any(c["part"] == p for c in curves)] or ["table"]
    fig, axes = plt.subplots(1, len(parts), figsize=(7.5 * len(parts), 5.2), squeeze=False)
    lrs = [c["lr"] for c in curves if c["lr"] > 0 and math.isfinite(c["lr"])]
    norm = colors.LogNorm(vmin=min(lrs, default=1e-5), vmax=max(lrs, default=1e-3) * 1.0001)
    cmap = matplotlib.colormaps["viridis"]
    for ax, part in zip(axes[0], parts, strict=True):
        mine = [c for c in curves if c["part"] == part]
        finite = [v for c in mine for v in c["loss"] if math.isfinite(v)]
        for c in sorted(mine, key=lambda c: (c["arch"], c["lr"], c["normalize"])):
            colour = cmap(norm(c["lr"])) if c["lr"] > 0 else "black"
            style = "-" if (part == "search" or c["normalize"]) else "--"
            label = f"lr {c['lr']:.0e}"
            if part == "table":
                label += f", {c['arch']}, " + ("norm" if c["normalize"] else "raw")
            label += f", dropout {c['dropout']:.2f}" if part == "search" else ""
            steps = c["steps"]
            loss = [v if math.isfinite(v) else float("nan") for v in c["loss"]]
            ax.plot(steps, loss, style, color=colour, lw=1.6, label=label, marker=".", ms=3)
            if c["diverged_at_step"] is not None:
                last = [v for v in loss if math.isfinite(v)]
                y = last[-1] if last else (max(finite) if finite else 0.0)
                ax.plot([c["diverged_at_step"]], [y], "x", color="red", ms=12, mew=3)
                ax.annotate(
                    f"diverged @ {c['diverged_at_step']}",
                    (c["diverged_at_step"], y),
                    textcoords="offset points",
                    xytext=(6, 6),
                    color="red",
                    fontsize=8,
                )
            elif c["status"] in ("KILLED", "FAILED") and steps:
                ax.plot([steps[-1]], [loss[-1]], "o", color="grey", ms=6)
        ax.set_title(
            "stability table (dashed: raw inputs)" if part == "table" else "Optuna search trials"
        )
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        if finite:
            lo, hi = min(finite), max(finite)
            pad = 0.05 * (hi - lo or 1.0)
            ax.set_ylim(lo - pad, hi + pad)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if any(c["diverged_at_step"] is not None for c in mine):
            handles.append(Line2D([], [], ls="", marker="x", color="red", mew=3))
            labels.append("diverged (guard fired)")
        if handles:
            ax.legend(handles, labels, fontsize=7, loc="best", ncol=2 if len(labels) > 8 else 1)
    fig.suptitle(title)
    return _save(plt, fig, path)


def plot_stability_table(
    cells: Sequence[Cell], path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """The stability table as a coloured grid image: the Markdown table's columns, each cell
    with its worst status over seeds, loss change and largest per-parameter gradient norm."""
    plt = _pyplot()

    grouped = table_cells(list(cells))
    shown = [c for c in COLUMNS if c.shown and any(k[1] == c for k in grouped)]
    lrs = sorted({lr for lr, _ in grouped})
    seed_cells: dict[tuple[float, Any], list[Cell]] = {}
    for c in cells:
        seed_cells.setdefault((c.lr, column_of(c)), []).append(c)
    text, fill = [], []
    for lr in lrs:
        row, row_fill = [f"{lr:.0e}"], ["#eeeeee"]
        for col in shown:
            tc = grouped.get((lr, col))
            if tc is None:
                row.append("not run")
                row_fill.append("#ffffff")
                continue
            worst = max(seed_cells[(lr, col)], key=lambda c: c.max_param_grad_norm)
            words = tc.text.replace("✅ ", "").replace("⚠️ ", "").replace("❌ ", "")
            row.append(
                f"{STATUS_WORD[tc.status]}  {words}\nmax |g| param {worst.max_param_grad_norm:.3g}"
            )
            row_fill.append(STATUS_COLOUR[tc.status])
        text.append(row)
        fill.append(row_fill)
    width = 0.82 / max(1, len(shown))
    fig, ax = plt.subplots(figsize=(4.0 + 3.6 * len(shown), 0.75 * (len(lrs) + 1) + 1.4))
    ax.axis("off")
    table = ax.table(
        cellText=text,
        cellColours=fill,
        colLabels=["Learning rate", *(c.title for c in shown)],
        colColours=["#cfd8dc"] * (len(shown) + 1),
        cellLoc="center",
        loc="center",
        colWidths=[0.18, *([width] * len(shown))],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 2.4)
    meta = meta or {}
    sub = ", ".join(
        f"{k} {v}" for k, v in meta.items() if k in ("steps", "batch_size", "seeds", "sweep")
    )
    ax.set_title("Learning-rate stability" + (f" ({sub})" if sub else ""), fontsize=11)
    return _save(plt, fig, path)


def plot_search_landscape(
    trials: Sequence[dict[str, Any]],
    path: str | Path,
    title: str,
    references: dict[str, float] | None = None,
) -> Path:
    """``search_landscape.png``: best validation error (rad) of every search trial against its
    learning rate (log axis), coloured by dropout; early-stopped trials hollow, diverged ones
    as red crosses at the top edge; ``references`` (e.g. line fit, random) as dashed lines.

    ``trials``: dicts with ``lr``, ``dropout``, ``best_val`` (None when diverged),
    ``stopped_early`` and ``diverged``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    refs = dict(references or {})
    finite = [t for t in trials if t.get("best_val") is not None and not t.get("diverged")]
    values = [t["best_val"] for t in finite] + list(refs.values())
    top = max(values, default=math.pi / 2) + 0.03
    bottom = min(values, default=1.0) - 0.05
    lo, hi = 0.0, max([t.get("dropout", 0.0) for t in trials] + [1e-9])
    cmap = plt.get_cmap("viridis")
    for t in finite:
        colour = cmap((t.get("dropout", 0.0) - lo) / (hi - lo) if hi > lo else 0.0)
        face = "none" if t.get("stopped_early") else colour
        ax.scatter(t["lr"], t["best_val"], s=60, facecolors=face, edgecolors=colour, lw=1.8)
    for t in trials:
        if t.get("diverged"):
            ax.scatter(t["lr"], top - 0.01, marker="x", s=70, color="#c62828", lw=2)
    for i, (name, value) in enumerate(refs.items()):
        ax.axhline(value, ls="--", lw=1, color=("#616161", "#9e9e9e")[i % 2])
        label = f"{name} {value:.3f}"
        at = ("axes fraction", "data")
        ax.annotate(label, (0.01, value), xycoords=at, xytext=(0, 3), textcoords="offset points",
                    fontsize=8, color="#424242")  # fmt: skip
    ax.set_xscale("log")
    ax.set_ylim(bottom, top)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("best validation angular error (rad)")
    ax.set_title(title, fontsize=10)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(mappable, ax=ax, label="dropout")
    handles = [
        plt.Line2D([], [], ls="", marker="o", color="#455a64", label="finished"),
        plt.Line2D([], [], ls="", marker="o", mfc="none", color="#455a64", label="stopped early"),
        plt.Line2D([], [], ls="", marker="x", color="#c62828", label="diverged"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="lower left")
    ax.grid(alpha=0.3, which="both")
    return _save(plt, fig, path)
