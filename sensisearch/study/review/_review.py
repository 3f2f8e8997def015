"""The study's records -> :class:`sensisearch.report.ReviewData` (report.html, PNGs, report.md).

The renderers know nothing about Optuna; this module is the one place that
turns :class:`TrialRecord`s, the front, the winner choice, ``references.json``,
``<out>/sensitivity.json`` and the study's inputs into what a release reviewer
sees. Every figure shown is a measurement of one trial (or of the sensitivity
profile): the evidence for a layer kept in FP16/FP32 is never a mean over
trials that differ in other layers too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sensisearch.report import (
    LATENCY_SPEED_AXIS,
    ClassAPRow,
    FloatLayerEvidence,
    PointKind,
    ReviewData,
    ReviewPoint,
    SensitivityRow,
)
from sensisearch.study.review._report import accuracy_resolution_line
from sensisearch.study.search._sensitivity import SENSITIVITY_FILE, SensitivityProfile
from sensisearch.study.store._results import baseline, is_estimate, trial_file

if TYPE_CHECKING:
    from sensisearch.study.run._context import StudyContext
    from sensisearch.study.store._record import TrialRecord
    from sensisearch.study.store._results import WinnerChoice

from sensisearch.study.trial._predicted import study_speed_label

log = logging.getLogger(__name__)

UNPAIRED_AXIS = "speed-up vs FP32 (ratio of median latencies, unpaired: no CI)"
MIXED_AXIS = LATENCY_SPEED_AXIS + "; paired where a CI is shown, else unpaired ratio of medians"
# A trial this many layers away from the winner (besides the layer in question)
# still says something about that layer; farther ones mostly measure the others.
NEAREST_TRIAL_MAX_OTHER_DIFFERENCES = 2


# --------------------------------------------------------------------------- speed


def speedup_of(record: TrialRecord, fp32: TrialRecord | None) -> tuple[float | None, tuple[float, float] | None, bool]:
    """(speed-up vs FP32, its 95 % CI, paired?).

    The paired (or verified) figure when the study measured one; else the ratio
    of the two trials' medians, which has no CI because the runs were not
    interleaved (machine drift between them is not accounted for).
    """
    if record.speedup is not None:
        # A predicted speed-up (table or estimate) is not paired and has no CI.
        return float(record.speedup), record.speedup_ci95, record.speedup_source not in ("table", "estimate")
    if record.baseline == "fp32":
        return 1.0, None, False
    if fp32 is not None and fp32.median_ms and record.median_ms:
        return fp32.median_ms / record.median_ms, None, False
    return None, None, False


# --------------------------------------------------------------------------- evidence


def _same_calibration(a: TrialRecord, b: TrialRecord) -> bool:
    return a.calibration_text == b.calibration_text or not a.calibration_text or not b.calibration_text


def _change_words(change: float) -> str:
    """A signed change with what it means, e.g. ``-0.40 points (a loss)``."""
    if change < 0:
        return f"{change:+.2f} points (a loss)"
    if change > 0:
        return f"{change:+.2f} points (a gain)"
    return "+0.00 points (no change)"


def read_sensitivity(out: Path) -> list[SensitivityRow]:
    """``<out>/sensitivity.json`` (written by ``sensisearch sensitivity``) as review rows; [] when there is none.

    Drops are in points below FP32: only this layer INT8, and every layer but this one INT8.
    """
    path = out / SENSITIVITY_FILE
    if not path.is_file():
        return []
    try:
        profile = SensitivityProfile.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s: not a sensitivity profile this version reads (%s); the review shows none", path, exc)
        return []
    all_int8_drop = profile.fp32 - profile.all_int8
    # recovery = all-but-this - all-INT8, so FP32 - all-but-this = (FP32 - all-INT8) - recovery.
    return [SensitivityRow(r.layer, r.alone_drop, all_int8_drop - r.recovery, r.revert_speedup) for r in profile.layers]


def float_layer_evidence(
    winner: TrialRecord, recs: Sequence[TrialRecord], sensitivity: Sequence[SensitivityRow] = ()
) -> list[FloatLayerEvidence]:
    """For each layer the winner keeps in FP16/FP32, the best measured evidence, labelled.

    In order of preference: the sensitivity profile's row; a completed trial
    identical to the winner but for this layer in INT8 (the best one if
    several); the nearest completed trial with this layer INT8 that differs in
    at most :data:`NEAREST_TRIAL_MAX_OTHER_DIFFERENCES` other layers; the
    all-INT8 baseline against FP32. Changes are in points, signed (negative = loss).
    """
    profile = {row.layer: row for row in sensitivity}
    fp32 = baseline(list(recs), "fp32")
    int8 = baseline(list(recs), "int8")
    mine = winner.precisions
    done = [r for r in recs if r.state == "COMPLETE" and r.value is not None and r.number != winner.number and r.precisions]
    out: list[FloatLayerEvidence] = []
    for layer, precision in mine.items():
        if precision == "int8":
            continue
        row = profile.get(layer)
        if row is not None and (row.drop_only_this_int8 is not None or row.drop_all_but_this_int8 is not None):
            parts = []
            if row.drop_only_this_int8 is not None:
                parts.append(f"only this layer INT8: {_change_words(-row.drop_only_this_int8)} vs FP32")
            if row.drop_all_but_this_int8 is not None:
                parts.append(f"every layer but this one INT8: {_change_words(-row.drop_all_but_this_int8)} vs FP32")
            if row.speed_all_but_this_int8 is not None:
                # A layer can be kept in float for speed: INT8 kernels are slower for some shapes (one input channel).
                speed, low, high = row.speed_all_but_this_int8
                parts.append(f"that model ran {speed:.2f}x [{low:.2f}, {high:.2f}] the speed of all-INT8 (timed interleaved)")
            out.append(FloatLayerEvidence(layer, precision, "sensitivity profile: " + "; ".join(parts)))
            continue
        out.append(FloatLayerEvidence(layer, precision, _trial_evidence(layer, winner, done, fp32, int8)))
    return out


def _trial_evidence(
    layer: str, winner: TrialRecord, done: Sequence[TrialRecord], fp32: TrialRecord | None, int8: TrialRecord | None
) -> str:
    mine = winner.precisions
    assert winner.value is not None
    scored: list[tuple[int, TrialRecord]] = []
    for r in done:
        theirs = r.precisions
        if theirs.get(layer) != "int8" or set(theirs) != set(mine):
            continue
        others = sum(theirs[name] != p for name, p in mine.items() if name != layer)
        if not _same_calibration(r, winner):
            others += 1  # a different calibration is one more difference
        scored.append((others, r))
    identical = [r for d, r in scored if d == 0]
    if identical:
        best = max(identical, key=lambda r: r.value)  # type: ignore[arg-type, return-value]
        change = best.value - winner.value  # type: ignore[operator]
        return f"trial #{best.number}, identical but for this layer in INT8: {_change_words(change)} vs the winner"
    near = sorted((d, -(r.value or 0.0), r.number, r) for d, r in scored if d <= NEAREST_TRIAL_MAX_OTHER_DIFFERENCES)
    if near:
        d, _, _, r = near[0]
        change = r.value - winner.value  # type: ignore[operator]
        return (
            f"nearest trial with this layer INT8, #{r.number} (also differs in {d} other layer(s) or the calibration): "
            f"{_change_words(change)} vs the winner"
        )
    if int8 is not None and fp32 is not None and int8.value is not None and fp32.value is not None:
        return (
            f"no trial near the winner had this layer INT8; the all-INT8 baseline (#{int8.number}) changes the metric "
            f"{_change_words(int8.value - fp32.value)} vs FP32 (all layers together, not this one alone)"
        )
    return "no measurement: no completed trial had this layer in INT8"


# --------------------------------------------------------------------------- points


def _points(
    recs: Sequence[TrialRecord], front: Sequence[TrialRecord], choice: WinnerChoice, references: Sequence[Mapping[str, Any]],
    layers: Sequence[str],
) -> tuple[list[ReviewPoint], int]:
    """Every completed trial and reference quantizer as a point; also how many speed-ups are paired."""
    fp32 = baseline(list(recs), "fp32")
    ref = None if fp32 is None else fp32.value
    on_front = {r.number for r in front}
    winner = None if choice.record is None else choice.record.number
    known = set(layers)
    points: list[ReviewPoint] = []
    paired = 0
    for r in recs:
        if r.state != "COMPLETE" or r.value is None:
            continue
        speed, speed_ci, is_paired = speedup_of(r, fp32)
        if speed is None:
            continue
        paired += is_paired
        drop = 0.0 if ref is None else ref - r.value
        points.append(ReviewPoint(
            trial=r.number, metric=r.value, drop=drop, speedup=speed,
            kind=PointKind.BASELINE if r.baseline else PointKind.SEARCHED, label=r.baseline or "",
            drop_ci95=None if r.drop_ci95 is None else (float(r.drop_ci95[0]), float(r.drop_ci95[1])),
            speedup_ci95=speed_ci, on_front=r.number in on_front, is_winner=r.number == winner, feasible=r.feasible,
            precisions={k: v for k, v in r.precisions.items() if k in known},
            calibration=r.calibration_text,
            latencies_ms=() if r.timing is None else r.timing.candidate_times_ms,
            relative_cost=1.0 / speed if is_estimate(r) and speed else None,
            holdout_drop=None if r.holdout is None else r.holdout.drop,
            # FP32 is the reference it pairs with: its drop there is 0 by definition, with no CI.
            holdout_drop_ci95=None if r.holdout is None or r.baseline == "fp32" else r.holdout.drop_ci95,
        ))
    # Reference quantizers are not trials: numbered below zero so they never clash with one.
    scored = [row for row in references if "error" not in row and row.get("value") is not None]
    for i, row in enumerate(scored):
        ms = row.get("latency", {}).get("median_ms")
        if not (fp32 and fp32.median_ms and ms):
            continue
        points.append(ReviewPoint(
            trial=-(i + 1), metric=float(row["value"]), drop=0.0 if ref is None else ref - float(row["value"]),
            speedup=fp32.median_ms / ms, kind=PointKind.REFERENCE, label=str(row["name"]),
            calibration=f"n={row.get('samples')}",
        ))
    return points, paired


def _speed_axis(points: Sequence[ReviewPoint], paired: int) -> str:
    trials = sum(p.kind is not PointKind.REFERENCE for p in points)
    if paired and paired == trials:
        return LATENCY_SPEED_AXIS
    return MIXED_AXIS if paired else UNPAIRED_AXIS


def _verified_backend(r: TrialRecord) -> str:
    return (None if r.verified is None else r.verified.backend) or "the backend"


def _predicted_axis(recs: Sequence[TrialRecord], label: str) -> str:
    """The speed axis of predicted figures: an estimate's is a relative cost (lower is faster), never a speed-up."""
    if any(is_estimate(r) for r in recs if r.state == "COMPLETE"):
        return f"relative cost vs FP32 = 1 (lower is faster), {label}"
    return f"speed-up vs FP32, {label}"


