"""The budget across workers: which proposed trial is evaluated, which repeats one, which is over budget.

Workers share nothing but the storage, and the storage hands out trial numbers
atomically, so the numbers are a total order every worker agrees on. Each trial
records the effective key of its configuration (``config_key``) and then its
role (``evaluate``, ``duplicate``, ``over_budget``) decided from the trials with
lower numbers only, by :func:`decide`. Because a trial waits while a
lower-numbered one is still undecided, every worker computes the same decisions:
the study holds exactly ``budget`` distinct evaluated searched configurations,
whatever the number of workers, without a lock server.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import optuna

from sensisearch.study.config._faults import EnvironmentalFailure
from sensisearch.study.config._stop import StopFlag
from sensisearch.study.store._owner import fail_dead_owner_trials, owner_of
from sensisearch.study.store._record import TrialRecord

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.study import Study
    from optuna.trial import FrozenTrial

# Roles a trial records once it has decided (user attribute "role", see TrialRecord.role).
EVALUATE = "evaluate"
DUPLICATE = "duplicate"
OVER_BUDGET = "over_budget"
INTERRUPTED = "interrupted"
WAIT = "wait"


@dataclass(frozen=True)
class TrialView:
    """What :func:`decide` needs to know about one trial of the study."""

    number: int
    state: str
    """Optuna's state name: RUNNING, COMPLETE, FAIL, PRUNED, WAITING."""
    key: str | None
    """``effective_config_key`` of its configuration; None until it has proposed one."""
    role: str | None
    """The decided role; None while undecided."""
    baseline: bool = False
    own_error: bool = False
    """FAILED by its own error (counts); a FAIL without one was interrupted or its worker died (re-queued)."""
    stopped_early: bool = False
    """PRUNED after its evaluation subset (multi-fidelity): a searched configuration, so it counts."""

    @property
    def evaluated(self) -> bool:
        """Built and evaluated (or evaluating) its configuration: the trial a repeat refers to."""
        if self.role != EVALUATE:
            return False
        return (
            self.state in ("RUNNING", "COMPLETE")
            or (self.state == "FAIL" and self.own_error)
            or (self.state == "PRUNED" and self.stopped_early)
        )


@dataclass(frozen=True)
class Decision:
    action: str
    """EVALUATE, DUPLICATE, OVER_BUDGET or WAIT (a lower-numbered trial must decide or finish first)."""
    of: int | None = None
    """DUPLICATE: the trial whose configuration this repeats; WAIT: the trial waited for."""


def decide(number: int, key: str, baseline: bool, trials: Sequence[TrialView], budget: int) -> Decision:
    """The role of trial ``number`` with configuration ``key``, from the trials numbered below it.

    - A lower-numbered trial still RUNNING and undecided: wait for it (it decides in milliseconds).
    - A lower-numbered trial evaluated the same key: a duplicate of it; while that
      one is still RUNNING, wait for its values (the repeat copies them).
    - Baselines never count against the budget; a searched trial whose rank
      among the counted searched trials is ``>= budget`` is over budget.
    """
    lower = sorted((t for t in trials if t.number < number), key=lambda t: t.number)
    for t in lower:
        if t.state == "RUNNING" and t.role is None:
            return Decision(WAIT, t.number)
    for t in lower:
        if t.key == key and t.evaluated:
            return Decision(WAIT, t.number) if t.state == "RUNNING" else Decision(DUPLICATE, t.number)
    if baseline:
        return Decision(EVALUATE)
    counted = sum(1 for t in lower if t.evaluated and not t.baseline)
    return Decision(OVER_BUDGET) if counted >= budget else Decision(EVALUATE)


PROBE_COST_ATTR = "sensitivity_cost"
"""Study user attribute: what the sensitivity probes cost, in trial-equivalents and seconds."""


def searched_budget(budget: int, study_attrs: dict[str, Any]) -> int:
    """``--budget`` less the sensitivity probes' cost: probes are evaluations too, so a guided
    study of budget N spends about as much evaluation as N trials of a plain one (at least one trial is left)."""
    cost = study_attrs.get(PROBE_COST_ATTR) or {}
    spent = int(math.ceil(float(cost.get("trials", 0.0)) - 1e-9))
    return max(1, budget - spent)


