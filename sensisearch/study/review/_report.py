"""report.md: what a release reviewer reads."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from sensisearch.fileio import write_text_atomic
from sensisearch.measure import noise_summary
from sensisearch.study.store._record import TrialRecord
from sensisearch.study.trial._predicted import partial_int8_verdict, prediction_lines
from sensisearch.study.store._results import (
    SPEEDUP_NOISE, WinnerChoice, baseline, is_estimate, relative_cost_text, speed_text, unverified_apart,
)

if TYPE_CHECKING:
    from sensisearch.report import FloatLayerEvidence
    from sensisearch.study.store._timing import PredictionCheck


@dataclass(frozen=True)
class ReportContext:
    """What the report says about the study besides its trials."""

    metric: str
    model_path: Path
    model_sha256: str
    num_layers: int
    backend: dict[str, Any]
    """``Backend.describe()``."""
    latency_batch: int
    budget: int
    precisions: tuple[str, ...]
    algorithms: tuple[str, ...]
    sample_counts: tuple[int, ...]
    max_drop: float
    fp16_note: str | None = None
    warnings: tuple[str, ...] = ()
    references: tuple[dict[str, Any], ...] = ()
    """Rows of ``references.json`` (``--compare-ort-quantizer``)."""
    # What was measured and how the winner was judged.
    axis_label: str | None = None
    """What the speed axis measured (``TimingPlan.axis_label``); None: latency per batch of ``latency_batch``."""
    objective: str = "latency"
    timing_batch: int | None = None
    min_speedup: float = 1.0
    max_class_drop: float | None = None
    min_class_instances: int | None = None
    eval_images: int | None = None
    """Images every trial is scored on (the search images with ``--holdout``); None: a user's evaluator."""
    # predicted latency and stage 2.
    prediction_check: PredictionCheck | None = None
    verify_summary: dict[str, Any] | None = None
    """How the verify tournament went (rounds, A/A controls, load, what stayed unverified)."""
    kernels_apply: bool = True
    """Do the integer kernels counted in the artifacts built here say anything about the target?
    False for a foreign quantization profile (``--profile tensorrt`` on ONNX Runtime): the
    column is left out rather than show ONNX Runtime's kernels as the target's."""


@dataclass(frozen=True)
class FrontRow:
    """One Pareto-front trial, formatted: the report's table and the CLI's show the same text."""

    trial: str
    value: str
    change: str
    """Metric change vs FP32 with an explicit sign: negative is a loss."""
    median_ms: str
    p90_ms: str
    speedup: str
    layers: str
    kernels: str
    calibration: str


    in_study: str
    """The in-study speed-up beside the verified one."""
    holdout: str = "-"
    """The change vs FP32 on the images ``--holdout`` kept from the search (``-``: not scored there)."""


FRONT_COLUMNS = (
    "trial", "{metric}", "change vs FP32 (± 95% CI)", "median ms", "p90 ms", "speed-up (95% CI)", "layers int8/fp16/fp32",
    "integer kernels", "calibration", "in-study speed-up", "held-out change (± 95% CI)",
)
_FRONT_FIELDS = tuple(f.name for f in dataclasses.fields(FrontRow))
ESTIMATE_COLUMNS = {
    # An estimate is a relative cost, never a speed-up: its columns say so.
    "median ms": "relative cost (FP32 = 1)",
    "speed-up (95% CI)": "speed-up (95% CI) or relative cost",
    "in-study speed-up": "in-study figure",
}


def front_columns(recs: Sequence[TrialRecord], kernels_apply: bool = True) -> list[tuple[str, str]]:
    """(header, :class:`FrontRow` field) of each column that applies to ``recs``.

    Left out: "integer kernels" on a foreign profile (ONNX Runtime's kernels are not the
    target's); "p90 ms" when no trial has one (predicted figures have no distribution);
    the speed-up and in-study columns while an estimate is all there is (they would repeat its cost).
    An estimated study's headers name a relative cost, not ms or a speed-up.
    """
    estimated = any(is_estimate(r) for r in recs)
    # Nothing verified yet: the speed-up and in-study columns would only repeat the estimate's cost.
    cost_only = estimated and not any(r.is_verified for r in recs)
    columns = []
    for header, name in zip(FRONT_COLUMNS, _FRONT_FIELDS):
        if name == "kernels" and not kernels_apply:
            continue
        if name in ("speedup", "in_study") and cost_only:
            continue
        if name == "p90_ms" and not any(r.latency.get("p90_ms") is not None for r in recs):
            continue
        if name == "holdout" and not any(r.holdout is not None for r in recs):
            continue
        columns.append((ESTIMATE_COLUMNS.get(header, header) if estimated else header, name))
    return columns


