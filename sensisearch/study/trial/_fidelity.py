"""Multi-fidelity: score a trial on a fixed subset of the evaluation set first, stop it when it is clearly out.

A searched trial is built and timed as usual; its evaluation then scores a fixed,
deterministic subset of the images first (``--fidelity-subset``: the same images
for every trial and for FP32). With FP32's per-image results on those images it
gets the drop on the subset and its paired bootstrap 95% CI, and
:func:`early_stop_decision` stops the trial (Optuna state PRUNED) when

- the CI lies entirely above ``--max-drop``: clearly infeasible; or
- a completed trial is at least as fast as this trial's speed-up CI upper bound
  and more accurate than this trial's accuracy upper bound (the subset drop's CI
  lower bound, translated to the full set through FP32's full-set value): clearly dominated.

Otherwise the evaluation goes on with the other images only, and the result is
exactly a full evaluation's (:meth:`~sensisearch.evaluation.base.Evaluator.evaluate_rest`).

Where the decision is made: in the process that evaluates (the trial child under
``--isolation process``), from an :class:`EarlyStopSnapshot` the worker takes
from the storage just before the trial and sends with the trial request. The
child cannot open the storage (see :mod:`sensisearch.study.run._trial_server`), and a
round trip to the worker between the two halves would add a protocol state for no
gain: trials completed while this one builds are only missing evidence, so a
decision from the snapshot is never wrong, at most less eager.

How the sampler sees a stopped trial: Optuna 5's TPE sampler takes PRUNED trials
into its good/bad split (``optuna/samplers/_tpe/sampler.py``, ``_split_trials``).
Without intermediate values (``Trial.report`` is refused in multi-objective
studies, so we report none) a pruned trial scores ``(1, 0.0)`` in
``_get_pruned_trial_score``: it ranks after every complete trial, so it goes to
the "above" (bad) group unless fewer complete trials exist than the good group
needs. So TPE does learn from a stopped trial: as an example of where not to
propose. (Random search ignores it; NSGA-II uses complete trials only.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from sensisearch.errors import SensisearchError
from sensisearch.evaluation.base import images_requested
from sensisearch.study.trial import _accuracy
from sensisearch.study.store._record import TrialRecord, read_fp32_per_image
from sensisearch.study.store._timing import PairedTiming

if TYPE_CHECKING:
    import optuna

    from sensisearch.backends.base import Runner
    from sensisearch.evaluation.base import EvaluationResult, Evaluator
    from sensisearch.study.trial._pipeline import TrialOutcome
    from sensisearch.study.config._settings import StudySettings

log = logging.getLogger(__name__)

# Off unless asked for: measured with benchmarks/multi_fidelity.py (YOLOv5n, TensorRT profile, 85 images,
# 12 trials, a quarter first) no trial was stopped and evaluation took 1.58x as long (the subset's own
# scoring and its bootstrap CI come on top of the full evaluation). It pays only when many proposals are
# clearly infeasible or dominated, e.g. wide searches with destructive calibration choices.
INFEASIBLE = "infeasible"
DOMINATED = "dominated"
STOPPED_PREFIX = "stopped early on the subset"


# --------------------------------------------------------------------------- the subset
def subset_size(requested: float | None, task: str, total: int | None) -> int | None:
    """Images scored first, or None when the study evaluates every image at once.

    ``requested``: None or 0 (off, the default), a fraction below 1, or a count. ``total``: the evaluator's images (None: it cannot split).
    """
    if requested is None or requested == 0:
        return None
    if total is None:
        raise SensisearchError(
            f"--fidelity-subset {requested:g}: this evaluator scores only all images at once (a user's --evaluator); "
            "leave --fidelity-subset out or set it to 0"
        )
    size = images_requested(requested, total)
    if size >= total:
        raise SensisearchError(
            f"--fidelity-subset {requested:g}: must be fewer than the {total} evaluation images "
            "(a count or a fraction such as 0.25; 0 turns it off)"
        )
    return size


def subset_positions(total: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct positions of ``total`` images, sorted; the same for every trial of a study.

    Drawn at random (seeded) rather than the first images: evaluation sets are
    often ordered (ImageFolder by class), and the subset should look like the whole.
    """
    if not 0 < size <= total:
        raise ValueError(f"subset size {size} must be in 1..{total}")
    return np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False)).astype(np.int64)


@dataclass(frozen=True, eq=False)
class SubsetPlan:
    """The fixed evaluation subset of a study."""

    positions: np.ndarray
    """Sorted positions in the evaluator's image order."""
    total: int


