"""All review files at once, and the Markdown that links them from report.md."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sensisearch.report._html import write_report_html
from sensisearch.report._png import write_pareto_png, write_precision_map_png, write_sensitivity_png

if TYPE_CHECKING:
    from sensisearch.report._data import ReviewData

REVIEW_FILES = {
    "html": "report.html", "pareto_png": "pareto.png", "precision_map_png": "precision_map.png",
    "sensitivity_png": "sensitivity.png",
}


@dataclass(frozen=True)
class ReviewFiles:
    html: Path
    pareto_png: Path
    precision_map_png: Path
    sensitivity_png: Path | None = None
    """The ranking plot; None when the study measured no sensitivity profile."""


def write_review(data: ReviewData, out_dir: str | Path) -> ReviewFiles:
    """``report.html``, ``pareto.png``, ``precision_map.png`` and (with a sensitivity profile) ``sensitivity.png`` in ``out_dir``."""
    out = Path(out_dir)
    return ReviewFiles(
        html=write_report_html(data, out / REVIEW_FILES["html"]),
        pareto_png=write_pareto_png(data, out / REVIEW_FILES["pareto_png"]),
        precision_map_png=write_precision_map_png(data, out / REVIEW_FILES["precision_map_png"]),
        sensitivity_png=write_sensitivity_png(data, out / REVIEW_FILES["sensitivity_png"]),
    )


def review_markdown(files: ReviewFiles, relative_to: str | Path) -> str:
    """Markdown for report.md: a link to the HTML and the two PNGs inline."""
    base = Path(relative_to)

    def rel(p: Path) -> str:
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            return p.as_posix()

    return (
        f"Interactive review (offline, one file): [{rel(files.html)}]({rel(files.html)})\n\n"
        f"![Pareto front]({rel(files.pareto_png)})\n\n"
        f"![Precision map of the front]({rel(files.precision_map_png)})\n"
        + ("" if files.sensitivity_png is None else f"\n![Layer sensitivity ranking]({rel(files.sensitivity_png)})\n")
    )
