"""The guided search (the default): from the sensitivity ranking to the accuracy bound, then around the front.

Measured on YOLOv5n (benchmarks/search_quality.py), TPE over every layer reaches
80% of the reference hypervolume in 50 trials, TPE after the sensitivity seeds
93%, seeds + fusion groups 96%, and a plain greedy revert from the ranking 98%:
the answer is almost always "all-INT8 minus a few sensitive groups", so the
search spends its first trials finding that boundary directly and only then
lets a sampler explore. The phases, each decided from the study's trials alone
(so a resumed study or a second worker continues instead of restarting):

1. **seeds** (enqueued, :mod:`~sensisearch.study.run._seeding`): all-INT8 under
   every calibration algorithm, and the ranking's seeds;
2. **boundary**: bisection over k for "all-INT8 minus the top-k groups" between
   the smallest k known to keep ``max_drop`` and the largest k below it known to break it;
3. **greedy**: from that boundary, each float group (least sensitive first) is
   put back to INT8 while the drop stays within ``max_drop``;
3b. **speed**: from the greedy answer, each group that is *faster in float* (its
   INT8 kernels are slower: :func:`~sensisearch.study.search._sensitivity.faster_in_float`
   from the timed probes, or the latency predictor) is put back to float while the
   result stays within the bound, largest gain first, at most :data:`SPEED_SHARE`
   of the budget. A ranking by accuracy proposes these by chance only: the MNIST
   CNN's first conv runs slower in INT8 (its probe: 1.14x over all-INT8 with it in
   float, CI 1.11-1.16), and a study whose ranking put it last never tried
   "all-INT8 but it", the fastest configuration. These trials join the verify
   tournament whatever their own timing said (:func:`speed_trials`);
4. **sampler**: multi-objective TPE over the most sensitive groups (at least
   :data:`SAMPLER_FREE_UNITS`, and twice the boundary's), the others held INT8 (or in
   float, where the speed walk kept them there); its
   history already holds the boundary and the greedy walk (it is "seeded" with them);
5. **local**: each feasible front member with one group flipped (INT8 <-> float),
   fastest member and most sensitive group first; when no neighbour is left, the sampler again.

Each trial records its phase (system attribute ``guided_phase``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution

from sensisearch.quantize.config import CalibrationChoice, Precision
from sensisearch.study.search._budget import TrialSeededSampler
from sensisearch.study.search._space import ALGORITHM, BIAS, GROUP_PREFIX, LAYER_PREFIX, PERCENTILE, SAMPLES, SearchSpace

if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial

    from sensisearch.latency import LatencyPredictor

log = logging.getLogger(__name__)

PHASE_ATTR = "guided_phase"
BOUNDARY, GREEDY, SPEED, SAMPLER, LOCAL = "boundary", "greedy", "speed", "sampler", "local"
LOCAL_SHARE = 0.25
"""Fraction of the searched budget kept for the local search around the front."""
SPEED_SHARE = 0.2
"""At most this fraction of the searched budget (and at least one trial) goes to the speed phase: where INT8
is slower nearly everywhere (YOLOv5n on a CPU without VNNI), every group is faster in float."""
MIN_PREDICTED_GAIN = 0.01
"""A latency predictor's figure has no noise: a group is faster in float when it predicts at least this gain."""
SAMPLER_FREE_UNITS = 8
"""The sampler chooses among the most sensitive units only, at least this many (and twice the boundary's);
the others stay INT8. Over every unit, multi-objective TPE spent YOLOv5n's sampler trials on nearly-FP32
configurations (0-2 of 41 groups INT8) that no one deploys: the ranking already says those units are safe in INT8."""


def competitive_algorithms(all_int8: Sequence[tuple[float, str]], max_drop: float) -> tuple[str, ...]:
    """Calibration algorithms whose all-INT8 metric is within ``max_drop`` of the best one's, best first.

    The seeds evaluate all-INT8 under every offered algorithm; one that loses more than the
    accuracy bound there (YOLOv5n: entropy 27.7 against MSE 36.9 mAP) cannot give a configuration
    the study keeps, yet TPE, with a handful of observations, kept proposing it.
    """
    best: dict[str, float] = {}
    for value, algorithm in all_int8:
        best[algorithm] = max(value, best.get(algorithm, float("-inf")))
    if not best:
        return ()
    top = max(best.values())
    return tuple(sorted((a for a, v in best.items() if v >= top - max_drop), key=lambda a: -best[a]))


