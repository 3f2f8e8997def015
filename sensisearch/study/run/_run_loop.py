"""The run loop: open the Optuna study, queue the baselines and seeds, run trials until the budget is met."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import optuna

from sensisearch.errors import SensisearchError
from sensisearch.quantize.config import Precision
from sensisearch.study.config._faults import EnvironmentalFailure, classify
from sensisearch.study.search import _budget
from sensisearch.study.store._owner import fail_dead_owner_trials
from sensisearch.study.run._context import StudyContext
from sensisearch.study.run._trial_runner import trial_runner
from sensisearch.study.run._objective import make_objective
from sensisearch.study.run._prepare import check_stored_identity
from sensisearch.study.store._record import TrialRecord
from sensisearch.study.run._seeding import enqueue_seeds, guided_plan
from sensisearch.study.search._seeds import make_sampler
from sensisearch.study.store._worker import artifact_pruner, store_settings
from sensisearch.study.run._identity import identity_for, write_study_file
from sensisearch.study.store._storage import mask_url, open_storage

log = logging.getLogger(__name__)


FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)


@dataclass(frozen=True)
class TrialEvent:
    """What the progress display gets after every finished trial."""

    number: int
    state: str
    finished: int
    budget: int
    value: float | None
    latency_ms: float | None
    best_value: float | None
    best_latency_ms: float | None
    error: str | None
    seconds: float
    note: str | None = None
    """What a trial that was not evaluated is: "over budget, not evaluated", "repeats trial 3, not evaluated"."""

def open_study(ctx: StudyContext) -> optuna.Study:
    # Seeded per trial number: a resumed study or a second worker continues the
    # sampler instead of replaying the first run's proposals (see _budget).
    if ctx.settings.search.sampler == "guided" and ctx.identity_may_differ:
        sampler = make_sampler("tpe", ctx.settings.search.seed)  # reviewing proposes nothing: no profile needed
    else:
        plan = guided_plan(ctx) if ctx.settings.search.sampler == "guided" else None
        sampler = make_sampler(ctx.settings.search.sampler, ctx.settings.search.seed, plan)
    storage = ctx.storage if ctx.storage is not None else open_storage(ctx.storage_url, ctx.settings.execution.heartbeat_seconds)
    masked = mask_url(ctx.storage_url)
    try:
        study = optuna.create_study(
            storage=storage, study_name=ctx.study_name,
            load_if_exists=True, directions=["maximize", "minimize"], sampler=sampler,
        )
    except (ValueError, ImportError, optuna.exceptions.StorageInternalError) as exc:
        raise SensisearchError(f"--storage {masked}: cannot open the study ({str(exc).splitlines()[0]})") from exc
    identity = ctx.identity or identity_for(ctx)
    check_stored_identity(storage, ctx.study_name, identity, ctx.storage_url, ctx.identity_may_differ)
    if study.user_attrs.get("identity") is None:
        study.set_user_attr("identity", identity.to_dict())
        study.set_user_attr("storage", masked)
        study.set_user_attr("model_sha256", ctx.info.sha256)
        study.set_user_attr("model_path", str(ctx.model_path.resolve()))
        study.set_user_attr("metric", ctx.evaluator.metric)
        study.set_user_attr("layers", list(ctx.space.layers))
        study.set_user_attr("backend", ctx.backend.describe())
    if not ctx.identity_may_differ:  # reviewing on another machine leaves the study's record as it is
        write_study_file(ctx.out, identity, ctx.study_name, masked)
    # Named objectives for optuna-dashboard, and the settings `sensisearch report` reloads.
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([ctx.evaluator.metric, "latency_ms"])
    # The latest run's settings (a resume may raise --budget): what `sensisearch worker` on another
    # host starts from and what `report` rewrites the results with.
    store_settings(study, ctx.settings, ctx.out)
    return study


def baseline_names(ctx: StudyContext) -> list[str]:
    """FP32 always (the reference, even when --precisions leaves it out), then all-INT8 and all-FP16 where searched."""
    return [p.value for p in (Precision.FP32, Precision.INT8, Precision.FP16) if p is Precision.FP32 or p in ctx.space.precisions]


def enqueue_baselines(ctx: StudyContext, study: optuna.Study) -> None:
    """Queue each baseline the study does not hold yet (first run, or one lost for good)."""
    # A trial failed without an error of its own (interrupted, dead worker) holds no
    # result; unless its re-queued copy exists, the baseline is queued again.
    present = {
        TrialRecord.from_attrs(t.number, t.user_attrs).baseline
        for t in study.get_trials(deepcopy=False)
        if not (t.state == optuna.trial.TrialState.FAIL and TrialRecord.recorded_error(t) is None)
    }
    for name in baseline_names(ctx):
        if name in present:
            continue
        precision = Precision(name)
        # FP32 outside the search space has no parameter encoding the space accepts:
        # it is queued without parameters and its objective bypasses suggest().
        params = ctx.space.params_for(ctx.space.uniform(precision)) if precision in ctx.space.precisions else {}
        study.enqueue_trial(params, user_attrs=TrialRecord.baseline_attrs(name))


def finished_count(study: optuna.Study) -> int:
    """Finished trials that count against the budget: distinct searched configurations.

    Baselines, repeats of an evaluated configuration and over-budget proposals do
    not count; a trial FAILED by the heartbeat or an interruption has no recorded
    error and is re-queued, so it does not either; a trial that failed on its own
    (bad build, exception) does.
    """
    return _budget.counted_trials([_budget.view_of(t) for t in study.get_trials(deepcopy=False)])


def run_study(
    ctx: StudyContext, on_trial: Callable[[TrialEvent], None] | None = None, study: optuna.Study | None = None
) -> optuna.Study:
    """Run trials until the study holds ``budget`` finished trials; resumes where it stopped.

    ``study``: an already opened study (see :func:`open_study`), to avoid opening the storage twice.
    """
    study = study or open_study(ctx)
    # Trials of a worker that died are failed (and re-queued) before counting: at once when
    # it ran on this host (its process is gone), after the heartbeat grace on another host.
    fail_dead_owner_trials(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    enqueue_baselines(ctx, study)
    enqueue_seeds(ctx, study)
    # The sensitivity probes were evaluations too: they take their share of --budget.
    budget = _budget.searched_budget(ctx.settings.search.budget, study.user_attrs)
    if budget < ctx.settings.search.budget:
        log.info("budget %d: %d trials after the sensitivity probes' share", ctx.settings.search.budget, budget)
    guard = _RunGuard()

    def watch(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # Counts the trials of every worker sharing the storage, so N workers stop together.
        record = TrialRecord.from_trial(trial)
        if record.environmental is not None:
            guard.environmental = record.environmental
            study.stop()
        if record.baseline == "fp32" and trial.state == optuna.trial.TrialState.FAIL and record.error is not None:
            guard.reference_error = f"trial {trial.number}: {record.error}"
            study.stop()
        guard.duplicates_in_a_row = guard.duplicates_in_a_row + 1 if record.role == _budget.DUPLICATE else 0
        # A trial that fails before it could even decide (no role) never counts: stop rather than loop.
        guard.undecided_failures = guard.undecided_failures + 1 if record.role is None and trial.state.name == "FAIL" else 0
        if guard.undecided_failures >= _budget.MAX_CONSECUTIVE_DUPLICATES:
            guard.stuck_error = TrialRecord.recorded_error(trial) or "see the log with -v"
            study.stop()
        if guard.duplicates_in_a_row >= _budget.MAX_CONSECUTIVE_DUPLICATES:
            guard.exhausted = True
            study.stop()
        if finished_count(study) >= budget and not _budget.missing_baselines(study, baseline_names(ctx)):
            study.stop()
        ctx.stop.check()  # a signal between trials: stop before the next one starts

    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [watch, artifact_pruner(ctx.trials_dir, ctx.settings.execution.keep_artifacts, ctx.settings.acceptance.max_drop)]
    if on_trial is not None:
        callbacks.append(lambda s, t: on_trial(_event(s, t, budget)))
    # Every trial's build, timing and evaluation in a child process (unless --isolation none).
    with trial_runner(ctx) as run_trial, _environmental_errors(ctx, guard):
        objective = make_objective(ctx, run_trial)
        # A trial RUNNING without a live owner is never left behind: each pass fails such trials
        # and queues them again, and the study is done only when a pass finds none.
        for _ in range(_MAX_PASSES):
            if finished_count(study) < budget or _budget.missing_baselines(study, baseline_names(ctx)):
                study.optimize(objective, callbacks=callbacks, catch=(Exception,), gc_after_trial=False)
            else:
                log.info("study '%s' already has %d finished trials (budget %d)", ctx.study_name, finished_count(study), budget)
            ctx.stop.check()
            _raise_if_environmental(guard)
            _raise_if_reference_failed(study, guard)
            if guard.exhausted:
                log.warning("%s; stopping with %d of %d trials", _budget.EXHAUSTED_MESSAGE, finished_count(study), budget)
            complete_baselines(ctx, study, objective, callbacks)
            _raise_if_environmental(guard)
            if not fail_dead_owner_trials(study) or guard.exhausted:
                break
    _raise_if_reference_failed(study, guard)
    return study


# Passes of the run loop over trials re-queued from dead workers (each pass runs them all).
_MAX_PASSES = 5


@contextlib.contextmanager
def _environmental_errors(ctx: StudyContext, guard: _RunGuard) -> Iterator[None]:
    """A storage commit that fails (disk full, connection lost) leaves Optuna's loop: one line, not a traceback."""
    try:
        yield
    except (KeyboardInterrupt, SensisearchError):
        raise
    except Exception as exc:
        fault = classify(exc, ctx.out)
        if fault is None:
            raise
        raise EnvironmentalFailure(fault.line) from exc