def front_cells(row: FrontRow, columns: Sequence[tuple[str, str]]) -> list[str]:
    return [getattr(row, name) for _, name in columns]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def signed_change(change: float | None, digits: int = 2) -> str:
    """``-0.40`` for a loss, ``+0.10`` for a gain: the sign is always printed."""
    if change is None:
        return "n/a"
    # round() first: a change that prints as zero must not print as "-0.00".
    return f"{round(change, digits) + 0.0:+.{digits}f}"


def _layers(r: TrialRecord) -> str:
    req = r.requested_counts()
    return f"{req['int8']}/{req['fp16']}/{req['fp32']}"


def _calibration(r: TrialRecord) -> str:
    return r.calibration_text or "-"


def change_text(r: TrialRecord, fp32: TrialRecord | None) -> str:
    """``-0.25 ± 0.31 (within noise)``: the signed change vs FP32 (negative is a loss) with the
    half-width of its paired bootstrap CI over images."""
    ref = None if fp32 is None else fp32.value
    change = None if ref is None or r.value is None else r.value - ref
    ci = r.drop_ci
    if change is None or ci is None or r is fp32:
        return signed_change(change)
    return _with_ci(change, ci)


def _with_ci(change: float, ci: Sequence[float]) -> str:
    text = f"{signed_change(change)} ± {(ci[1] - ci[0]) / 2:.2f}"
    return text + (" (within noise)" if ci[0] <= 0.0 <= ci[1] else "")


def holdout_text(r: TrialRecord) -> str:
    """The change vs FP32 on the held-out images, as :func:`change_text` writes the search images' one."""
    held = r.holdout
    if held is None:
        return "-"
    if held.drop_ci95 is None or r.baseline == "fp32":
        return signed_change(-held.drop)
    # The CI is of the drop (FP32 - trial); the change is its negative, so its interval flips.
    return _with_ci(-held.drop, (-held.drop_ci95[1], -held.drop_ci95[0]))


def _predicted_tag(r: TrialRecord) -> str:
    """"estimated" or "predicted (table)": a predicted figure never reads as measured."""
    return "estimated" if r.latency_source == "estimate" else "predicted (table)"


def _speedup(r: TrialRecord, fp32: TrialRecord | None) -> str:
    if r.speedup is not None and r.speedup_ci95 is not None:
        lo, hi = r.speedup_ci95
        backend = None if r.verified is None else r.verified.backend
        return f"{r.speedup:.2f}x [{lo:.2f}, {hi:.2f}]" + (f" verified{f' on {backend}' if backend else ''}" if r.is_verified else "")
    if is_estimate(r) and r.speedup is not None:
        return relative_cost_text(r.speedup, "estimated")
    if r.is_predicted and r.speedup is not None:
        return f"{r.speedup:.2f}x {_predicted_tag(r)}, no CI"
    speed = fp32.median_ms / r.median_ms if fp32 and fp32.median_ms and r.median_ms else None
    return f"{_fmt(speed)}x"


def front_row(r: TrialRecord, fp32: TrialRecord | None) -> FrontRow:
    in_study = "-"
    if r.paired_speedup is not None and r.paired_ci is not None:
        in_study = f"{r.paired_speedup:.2f}x [{r.paired_ci[0]:.2f}, {r.paired_ci[1]:.2f}]"
    elif r.latency_source == "estimate" and r.predicted_speedup:
        in_study = relative_cost_text(r.predicted_speedup)
    elif r.is_predicted and r.predicted_speedup is not None:
        in_study = f"{r.predicted_speedup:.2f}x {_predicted_tag(r)}"
    median = _fmt(r.median_ms, 3)
    if r.is_predicted and r.latency.get("unit", "ms") != "ms":
        median += " cost"  # the estimate's unitless relative cost (FP32 = 1), not ms
    return FrontRow(
        trial=f"{r.number}" + (f" ({r.baseline})" if r.baseline else ""),
        value=_fmt(r.value), change=change_text(r, fp32), median_ms=median, p90_ms=_fmt(r.latency.get("p90_ms"), 3),
        speedup=_speedup(r, fp32), layers=_layers(r), kernels=str(r.layer_precisions.get("int8", 0)), calibration=_calibration(r),
        in_study=in_study, holdout=holdout_text(r),
    )


