"""Confirm the answer on images the search never saw (``--holdout``).

Every trial of a study is scored on the same evaluation images, and the front and
the winner are the best of many trials on them: the images' noise is part of why
they won, so their drops there are optimistic (the winner's curse). Measured on
YOLOv5n (``benchmarks/peers.py``: 40 search images, 98 others): the study's 59/60
answer, +0.17 points on the search images, lost 1.06 [+0.39, +2.44] on the others,
significantly more than all-FP16.

With ``--holdout`` the study keeps some evaluation images back
(:func:`sensisearch.study.config._inputs.hold_out`): trials score on the rest; after the
last trial (and the verify tournament) FP32, the baselines, every front member and
the winner are scored on the held-out images, each drop with its paired bootstrap
CI against FP32 on the same images. A trial whose drop CI there lies wholly above
``--max-drop`` is passed over by :func:`~sensisearch.study.store._results.choose_winner`
(only clear failures: :meth:`~sensisearch.study.store._record.HoldoutScore.fails` says
why), and the next winner is scored in turn, until one holds or none is left. The
winner's held-out figures are reported beside its search ones: with few held-out
images they are wide, and they are the honest ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sensisearch.study.review._verify import DROP_RESAMPLE_FACTOR
from sensisearch.study.store._record import HoldoutScore, TrialRecord, holdout_attrs, read_holdout
from sensisearch.study.store._results import baseline, choose_winner, pareto_front, records
from sensisearch.study.trial import _accuracy

if TYPE_CHECKING:
    import optuna

    from sensisearch.evaluation.base import EvaluationResult, Evaluator
    from sensisearch.study.run._context import StudyContext

log = logging.getLogger(__name__)

MAX_WINNER_ROUNDS = 10
"""Winners scored in turn at most after the front (each one passed over brings the next)."""


@dataclass(frozen=True)
class HoldoutResult:
    """What one confirmation on the held-out images did."""

    scored: tuple[int, ...]
    """Trials scored on the held-out images this time (FP32 first)."""
    images: int
    winner: int | None
    """The winner after the confirmation (None: no trial qualifies)."""
    winner_score: HoldoutScore | None
    passed_over: tuple[int, ...]
    """Trials within ``--max-drop`` on the search images that the held-out images ruled out."""
    seconds: float


def _has_artifact(r: TrialRecord) -> bool:
    return bool(r.artifact) and Path(r.artifact).is_file()  # type: ignore[arg-type]


def _store(study: optuna.Study, scores: dict[int, HoldoutScore]) -> None:
    for key, value in holdout_attrs(scores).items():
        study.set_user_attr(key, value)


def _evaluate(ctx: StudyContext, evaluator: Evaluator, r: TrialRecord) -> EvaluationResult:
    with ctx.backend.load(Path(r.artifact)) as runner:  # type: ignore[arg-type]
        return evaluator.evaluate(runner)


def score_holdout(ctx: StudyContext, study: optuna.Study) -> HoldoutResult | None:
    """Score FP32, the baselines, the front and the winner on the held-out images and store the scores in
    the study; None when the study holds no images out or has no FP32 artifact to pair with."""
    evaluator = ctx.evaluation.holdout
    if evaluator is None:
        return None
    started = time.monotonic()
    max_drop, min_speedup = ctx.settings.acceptance.max_drop, ctx.settings.acceptance.min_speedup
    recs = records(study)
    fp32 = baseline(recs, "fp32")
    if fp32 is None or fp32.state != "COMPLETE" or not _has_artifact(fp32):
        log.warning("holdout: the FP32 baseline's artifact is not here; the held-out images were not scored")
        return None
    # FP32's per-image results on the held-out images: every drop CI pairs with them. Scored again each
    # time (seconds), so a stored score whose FP32 differs (another machine, another build) is redone.
    reference = _evaluate(ctx, evaluator, fp32)
    resamples = int(DROP_RESAMPLE_FACTOR * ctx.settings.measurement.drop_resamples)
    bootstrap = None if reference.per_image is None else _accuracy.drop_bootstrap(
        reference.per_image, reference.metric, resamples, ctx.settings.search.seed)
    scores = {n: s for n, s in read_holdout(study.user_attrs).items() if s.reference_value == reference.value}
    scored: list[int] = []

    def score(r: TrialRecord) -> None:
        result = reference if r.number == fp32.number else _evaluate(ctx, evaluator, r)
        estimate = None if bootstrap is None or result.per_image is None else _accuracy.estimate_with(
            bootstrap, result.per_image, result.metric)
        scores[r.number] = HoldoutScore(result.value, reference.value, result.count, None if estimate is None else estimate.ci95)
        scored.append(r.number)
        log.info("holdout: trial %d %s %.2f on %d held-out images (FP32 %.2f)", r.number, result.metric, result.value,
                 result.count, reference.value)

    first = [fp32, *(b for b in (baseline(recs, name) for name in ("int8", "fp16")) if b is not None),
             *pareto_front(recs)]
    for r in first:
        if r.number not in scores and r.state == "COMPLETE" and _has_artifact(r):
            score(r)
    _store(study, scores)
    for _ in range(MAX_WINNER_ROUNDS):
        winner = choose_winner(records(study), max_drop, min_speedup).record
        if winner is None or winner.number in scores:
            break
        if not _has_artifact(winner):
            log.warning("holdout: trial %d's artifact is not here, so the winner is not scored on the held-out images; "
                        "run the study again to rebuild it", winner.number)
            break
        score(winner)
        _store(study, scores)
    choice = choose_winner(records(study), max_drop, min_speedup)
    winner = choice.record
    return HoldoutResult(
        tuple(scored), int(evaluator.image_count() or 0), None if winner is None else winner.number,
        None if winner is None else winner.holdout, choice.passed_over, time.monotonic() - started,
    )
