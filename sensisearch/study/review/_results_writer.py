"""A study's results from what the storage holds: pareto, winner/, review, report.md, and the summary the CLI prints."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from sensisearch.quantize.config import Precision
from sensisearch.study.run._context import StudyContext
from sensisearch.study.store._record import VERIFY_SUMMARY_ATTR, TrialRecord, read_prediction_check
from sensisearch.study.store._timing import PredictionCheck
from sensisearch.study.trial._predicted import partial_int8_verdict
from sensisearch.quantize.ranges import ranges_to_dict
from sensisearch.report import review_markdown, write_review
from sensisearch.study.review._review import build_review, recorded_thresholds
from sensisearch.study.review._holdout import HoldoutResult, score_holdout
from sensisearch.study.review._references import run_references
from sensisearch.study.review._report import ReportContext, int8_speed_verdict, write_report
from sensisearch.study.store._results import (
    WinnerChoice,
    baseline,
    choose_winner,
    export_winner,
    pareto_front,
    records,
    write_pareto,
)


@dataclass
class StudySummary:
    records: list[TrialRecord]
    front: list[TrialRecord]
    winner: WinnerChoice
    winner_dir: Path | None
    report: Path
    int8_faster: bool | None
    int8_verdict: str
    partial_int8_verdict: str | None = None
    """The sentence on partial-INT8 configurations slower than FP32, if they are."""
    prediction_check: PredictionCheck | None = None
    holdout: HoldoutResult | None = None
    """What scoring the held-out images did (``--holdout``), if the study holds images out."""


def write_results(ctx: StudyContext, study: optuna.Study) -> StudySummary:
    """pareto.json/.csv, winner/ and report.md from what the storage holds now.

    With ``--holdout`` the front and the winner are first scored on the held-out images
    (:func:`~sensisearch.study.review._holdout.score_holdout`; only what is not scored yet),
    so the winner written is one that holds there too.
    """
    holdout = score_holdout(ctx, study)
    recs = records(study)
    front = pareto_front(recs)
    references: list[dict[str, Any]] = []
    references_file = ctx.out / "references.json"
    if ctx.settings.report.compare_ort_quantizer and Precision.INT8 in ctx.space.precisions:
        # Once per output folder: a resumed study reuses the scored references.
        if references_file.is_file():
            references = json.loads(references_file.read_text())
        else:
            references = run_references(ctx, ctx.space.default_calibration.samples)
    fp32 = baseline(recs, "fp32")
    write_pareto(front, None if fp32 is None else fp32.value, ctx.out)
    choice = choose_winner(recs, ctx.settings.acceptance.max_drop, ctx.settings.acceptance.min_speedup)
    thresholds = None
    if choice.record is not None and choice.record.config is not None:
        winner_config = choice.record.config
        if ctx.calibration is not None or not winner_config.uses_int8:
            thresholds = ranges_to_dict(ctx.pipeline.ranges_for(winner_config, every_tensor=True))
        else:  # `sensisearch report` without cached statistics: the ranges the trial itself recorded
            thresholds = recorded_thresholds(choice.record, ctx.out)
    extra = {
        "task": ctx.task,
        # The whole preset (kind, mean/std, channel order, layout), so a deployment feeds the winner what it was scored on.
        "preprocess": ctx.evaluation.preprocess.to_dict(),
        "profile": ctx.backend.profile.name,
        "latency_batch": ctx.settings.backend.latency_batch,
        "objective": ctx.settings.measurement.objective,
        "timing_batch": None if ctx.pipeline.timing is None else ctx.pipeline.timing.batch,
    }
    winner_dir = export_winner(
        choice, recs, ctx.out, ctx.model_path, ctx.info.sha256, ctx.backend.describe(), ctx.settings.acceptance.max_drop,
        thresholds, extra,
    )
    review = build_review(ctx, recs, front, choice, references)
    files = write_review(review, ctx.out)
    check = read_prediction_check(study.user_attrs)  # stage 2's predicted vs measured
    context = dataclasses.replace(report_context(ctx, references), prediction_check=check,
                                  verify_summary=study.user_attrs.get(VERIFY_SUMMARY_ATTR))
    report = write_report(
        ctx.out, recs, front, choice, context,
        review_markdown=review_markdown(files, ctx.out), float_evidence=review.float_layer_evidence,
    )
    verdict, text = int8_speed_verdict(recs)
    return StudySummary(recs, front, choice, winner_dir, report, verdict, text, partial_int8_verdict(recs), context.prediction_check,
                        holdout)


def kernels_apply(ctx: StudyContext) -> bool:
    """Do the integer kernels of the artifacts built here describe the target?

    Not when the trials' latency is predicted for another machine (a foreign
    ``--profile``, or a table made elsewhere): ONNX Runtime's kernel count on a
    TensorRT Q/DQ graph says nothing about TensorRT's.
    """
    from sensisearch.study.trial._predicted import runs_on_target

    return runs_on_target(ctx.pipeline.predictor, ctx.backend)


def report_context(ctx: StudyContext, references: list[dict[str, Any]]) -> ReportContext:
    return ReportContext(
        kernels_apply=kernels_apply(ctx),
        metric=ctx.evaluator.metric,
        model_path=ctx.model_path,
        model_sha256=ctx.info.sha256,
        num_layers=len(ctx.info.layers),
        backend=ctx.backend.describe(),
        latency_batch=ctx.settings.backend.latency_batch,
        budget=ctx.settings.search.budget,
        precisions=tuple(p.value for p in ctx.space.precisions),
        algorithms=tuple(a.value for a in ctx.space.algorithms),
        sample_counts=tuple(ctx.space.sample_counts),
        max_drop=ctx.settings.acceptance.max_drop,
        fp16_note=ctx.backend.capabilities.fp16_note,
        warnings=tuple(ctx.warnings),
        references=tuple(references),
        axis_label=None if ctx.pipeline.timing is None else ctx.pipeline.timing.axis_label,
        objective=ctx.settings.measurement.objective,
        timing_batch=None if ctx.pipeline.timing is None else ctx.pipeline.timing.batch,
        min_speedup=ctx.settings.acceptance.min_speedup,
        max_class_drop=ctx.settings.acceptance.max_class_drop,
        min_class_instances=ctx.settings.acceptance.min_class_instances,
        eval_images=ctx.evaluator.image_count(),
    )
