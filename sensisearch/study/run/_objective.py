"""One trial's objective: its configuration, the budget decision, the build/time/evaluate call and what is recorded."""

from __future__ import annotations

import contextlib
import logging
import math
import traceback
from typing import Callable, Collection

import optuna

from sensisearch.errors import SensisearchError
from sensisearch.fileio import write_json_atomic
from sensisearch.progress import doing
from sensisearch.quantize.config import Precision, TrialConfig
from sensisearch.study.config._faults import EnvironmentalFailure, check_free_space, classify, classify_text, trial_bytes_estimate
from sensisearch.study.search import _budget
from sensisearch.study.store._owner import claim
from sensisearch.study.trial import _accuracy, _fidelity
from sensisearch.study.run._context import StudyContext
from sensisearch.study.trial._isolation import RunTrial
from sensisearch.study.trial._measurement import (
    accuracy_json,
    class_figure,
    classes_to_skip,
    measured_fields,
    pool_into_class,
    study_reference_ms,
)
from sensisearch.study.store._record import TrialRecord, WorstClass
from sensisearch.study.trial._predicted import store_predicted_reference
from sensisearch.study.store._worker import worker_device, worker_host
from sensisearch.study.run._identity import effective_config_key

log = logging.getLogger(__name__)


def make_objective(ctx: StudyContext, run_trial: RunTrial | None = None) -> Callable[[optuna.Trial], tuple[float, float]]:
    """``run_trial``: builds, times and evaluates one configuration (default: in this process)."""
    run_trial = run_trial or ctx.pipeline.run
    host, device = worker_host(), worker_device(ctx.backend.name)
    # Multi-fidelity: what a searched trial needs to stop after its subset, read from the storage here.
    snapshots = None if ctx.pipeline.subset is None else _fidelity.SnapshotSource(
        ctx.evaluator, ctx.pipeline.subset, ctx.settings.acceptance.max_drop, ctx.settings.measurement.drop_resamples, ctx.settings.search.seed
    )

    model_bytes = ctx.model_path.stat().st_size if ctx.model_path.is_file() else 0
    # The bootstrap against FP32's per-image results: its reference side is computed once, not per trial.
    fp32_bootstraps = _accuracy.FP32Bootstraps(ctx.settings.measurement.drop_resamples, ctx.settings.search.seed)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        # A progress line during a long trial says which one runs and in which step.
        with doing(f"trial {trial.number}"):
            return evaluate(trial)

    def evaluate(trial: optuna.Trial) -> tuple[float, float]:
        # First: this process owns the trial, so a re-run on this host fails it at once if we die.
        claim(trial)
        # The baseline mark was stored by enqueue_baselines.
        baseline_name = TrialRecord.from_attrs(trial.number, trial.user_attrs).baseline
        config = proposed_config(ctx, trial, baseline_name)
        try:
            ctx.stop.check()
            repeat = decide_trial(ctx, trial, config, baseline_name)
        except KeyboardInterrupt:
            # Interrupted while waiting for the budget decision: queued again like a running trial.
            requeue_interrupted(trial, config, baseline_name)
            raise
        except EnvironmentalFailure as exc:  # gave up waiting for another worker's trial
            fail_environmental(trial, config, baseline_name, str(exc))
            raise
        if repeat is not None:
            return repeat
        trial_dir = ctx.trials_dir / f"{trial.number:04d}"
        trial_json = trial_dir / "trial.json"
        header = {
            "number": trial.number,
            "baseline": baseline_name,
            "model": {"path": str(ctx.model_path.resolve()), "sha256": ctx.info.sha256},
            "backend": ctx.backend.describe(),
            "config": config.to_dict(),
        }
        timed_here = ctx.pipeline.timed_here
        try:
            check_free_space(ctx.out, trial_bytes_estimate(ctx.trials_dir, model_bytes))
            trial_dir.mkdir(parents=True, exist_ok=True)
            # Baselines are never stopped early: they evaluate every image at once.
            snapshot = snapshots.snapshot(trial.study) if snapshots is not None and baseline_name is None else None
            class_key = ctx.pipeline.latency_class_key(config) if timed_here else None
            known = None
            if class_key is not None:
                known = class_figure(trial.study, class_key, ctx.pipeline.timing.settings.target_ci_width)  # type: ignore[union-attr]
            # Passed only when there is one, so a run_trial of the older four-argument form still works.
            args = (config, trial_dir, study_reference_ms(trial.study), snapshot, *(() if known is None else (known,)))
            if ctx.settings.execution.isolation == "none":
                # Computed here, checking no flag: a signal may raise inside it.
                with ctx.stop.interruptible():
                    outcome = run_trial(*args)
            else:
                outcome = run_trial(*args)
            ctx.stop.check()
            check_metric_value(outcome.evaluation.value, outcome.evaluation.metric)
        except KeyboardInterrupt:
            requeue_interrupted(trial, config, baseline_name)
            with contextlib.suppress(OSError):
                write_json_atomic(trial_json, {**header, "status": "interrupted"})
            raise
        except Exception as exc:
            fault = classify(exc, ctx.out) or classify_text(str(exc), ctx.out)
            if fault is not None:
                # The machine failed, not the configuration: not counted, queued again, the study stops.
                fail_environmental(trial, config, baseline_name, fault.line)
                with contextlib.suppress(OSError):
                    write_json_atomic(trial_json, {**header, "status": "environmental", "error": fault.line})
                raise EnvironmentalFailure(fault.line) from exc
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}" if not isinstance(exc, SensisearchError) else str(exc)
            failed = TrialRecord(trial.number, baseline=baseline_name, config=config, trial_json=str(trial_json), error=error,
                                 config_key=effective_config_key(config), role=_budget.EVALUATE, host=host, device=device)
            _store(trial, failed)
            write_json_atomic(trial_json, {**header, "status": "failed", "error": error, "traceback": traceback.format_exc()})
            raise
        if outcome.early_stop is not None:
            # PRUNED, counted in the budget (role evaluate + stopped_early), kept off the front and the winner.
            stopped = _fidelity.stopped_record(trial.number, outcome, config_key=effective_config_key(config),
                                               role=_budget.EVALUATE, trial_json=str(trial_json), host=host, device=device)
            _store(trial, stopped)
            write_json_atomic(trial_json, {**header, "status": "stopped_early", **outcome.to_dict()})
            raise optuna.TrialPruned(outcome.early_stop.text)
        evaluation = outcome.evaluation
        measured = measured_fields(trial.study, outcome, baseline_name, trial_dir, ctx.settings, fp32_bootstraps)
        pool_into_class(trial.study, trial.number, outcome)
        if outcome.latency_class is not None:
            measured["latency_class"] = outcome.latency_class
        if outcome.paired is None and outcome.latency_record and "source" in outcome.latency_record:
            store_predicted_reference(trial.study, outcome.latency_record)  # the predicted FP32 scale
        if outcome.subset is not None:
            measured["subset"] = outcome.subset.to_dict()
        worst_class = None
        if evaluation.per_class is not None and ctx.settings.acceptance.max_class_drop is not None:
            reference = evaluation.per_class if baseline_name == "fp32" else _fp32_per_class(trial.study)
            skipped = classes_to_skip(evaluation.per_class_instances, ctx.settings.acceptance.min_class_instances)
            measured["class_guard_skipped"] = skipped
            if reference is None:
                log.warning("trial %d: no FP32 per-class scores yet, class guard not applied", trial.number)
            else:
                worst_class = worst_class_drop(reference, evaluation.per_class, skip=skipped)
                trial.set_constraint("class_drop", worst_class["drop"] - ctx.settings.acceptance.max_class_drop)
        record = TrialRecord(
            trial.number,
            baseline=baseline_name,
            metric=evaluation.metric,
            metrics=dict(evaluation.metrics),
            latency=outcome.latency_record or outcome.latency.to_dict(),  # type: ignore[typeddict-item]
            config=config,
            artifact=str(outcome.build.artifact),
            deployable=str(outcome.deployable),
            trial_json=str(trial_json),
            layer_precisions=dict(outcome.build.layer_precisions),
            timings=dict(outcome.timings),
            per_class=evaluation.per_class,
            worst_class=worst_class,
            host=host,
            device=device,
            **measured,
            config_key=effective_config_key(config),
            role=_budget.EVALUATE,
        )
        _store(trial, record)
        write_json_atomic(trial_json, {**header, "status": "complete", **outcome.to_dict(), **accuracy_json(record)})
        return evaluation.value, outcome.median_ms

    return objective


