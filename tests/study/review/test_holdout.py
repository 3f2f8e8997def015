"""Held-out confirmation (``--holdout``): trials score on the search images, the answer is checked on the others.

The split and the subset evaluator are checked against the full evaluation (a trial's
Top-1 on the search images and on the held-out ones must add up to its Top-1 on all
images, scored by ``sensisearch evaluate``'s path, which knows nothing of the split);
the winner rule on constructed records; and a whole digits study end to end.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import optuna
import pytest

from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
from sensisearch.errors import SensisearchError
from sensisearch.evaluation.base import ImageSubset, holdout_positions
from sensisearch.study import StudySettings, evaluate_model, open_study, prepare, run_study, score_holdout, write_results
from sensisearch.study.config._inputs import build_evaluation, hold_out, resolve_inputs
from sensisearch.study.config._settings import merge_settings
from sensisearch.study.store._record import HoldoutScore, holdout_attrs
from sensisearch.study.store._results import baseline, choose_winner, pareto_front, records


# --------------------------------------------------------------------------- the split
def test_holdout_positions_are_a_deterministic_disjoint_cover() -> None:
    search, held = holdout_positions(100, 30, seed=0)
    assert len(held) == 30 and len(search) == 70
    assert not set(search) & set(held) and sorted([*search, *held]) == list(range(100))
    assert np.array_equal(held, holdout_positions(100, 30, seed=0)[1])
    assert not np.array_equal(held, holdout_positions(100, 30, seed=1)[1])
    # Not simply the first or the last images: evaluation sets are often ordered by class.
    assert held.min() < 50 < held.max()
    with pytest.raises(ValueError):
        holdout_positions(10, 10, seed=0)


def test_image_subset_scores_exactly_its_images_of_the_full_evaluation() -> None:
    resolved = resolve_inputs(StudySettings.from_flat(example="digits"))
    evaluator = build_evaluation(resolved.settings, resolved.input_spec, resolved.model, Path("unused"), False).evaluator
    search, held = holdout_positions(evaluator.image_count(), 500, seed=0)
    with OnnxRuntimeBackend().load(resolved.model_path) as runner:
        full = evaluator.evaluate(runner)
        on_held = ImageSubset(evaluator, held, "holdout").evaluate(runner)
        searched = ImageSubset(evaluator, search, "search")
        on_search = searched.evaluate(runner)
        # Positions given to the subset are its own: 0..n-1 of the search images.
        part = searched.evaluate_part(runner, [0, 2, 5])
    assert on_held.count == 500 and on_search.count == full.count - 500
    assert np.array_equal(on_held.per_image, full.per_image[held])
    assert np.array_equal(on_search.per_image, full.per_image[search])
    assert on_held.value == pytest.approx(100.0 * full.per_image[held].mean(), abs=1e-12)
    assert np.array_equal(part.result.per_image, full.per_image[search[[0, 2, 5]]])
    assert searched.describe()["images"] == full.count - 500


def test_holdout_is_refused_with_one_line_where_it_cannot_split() -> None:
    with pytest.raises(SensisearchError, match="--holdout 2.5: a number of images must be whole"):
        merge_settings({}, {"example": "digits", "holdout": 2.5}, None)
    with pytest.raises(SensisearchError, match="--holdout -1"):
        merge_settings({}, {"example": "digits", "holdout": -1}, None)
    resolved = resolve_inputs(StudySettings.from_flat(example="digits"))
    evaluation = build_evaluation(resolved.settings, resolved.input_spec, resolved.model, Path("unused"), False)
    with pytest.raises(SensisearchError, match="--holdout 1999: would hold out 1999 of the 2000"):
        hold_out(evaluation, 1999, seed=0)
    assert hold_out(evaluation, 0, seed=0) is evaluation  # 0 turns it off


def test_holdout_and_fidelity_subset_together_are_refused(tmp_path: Path) -> None:
    settings = merge_settings({}, {"example": "digits", "out": tmp_path / "run", "holdout": 0.3, "fidelity_subset": 0.25}, None)
    with pytest.raises(SensisearchError, match="--fidelity-subset with --holdout"):
        prepare(settings)


# --------------------------------------------------------------------------- the winner rule
def _study() -> optuna.Study:
    """FP32 99.0 @ 10 ms; trial 1 98.6 @ 3 ms; trial 2 98.3 @ 4 ms; trial 3 97.0 @ 2 ms (out of max_drop 1.0)."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    config = {"precisions": {}, "calibration": {"algorithm": "minmax", "samples": 64, "percentile": 99.99}}
    for i, (value, ms) in enumerate([(99.0, 10.0), (98.6, 3.0), (98.3, 4.0), (97.0, 2.0)]):
        attrs = {"latency": {"median_ms": ms}, "metric": "top1", "config": config, **({"baseline": "fp32"} if i == 0 else {})}
        study.add_trial(optuna.trial.create_trial(values=[value, ms], user_attrs=attrs))
    return study