def subset_plan(settings: StudySettings, evaluator: Evaluator, task: str) -> SubsetPlan | None:
    """The study's subset (None: every trial evaluates all images at once)."""
    total = evaluator.image_count()
    size = subset_size(settings.search.fidelity_subset, task, total)
    if size is None or total is None:
        return None
    return SubsetPlan(subset_positions(total, size, settings.search.seed), total)


# --------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class CompletedTrial:
    """A complete, feasible trial as the decision sees it."""

    number: int
    speedup: float
    """Its in-study speed-up vs FP32, paired or predicted (higher is faster)."""
    value: float
    """Its metric on the full evaluation set (points)."""


@dataclass(frozen=True)
class StopDecision:
    reason: str
    """:data:`INFEASIBLE` or :data:`DOMINATED`."""
    detail: str
    dominated_by: int | None = None

    @property
    def text(self) -> str:
        """What the trial record, the progress line and the report say."""
        return f"{STOPPED_PREFIX} ({self.reason}: {self.detail})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StopDecision:
        by = data.get("dominated_by")
        return cls(str(data["reason"]), str(data["detail"]), None if by is None else int(by))


def early_stop_decision(
    drop_ci95: tuple[float, float],
    *,
    max_drop: float,
    reference_value: float,
    speedup_upper: float | None,
    completed: Sequence[CompletedTrial],
    baseline: bool = False,
) -> StopDecision | None:
    """Whether a trial is already clearly out after the subset; None: evaluate the rest.

    ``drop_ci95``: paired bootstrap 95% CI of FP32 minus this trial on the subset (points).
    ``reference_value``: FP32's metric on the full set, which turns the CI's lower
    bound into this trial's best plausible full-set value. ``speedup_upper``: the
    upper bound of its speed-up CI (None: no domination test). Baselines never stop.
    """
    if baseline:
        return None
    low, high = float(drop_ci95[0]), float(drop_ci95[1])
    if low > max_drop:
        return StopDecision(
            INFEASIBLE, f"drop 95% CI {low:.2f} to {high:.2f} points on the subset lies above --max-drop {max_drop:g}"
        )
    if speedup_upper is None:
        return None
    best_value = reference_value - low
    faster = [c for c in completed if c.speedup >= speedup_upper and c.value > best_value]
    if not faster:
        return None
    by = max(faster, key=lambda c: (c.value, c.speedup))
    return StopDecision(
        DOMINATED,
        f"trial {by.number} is at least as fast ({by.speedup:.2f}x vs this trial's CI upper bound {speedup_upper:.2f}x) "
        f"and more accurate ({by.value:.2f} vs this trial's upper bound {best_value:.2f})",
        by.number,
    )


# --------------------------------------------------------------------------- what the worker sends
@dataclass(frozen=True)
class EarlyStopSnapshot:
    """What the decision needs from the storage, taken by the worker just before the trial (JSON-safe)."""

    reference_subset: str
    """FP32's per-image results on the subset images (``_accuracy.encode``)."""
    reference_value: float
    """FP32's metric on the full set."""
    completed: tuple[CompletedTrial, ...]
    max_drop: float
    resamples: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "completed": [asdict(c) for c in self.completed]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EarlyStopSnapshot:
        completed = tuple(CompletedTrial(int(c["number"]), float(c["speedup"]), float(c["value"])) for c in data["completed"])
        return cls(
            reference_subset=str(data["reference_subset"]), reference_value=float(data["reference_value"]),
            completed=completed, max_drop=float(data["max_drop"]), resamples=int(data["resamples"]), seed=int(data["seed"]),
        )


class SnapshotSource:
    """Builds each searched trial's :class:`EarlyStopSnapshot` in the worker (one per objective, no global state)."""

    def __init__(self, evaluator: Evaluator, plan: SubsetPlan, max_drop: float, resamples: int, seed: int) -> None:
        self.evaluator = evaluator
        self.plan = plan
        self.max_drop = max_drop
        self.resamples = resamples
        self.seed = seed
        self._encoded_fp32: str | None = None
        self._subset_fp32: str | None = None

    def _reference_subset(self, encoded: str) -> str:
        # FP32's results never change once stored: restrict them to the subset once.
        if encoded != self._encoded_fp32:
            full = _accuracy.decode(encoded)
            self._subset_fp32 = _accuracy.encode(self.evaluator.per_image_subset(full, self.plan.positions))
            self._encoded_fp32 = encoded
        assert self._subset_fp32 is not None
        return self._subset_fp32

    def snapshot(self, study: optuna.Study) -> EarlyStopSnapshot | None:
        """None until the FP32 baseline has stored its per-image results (then the trial evaluates everything)."""
        import optuna

        encoded = read_fp32_per_image(study.user_attrs)
        if encoded is None:
            return None
        fp32_value: float | None = None
        completed: list[CompletedTrial] = []
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            record = TrialRecord.from_trial(t)
            if record.baseline == "fp32" and fp32_value is None:
                fp32_value = record.value
            # In-study speed-up: paired, or predicted when the study's latency is (latency away from the target).
            if record.feasible and record.value is not None and record.in_study_speedup is not None:
                completed.append(CompletedTrial(t.number, float(record.in_study_speedup), float(record.value)))
        if fp32_value is None:
            return None
        return EarlyStopSnapshot(
            self._reference_subset(encoded), fp32_value, tuple(completed), self.max_drop, self.resamples, self.seed,
        )


