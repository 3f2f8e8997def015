"""PNG versions of the Pareto plot and the precision map, for documents and pull requests.

matplotlib's object API with the Agg canvas: no pyplot, so no global figure
state and no display needed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from sensisearch.fileio import write_bytes_atomic
from sensisearch.report._data import (
    MISSING_CODE,
    PRECISION_COLOURS,
    PRECISION_ORDER,
    ci_offsets,
    negate_ci,
    precision_codes,
)
from sensisearch.report._groups import pareto_groups

if TYPE_CHECKING:
    from sensisearch.report._data import ReviewData


def _save(fig: Figure, path: str | Path, dpi: int = 130) -> Path:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return write_bytes_atomic(path, buffer.getvalue())


def write_pareto_png(data: ReviewData, path: str | Path) -> Path:
    """Speed-up (x) against metric change vs FP32 (y), both with 95 % CIs."""
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    for group in pareto_groups(data):
        pts = group.points
        x = [data.x_of(p) for p in pts]
        y = [p.metric_change for p in pts]
        xerr = np.vstack(ci_offsets(x, [None if data.cost_axis else p.speedup_ci95 for p in pts]))
        yerr = np.vstack(ci_offsets(y, [negate_ci(p.drop_ci95) for p in pts]))
        ax.errorbar(
            x, y, xerr=xerr, yerr=yerr, fmt=group.matplotlib_marker, color=group.colour, ecolor=group.colour,
            elinewidth=0.8, alpha=0.9, markersize=group.size / 1.6, label=f"{group.name} ({len(pts)})", capsize=2,
        )
        if group.annotate:
            for p in pts:
                ax.annotate(p.name, (data.x_of(p), p.metric_change), textcoords="offset points", xytext=(5, 5), fontsize=7)
    front = data.front()
    if len(front) > 1:
        ax.plot([data.x_of(p) for p in front], [p.metric_change for p in front], color="#264653", lw=0.8, alpha=0.5, zorder=0)
    ax.axhline(0.0, color="grey", lw=0.6, ls="--")
    ax.axvline(1.0, color="grey", lw=0.6, ls="--")
    ax.set_xlabel(data.speed_axis)
    ax.set_ylabel(f"{data.metric_name} change vs FP32 (points)")
    ax.set_title(f"{data.title}: Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def write_precision_map_png(data: ReviewData, path: str | Path) -> Path:
    """One row per front point (fastest first), one column per layer in graph order."""
    front = data.front()
    rows = front or [p for p in data.points if p.precisions]
    codes = precision_codes(data.layers, rows)
    n_layers = max(len(data.layers), 1)
    fig = Figure(figsize=(min(4 + 0.22 * n_layers, 30), 1.5 + 0.35 * max(len(rows), 1)))
    ax = fig.add_subplot()
    # Missing (-1) shown as light grey; codes shift by one so index 0 is "missing".
    cmap = ListedColormap(["#dddddd", *(PRECISION_COLOURS[p] for p in PRECISION_ORDER)])
    ax.imshow(codes.astype(int) - MISSING_CODE, cmap=cmap, vmin=0, vmax=len(PRECISION_ORDER), aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [f"{p.name}  ({p.speed_text(2, None)}, {p.metric_change:+.2f})" for p in rows], fontsize=7)
    ax.set_xticks(range(len(data.layers)), list(data.layers), rotation=90, fontsize=6 if n_layers > 30 else 7)
    ax.set_xticks(np.arange(-0.5, len(data.layers), 1), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows), 1), minor=True)
    ax.grid(which="minor", color="white", lw=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title(f"{data.title}: precision per layer (graph order) of each front point")
    ax.legend(
        handles=[Patch(color=PRECISION_COLOURS[p], label=p.upper()) for p in PRECISION_ORDER],
        loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
    )
    return _save(fig, path)


def write_sensitivity_png(data: ReviewData, path: str | Path) -> Path | None:
    """The sensitivity ranking, most sensitive layer first: the drop with only this layer INT8 and the drop
    with every layer but this one INT8 (points below FP32); None when the study measured no profile."""
    rows = list(data.sensitivity)
    if not rows:
        return None
    fig = Figure(figsize=(max(8.0, 0.16 * len(rows) + 2), 4.8))
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    width = 0.42
    only = [np.nan if r.drop_only_this_int8 is None else r.drop_only_this_int8 for r in rows]
    but = [np.nan if r.drop_all_but_this_int8 is None else r.drop_all_but_this_int8 for r in rows]
    ax.bar(x - width / 2, only, width, color=PRECISION_COLOURS["int8"], label="only this layer INT8")
    ax.bar(x + width / 2, but, width, color=PRECISION_COLOURS["fp32"], label="every layer but this one INT8")
    ax.set_xticks(x, [r.layer for r in rows], rotation=90, fontsize=6)
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_ylabel(f"{data.metric_name} drop vs FP32 (points)")
    ax.set_title(f"{data.title}: layer sensitivity ranking (most sensitive first)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)