def timing_noise_lines(recs: list[TrialRecord]) -> list[str]:
    """One line on how noisy the study's timing was (and one for the verify tournament, if it ran)."""
    done = [r for r in recs if r.state == "COMPLETE"]
    lines = []
    in_study = [r.paired for r in done if r.paired is not None]
    if in_study:
        lines.append(f"Timing noise (in-study, each trial paired with FP32): {noise_summary(in_study)}.")
    verified = [r.verified for r in done if r.verified is not None and r.baseline != "fp32"]
    if verified:
        lines.append(f"Timing noise (verify tournament): {noise_summary(verified)}.")
    return lines


def accuracy_resolution_line(recs: Sequence[TrialRecord], max_drop: float, images: int | None) -> str | None:
    """How finely the evaluation images resolve a trial's drop, and whether that is finer than ``--max-drop``.

    The median half-width of the searched trials' paired 95% drop CIs. When it exceeds ``max_drop``
    the bound is below what the images can tell: trials just inside it and just outside it differ
    by image noise, and the winner (the best of many on the same images) is optimistic by about that
    much. Measured on YOLOv5n with 40 images: +-1.5 points at --max-drop 0.5; its 59/60 answer, +0.17 on
    the 40 images, lost 1.06 on 98 others. The CI half-width falls as 1/sqrt(images), hence the count.
    """
    widths = sorted((r.drop_ci[1] - r.drop_ci[0]) / 2 for r in recs  # type: ignore[index]
                    if r.state == "COMPLETE" and r.baseline is None and r.drop_ci is not None)
    if not widths:
        return None
    half = float(statistics.median(widths))
    on = f"on these {images} evaluation images" if images else "on this evaluation"
    line = f"Accuracy resolution: {on} a trial's drop is known to +-{half:.2f} points (median 95% CI half-width over {len(widths)} trials)"
    if half <= max_drop:
        return line + f", finer than --max-drop {max_drop:g}."
    needed = "" if not images else f"; about {math.ceil(images * (half / max(max_drop, 1e-9)) ** 2)} images would resolve it"
    return (line + f": coarser than --max-drop {max_drop:g}, so trials inside the bound cannot be told from trials beyond it and "
            f"the winner's drop there is optimistic (the best of many trials on the same images){needed}; --holdout scores "
            "the answer on images the search never saw.")


def control_lines(recs: list[TrialRecord], summary: Mapping[str, Any] | None) -> list[str]:
    """The A/A control (FP32 timed against an FP32 copy built as trials are) and the load the timing saw."""
    lines = []
    controls = [r.latency.get("control") for r in recs if r.state == "COMPLETE" and r.latency.get("control")]
    if controls:
        ratios = sorted(float(c["ratio"]) for c in controls)  # type: ignore[index]
        off = sum(not c["ok"] for c in controls)  # type: ignore[index]
        lines.append(
            f"A/A control in-study (FP32 vs an FP32 copy built as trials are, in every timing): median "
            f"{ratios[len(ratios) // 2]:.3f}x over {len(ratios)} timings, range {ratios[0]:.3f}-{ratios[-1]:.3f}x; "
            f"{off} off 1.00 beyond their CI (re-timed, then divided by it)."
        )
    loaded = [r.number for r in recs if r.state == "COMPLETE" and r.latency.get("under_load")]
    if loaded:
        lines.append(f"In-study figures taken under load (the machine stayed busier than the sessions need): trials "
                     f"{', '.join(map(str, loaded))}.")
    reused = [r.number for r in recs if r.latency.get("class_reused")]
    classes = {r.latency_class for r in recs if r.latency_class}
    if classes:
        lines.append(f"Latency classes (one figure per placement, calibration-only variants share it): {len(classes)}; "
                     f"{len(reused)} trial(s) reused their class's figure instead of being timed.")
    if summary:
        for i, rnd in enumerate(summary.get("rounds", []), start=1):
            c = rnd.get("control")
            text = "" if not c else (f"A/A control {c['ratio']:.3f}x [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
                                     + (" off 1.00: figures divided by it" if c.get("corrected") else ""))
            lines.append(f"Verify round {i}: trials {', '.join(map(str, rnd['arms']))} timed ({rnd['rounds']} rounds); {text}"
                         + ("; taken under load" if rnd.get("under_load") else ""))
        if summary.get("forced_under_load"):
            lines.append("Verify ran with --force on a busy machine: its figures were taken under load.")
        if summary.get("unverified"):
            lines.append(f"Not verified (round cap reached) though they matter: trials {', '.join(map(str, summary['unverified']))}.")
        if summary.get("unsettled"):
            lines.append(f"Unsettled (verified, but no two timings agreed within 5% with a narrow CI: the machine was disturbed; "
                         f"verify again when quiet): trials {', '.join(map(str, summary['unsettled']))}.")
    return lines