def _scores(study: optuna.Study, scores: dict[int, HoldoutScore]) -> None:
    for key, value in holdout_attrs(scores).items():
        study.set_user_attr(key, value)


def test_only_a_winner_clearly_beyond_max_drop_on_the_held_out_images_is_passed_over() -> None:
    study = _study()
    assert choose_winner(records(study), max_drop=1.0).record.number == 1  # by the search images alone
    fp32 = HoldoutScore(95.0, 95.0, 300)
    # Trial 1 loses 1.4 points on the held-out images, but its CI reaches below --max-drop: it may be noise.
    _scores(study, {0: fp32, 1: HoldoutScore(93.6, 95.0, 300, (0.8, 2.0))})
    choice = choose_winner(records(study), max_drop=1.0)
    assert choice.qualified and choice.record.number == 1
    assert "held-out drop 1.40 [0.80, 2.00] on 300 images" in choice.reason and "passed over" not in choice.reason
    # Its whole CI above --max-drop: passed over; trial 2, not scored there yet, may win (and is scored next).
    _scores(study, {0: fp32, 1: HoldoutScore(93.6, 95.0, 300, (1.1, 2.0))})
    choice = choose_winner(records(study), max_drop=1.0)
    assert choice.qualified and choice.record.number == 2
    assert "passed over for their held-out drop: trial 1 (1.40)" in choice.reason
    _scores(study, {0: fp32, 1: HoldoutScore(93.6, 95.0, 300, (1.1, 2.0)), 2: HoldoutScore(94.5, 95.0, 300, (-0.1, 1.1))})
    choice = choose_winner(records(study), max_drop=1.0)
    assert choice.record.number == 2 and "held-out drop 0.50 [-0.10, 1.10] on 300 images" in choice.reason
    # Without a CI (a metric with no per-image form) the point estimate decides. Nothing holds: best-effort,
    # and the reason says which trials the held-out images ruled out.
    _scores(study, {1: HoldoutScore(93.6, 95.0, 300), 2: HoldoutScore(93.0, 95.0, 300)})
    choice = choose_winner(records(study), max_drop=1.0)
    assert not choice.qualified and "trial 1 (1.40), 2 (2.00)" in choice.reason


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_digits_study_confirms_its_answer_on_held_out_images(tmp_path: Path) -> None:
    settings = merge_settings({}, {
        "example": "digits", "out": tmp_path / "run", "budget": 3, "precisions": ["int8", "fp32"],
        "algorithms": ["minmax", "mse"], "sample_counts": [64], "holdout": 0.3, "timing_max_seconds": 0.3,
        "verify": False, "sampler": "tpe", "search": "full",
    }, None)
    ctx = prepare(settings)
    assert ctx.evaluation.holdout is not None and ctx.evaluation.holdout.image_count() == 600
    assert ctx.evaluator.image_count() == 1400
    study = run_study(ctx, study=open_study(ctx))
    summary = write_results(ctx, study)

    recs = records(study)
    fp32 = baseline(recs, "fp32")
    winner = summary.winner.record
    assert fp32 is not None and winner is not None and fp32.holdout is not None and winner.holdout is not None
    expected = {fp32.number, winner.number, *(r.number for r in pareto_front(recs))}
    int8 = baseline(recs, "int8")
    if int8 is not None:
        expected.add(int8.number)
    assert expected <= {r.number for r in recs if r.holdout is not None}
    assert summary.holdout is not None and set(summary.holdout.scored) >= expected
    # Independent check: the search images' and the held-out images' Top-1 add up to the full set's, scored
    # by `sensisearch evaluate` on the trial's deployable ONNX (a plain evaluation of all 2000 images).
    for r in (fp32, winner):
        full = evaluate_model(StudySettings.from_flat(example="digits", model=Path(r.deployable)))
        assert full["images"] == 2000
        assert (1400 * r.value + 600 * r.holdout.value) / 2000 == pytest.approx(full["top1"], abs=1e-9)
        assert r.holdout.reference_value == pytest.approx(fp32.holdout.value, abs=1e-12)
    if winner.number != fp32.number:
        lo, hi = winner.holdout.drop_ci95
        assert lo <= winner.holdout.drop <= hi
    config = json.loads((summary.winner_dir / "config.json").read_text())
    assert config["holdout"]["images"] == 600 and config["holdout"]["value"] == pytest.approx(winner.holdout.value)
    assert "held-out images the search never saw" in summary.report.read_text()
    page = html.unescape((ctx.out / "report.html").read_text())
    assert f"On the 600 held-out images the search never saw: change vs FP32 {-winner.holdout.drop:+.3f}" in page
    assert "held-out change [95% CI] (600 images)" in page and "Accuracy resolution: on these 1400 evaluation images" in page

    # A winner that clearly fails on the held-out images is passed over, and the next one is scored in turn.
    first, reference = winner.number, fp32.holdout.value
    kept = {fp32.number: fp32.holdout, first: HoldoutScore(reference - 50.0, reference, 600, (40.0, 60.0))}
    _scores(study, kept)  # every other score forgotten: whichever trial wins next must be scored by the loop
    again = score_holdout(ctx, study)
    assert again is not None and first in again.passed_over and again.winner not in (None, first)
    after = choose_winner(records(study), ctx.settings.acceptance.max_drop, ctx.settings.acceptance.min_speedup)
    assert after.record.number == again.winner and again.winner in again.scored
    assert after.record.holdout is not None and after.record.holdout.images == 600
    assert f"passed over for their held-out drop: trial {first} (50.00)" in after.reason

    # The split is part of the study's identity: another --holdout into the same study is refused.
    with pytest.raises(SensisearchError, match="holds another experiment"):
        prepare(settings.replace(holdout=0.2))