# --------------------------------------------------------------------------- in the evaluating process
@dataclass(frozen=True)
class SubsetFigures:
    """A trial's figures on the subset (``TrialRecord.subset``)."""

    images: int
    of: int
    value: float
    reference_value: float
    """FP32 on the same images."""
    drop: float
    drop_ci95: tuple[float, float] | None
    """Paired bootstrap 95% CI of the drop on the subset; None when the point estimate already ruled a stop out."""
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop_ci95": None if self.drop_ci95 is None else list(self.drop_ci95)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubsetFigures:
        ci = data.get("drop_ci95")
        return cls(
            images=int(data["images"]), of=int(data["of"]), value=float(data["value"]),
            reference_value=float(data["reference_value"]), drop=float(data["drop"]),
            drop_ci95=None if ci is None else (float(ci[0]), float(ci[1])), seconds=float(data["seconds"]),
        )


@dataclass(frozen=True)
class StagedEvaluation:
    evaluation: EvaluationResult
    """The full-set result, or the subset's when the trial was stopped."""
    subset: SubsetFigures | None
    stop: StopDecision | None


def evaluate_staged(
    evaluator: Evaluator, runner: Runner, plan: SubsetPlan, snapshot: EarlyStopSnapshot, speedup_upper: float | None
) -> StagedEvaluation:
    """The subset, the decision, then (unless stopped) the rest: no image is run twice."""
    started = time.perf_counter()
    part = evaluator.evaluate_part(runner, plan.positions)
    reference = _accuracy.decode(snapshot.reference_subset)
    candidate = part.result.per_image
    metric = part.result.metric
    metric_fn = _accuracy.metric_function(metric, reference)
    if candidate is None or metric_fn is None or type(candidate) is not type(reference) or len(candidate) != len(reference):
        return StagedEvaluation(evaluator.evaluate_rest(runner, part), None, None)  # nothing to pair: no decision

    def decide(ci95: tuple[float, float]) -> StopDecision | None:
        return early_stop_decision(
            ci95, max_drop=snapshot.max_drop, reference_value=snapshot.reference_value,
            speedup_upper=speedup_upper, completed=snapshot.completed,
        )

    reference_value = float(metric_fn(reference, None))
    drop = reference_value - float(metric_fn(candidate, None))
    ci95: tuple[float, float] | None = None
    stop = None
    # The bootstrap (hundreds of mAP re-accumulations for a detector) only when it can matter: a CI whose
    # lower bound is at most the point estimate stops a trial only if the point estimate itself would.
    if decide((drop, drop)) is not None:
        estimate = _accuracy.drop_estimate(reference, candidate, metric, snapshot.resamples, seed=snapshot.seed)
        if estimate is not None:
            ci95 = estimate.ci95
            stop = decide(ci95)
    figures = SubsetFigures(
        images=len(plan.positions), of=plan.total, value=part.result.value, reference_value=reference_value,
        drop=drop, drop_ci95=ci95, seconds=time.perf_counter() - started,
    )
    if stop is not None:
        log.info("%s", stop.text)
        return StagedEvaluation(part.result, figures, stop)
    return StagedEvaluation(evaluator.evaluate_rest(runner, part), figures, None)


# --------------------------------------------------------------------------- the stopped trial's record
def stopped_record(
    number: int, outcome: TrialOutcome, *, config_key: str, role: str, trial_json: str, host: str | None, device: str | None
) -> TrialRecord:
    """The record of a trial stopped after the subset: why, its subset figures and its timing; no metric value."""
    assert outcome.early_stop is not None
    return TrialRecord(
        number,
        config=outcome.config,
        config_key=config_key,
        role=role,
        latency=outcome.latency_record or outcome.latency.to_dict(),  # type: ignore[arg-type]
        paired=None if outcome.paired is None else PairedTiming.of(outcome.paired, outcome.timing_facts),
        artifact=str(outcome.build.artifact),
        deployable=str(outcome.deployable),
        trial_json=trial_json,
        layer_precisions=dict(outcome.build.layer_precisions),
        timings=dict(outcome.timings),
        host=host,
        device=device,
        subset=None if outcome.subset is None else outcome.subset.to_dict(),
        stopped_early=outcome.early_stop.text,
    )