def sampler_free_units(units: int, boundary: int) -> int:
    """How many of the most sensitive units the sampler may keep in float (the rest are held INT8)."""
    return min(units, max(SAMPLER_FREE_UNITS, 2 * boundary))


# --------------------------------------------------------------------------- pure: the boundary
@dataclass(frozen=True)
class Evaluated:
    """One evaluated configuration as the plan sees it: which units are float, its metric (None: pending or failed)."""

    floats: frozenset[int]
    """Positions in the ranked units that are not INT8."""
    value: float | None
    latency: float | None = None


def boundary_next(values: Mapping[int, float | None], units: int, threshold: float) -> int | None:
    """The next k to evaluate in the bisection, or None when the boundary is known (:func:`boundary_k`).

    ``values[k]``: the metric of "all-INT8 minus the top-k units" (None while pending);
    ``threshold``: the lowest acceptable metric (FP32 minus ``max_drop``). k = 0 is
    all-INT8 (a baseline), k = ``units`` is all-float (feasible by definition).
    Assumes feasibility is monotone in k, which the ranking makes nearly so;
    where it is not, the greedy phase after it corrects.
    """
    lo, hi = _bracket(values, units, threshold)
    if hi - lo <= 1:
        return None
    mid = (lo + hi) // 2
    if mid in values:  # pending: nothing to decide from yet
        return None
    return mid


def boundary_k(values: Mapping[int, float | None], units: int, threshold: float) -> int:
    """The smallest k known to be feasible (the largest k known to be infeasible lies below it)."""
    return _bracket(values, units, threshold)[1]


def _bracket(values: Mapping[int, float | None], units: int, threshold: float) -> tuple[int, int]:
    """(largest infeasible k below ``hi``, ``hi`` = the smallest feasible k).

    Where evaluation noise breaks monotonicity (a k infeasible above a feasible one:
    YOLOv5n on 40 images put "all-INT8 minus the top 8 groups" below the bound and
    all-INT8 within it), the feasible one stands: the walk aims at the most INT8 that
    meets the bound, instead of bisecting toward all-float above a noisy failure.
    """
    feasible = [k for k, v in values.items() if v is not None and v >= threshold]
    hi = min(feasible, default=units)
    lo = max((k for k, v in values.items() if v is not None and v < threshold and k < hi), default=-1)
    return lo, hi


def find_boundary(
    evaluate: Callable[[int], float], units: int, threshold: float, known: Mapping[int, float] | None = None
) -> tuple[int, dict[int, float]]:
    """The bisection run to its end with ``evaluate(k)`` (the metric of all-INT8 minus the top-k units).

    Returns the boundary k and every value evaluated (``known`` included). What the
    study does one trial at a time; benchmarks and tests call it directly.
    """
    values: dict[int, float] = dict(known or {})
    if 0 not in values:
        values[0] = evaluate(0)
    while (k := boundary_next(values, units, threshold)) is not None:
        values[k] = evaluate(k)
    return boundary_k(values, units, threshold), values


def greedy_next(
    start: frozenset[int], known: Mapping[frozenset[int], float | None], threshold: float
) -> tuple[frozenset[int] | None, frozenset[int]]:
    """The greedy revert replayed from the history: (next float set to evaluate or None, the current feasible set).

    From ``start`` each float unit, least sensitive (highest position) first, is put
    back to INT8; the change is kept when the result stays at or above ``threshold``.
    """
    current = start
    for unit in sorted(start, reverse=True):
        candidate = current - {unit}
        if not candidate and candidate not in known:
            continue  # all-INT8 is a baseline, evaluated already
        if candidate not in known:
            return candidate, current
        value = known[candidate]
        if value is None:
            return None, current  # pending (another worker): wait for it by sampling meanwhile
        if value >= threshold:
            current = candidate
    return None, current


def speed_next(
    start: frozenset[int], faster: Sequence[int], known: Mapping[frozenset[int], float | None], threshold: float,
) -> tuple[frozenset[int] | None, frozenset[int]]:
    """The speed walk replayed from the history: (next float set to evaluate or None, the current answer).

    From ``start`` (the greedy answer) each unit of ``faster`` (faster in float, largest gain first)
    goes back to float; the change is kept when the result stays at or above ``threshold``.

    Kept on accuracy alone, not on the trials' latencies: those are each timed against FP32 at
    their own moment, and on the 2-core machine such separate figures contradicted a direct
    comparison by more than the gain (MNIST CNN: the first conv in float and all-INT8, each timed
    with FP32, read 2.25x against 2.53x, while interleaved together the first read 1.14x faster;
    one all-INT8 class read 2.54x in a study and 2.06x in its verify tournament).
    The verify tournament times these trials together with all-INT8 (:func:`speed_trials`).
    """
    current = start
    for unit in faster:
        if unit in current:
            continue
        candidate = current | {unit}
        if candidate not in known:
            return candidate, current
        value = known[candidate]
        if value is None:
            return None, current  # pending (another worker)
        if value >= threshold:
            current = candidate
    return None, current


