"""Issue 10, multi-fidelity: subset first, stop a trial early when it is clearly out.

The decision is a pure function tested on constructed inputs; subset + rest is
compared with a plain full evaluation on real models (digits Top-1, YOLOv5n COCO
mAP via pycocotools); an end-to-end digits study stops trials that are certainly
infeasible (clipped at the 1st percentile of |x|) and checks how the study treats them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest

from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
from sensisearch.errors import SensisearchError
from sensisearch.measure import DetectionMatches
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
from sensisearch.study import TrialRecord
from sensisearch.study.search import _budget
from sensisearch.study.trial._fidelity import (
    DOMINATED,
    INFEASIBLE,
    CompletedTrial,
    EarlyStopSnapshot,
    early_stop_decision,
    subset_positions,
    subset_size,
)
from sensisearch.study.store._results import choose_winner, pareto_front, records
from sensisearch.study.run import (
    enqueue_baselines,
    finished_count,
    open_study,
    prepare,
    run_study,
)
from sensisearch.study.review import write_results
from sensisearch.study.config._settings import StudySettings, merge_settings
from sensisearch.study.config._inputs import build_evaluation, resolve_inputs


# --------------------------------------------------------------------------- the decision
def test_infeasible_when_the_whole_drop_ci_lies_above_max_drop() -> None:
    stop = early_stop_decision((1.2, 3.0), max_drop=1.0, reference_value=90.0, speedup_upper=1.5, completed=())
    assert stop is not None and stop.reason == INFEASIBLE and stop.dominated_by is None
    assert stop.text.startswith("stopped early on the subset (infeasible")
    # The CI still reaches below --max-drop: the full set might bring it back.
    assert early_stop_decision((0.9, 3.0), max_drop=1.0, reference_value=90.0, speedup_upper=1.5, completed=()) is None


def test_dominated_when_a_complete_trial_is_surely_faster_and_more_accurate() -> None:
    # Best plausible full-set value: 90 - 0.5 = 89.5; speed-up at most 1.3x.
    faster_better = CompletedTrial(5, speedup=1.5, value=89.8)
    stop = early_stop_decision((0.5, 2.0), max_drop=1.0, reference_value=90.0, speedup_upper=1.3, completed=[faster_better])
    assert stop is not None and stop.reason == DOMINATED and stop.dominated_by == 5
    # Exactly as fast counts as "at least as fast".
    tied = CompletedTrial(6, speedup=1.3, value=89.9)
    stop = early_stop_decision((0.5, 2.0), max_drop=1.0, reference_value=90.0, speedup_upper=1.3, completed=[tied])
    assert stop is not None and stop.dominated_by == 6


@pytest.mark.parametrize(
    "completed",
    [
        [CompletedTrial(5, speedup=1.5, value=89.4)],  # faster, but not more accurate than the upper bound
        [CompletedTrial(5, speedup=1.5, value=89.5)],  # equal to the upper bound is not "more accurate"
        [CompletedTrial(5, speedup=1.25, value=92.0)],  # more accurate, but maybe slower
        [],
    ],
)
def test_not_dominated(completed: list[CompletedTrial]) -> None:
    assert early_stop_decision((0.5, 2.0), max_drop=1.0, reference_value=90.0, speedup_upper=1.3, completed=completed) is None


def test_baselines_and_unpaired_timing() -> None:
    completed = [CompletedTrial(1, speedup=3.0, value=99.0)]
    # A baseline is never stopped, even when certainly infeasible and dominated.
    assert early_stop_decision((5.0, 9.0), max_drop=1.0, reference_value=90.0, speedup_upper=1.0, completed=completed, baseline=True) is None
    # Without a speed-up bound only infeasibility can stop a trial.
    assert early_stop_decision((0.5, 2.0), max_drop=1.0, reference_value=90.0, speedup_upper=None, completed=completed) is None


def test_snapshot_round_trips_through_json() -> None:
    snapshot = EarlyStopSnapshot("abc=", 93.7, (CompletedTrial(2, 1.8, 93.1),), 0.5, 200, 3)
    assert EarlyStopSnapshot.from_dict(json.loads(json.dumps(snapshot.to_dict()))) == snapshot


def test_subset_size_and_positions() -> None:
    assert subset_size(None, "detection", 170) is None  # off by default
    assert subset_size(0, "detection", 170) is None
    assert subset_size(0.25, "detection", 170) == 42
    assert subset_size(None, "classification", 2000) is None
    assert subset_size(0, "detection", 170) is None
    assert subset_size(0.1, "classification", 2000) == 200
    assert subset_size(50, "classification", 2000) == 50
    with pytest.raises(SensisearchError, match="--fidelity-subset 2000: must be fewer than the 2000"):
        subset_size(2000, "classification", 2000)
    with pytest.raises(SensisearchError, match="--fidelity-subset"):
        subset_size(10, "custom", None)
    with pytest.raises(SensisearchError, match="--fidelity-subset 2.5"):
        merge_settings({}, {"example": "digits", "fidelity_subset": 2.5}, None)
    a, b = subset_positions(2000, 200, 0), subset_positions(2000, 200, 0)
    assert np.array_equal(a, b) and len(np.unique(a)) == 200 and np.all(np.diff(a) > 0)
    assert a.max() > 1500  # spread over the set, not its first images


def test_a_stopped_trial_counts_against_the_budget() -> None:
    views = [
        _budget.TrialView(0, "COMPLETE", "fp32", _budget.EVALUATE, baseline=True),
        _budget.TrialView(1, "PRUNED", "a", _budget.EVALUATE, stopped_early=True),
        _budget.TrialView(2, "PRUNED", "b", _budget.OVER_BUDGET),
    ]
    assert _budget.counted_trials(views) == 1
    assert _budget.decide(3, "c", False, views, budget=1).action == _budget.OVER_BUDGET
    assert _budget.decide(3, "a", False, views, budget=5) == _budget.Decision(_budget.DUPLICATE, 1)


# --------------------------------------------------------------------------- subset + rest == full
def test_digits_subset_then_rest_is_the_full_evaluation() -> None:
    resolved = resolve_inputs(StudySettings.from_flat(example="digits"))
    evaluator = build_evaluation(resolved.settings, resolved.input_spec, resolved.model, Path("unused"), False).evaluator
    positions = subset_positions(evaluator.image_count(), 300, seed=0)
    with OnnxRuntimeBackend().load(resolved.model_path) as runner:
        full = evaluator.evaluate(runner)
        part = evaluator.evaluate_part(runner, positions)
        staged = evaluator.evaluate_rest(runner, part)
    assert staged.metrics == full.metrics and staged.count == full.count == 2000
    assert np.array_equal(staged.per_image, full.per_image)
    # The subset's own Top-1 is the full run's correctness on those images.
    assert part.result.count == 300
    assert part.result.value == pytest.approx(100.0 * full.per_image[positions].mean(), abs=1e-12)
    assert np.array_equal(evaluator.per_image_subset(full.per_image, positions), part.result.per_image)


def _matches_equal(a: DetectionMatches, b: DetectionMatches) -> bool:
    names = ("image_ids", "category_ids", "det_image", "det_category", "det_score", "det_matched", "det_ignore", "gt_counts")
    return all(np.array_equal(getattr(a, n), getattr(b, n)) for n in names)


def test_yolov5n_subset_then_rest_is_the_full_coco_evaluation(yolo_model: Path, coco_dev: Path, coco_cache: Path) -> None:
    settings = StudySettings.from_flat(
        model=yolo_model, eval_data=coco_dev / "images", annotations=coco_dev / "instances.json", cache_dir=coco_cache, eval_limit=8
    )
    resolved = resolve_inputs(settings)
    evaluator = build_evaluation(resolved.settings, resolved.input_spec, resolved.model, coco_cache, False).evaluator
    positions = np.array([1, 4, 6])
    with OnnxRuntimeBackend().load(yolo_model) as runner:
        full = evaluator.evaluate(runner)  # pycocotools over all 8 images at once
        part = evaluator.evaluate_part(runner, positions)
        staged = evaluator.evaluate_rest(runner, part)
        # pycocotools over the subset images alone, from a plain prediction of all images.
        subset_ids = [evaluator.image_ids[p] for p in positions]
        subset_reference = evaluator.score(evaluator.predict(runner), image_ids=subset_ids)
    assert full.metrics["mAP50-95"] > 0
    assert staged.metrics == full.metrics and staged.per_class == full.per_class and staged.count == full.count
    assert _matches_equal(staged.per_image, full.per_image)
    assert part.result.metrics == subset_reference.metrics
    assert _matches_equal(part.result.per_image, subset_reference.per_image)
    assert _matches_equal(evaluator.per_image_subset(full.per_image, positions), part.result.per_image)


# --------------------------------------------------------------------------- end to end
def test_digits_study_stops_certainly_infeasible_trials_early(tmp_path: Path) -> None:
    max_drop = 1.0
    settings = merge_settings({}, {
        "example": "digits", "out": tmp_path / "run", "budget": 2, "precisions": ["int8", "fp32"],
        "algorithms": ["minmax", "percentile"], "percentiles": [1.0], "sample_counts": [64], "max_drop": max_drop,
        "fidelity_subset": 200, "timing_max_seconds": 0.3, "verify": False,
        "sampler": "tpe", "search": "full",  # exactly the enqueued trials: no sensitivity seeds or probes' share
    }, None)
    ctx = prepare(settings)
    assert ctx.pipeline.subset is not None and len(ctx.pipeline.subset.positions) == 200
    study = open_study(ctx)
    enqueue_baselines(ctx, study)  # FP32 first: the subset decision compares with it
    # Clipping every activation at the 1st percentile of |x| wipes the classifier out: certainly infeasible.
    destructive = CalibrationChoice(CalibrationAlgorithm.PERCENTILE, 64, 1.0)
    layers = list(ctx.space.layers)
    configs = [
        TrialConfig({n: Precision.FP32 if n == keep else Precision.INT8 for n in layers}, destructive)
        for keep in (layers[0], layers[-1])
    ]
    for config in configs:
        study.enqueue_trial(ctx.space.params_for(config))
    run_study(ctx, study=study)  # --isolation process (the default): the snapshot travels with the request
    summary = write_results(ctx, study)

    trials = study.get_trials(deepcopy=False)
    recs = records(study)
    searched = [r for r in recs if r.baseline is None]
    assert [r.precisions for r in searched] == [{k: v.value for k, v in c.precisions.items()} for c in configs]
    assert finished_count(study) == 2  # both stopped trials count against --budget 2, and nothing else ran
    fp32 = next(r for r in recs if r.baseline == "fp32")
    for record in searched:
        trial = trials[record.number]
        assert trial.state == optuna.trial.TrialState.PRUNED and not trial.values
        assert record.stopped_early is not None and record.stopped_early.startswith("stopped early on the subset (infeasible")
        subset = record.subset
        assert subset is not None and subset["images"] == 200 and subset["of"] == 2000
        assert subset["drop_ci95"][0] > max_drop
        assert record.paired is not None and record.paired.speedup is not None  # timed before the subset was scored
        trial_dir = ctx.trials_dir / f"{record.number:04d}"
        assert json.loads((trial_dir / "trial.json").read_text())["status"] == "stopped_early"
        assert not (trial_dir / "deployable.onnx").exists()  # artifacts pruned like any trial not kept

        # Independent check that the stop was right: a plain full evaluation of the same configuration.
        outcome = ctx.pipeline.run(record.config, tmp_path / f"check-{record.number}")
        assert fp32.value - outcome.evaluation.value > max_drop
        on_subset = 100.0 * outcome.evaluation.per_image[ctx.pipeline.subset.positions].mean()
        assert subset["value"] == pytest.approx(on_subset, abs=1e-9)
        assert subset["reference_value"] - subset["value"] == pytest.approx(subset["drop"], abs=1e-9)

    stopped = {r.number for r in searched}
    assert not stopped & {r.number for r in pareto_front(recs)}
    winner = choose_winner(recs, max_drop).record
    assert winner is None or winner.number not in stopped
    report = summary.report.read_text()
    assert "2 stopped early on the subset" in report
    assert all(f"- trial {n}: stopped early on the subset (infeasible" in report for n in stopped)
    assert all(TrialRecord.from_trial(t).stopped_early is None for t in trials if t.state.name == "COMPLETE")


def test_snapshot_takes_predicted_speedups_when_the_study_predicts_latency() -> None:
    """A --profile tensorrt study has no paired speed-up: the domination test uses the predicted one."""
    from sensisearch.study.trial import _accuracy
    from sensisearch.study.trial._fidelity import SnapshotSource, SubsetPlan
    from sensisearch.study.store._record import fp32_per_image_attrs

    resolved = resolve_inputs(StudySettings.from_flat(example="digits"))
    evaluator = build_evaluation(resolved.settings, resolved.input_spec, resolved.model, Path("unused"), False).evaluator
    fp32_correct = np.arange(evaluator.image_count()) % 10 != 0  # a real per-image Top-1 array: 90% correct
    study = optuna.create_study(directions=["maximize", "minimize"])
    for key, value in fp32_per_image_attrs(_accuracy.encode(fp32_correct)).items():
        study.set_user_attr(key, value)
    predicted = {"source": "estimate", "label": "estimated", "unit": "relative cost (FP32 = 1)", "median_ms": 0.4,
                 "reference_ms": 1.0, "speedup": 2.5}
    for number, (baseline, value, latency) in enumerate(
        [("fp32", 90.0, {**predicted, "median_ms": 1.0, "speedup": 1.0}), (None, 89.5, predicted)]
    ):
        record = TrialRecord(number, baseline=baseline, metric="top1", latency=latency)  # type: ignore[arg-type]
        study.add_trial(optuna.trial.create_trial(values=[value, latency["median_ms"]], user_attrs=record.to_attrs()))
    positions = subset_positions(evaluator.image_count(), 100, seed=0)
    settings = StudySettings.from_flat(example="digits", max_drop=1.0)
    source = SnapshotSource(evaluator, SubsetPlan(positions, evaluator.image_count()), settings.acceptance.max_drop,
                            settings.measurement.drop_resamples, settings.search.seed)
    snapshot = source.snapshot(study)
    assert snapshot is not None and snapshot.reference_value == 90.0
    assert sorted((c.number, c.speedup) for c in snapshot.completed) == [(0, 1.0), (1, 2.5)]
    assert np.array_equal(_accuracy.decode(snapshot.reference_subset), fp32_correct[positions])