def int8_speed_verdict(recs: list[TrialRecord]) -> tuple[bool | None, str]:
    """Does all-INT8 beat FP32 on this backend, beyond noise?

    With paired timing: only when the lower bound of its speed-up CI exceeds 1.
    Studies recorded before paired timing: when the medians differ by more than
    :data:`SPEEDUP_NOISE`.
    """
    fp32, int8 = baseline(recs, "fp32"), baseline(recs, "int8")
    if fp32 is None or int8 is None or not fp32.median_ms or not int8.median_ms:
        return None, "The all-FP32 or all-INT8 baseline did not complete, so INT8's speed-up is unknown."
    if int8.is_predicted and not int8.is_verified and int8.speedup is not None:
        # The figure is a prediction for the target; the verdict speaks about it and says so.
        label = int8.latency.get("label") or int8.latency_source
        if is_estimate(int8):
            # Nothing was measured: the estimate is a relative cost, and says only that.
            return int8.speedup > 1.0 + SPEEDUP_NOISE, (
                f"All-INT8's estimated {relative_cost_text(int8.speedup)} against FP32's 1 ({label}): an estimate for "
                "ranking configurations, not a speed-up; how much faster INT8 runs on the target is unknown until "
                "`sensisearch verify RUN_DIR --backend <target>` runs there (predicted, not measured)."
            )
        if int8.speedup > 1.0 + SPEEDUP_NOISE:
            return True, (
                f"All-INT8 is predicted to run {int8.speedup:.2f}x faster than FP32 on the target ({label}; no CI): "
                "predicted, not measured, until `sensisearch verify RUN_DIR --backend <target>` runs there."
            )
        return False, (
            f"**INT8 is predicted to bring no significant speed for this model on the target**: all-INT8 at "
            f"{int8.speedup:.2f}x the speed of FP32 ({label}; predicted, not measured). The front below is therefore "
            "not a speed/accuracy trade-off; verify on the target."
        )
    if int8.speedup is not None and int8.speedup_ci95 is not None:
        if int8.speedup_ci95[0] > 1.0:
            return True, f"All-INT8 runs {speed_text(int8)} faster than FP32 on this backend (paired, interleaved timing)."
        return False, (
            f"**INT8 brings no significant speed for this model on this backend**: all-INT8 runs at {speed_text(int8)} "
            f"the speed of FP32 ({int8.layer_precisions.get('int8', 0)} layers ran integer kernels; its CI reaches 1). "
            "The front below is therefore not a speed/accuracy trade-off; judge INT8 on the target backend."
        )
    speedup = fp32.median_ms / int8.median_ms
    ci = int8.speedup_ci95
    if ci is not None:
        # Paired timing with a CI (TrialRecord.paired/verified) decides when it exists.
        if ci[0] > 1.0:
            return True, f"All-INT8 runs {int8.speedup or speedup:.2f}x faster than FP32 on this backend (paired 95% CI {ci[0]:.2f}-{ci[1]:.2f}x)."
        return False, (
            f"**INT8 brings no significant speed for this model on this backend**: all-INT8 runs at {int8.speedup or speedup:.2f}x "
            f"the speed of FP32 (paired 95% CI {ci[0]:.2f}-{ci[1]:.2f}x includes 1). The front below is therefore not a "
            "speed/accuracy trade-off; judge INT8 on the target backend."
        )
    if speedup > 1 + SPEEDUP_NOISE:
        return True, f"All-INT8 runs {speedup:.2f}x faster than FP32 on this backend ({int8.median_ms:.3f} ms vs {fp32.median_ms:.3f} ms)."
    return False, (
        f"**INT8 brings no speed for this model on this backend**: all-INT8 runs at {speedup:.2f}x the speed of FP32 "
        f"({int8.median_ms:.3f} ms vs {fp32.median_ms:.3f} ms, {int8.layer_precisions.get('int8', 0)} layers ran integer kernels). "
        "The front below is therefore not a speed/accuracy trade-off; judge INT8 on the target backend."
    )