def speed_trials(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the trials the speed walk proposed: the verify tournament times them beside the front."""
    return {t.number for t in trials if t.system_attrs.get(PHASE_ATTR) == SPEED}


def faster_units(units: Sequence[Sequence[str]], faster_layers: Mapping[str, float]) -> tuple[int, ...]:
    """Positions of the units holding a layer that is faster in float (``layer -> gain``), largest gain first."""
    gains = {i: max(faster_layers[n] for n in unit if n in faster_layers) for i, unit in enumerate(units)
             if any(n in faster_layers for n in unit)}
    return tuple(sorted(gains, key=lambda i: (-gains[i], i)))


def predicted_faster_units(
    predictor: LatencyPredictor, layers: Sequence[str], units: Sequence[Sequence[str]], float_precision: Precision,
    min_gain: float = MIN_PREDICTED_GAIN,
) -> tuple[int, ...]:
    """Positions of the units whose return to ``float_precision`` alone the predictor says makes all-INT8 faster,
    largest gain first (a measured latency table can say so; the MAC estimate never does)."""
    all_int8 = predictor.predict({n: Precision.INT8 for n in layers})
    gains: dict[int, float] = {}
    for i, unit in enumerate(units):
        reverted = predictor.predict({n: (float_precision if n in unit else Precision.INT8) for n in layers})
        if reverted > 0 and all_int8 / reverted >= 1 + min_gain:
            gains[i] = all_int8 / reverted
    return tuple(sorted(gains, key=lambda i: (-gains[i], i)))


def pareto(points: Sequence[Evaluated]) -> list[Evaluated]:
    """Evaluated points no other point beats in metric (higher) and latency (lower)."""
    done = [p for p in points if p.value is not None and p.latency is not None]
    return [
        p for p in done
        if not any((q.value >= p.value and q.latency <= p.latency) and (q.value > p.value or q.latency < p.latency)  # type: ignore[operator]
                   for q in done)
    ]


def local_next(front: Sequence[Evaluated], known: set[frozenset[int]], units: int) -> frozenset[int] | None:
    """The first unevaluated neighbour (one unit flipped) of a front member, fastest member and most sensitive unit first.

    Fastest first: the front given is the feasible one, so its fastest member is the
    answer with the most INT8 within the bound, and its neighbours (one more unit INT8,
    or one sensitive unit traded for another) are what that answer's user asks next.
    Most accurate first spent YOLOv5n's local trials on nearly-FP32 members whose
    metric beat FP32 by evaluation noise.
    """
    for member in sorted(front, key=lambda p: (p.latency if p.latency is not None else float("inf"), -(p.value or 0.0))):
        for unit in range(units):
            neighbour = member.floats ^ {unit}
            if neighbour not in known and len(neighbour) < units:
                return neighbour
    return None


# --------------------------------------------------------------------------- the sampler
@dataclass
class GuidedPlan:
    """What the guided sampler needs from the study: the ranked units and how to write them as parameters."""

    space: SearchSpace
    units: list[tuple[str, ...]]
    """Fusion groups (or single layers), most sensitive first."""
    max_drop: float
    budget: Callable[[Study], int]
    """The searched budget (``--budget`` less the sensitivity probes' cost)."""
    float_precision: Precision = Precision.FP32
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    searched_budget: int | None = None
    """The budget as of the trial being proposed (set by the sampler from ``budget``)."""
    faster_in_float: tuple[int, ...] = ()
    """Positions of the units faster in float (:func:`faster_units`, :func:`predicted_faster_units`), largest gain first."""

    def __post_init__(self) -> None:
        choices = [p.value for p in self.space.precisions]
        names = [self.param(u) for u in self.units]
        self.distributions = {n: CategoricalDistribution(choices) for n in names}
        self.distributions[ALGORITHM] = CategoricalDistribution([a.value for a in self.space.algorithms])
        self.distributions[SAMPLES] = CategoricalDistribution(list(self.space.sample_counts))
        self.distributions[PERCENTILE] = CategoricalDistribution(list(self.space.percentiles))
        if len(self.space.bias_correction) > 1:
            self.distributions[BIAS] = CategoricalDistribution(list(self.space.bias_correction))

    def param(self, unit: Sequence[str]) -> str:
        return (GROUP_PREFIX if self.space.groups is not None else LAYER_PREFIX) + unit[0]

    def floats_of(self, params: Mapping[str, Any]) -> frozenset[int] | None:
        """The float units of a trial's parameters (None: not a configuration of this space, e.g. FP32 outside it)."""
        names = [self.param(u) for u in self.units]
        if any(n not in params for n in names):
            return None
        return frozenset(i for i, n in enumerate(names) if params[n] != Precision.INT8.value)

    def params(self, floats: frozenset[int], calibration: CalibrationChoice) -> dict[str, Any]:
        out: dict[str, Any] = {
            self.param(u): (self.float_precision.value if i in floats else Precision.INT8.value) for i, u in enumerate(self.units)
        }
        out[ALGORITHM] = calibration.algorithm.value
        out[SAMPLES] = calibration.samples
        percentiles = list(self.space.percentiles)
        # Only read for a percentile algorithm, whose value the history always holds; else any offered one.
        out[PERCENTILE] = calibration.percentile if calibration.percentile in percentiles else percentiles[len(percentiles) // 2]
        if len(self.space.bias_correction) > 1:
            out[BIAS] = calibration.bias_correction
        return out


def _calibration_of(params: Mapping[str, Any], default: CalibrationChoice) -> CalibrationChoice:
    if ALGORITHM not in params:
        return default
    from sensisearch.quantize.config import CalibrationAlgorithm

    return CalibrationChoice(
        CalibrationAlgorithm(params[ALGORITHM]), int(params.get(SAMPLES, default.samples)),
        float(params.get(PERCENTILE, default.percentile)), bool(params.get(BIAS, default.bias_correction)),
    )


@dataclass(frozen=True)
class Proposal:
    phase: str
    params: dict[str, Any] | None
    """None: let the inner sampler propose."""
    free_units: int | None = None
    """With ``params`` None: the sampler chooses the precision of the first ``free_units`` ranked units only
    (:func:`sampler_free_units`); None: of every unit."""
    algorithms: tuple[str, ...] | None = None
    """With ``params`` None: the calibration algorithms the sampler may choose, best all-INT8 first
    (:func:`competitive_algorithms`); None: every one offered."""
    held_float: frozenset[int] = frozenset()
    """With ``free_units``: units beyond them held in float instead of INT8 (the speed walk found them faster so)."""


def propose(plan: GuidedPlan, trials: Sequence[FrozenTrial]) -> Proposal:
    """The next configuration of the guided search, from the study's trials alone."""
    from sensisearch.study.store._record import TrialRecord

    fp32: float | None = None
    history: list[tuple[Evaluated, CalibrationChoice]] = []
    phases: dict[str, int] = {}
    searched = 0
    for t in trials:
        record = TrialRecord.from_attrs(t.number, t.user_attrs)
        if record.baseline == "fp32" and t.state == optuna.trial.TrialState.COMPLETE and t.values:
            fp32 = t.values[0]
        phase = t.system_attrs.get(PHASE_ATTR)
        if phase:
            phases[phase] = phases.get(phase, 0) + 1
        if record.baseline is None and record.role == "evaluate":
            searched += 1
        floats = plan.floats_of(t.params)
        if floats is None:
            continue
        done = t.state == optuna.trial.TrialState.COMPLETE and bool(t.values)
        pending = t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        if not done and not pending and t.state != optuna.trial.TrialState.PRUNED:
            continue  # failed: known, but without a value
        # Stopped early on the evaluation subset (PRUNED): clearly out, i.e. known and infeasible, not pending.
        value = t.values[0] if done else (float("-inf") if t.state == optuna.trial.TrialState.PRUNED else None)
        latency = t.values[1] if done else None
        history.append((Evaluated(floats, value, latency), _calibration_of(t.params, plan.space.default_calibration)))
    if fp32 is None:
        return Proposal(SAMPLER, None)  # the reference comes first; nothing to aim at yet
    threshold = fp32 - plan.max_drop
    # The calibration the walk uses: the one whose all-INT8 result is best (the seeds tried each).
    all_int8 = [(e.value, c) for e, c in history if not e.floats and e.value is not None]
    calibration = max(all_int8, key=lambda vc: vc[0])[1] if all_int8 else plan.space.default_calibration
    mine = [e for e, c in history if c == calibration]
    known: dict[frozenset[int], float | None] = {}
    for e in mine:
        if e.floats not in known or known[e.floats] is None:
            known[e.floats] = e.value
    n = len(plan.units)
    prefix = {frozenset(range(k)): k for k in range(n + 1)}
    values = {prefix[f]: v for f, v in known.items() if f in prefix}
    values.setdefault(0, next((v for f, v in known.items() if not f), None))
    step = boundary_next(values, n, threshold)
    if step is not None:
        return Proposal(BOUNDARY, plan.params(frozenset(range(step)), calibration))
    if any(v is None for v in values.values()) and boundary_next({k: v for k, v in values.items() if v is not None}, n, threshold) is not None:
        return Proposal(SAMPLER, None)  # a bisection step is pending on another worker
    boundary = boundary_k(values, n, threshold)
    start = frozenset(range(boundary))
    candidate, answer = greedy_next(start, known, threshold)
    if candidate is not None and len(candidate) < n:
        return Proposal(GREEDY, plan.params(candidate, calibration))
    budget = plan.searched_budget or searched + 1
    if plan.faster_in_float:
        step, answer = speed_next(answer, plan.faster_in_float, known, threshold)
        room = max(1, int(SPEED_SHARE * budget))
        if step is not None and len(step) < n and phases.get(SPEED, 0) < room:
            return Proposal(SPEED, plan.params(step, calibration))
    free = sampler_free_units(n, boundary)
    algorithms = competitive_algorithms([(v, c.algorithm.value) for v, c in all_int8], plan.max_drop) or None
    local_from = int(round(budget * (1 - LOCAL_SHARE)))
    if searched >= local_from:
        everything = {e.floats for e, _ in history}
        front = pareto([e for e, _ in history if e.value is not None and e.value >= threshold] or [e for e, _ in history])
        neighbour = local_next(front, everything, n)
        if neighbour is not None:
            member_cal = calibration
            return Proposal(LOCAL, plan.params(neighbour, member_cal))
    return Proposal(SAMPLER, None, free, algorithms, frozenset(u for u in answer if u >= free and u in plan.faster_in_float))


class GuidedSampler(TrialSeededSampler):
    """The guided phases (:func:`propose`) in front of a multi-objective TPE (seeded per trial number)."""

    def __init__(self, plan: GuidedPlan, seed: int) -> None:
        super().__init__(seed, constant_liar=True)
        self._plan = plan
        self._held: dict[int, dict[str, str]] = {}
        """Per trial number: the unit parameters the sampler phase holds (beyond its free units) and their precision."""
        self._algorithms: dict[int, tuple[str, ...]] = {}
        """Per trial number: the calibration algorithms its sampler phase may choose (best first)."""

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._plan.distributions)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if "fixed_params" in trial.system_attrs:
            return {}  # an enqueued baseline or seed
        self._plan.searched_budget = self._plan.budget(study)
        proposal = propose(self._plan, study.get_trials(deepcopy=False))
        study._storage.set_trial_system_attr(trial._trial_id, PHASE_ATTR, proposal.phase)
        if proposal.params is not None:
            log.info("guided %s: trial %d", proposal.phase, trial.number)
            return proposal.params
        if proposal.free_units is not None:
            self._held[trial.number] = {
                self._plan.param(u): (self._plan.float_precision if i in proposal.held_float else Precision.INT8).value
                for i, u in enumerate(self._plan.units) if i >= proposal.free_units
            }
        if proposal.algorithms:
            self._algorithms[trial.number] = proposal.algorithms
        return {}

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        held = self._held.get(trial.number, {})
        if param_name in held:
            return held[param_name]
        value = super().sample_independent(study, trial, param_name, param_distribution)
        allowed = self._algorithms.get(trial.number)
        if param_name == ALGORITHM and allowed and value not in allowed:
            # TPE's choice over every offered algorithm (its distribution stays the stored one, so
            # its history reads back unchanged); one that loses the bound on all-INT8 becomes the best.
            return allowed[0]
        return value

    def after_trial(self, study: Study, trial: FrozenTrial, state: optuna.trial.TrialState, values: Sequence[float] | None) -> None:
        self._held.pop(trial.number, None)
        self._algorithms.pop(trial.number, None)
        super().after_trial(study, trial, state, values)