def predicted_note(recs: list[TrialRecord], label: str, out: Path) -> str:
    """What report.html says about predicted speed figures, the partial-INT8 verdict, and stage 2."""
    from sensisearch.study.trial._predicted import partial_int8_verdict

    verified = [r for r in recs if r.is_verified]
    text = f"Speed figures are not timed on the target: {label}; they have no CI."
    if verified:
        text += f" Figures marked verified were timed by `sensisearch verify` on {_verified_backend(verified[0])}."
    else:
        text += f" Unverified until `sensisearch verify {out} --backend <target>` runs on the target."
    partial = partial_int8_verdict(recs)
    return text + (" " + partial.replace("**", "") if partial else "")


# --------------------------------------------------------------------------- per class, provenance


def _trial_json(record: TrialRecord, out: Path) -> dict[str, Any]:
    path = trial_file(record.trial_json, out, record.number)
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def class_rows(winner: TrialRecord, fp32: TrialRecord | None, out: Path) -> list[ClassAPRow]:
    """Per-class AP of the winner vs FP32 with instance counts (from the record, else its trial.json)."""
    if fp32 is None or not winner.per_class or not fp32.per_class:
        return []
    instances = winner.per_class_instances or fp32.per_class_instances
    if not instances:
        for record in (fp32, winner):
            instances = _trial_json(record, out).get("evaluation", {}).get("per_class_instances")
            if instances:
                break
    instances = instances or {}
    return [
        ClassAPRow(name, int(instances.get(name, 0)), float(fp32.per_class[name]), float(ap))
        for name, ap in winner.per_class.items()
        if name in fp32.per_class
    ]