def counted_trials(trials: Sequence[TrialView]) -> int:
    """Distinct searched configurations evaluated (or being evaluated): what ``--budget`` counts."""
    return sum(1 for t in trials if t.evaluated and not t.baseline and t.state != "RUNNING")


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler, seeded from (seed, trial number) for every trial.

    A TPE sampler seeded once replays its random start-up proposals whenever a
    study is resumed (a new process starts the same random stream), and two
    workers started with one seed propose the same configurations. Seeding by
    trial number keeps a single-worker study reproducible while a resumed study
    or a second worker continues with proposals it has not made yet.
    """

    def __init__(self, seed: int, make: Callable[[int], optuna.samplers.BaseSampler] | None = None, **tpe_options: Any) -> None:
        """``make(seed)`` builds the inner sampler (default: TPE with ``tpe_options``), e.g. random or NSGA-II."""
        self._seed = seed
        self._make = make or (lambda s: optuna.samplers.TPESampler(seed=s, **tpe_options))
        self._inner = self._tpe(0)

    def _tpe(self, number: int) -> optuna.samplers.BaseSampler:
        # Distinct, deterministic stream per trial; 2**31 keeps it a valid numpy seed.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return self._make((self._seed * 1_000_003 + number) % (2**31))

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._inner = self._tpe(trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: optuna.trial.TrialState, values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def view_of(trial: FrozenTrial) -> TrialView:
    record = TrialRecord.from_trial(trial)
    return TrialView(
        number=trial.number, state=trial.state.name, key=record.config_key, role=record.role,
        # An environmental failure (disk, storage) records its reason apart from ``error``: never counted.
        baseline=record.baseline is not None, own_error=record.error is not None,
        stopped_early=record.stopped_early is not None,
    )


# ---------------------------------------------------------------------------- against the storage

# Poll interval while a lower-numbered trial decides (milliseconds) or evaluates the same configuration.
WAIT_SECONDS = 0.2
# A sampler that keeps proposing configurations the study already holds has
# exhausted the space (small spaces, or a converged TPE): stop after this many in a row.
MAX_CONSECUTIVE_DUPLICATES = 40
EXHAUSTED_MESSAGE = "the search space has no configuration left that the study has not evaluated"


class WaitGaveUp(EnvironmentalFailure):
    """A trial waited longer than any trial may run for a lower-numbered one: its worker is stuck or gone."""


def await_decision(
    study: Study, number: int, key: str, baseline: bool, budget: int,
    stop: StopFlag | None = None, max_wait_seconds: float | None = None,
) -> Decision:
    """:func:`decide` against the storage, waiting while it says WAIT.

    A lower-numbered trial on a dead worker stays RUNNING until its heartbeat is
    stale: failing trials of dead workers on this host and stale trials here (what
    Optuna does before every trial) ends the wait. ``stop`` ends it on a signal;
    after ``max_wait_seconds`` it gives up with :class:`WaitGaveUp`, naming whose trial
    it waited for (a worker that is alive but stuck keeps its heartbeat going).
    """
    started = time.monotonic()
    while True:
        if stop is not None:
            stop.check()
        views = [view_of(t) for t in study.get_trials(deepcopy=False)]
        decision = decide(number, key, baseline, views, budget)
        if decision.action != WAIT:
            return decision
        waited = time.monotonic() - started
        if max_wait_seconds is not None and waited > max_wait_seconds:
            raise WaitGaveUp(f"trial {number} waited {waited:.0f} s for trial {decision.of} ({whose(study, decision.of)}); "
                             "stop or restart that worker, then re-run the same command")
        fail_dead_owner_trials(study)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        if stop is not None:
            stop.wait(WAIT_SECONDS)
        else:
            time.sleep(WAIT_SECONDS)


def whose(study: Study, number: int | None) -> str:
    """"the fp32 baseline of pid 123 on host-a": the trial and the worker that owns it, for a give-up line."""
    if number is None:
        return "an unknown trial"
    trial = study.get_trials(deepcopy=False)[number]
    record = TrialRecord.from_trial(trial)
    what = f"the {record.baseline} baseline" if record.baseline else "a searched configuration"
    owner = owner_of(trial)
    return what + ("" if owner is None else f" of pid {owner.pid} on {owner.host}")


def missing_baselines(study: Study, names: Sequence[str]) -> dict[str, str]:
    """Baselines without a finished result, each with why: "running", "waiting" or "absent"."""
    status: dict[str, str] = {}
    for name in names:
        mine = [t for t in study.get_trials(deepcopy=False) if TrialRecord.from_attrs(t.number, t.user_attrs).baseline == name]
        done = any(
            t.state.name == "COMPLETE" or (t.state.name == "FAIL" and TrialRecord.recorded_error(t) is not None)
            for t in mine
        )
        if done:
            continue
        if any(t.state.name == "RUNNING" for t in mine):
            status[name] = "running"
        elif any(t.state.name == "WAITING" for t in mine):
            status[name] = "waiting"
        else:
            status[name] = "absent"
    return status