def requeue_interrupted(trial: optuna.Trial, config: TrialConfig, baseline_name: str | None) -> None:
    """Ctrl-C or SIGTERM: the trial fails without an error of its own, so it does not
    count, and is queued again so the next run (or another worker) evaluates it."""
    _store(trial, TrialRecord(trial.number, baseline=baseline_name, config=config,
                              config_key=effective_config_key(config), role=_budget.INTERRUPTED))
    trial.study.enqueue_trial(dict(trial.params), user_attrs=TrialRecord.baseline_attrs(baseline_name) if baseline_name else None)


def fail_environmental(trial: optuna.Trial, config: TrialConfig, baseline_name: str | None, reason: str) -> None:
    """Record why the machine failed the trial and queue it again; best effort, since the storage
    itself may be what failed (then the trial stays RUNNING and its dead owner is failed on the next start)."""
    try:
        _store(trial, TrialRecord(trial.number, baseline=baseline_name, config=config,
                                  config_key=effective_config_key(config), role=_budget.INTERRUPTED, environmental=reason))
        trial.study.enqueue_trial(dict(trial.params), user_attrs=TrialRecord.baseline_attrs(baseline_name) if baseline_name else None)
        trial.study.stop()
    except Exception as exc:  # said, not hidden: a bug here would otherwise count the machine's failure against the budget
        log.warning("trial %d: could not record its environmental failure (%s: %s)", trial.number, type(exc).__name__, exc)


