"""How points are grouped and drawn on the Pareto plot: shared by the HTML and the PNG."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sensisearch.report._data import PointKind

if TYPE_CHECKING:
    from sensisearch.report._data import ReviewData, ReviewPoint


@dataclass(frozen=True)
class PointGroup:
    name: str
    colour: str
    plotly_symbol: str
    matplotlib_marker: str
    size: int
    annotate: bool
    points: list[ReviewPoint]


# (name, colour, plotly symbol, matplotlib marker, size, annotate); order = drawing order.
_STYLES = {
    "searched": ("searched", "#8ab6d6", "circle", "o", 8, False),
    "infeasible": ("infeasible (constraint violated)", "#b0b0b0", "x", "x", 8, False),
    "front": ("Pareto front", "#264653", "circle", "o", 10, False),
    "baseline": ("baselines", "#6a4c93", "diamond", "D", 11, True),
    "reference": ("reference quantizers", "#f4a261", "square", "s", 10, True),
    "winner": ("winner", "#d62828", "star", "*", 18, True),
}


def _group_of(p: ReviewPoint) -> str:
    if p.is_winner:
        return "winner"
    if p.kind is PointKind.BASELINE:
        return "baseline"
    if p.kind is PointKind.REFERENCE:
        return "reference"
    if not p.feasible:
        return "infeasible"
    return "front" if p.on_front else "searched"


def pareto_groups(data: ReviewData) -> list[PointGroup]:
    """Every point in exactly one non-empty group (so one marker per trial)."""
    members: dict[str, list[ReviewPoint]] = {key: [] for key in _STYLES}
    for p in data.points:
        members[_group_of(p)].append(p)
    return [PointGroup(*_STYLES[key], points=pts) for key, pts in members.items() if pts]