def recorded_thresholds(record: TrialRecord, out: Path) -> dict[str, Any] | None:
    """The calibrated ranges a trial recorded in its trial.json (enough to rebuild it on the same backend)."""
    return _trial_json(record, out).get("thresholds")


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed (source tree)"


def provenance(ctx: StudyContext) -> dict[str, Any]:
    """Model, data, software and machine a reviewer needs to reproduce the numbers."""
    import numpy
    import onnxruntime
    import optuna

    from sensisearch.measure import machine_identity

    settings = ctx.settings
    calibration = ctx.evaluation.calibration
    evaluator = ctx.evaluator.describe()
    return {
        "model": {"path": str(ctx.model_path.resolve()), "sha256": ctx.info.sha256},
        "calibration data": {
            "path": None if settings.data.calib_data is None else str(Path(settings.data.calib_data).resolve()),
            "fingerprint": None if calibration is None else calibration.fingerprint,
            "samples available": None if calibration is None else calibration.size,
            "sample counts searched": list(ctx.space.sample_counts),
            "seed": settings.search.seed,
        },
        "evaluation data": {
            "path": None if settings.data.eval_data is None else str(Path(settings.data.eval_data).resolve()),
            "annotations": None if settings.data.annotations is None else str(Path(settings.data.annotations).resolve()),
            "limit": settings.data.eval_limit,
            "task": ctx.task,
            **{k: v for k, v in evaluator.items() if isinstance(v, (str, int, float, bool))},
        },
        "preprocess": ctx.evaluation.preprocess.to_dict(),
        "backend": ctx.backend.describe(),
        "versions": {
            "sensisearch": _package_version("sensisearch"),
            "onnxruntime": onnxruntime.__version__,
            "optuna": optuna.__version__,
            "numpy": numpy.__version__,
        },
        "machine": machine_identity().to_dict(),
    }


