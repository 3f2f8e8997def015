"""The review of a finished study, rendered from plain typed data.

Fill a :class:`ReviewData` (points as :class:`ReviewPoint`, optional
:class:`SensitivityRow`, :class:`ClassAPRow`, :class:`FloatLayerEvidence`,
provenance) and call :func:`write_review` for ``report.html`` (self-contained,
offline), ``pareto.png`` and ``precision_map.png``, or each writer alone.
"""

from sensisearch.report._data import (
    LATENCY_SPEED_AXIS,
    PRECISION_COLOURS,
    PRECISION_ORDER,
    THROUGHPUT_SPEED_AXIS,
    ClassAPRow,
    FloatLayerEvidence,
    PointKind,
    ReviewData,
    ReviewPoint,
    SensitivityRow,
    ci_offsets,
    configuration_summary,
    flatten_provenance,
    negate_ci,
    precision_codes,
)
from sensisearch.report._html import PARETO_DIV, PRECISION_DIV, render_report_html, write_report_html
from sensisearch.report._png import write_pareto_png, write_precision_map_png, write_sensitivity_png
from sensisearch.report._review import REVIEW_FILES, ReviewFiles, review_markdown, write_review

__all__ = [
    "ClassAPRow",
    "FloatLayerEvidence",
    "LATENCY_SPEED_AXIS",
    "PARETO_DIV",
    "PRECISION_COLOURS",
    "PRECISION_DIV",
    "PRECISION_ORDER",
    "PointKind",
    "REVIEW_FILES",
    "ReviewData",
    "ReviewFiles",
    "ReviewPoint",
    "SensitivityRow",
    "THROUGHPUT_SPEED_AXIS",
    "ci_offsets",
    "configuration_summary",
    "flatten_provenance",
    "negate_ci",
    "precision_codes",
    "render_report_html",
    "review_markdown",
    "write_pareto_png",
    "write_precision_map_png",
    "write_sensitivity_png",
    "write_report_html",
    "write_review",
]