def proposed_config(ctx: StudyContext, trial: optuna.Trial, baseline_name: str | None) -> TrialConfig:
    """The trial's configuration: a baseline's is fixed, a searched one comes from the sampler."""
    if baseline_name is None:
        return ctx.space.suggest(trial)
    precision = Precision(baseline_name)
    if precision in ctx.space.precisions:
        ctx.space.suggest(trial)  # the enqueued parameters: recorded so the sampler learns from the baseline
    return ctx.space.uniform(precision)


def decide_trial(
    ctx: StudyContext, trial: optuna.Trial, config: TrialConfig, baseline_name: str | None
) -> tuple[float, float] | None:
    """Record the configuration's key and the trial's role; the known values when it repeats a configuration.

    Raises ``TrialPruned`` (not counted) when the budget is already taken by
    lower-numbered trials, and stops this worker.
    """
    key = effective_config_key(config)
    record_heartbeat_now(ctx, trial.number)
    trial.set_user_attr(TrialRecord.attr_key("config_key"), key)
    # A re-queued trial carries the attributes of the one it replaces: decide afresh.
    trial.set_user_attr(TrialRecord.attr_key("role"), None)
    budget = _budget.searched_budget(ctx.settings.search.budget, trial.study.user_attrs)
    # No trial may run longer than its two timeouts; past that (and the heartbeat grace) the one waited for is stuck.
    max_wait = ctx.settings.execution.build_timeout + ctx.settings.execution.eval_timeout + 2 * ctx.settings.execution.heartbeat_seconds
    decision = _budget.await_decision(trial.study, trial.number, key, baseline_name is not None, budget,
                                      stop=ctx.stop, max_wait_seconds=max_wait)
    if decision.action == _budget.EVALUATE:
        trial.set_user_attr(TrialRecord.attr_key("role"), _budget.EVALUATE)
        return None
    if decision.action == _budget.OVER_BUDGET:
        trial.set_user_attr(TrialRecord.attr_key("role"), _budget.OVER_BUDGET)
        trial.study.stop()
        raise optuna.TrialPruned(f"budget of {budget} distinct configurations reached")
    assert decision.of is not None
    original = trial.study.get_trials(deepcopy=False)[decision.of]
    _store(trial, TrialRecord(trial.number, baseline=baseline_name, config=config, config_key=key,
                              role=_budget.DUPLICATE, duplicate_of=decision.of))
    log.info("trial %d repeats trial %d's configuration: not evaluated again", trial.number, decision.of)
    if original.state == optuna.trial.TrialState.COMPLETE and original.values:
        return original.values[0], original.values[1]
    if original.state == optuna.trial.TrialState.PRUNED:  # stopped after its subset
        raise optuna.TrialPruned(f"repeats trial {decision.of}, which was stopped early on the subset")
    raise optuna.TrialPruned(f"repeats trial {decision.of}, which failed")


def record_heartbeat_now(ctx: StudyContext, number: int) -> None:
    """Write the trial's first heartbeat before any work.

    Optuna's heartbeat thread writes it asynchronously; a worker killed before that
    write leaves a RUNNING trial without a heartbeat, which is never found stale.
    """
    storage = ctx.storage
    if isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None:
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(ctx.study_name), number)
        storage.record_heartbeat(trial_id)


def check_metric_value(value: object, metric: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SensisearchError(f"the evaluator returned {value!r} for {metric}: it must return a finite number (points)")


def _store(trial: optuna.Trial, record: TrialRecord) -> None:
    for key, value in record.to_attrs().items():
        trial.set_user_attr(key, value)


def _fp32_per_class(study: optuna.Study) -> dict[str, float] | None:
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        record = TrialRecord.from_trial(t)
        if record.baseline == "fp32":
            return record.per_class
    return None


def worst_class_drop(reference: dict[str, float], per_class: dict[str, float], skip: Collection[str] = ()) -> WorstClass:
    """The class that fell most below ``reference`` (points); classes with a non-finite score, and ``skip``, are skipped."""
    drops = {
        name: reference[name] - value
        for name, value in per_class.items()
        if name in reference and name not in skip and math.isfinite(value) and math.isfinite(reference[name])
    }
    worst = max(drops, key=drops.__getitem__) if drops else None
    return {"name": worst, "drop": drops[worst] if worst is not None else 0.0}
