"""Pictures of a sweep, logged as artifacts of its MLflow parent run.

* ``loss_curves.png``: the training-loss curve of every trial, read back from MLflow; the
  stability table's cells on the left (colour = learning rate, dashed = raw inputs), the
  Optuna trials on the right; a diverged trial ends in a red cross at the step its guard
  fired, an early-stopped one in a grey dot.
* ``stability_table.png``: the table's two views as coloured grids (the reproduction beside
  the published cells; then stability and learning painted separately in each cell), so the
  result can be read at a glance in the MLflow UI.

Matplotlib's Agg backend draws them; no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iceaggr.training.mlflow_hook import TAG_DIVERGED, TAG_DIVERGED_AT_STEP
from iceaggr.training.probe import COLUMNS, Cell
from iceaggr.training.stability_table import learning, lr_label, reproduction, reproduction_score
from iceaggr_tune.mlflow_runs import TAG_SWEEP_PART

STATUS_COLOUR = {
    "ok": "#c8e6c9",
    "warn": "#ffe0b2",
    "no_decrease": "#ffcdd2",
    "explodes": "#ef9a9a",
}
STABILITY_COLOUR = {"stable": "#c8e6c9", "unstable": "#ffe0b2", "explodes": "#ef9a9a"}
LEARNING_COLOUR = {
    "learned": "#81c784",
    "mixed": "#dcedc8",
    "collapsed": "#cfd8dc",
    "not learned": "#ffcdd2",
    "—": "#ef9a9a",
}


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
    """``stability_table.png``, the two views of :mod:`iceaggr.training.stability_table` as coloured
    grids. Top, the reproduction: each of the original network's cells in the original's rule
    beside the published cell (green ✅, amber ⚠️, red ❌). Bottom, what the 20 steps did: each
    cell split in two, stability on the left (green stable, amber ⚠️, red EXPLODES) and
    learning on the right (green learned, grey collapsed, pale red not learned), so a stable
    but collapsed network never looks like a failed fix."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    cells = list(cells)
    repro = reproduction(cells)
    learn = learning(cells)
    repro_cols = [c for c in COLUMNS if any(k[1] == c for k in repro)]
    learn_cols = [c for c in COLUMNS if any(k[1] == c for k in learn)]
    lrs = sorted({lr for lr, _ in learn})
    n_rows = len(lrs) + 1
    heights = [n_rows if repro_cols else 0.01, n_rows]
    width = max(2 * len(repro_cols), len(learn_cols))
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(3.0 + 3.4 * width, 1.0 + 0.62 * sum(heights) + 1.2),
        gridspec_kw={"height_ratios": heights},
    )  # fmt: skip

    def grid(ax: Any, headers: list[str], rows: list[list[tuple[str, str, Any]]]) -> None:
        """Cells as (text, colour, None) or, split in two halves, (left text, left colour,
        (right text, right colour)) under ``headers``."""
        ax.set_xlim(0, len(headers) + 0.6)
        ax.set_ylim(len(rows) + 1, 0)
        ax.axis("off")
        for j, h in enumerate(["Learning rate", *headers]):
            x, w = (0.0, 0.6) if j == 0 else (0.6 + (j - 1), 1.0)
            ax.add_patch(Rectangle((x, 0), w, 1, facecolor="#cfd8dc", edgecolor="white"))
            ax.text(x + w / 2, 0.5, h, ha="center", va="center", fontsize=8, wrap=True)
        for i, (lr, row) in enumerate(zip(lrs, rows, strict=True), start=1):
            ax.add_patch(Rectangle((0, i), 0.6, 1, facecolor="#eeeeee", edgecolor="white"))
            ax.text(0.3, i + 0.5, lr_label(lr), ha="center", va="center", fontsize=9)
            for j, (text, colour, right) in enumerate(row):
                x = 0.6 + j
                ax.add_patch(Rectangle((x, i), 1.0 if right is None else 0.5, 1,
                                       facecolor=colour, edgecolor="white"))  # fmt: skip
                if right is None:
                    ax.text(x + 0.5, i + 0.5, text, ha="center", va="center", fontsize=7.5)
                    continue
                right_text, right_colour = right
                ax.add_patch(Rectangle((x + 0.5, i), 0.5, 1, facecolor=right_colour,
                                       edgecolor="white"))  # fmt: skip
                ax.text(x + 0.25, i + 0.5, text, ha="center", va="center", fontsize=7.5)
                ax.text(x + 0.75, i + 0.5, right_text, ha="center", va="center", fontsize=7.5)

    if repro_cols:
        headers, rows = [], []
        for col in repro_cols:
            headers += [f"{col.title}\n(measured)", f"{col.title}\n(published)"]
        for lr in lrs:
            row: list[tuple[str, str, Any]] = []
            for col in repro_cols:
                rc = repro.get((lr, col))
                if rc is None:
                    row += [("not run", "#ffffff", None), ("", "#ffffff", None)]
                    continue
                pub = rc.published_status
                row += [
                    (_plain(rc.text), STATUS_COLOUR[rc.status], None),
                    (_plain(rc.published_text or "—"),
                     STATUS_COLOUR[pub] if pub else "#ffffff", None),
                ]  # fmt: skip
            rows.append(row)
        grid(top, headers, rows)
        k, n = reproduction_score(cells)
        top.set_title(
            f"Reproduction: the original's measure and rule ({k} of {n} cells have the "
            "published status)", fontsize=10,
        )  # fmt: skip
    else:
        top.axis("off")
    rows = []
    for lr in lrs:
        row = []
        for col in learn_cols:
            lc = learn.get((lr, col))
            if lc is None:
                row.append(("not run", "#ffffff", None))
                continue
            stab = _plain(lc.stability_text).replace(" at ", "\nat ").replace(" (", "\n(")
            learned = (lc.learning_text or "—").replace(", ", "\n")
            row.append((stab, STABILITY_COLOUR[lc.stability],
                        (learned, LEARNING_COLOUR[lc.learning])))  # fmt: skip
        rows.append(row)
    grid(bottom, [c.title for c in learn_cols], rows)
    bottom.set_title(
        "What the steps did: stability (left half) and learning against the best constant "
        "direction (right half)", fontsize=10,
    )  # fmt: skip
    meta = meta or {}
    sub = ", ".join(
        f"{k} {v}" for k, v in meta.items() if k in ("steps", "batch_size", "seeds", "sweep")
    )
    fig.suptitle("Learning-rate stability" + (f" ({sub})" if sub else ""), fontsize=11)
    return _save(plt, fig, path)


def _plain(text: str) -> str:
    """Matplotlib's default font has no emoji: the words say it."""
    for symbol in ("✅ ", "⚠️ ", "❌ "):
        text = text.replace(symbol, "")
    return text


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