# --------------------------------------------------------------------------- how finely the images resolve a drop
def test_the_report_says_when_max_drop_is_finer_than_the_images_resolve() -> None:
    from sensisearch.study import TrialRecord, accuracy_resolution_line

    recs = [
        TrialRecord(0, "COMPLETE", 99.0, baseline="fp32", drop_ci95=[0.0, 0.0]),  # baselines do not count
        TrialRecord(1, "COMPLETE", 98.0, drop_ci95=[0.0, 2.0]),  # half-widths 1.0, 1.5, 2.0: median 1.5
        TrialRecord(2, "COMPLETE", 98.0, drop_ci95=[-1.0, 2.0]),
        TrialRecord(3, "COMPLETE", 98.0, drop_ci95=[-2.0, 2.0]),
        TrialRecord(4, "FAIL", None, drop_ci95=[-9.0, 9.0]),
    ]
    coarse = accuracy_resolution_line(recs, max_drop=0.5, images=40)
    assert coarse is not None and "known to +-1.50 points (median 95% CI half-width over 3 trials)" in coarse
    # The half-width falls as 1/sqrt(images): 40 x (1.5 / 0.5)^2 images resolve 0.5 points.
    assert "coarser than --max-drop 0.5" in coarse and "about 360 images would resolve it" in coarse
    fine = accuracy_resolution_line(recs, max_drop=2.0, images=40)
    assert fine is not None and fine.endswith("finer than --max-drop 2.")
    assert accuracy_resolution_line(recs[:1], max_drop=0.5, images=40) is None  # nothing searched yet