def _speed_evidence(recs: list[TrialRecord]) -> str:
    """What the study's speed figures are: paired timing, or a predictor's, by its label."""
    from sensisearch.study.trial._predicted import COST_UNIT, predicted_unit, study_speed_label

    label = study_speed_label(recs)
    if label is None:
        return ("; speed-ups are paired with FP32 (interleaved rounds, median ratio, bootstrap 95% CI); "
                "ms figures are the study's FP32 reference latency over that speed-up")
    unit = predicted_unit(recs)
    scale = f"'median ms' is a {COST_UNIT} ('cost')" if unit != "ms" else "'median ms' is the table's predicted ms"
    return (f"; speed figures are not timed here: {label}; they have no CI; {scale}; figures marked verified were "
            "timed by `sensisearch verify`")


def _winner_speed_lines(r: TrialRecord, context: ReportContext) -> list[str]:
    """The winner's speed: measured figures in ms and speed-up, an estimate as the relative cost it is."""
    if is_estimate(r) and r.speedup is not None:
        return [f"- estimated {relative_cost_text(r.speedup)} (required: below {1.0 / context.min_speedup:.2f}; "
                "predicted, not measured: a relative cost, not a speed-up; unverified on the target)"]
    return [
        f"- speed-up vs FP32 {speed_text(r)} (required: "
        + (f"predicted speed-up above {context.min_speedup:g}; unverified on the target)" if r.is_predicted and not r.is_verified
           else f"CI lower bound above {context.min_speedup:g})")
        + (f"; in-study {r.paired_speedup:.2f}x" if r.is_verified and r.paired_speedup is not None else ""),
        f"- median {_fmt(r.median_ms, 3)} ms{' (verified)' if r.is_verified else ''}, "
        f"in-study {_fmt(r.in_study_ms, 3)} ms, p90 {_fmt(r.latency.get('p90_ms'), 3)} ms",
    ]


def _float_layer_lines(r: TrialRecord) -> list[str]:
    """The winner's FP16/FP32 layers by name (a reviewer must not need config.json for them)."""
    lines = []
    for precision in ("fp16", "fp32"):
        names = [name for name, p in r.precisions.items() if p == precision]
        if names:
            lines.append(f"- {precision.upper()} layers ({len(names)}): " + ", ".join(f"`{n}`" for n in names))
    return lines


