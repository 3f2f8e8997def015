"""A study's result on the terminal: the Pareto front, the verdicts, the winner, stage 2's prediction check, disk use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from sensisearch.cli._console import stdout

if TYPE_CHECKING:
    from sensisearch.study import StudyContext, StudySummary


def print_summary(ctx: StudyContext, summary: StudySummary, seconds: float) -> None:
    from sensisearch.study import (
        accuracy_resolution_line,
        baseline,
        front_cells,
        front_columns,
        front_row,
        kernels_apply,
        timing_noise_lines,
    )

    fp32 = baseline(summary.records, "fp32")
    metric = ctx.evaluator.metric
    axis = ctx.pipeline.timing.axis_label if ctx.pipeline.timing else f"latency, median ms per batch of {ctx.settings.backend.latency_batch}"
    if ctx.pipeline.predictor is not None:  # never "measured" for a predicted figure
        axis = ctx.pipeline.predictor.label if ctx.pipeline.predictor.unit != "ms" else f"latency {ctx.pipeline.predictor.label}"
    table = Table(title=f"Pareto front ({metric} vs {axis})")
    # Only the columns that apply: no integer kernels for a foreign profile, a relative cost for an estimate.
    columns = front_columns([r for r in summary.records if r.state == "COMPLETE"], kernels_apply(ctx))
    for header, name in columns:
        table.add_column(header.format(metric=metric), justify="right", no_wrap=name != "calibration")
    for r in summary.front:
        table.add_row(*front_cells(front_row(r, fp32), columns))
    stdout.print(table)
    stdout.print(escape(summary.int8_verdict.replace("**", "")))
    if summary.partial_int8_verdict:  # the honest verdict on partial INT8
        stdout.print(escape(summary.partial_int8_verdict.replace("**", "")))
    _print_prediction_check(summary)
    for line in timing_noise_lines(summary.records):
        stdout.print(escape(line))
    resolution = accuracy_resolution_line(summary.records, ctx.settings.acceptance.max_drop, ctx.evaluator.image_count())
    if resolution is not None:
        stdout.print(escape(resolution), highlight=False)
    held = summary.holdout
    if held is not None and held.scored:
        stdout.print(escape(f"held-out check: trials {', '.join(map(str, held.scored))} scored on the {held.images} "
                            f"evaluation images the search never saw ({held.seconds:.1f} s)"), highlight=False)
    choice = summary.winner
    if choice.record is None:
        stdout.print(f"[red]No winner:[/] {escape(choice.reason)}")
    else:
        tag = "[green]winner[/]" if choice.qualified else "[yellow]best-effort (no trial met the target)[/]"
        stdout.print(f"{tag}: trial {choice.record.number} — {escape(choice.reason)} → {escape(str(summary.winner_dir))}")
    stdout.print(
        escape(f"report: {summary.report}   review: {ctx.out / 'report.html'}   pareto: {ctx.out / 'pareto.json'}   ({seconds:.0f} s)"),
        highlight=False,
    )


def _print_prediction_check(summary: StudySummary) -> None:
    """Stage 2's rank correlation and each trial's in-study vs verified speed-up, side by side."""
    check = summary.prediction_check
    if check is None:
        return
    stdout.print(escape(check.summary()), highlight=False)
    estimate = check.source == "estimate"  # the in-study figure was a relative cost, never a speed-up
    table = Table("trial", "in-study estimated cost (FP32 = 1)" if estimate else "in-study speed-up", "verified speed-up",
                  title="predicted (in-study) vs measured (verified)")
    for number, in_study, verified in check.rows:
        table.add_row(str(number), f"{1.0 / in_study:.2f}" if estimate else f"{in_study:.2f}x", f"{verified:.2f}x")
    stdout.print(table)



def print_disk(ctx: StudyContext, summary: StudySummary) -> None:
    from sensisearch.study import append_disk_section

    used = append_disk_section(summary.report, ctx.out, ctx.settings.execution.keep_artifacts)
    stdout.print(f"disk: {ctx.out} uses {used / 2**20:.1f} MiB")
