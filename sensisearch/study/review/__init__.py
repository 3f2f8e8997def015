"""What a finished study tells a reviewer: the verified front, the winner, report.md/html, PNGs, references."""

from sensisearch.study.review._holdout import HoldoutResult, score_holdout
from sensisearch.study.review._references import quiet_quantizer
from sensisearch.study.review._report import (
    FRONT_COLUMNS,
    ReportContext,
    accuracy_resolution_line,
    front_cells,
    front_columns,
    front_row,
    timing_noise_lines,
)
from sensisearch.study.review._results_writer import (
    StudySummary,
    kernels_apply,
    report_context,
    write_results,
)
from sensisearch.study.review._verify import (
    DROP_RESAMPLE_FACTOR,
    VerifyResult,
    VerifySettings,
    load_run_settings,
    save_run_settings,
    select_for_verification,
    verify_backend,
    verify_study,
)

__all__ = [
    "DROP_RESAMPLE_FACTOR",
    "FRONT_COLUMNS",
    "HoldoutResult",
    "ReportContext",
    "StudySummary",
    "VerifyResult",
    "VerifySettings",
    "accuracy_resolution_line",
    "front_cells",
    "front_columns",
    "front_row",
    "kernels_apply",
    "load_run_settings",
    "quiet_quantizer",
    "report_context",
    "save_run_settings",
    "score_holdout",
    "select_for_verification",
    "timing_noise_lines",
    "verify_backend",
    "verify_study",
    "write_results",
]