def _raise_if_environmental(guard: _RunGuard) -> None:
    if guard.environmental is not None:
        raise EnvironmentalFailure(guard.environmental)


@dataclass
class _RunGuard:
    """What the run loop's callback noticed: a failed reference, an exhausted search space."""

    reference_error: str | None = None
    exhausted: bool = False
    duplicates_in_a_row: int = 0
    undecided_failures: int = 0
    stuck_error: str | None = None
    environmental: str | None = None


def _raise_if_reference_failed(study: optuna.Study, guard: _RunGuard) -> None:
    if guard.reference_error is None:
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
            record = TrialRecord.from_trial(t)
            if record.baseline == "fp32" and record.error is not None and record.role != _budget.DUPLICATE:
                guard.reference_error = f"trial {t.number}: {record.error}"
    if guard.stuck_error is not None:
        raise SensisearchError(
            f"{guard.undecided_failures} trials in a row failed before they could be evaluated ({guard.stuck_error}); "
            "run with -v for the traceback"
        )
    if guard.reference_error is not None:
        raise SensisearchError(
            f"the FP32 reference failed ({guard.reference_error}), so no trial can be compared; "
            "fix the model or the evaluator and start a new study (--out)"
        )


def complete_baselines(
    ctx: StudyContext, study: optuna.Study, objective: Callable[[optuna.Trial], tuple[float, float]],
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]],
) -> None:
    """Do not finish while a baseline is missing.

    A baseline RUNNING on a dead worker (kill -9) is failed once its heartbeat is
    stale (at most the grace period, ``2 * --heartbeat-seconds``) and re-queued; a
    queued or lost one is run here. A baseline a live worker runs is waited for.
    """
    names = baseline_names(ctx)
    started = time.monotonic()
    max_wait = ctx.settings.execution.build_timeout + ctx.settings.execution.eval_timeout + 2 * ctx.settings.execution.heartbeat_seconds
    while missing := _budget.missing_baselines(study, names):
        ctx.stop.check()
        if "absent" in missing.values():
            enqueue_baselines(ctx, study)
        if any(state in ("waiting", "absent") for state in missing.values()):
            log.info("running the missing baselines: %s", ", ".join(missing))
            study.optimize(objective, n_trials=1, callbacks=callbacks, catch=(Exception,), gc_after_trial=False)
            continue
        log.info("waiting for baselines another worker runs (or its heartbeat to go stale): %s", ", ".join(missing))
        if time.monotonic() - started > max_wait:
            running = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                       if TrialRecord.from_trial(t).baseline in missing]
            raise _budget.WaitGaveUp(
                f"waited {time.monotonic() - started:.0f} s for the {', '.join(missing)} baseline "
                f"({'; '.join(_budget.whose(study, n) for n in running) or 'no running trial'}); "
                "stop or restart that worker, then re-run the same command"
            )
        fail_dead_owner_trials(study)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        ctx.stop.wait(min(1.0, ctx.settings.execution.heartbeat_seconds / 2))


def _event(study: optuna.Study, trial: optuna.trial.FrozenTrial, budget: int) -> TrialEvent:
    best_value = best_latency = None
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if complete:
        best = max(complete, key=lambda t: (t.values[0], -t.values[1]))
        best_value, best_latency = best.values[0], best.values[1]
    record = TrialRecord.from_trial(trial)
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete and trial.datetime_start else 0.0
    return TrialEvent(
        number=trial.number,
        state=trial.state.name,
        finished=finished_count(study),
        budget=budget,
        value=trial.values[0] if trial.values else None,
        latency_ms=trial.values[1] if trial.values else None,
        best_value=best_value,
        best_latency_ms=best_latency,
        error=TrialRecord.recorded_error(trial) or record.environmental or record.stopped_early,
        seconds=seconds,
        note=_note(record),
    )


def _note(record: TrialRecord) -> str | None:
    if record.role == _budget.OVER_BUDGET:
        return "over budget, not evaluated"
    if record.role == _budget.DUPLICATE:
        return f"repeats trial {record.duplicate_of}, not evaluated again"
    if record.environmental is not None:
        return f"not counted, queued again: {record.environmental}"
    if record.role == _budget.INTERRUPTED:
        return "interrupted, queued again"
    return None