# --------------------------------------------------------------------------- all of it


def build_review(
    ctx: StudyContext, recs: Sequence[TrialRecord], front: Sequence[TrialRecord], choice: WinnerChoice,
    references: Sequence[Mapping[str, Any]] = (),
) -> ReviewData:
    """Everything ``report.html`` and the PNGs show, for the study as the storage holds it now."""
    layers = list(ctx.space.layers)
    points, paired = _points(recs, front, choice, references, layers)
    sensitivity = read_sensitivity(ctx.out)
    fp32 = baseline(list(recs), "fp32")
    winner = choice.record
    evidence = [] if winner is None or winner.value is None else float_layer_evidence(winner, recs, sensitivity)
    classes = [] if winner is None else class_rows(winner, fp32, ctx.out)
    noise = "" if paired else "Speed-ups are ratios of median latencies of separate runs (not interleaved): treat differences under ~5 % as noise."
    predicted_label = study_speed_label(list(recs))  # predicted latency is labelled, never "measured"
    if predicted_label is not None:
        noise = predicted_note(list(recs), predicted_label, ctx.out)
    if winner is not None and not choice.qualified:
        noise = (noise + " " if noise else "") + f"The exported trial is best-effort: {choice.reason}."
    resolution = accuracy_resolution_line(recs, ctx.settings.acceptance.max_drop, ctx.evaluator.image_count())
    accuracy_notes = [] if resolution is None else [resolution]
    if choice.qualified and choice.passed_over:  # a best-effort winner's reason is in ``noise`` already
        accuracy_notes.append(f"The winner: {choice.reason}.")
    holdout = ctx.evaluation.holdout
    return ReviewData(
        metric_name=ctx.evaluator.metric,
        points=points,
        layers=layers,
        speed_axis=_speed_axis(points, paired) if predicted_label is None or paired else _predicted_axis(recs, predicted_label),
        title=f"sensisearch review: {ctx.model_path.name}",
        sensitivity=sensitivity,
        winner_classes=classes,
        float_layer_evidence=evidence,
        provenance=provenance(ctx),
        noise=noise,
        holdout_images=0 if holdout is None else int(holdout.image_count() or 0),
        accuracy_notes=accuracy_notes,
        **_stage2_fields(ctx, recs, predicted_label is not None),
    )


def _stage2_fields(ctx: StudyContext, recs: Sequence[TrialRecord], predicted: bool) -> dict[str, Any]:
    """The partial-INT8 verdict (when ``noise`` does not carry it) and stage 2's comparison."""
    from sensisearch.study.trial._predicted import partial_int8_verdict
    from sensisearch.study.store._record import read_prediction_check

    partial = None if predicted else partial_int8_verdict(list(recs))
    study = ctx.storage and _study_attrs(ctx)
    check = read_prediction_check(study or {})
    return {
        "verdicts": (partial,) if partial else (),
        "prediction_summary": "" if check is None else check.summary() + ".",
        "prediction_rows": () if check is None else check.rows,
        "prediction_source": "" if check is None else check.source,
    }


def _study_attrs(ctx: StudyContext) -> Mapping[str, Any]:
    storage = ctx.storage
    try:
        return storage.get_study_user_attrs(storage.get_study_id_from_name(ctx.study_name))  # type: ignore[union-attr]
    except KeyError:
        return {}