def write_report(
    out: Path, recs: list[TrialRecord], front: list[TrialRecord], choice: WinnerChoice, context: ReportContext,
    review_markdown: str = "", float_evidence: Sequence[FloatLayerEvidence] = (),
) -> Path:
    """``report.md``; ``review_markdown`` links report.html and the PNGs, ``float_evidence``
    names each layer the winner keeps in FP16/FP32 with the measurement behind it."""
    metric = context.metric
    fp32 = baseline(recs, "fp32")
    ref = None if fp32 is None else fp32.value
    backend = ", ".join(f"{k}={v}" for k, v in context.backend.items())
    lines = [f"# sensisearch report: {context.model_path.name}", ""]
    lines += [
        f"- Model: `{context.model_path}` (sha256 `{context.model_sha256[:16]}…`, {context.num_layers} quantizable layers)",
        f"- Backend: {backend}",
        f"- Metric: {metric} (points, higher is better); speed: "
        + (context.axis_label or ("relative cost (FP32 = 1), estimated" if any(is_estimate(r) for r in recs)
                                  else f"latency, median ms per batch of {context.latency_batch}"))
        + _speed_evidence(recs),
        f"- Trials: {sum(r.state == 'COMPLETE' for r in recs)} complete, {sum(r.state == 'FAIL' for r in recs)} failed, "
        + (f"{sum(r.stopped_early is not None for r in recs)} stopped early on the subset, " if any(r.stopped_early for r in recs) else "")
        + f"budget {context.budget}",
        f"- Search: precisions {', '.join(context.precisions)}; calibration {', '.join(context.algorithms)}; samples {list(context.sample_counts)}",
    ]
    for warning in context.warnings:
        lines.append(f"- Warning: {warning}")
    if context.fp16_note is not None and "fp16" in context.precisions:
        lines.append(f"- FP16 on this backend: {context.fp16_note}")
    if review_markdown:
        lines += ["", review_markdown.rstrip()]
    lines += [f"- {line}" for line in timing_noise_lines(recs)]
    resolution = accuracy_resolution_line(recs, context.max_drop, context.eval_images)
    lines += [] if resolution is None else [f"- {resolution}"]
    lines += [f"- {line}" for line in control_lines(recs, context.verify_summary)]
    done = [r for r in recs if r.state == "COMPLETE"]
    # The columns that apply (FRONT_COLUMNS' baseline subset): no integer kernels for a foreign profile.
    columns = [c for c in front_columns(done, context.kernels_apply) if c[1] not in ("trial", "layers", "calibration")]
    lines += [
        "", "## Baselines", "",
        "| baseline | trial | " + " | ".join(h.format(metric=metric) for h, _ in columns) + " |",
        "|---|" + "---:|" * (len(columns) + 1),
    ]
    for name in ("fp32", "int8", "fp16"):
        r = baseline(recs, name)
        if r is None:
            failed = next((x for x in recs if x.baseline == name and x.state == "FAIL"), None)
            if failed is not None:
                lines.append(f"| all-{name.upper()} | {failed.number} | failed: {failed.error} |" + " |" * (len(columns) - 1))
            continue
        lines.append(f"| all-{name.upper()} | {r.number} | " + " | ".join(front_cells(front_row(r, fp32), columns)) + " |")
    verdict, text = int8_speed_verdict(recs)
    partial = partial_int8_verdict(recs)  # the honest verdict on partial INT8
    lines += ["", text, *(["", partial] if partial else []), "", "## Pareto front", ""]
    if verdict is False or (partial and not verdict):
        lines += ["(Accuracy-only: INT8 is not faster here, see above.)", ""]
    front_cols = front_columns(done, context.kernels_apply)
    lines += [
        "Drops are FP32 minus the trial, ± half the paired bootstrap 95% CI over images; \"within noise\": the CI holds 0.",
        "",
        "| " + " | ".join(h.format(metric=metric) for h, _ in front_cols) + " |",
        "|" + "".join("---|" if name in ("layers", "calibration") else "---:|" for _, name in front_cols),
    ]
    for r in front:
        lines.append("| " + " | ".join(front_cells(front_row(r, fp32), front_cols)) + " |")
    apart = unverified_apart(recs)
    if apart:
        # Never ranked against verified figures: listed apart, with their in-study figures.
        lines += ["", "Not verified (in-study figures only, not ranked with the verified ones above):", ""]
        lines += [f"- trial {r.number}" + (f" ({r.baseline})" if r.baseline else "") + f": {metric} {_fmt(r.value)}, "
                  f"{front_row(r, fp32).in_study}" for r in apart]
    references = context.references
    if references:
        lines += [
            "",
            "Reference quantizers on the same calibration samples (not trials; they show what the search beat):",
            "",
            f"| reference | {metric} | change vs FP32 | median ms | speed-up | integer kernels |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for ref_row in references:
            if "error" in ref_row:
                lines.append(f"| {ref_row['name']} | failed: {ref_row['error']} | | | | |")
                continue
            ms = ref_row["latency"]["median_ms"]
            # Paired references carry their own speed-up vs FP32; older ones only a median.
            speed = ref_row["latency"].get("speedup") or (fp32.median_ms / ms if fp32 and fp32.median_ms else None)
            drop = None if ref is None else ref - ref_row["value"]
            lines.append(
                f"| {ref_row['name']} (n={ref_row['samples']}) | {_fmt(ref_row['value'])} | {signed_change(None if drop is None else -drop)} | {_fmt(ms, 3)} | "
                f"{_fmt(speed)}x | {ref_row['layers_run'].get('int8', 0)} |"
            )
    lines += prediction_lines(context.prediction_check)  # stage 2, predicted vs measured
    lines += ["", "## Winner", ""]
    if choice.record is None:
        lines.append(f"No winner: {choice.reason}.")
    else:
        r = choice.record
        status = "qualified" if choice.qualified else "**best-effort: no trial met the target**"
        lines += [
            f"Trial {r.number} ({status}): {choice.reason}.",
            "",
            f"- {metric} {_fmt(r.value)} (FP32 {_fmt(ref)}, change vs FP32 {change_text(r, fp32)}; allowed loss {context.max_drop:g})",
            *([] if r.holdout is None else [
                f"- on the {r.holdout.images} held-out images the search never saw: {metric} {_fmt(r.holdout.value)} "
                f"(FP32 {_fmt(r.holdout.reference_value)}, change vs FP32 {holdout_text(r)})"]),
            *_winner_speed_lines(r, context),
            f"- layers int8/fp16/fp32: {_layers(r)}"
            + (f"; integer kernels in the built artifact: {r.layer_precisions.get('int8', 0)}" if context.kernels_apply else ""),
            f"- calibration: {_calibration(r)}",
            *_float_layer_lines(r),
            "- files: `winner/` (artifact, deployable ONNX, config.json)",
        ]
        if r.per_class and fp32 is not None and fp32.per_class:
            instances = r.per_class_instances or fp32.per_class_instances or {}
            losses = sorted(((fp32.per_class[c] - v, c) for c, v in r.per_class.items() if c in fp32.per_class), reverse=True)[:10]
            instances = r.per_class_instances or fp32.per_class_instances or {}
            lines += ["", "Classes that lost most against FP32:", "", "| class | instances | FP32 | winner | change |", "|---|---:|---:|---:|---:|"]
            lines += [
                f"| {c} | {instances.get(c, 'n/a')} | {fp32.per_class[c]:.2f} | {r.per_class[c]:.2f} | {signed_change(-d)} |"
                for d, c in losses
            ]
            if r.class_guard_skipped and context.max_class_drop is not None:
                lines += [
                    "",
                    f"The class guard (--max-class-drop {context.max_class_drop:g}) skipped {len(r.class_guard_skipped)} classes "
                    f"with fewer than {context.min_class_instances} instances: {', '.join(r.class_guard_skipped)}.",
                ]
    lines += ["", "## What each precision choice did", ""]
    if choice.record is None:
        lines.append("No winner, so no layer choice to explain.")
    elif not float_evidence:
        lines.append("The winner runs every quantizable layer in INT8.")
    else:
        lines += [
            f"Why the winner keeps these layers in FP16/FP32: for each, the measurement that says what INT8 there did "
            f"({metric} change in points, negative = a loss; the evidence names which measurement it is).",
            "",
            "| layer | winner keeps | evidence |",
            "|---|---|---|",
        ]
        lines += [f"| `{e.layer}` | {e.precision.upper()} | {e.evidence} |" for e in float_evidence]
    alg: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        if r.state == "COMPLETE" and r.value is not None and r.requested_counts()["int8"]:
            alg[_calibration(r).split(" ")[0]].append(r.value)
    if alg:
        lines += [
            "",
            "Calibration algorithms as sampled (all completed trials with INT8 layers; they differ in their layer "
            "choices too, so this describes the search, it does not measure an algorithm's effect):",
            "",
            f"| calibration algorithm | trials | mean {metric} | best {metric} |",
            "|---|---:|---:|---:|",
        ]
        for name, values in sorted(alg.items(), key=lambda kv: -max(kv[1])):
            lines.append(f"| {name} | {len(values)} | {sum(values) / len(values):.2f} | {max(values):.2f} |")
    failed = [r for r in recs if r.state == "FAIL"]
    if failed:
        lines += ["", "## Failed trials", ""] + [f"- trial {r.number}: {r.error}" for r in failed]
    stopped = [r for r in recs if r.stopped_early is not None]  # multi-fidelity: stopped after its subset
    if stopped:
        lines += ["", "## Stopped early on the subset", "",
                  "Scored on the fixed evaluation subset only, then stopped (counted in the budget, never on the front):", ""]
        lines += [f"- trial {r.number}: {r.stopped_early}" for r in stopped]
    return write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
