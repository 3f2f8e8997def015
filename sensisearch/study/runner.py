"""Run (or resume) a study: prepare everything once, then trials until the budget is met."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection

import onnx
import optuna

from sensisearch.backends.base import LatencySettings
from sensisearch.backends.factory import choose_backend
from sensisearch.errors import SensisearchError
from sensisearch.fileio import write_json_atomic
from sensisearch.quantize.config import CalibrationChoice, Precision, TrialConfig
from sensisearch.study import _budget, _fidelity
from sensisearch.study._context import StudyContext
from sensisearch.study._isolation import RunTrial, trial_runner
from sensisearch.study._measurement import accuracy_json, classes_to_skip, measured_fields, study_reference_ms, timing_plan
from sensisearch.study._record import TrialRecord, WorstClass, read_prediction_check
from sensisearch.study._seeds import apply_sensitivity, enqueue_seeds, make_sampler, with_profile
from sensisearch.study._predicted import (
    PredictionCheck,
    latency_predictor,
    latency_source_identity,
    partial_int8_verdict,
    store_predicted_reference,
)
from sensisearch.study._worker import artifact_pruner, store_settings, worker_device, worker_host
from sensisearch.study._identity import (
    REVIEW_MAY_DIFFER,
    StudyIdentity,
    check_out_identity,
    check_out_owner,
    effective_config_key,
    identity_for,
    identity_of,
    refusal,
    write_study_file,
)
from sensisearch.study._storage import mask_url, open_storage
from sensisearch.study.calibrate import prepare_calibration
from sensisearch.study.pipeline import TrialPipeline, ranges_to_dict
from sensisearch.report import review_markdown, write_review
from sensisearch.study._review import build_review, recorded_thresholds
from sensisearch.study.references import run_references
from sensisearch.study.report import ReportContext, int8_speed_verdict, write_report
from sensisearch.study.results import WinnerChoice, baseline, choose_winner, export_winner, pareto_front, records, write_pareto
from sensisearch.study.settings import StudySettings
from sensisearch.study.space import SearchSpace, capped_sample_counts
from sensisearch.study.tasks import build_evaluation, resolve_inputs

if TYPE_CHECKING:
    from sensisearch.calibration.statistics import StatisticsProgress

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


def prepare(
    settings: StudySettings, on_statistics: StatisticsProgress | None = None, calibrate: bool = True, reviewing: bool = False
) -> StudyContext:
    """Load the model and data, pick the backend, collect calibration statistics (cached).

    ``on_statistics(seen, total)`` reports the statistics pass; ``calibrate=False``
    (rewriting results of a finished study) only reads cached statistics, never runs a pass.
    ``reviewing`` (``verify``, ``report``: no trial runs): the study may have been made on
    another machine (:data:`REVIEW_MAY_DIFFER`), and its recorded identity is left as it is.
    """
    resolved = resolve_inputs(settings)
    settings = resolved.settings
    ignore: tuple[str, ...] = REVIEW_MAY_DIFFER if reviewing else ()
    if reviewing and settings.latency_table is not None and not Path(settings.latency_table).is_file():
        # Stage 2 on the target need not have the study machine's copy of the table: the
        # trials' predictions are recorded; only the table's identity cannot be checked.
        log.warning("latency table %s is not on this host: its identity is not checked", settings.latency_table)
        settings = dataclasses.replace(settings, latency_table=None)
        ignore = (*ignore, "timing")
    out = settings.out or Path("runs") / resolved.model_path.stem
    study_name = settings.study_name or resolved.model_path.stem
    # Issue 9: nothing is written into another study's --out, and the storage is
    # opened and checked before calibration or any other long work.
    if settings.task == "classification":
        check_classifier_output(resolved.model, f"--task classification with --model {resolved.model_path}")
    check_out_owner(out, study_name, resolved.info.sha256)
    make_out_dir(out)
    storage_url = settings.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    storage = open_storage(storage_url, settings.heartbeat_seconds)
    backend_settings = settings.backend_settings()
    choice = choose_backend(backend_settings, out)
    if not choice.can_run:
        raise SensisearchError(
            f"--backend {settings.backend}: builds here but cannot run engines ({choice.run_reason}); "
            "run the study on the GPU machine, or use --backend onnxruntime here and `sensisearch build` there"
        )
    backend, profile_warning = with_profile(choice.backend, settings.profile)  # issue 10: --profile
    # Issue 10: a foreign profile or --latency-table: trials take their latency from a predictor, untimed.
    predictor = latency_predictor(settings, choice.backend.profile.name, backend, resolved.model, resolved.info)
    precisions = tuple(settings.precisions or backend.capabilities.precisions)
    unsupported = [p.value for p in precisions if p not in backend.capabilities.precisions]
    if unsupported:
        log.warning("backend %s: %s offered anyway (%s)", backend.name, unsupported, backend.capabilities.fp16_note)
    evaluation = build_evaluation(settings, resolved.input_spec, resolved.model, out, need_calibration=Precision.INT8 in precisions)
    check_task_settings(settings, evaluation.task, resolved.model)
    calib_source = evaluation.calibration
    calibration = None
    sample_counts: tuple[int, ...] = tuple(settings.sample_counts)
    if Precision.INT8 in precisions:
        if calib_source is None:
            raise SensisearchError("INT8 needs calibration data: pass --calib-data DIR (or --precisions fp16,fp32)")
        sample_counts = capped_sample_counts(settings.sample_counts, calib_source.size)
    default_samples = sample_counts[0] if len(sample_counts) == 1 else sample_counts[min(1, len(sample_counts) - 1)]
    space = SearchSpace(
        layers=tuple(layer.name for layer in resolved.info.layers),
        precisions=precisions,
        algorithms=tuple(settings.algorithms),
        sample_counts=sample_counts,
        percentiles=tuple(settings.percentiles),
        default_calibration=CalibrationChoice(settings.default_algorithm, default_samples, 99.99),
    )
    timing, timing_warnings = timing_plan(settings, backend_settings, resolved.info.inputs[0] if len(resolved.info.inputs) == 1 else None)
    evaluation.warnings.extend(timing_warnings)
    identity = identity_of(settings, resolved.info, evaluation, backend, space, latency_source_identity(settings, predictor))
    check_out_identity(out, identity, ignore)
    check_stored_identity(storage, study_name, identity, storage_url, ignore)
    if not reviewing:
        # Claimed before the long work, so a second run into this --out sees whose it is.
        write_study_file(out, identity, study_name, mask_url(storage_url))
    if Precision.INT8 in precisions:
        assert calib_source is not None
        calibration = prepare_calibration(
            resolved.model_path, resolved.model, resolved.info, calib_source, sample_counts,
            seed=settings.seed, cache_dir=settings.cache_dir or out / "cache", threads=settings.threads,
            progress=on_statistics, cached_only=not calibrate,
        )
    pipeline = TrialPipeline(
        resolved.model, resolved.info, backend, evaluation.evaluator, calibration,
        LatencySettings(min_seconds=settings.timing_seconds), settings.latency_batch, timing, predictor=predictor,
        subset=_fidelity.subset_plan(settings, evaluation.evaluator, evaluation.task),  # issue 10: subset first
    )
    ctx = StudyContext(
        settings=settings, out=out, model_path=resolved.model_path, model=resolved.model, info=resolved.info,
        backend_settings=backend_settings, backend=backend, evaluation=evaluation, space=space, pipeline=pipeline,
        calibration=calibration, storage_url=storage_url, study_name=study_name,
        model_warnings=tuple(resolved.warnings) + ((profile_warning,) if profile_warning else ()), backend_reason=choice.reason,
        storage=storage, identity=identity, identity_may_differ=ignore,
    )
    return apply_sensitivity(ctx)  # issue 10: sensitivity profile and compact space when the search uses them


def make_out_dir(out: Path) -> None:
    """Create ``--out`` and check it is writable, with one line when it is not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".sensisearch-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SensisearchError(f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__}); pass a writable folder") from exc


def check_task_settings(settings: StudySettings, task: str, model: onnx.ModelProto) -> None:
    """Settings that only make sense for some tasks, and a classifier's output shape."""
    if settings.max_class_drop is not None and task != "detection":
        raise SensisearchError(f"--max-class-drop: applies to detectors only (this study's task is {task}); remove it")
    if task == "classification":
        check_classifier_output(model, "--model")


def check_classifier_output(model: onnx.ModelProto, flag: str) -> None:
    """A classifier's first output must be scores per class, [N, classes] (or [N, classes, 1, 1])."""
    output = model.graph.output[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in output.type.tensor_type.shape.dim]
    extra = [d for d in dims[2:] if d != 1]
    if len(dims) < 2 or extra:
        raise SensisearchError(
            f"{flag}: output '{output.name}' has shape {dims}, not class scores [N, classes]; "
            "this is not a classifier (use --task detection with --annotations, or --evaluator MODULE:FUNCTION)"
        )


def check_stored_identity(
    storage: optuna.storages.BaseStorage, study_name: str, identity: StudyIdentity, storage_url: str, ignore: Collection[str] = ()
) -> None:
    """Refuse a run whose identity differs from the one the stored study recorded (but for ``ignore``)."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return
    attrs = storage.get_study_user_attrs(study_id)
    recorded = attrs.get("identity")
    differences: list[str] = []
    if recorded is not None:
        differences = identity.differences(recorded, ignore)
    elif attrs.get("model_sha256") not in (None, identity.model_sha256):
        differences = [f"--model: {str(attrs['model_sha256'])[:12]}… in the study, {identity.model_sha256[:12]}… now"]
    if differences:
        raise SensisearchError(refusal(differences, f"study '{study_name}' in --storage {mask_url(storage_url)}"))


def open_study(ctx: StudyContext) -> optuna.Study:
    # Seeded per trial number: a resumed study or a second worker continues the
    # sampler instead of replaying the first run's proposals (see _budget).
    sampler = make_sampler(ctx.settings.sampler, ctx.settings.seed)
    storage = ctx.storage if ctx.storage is not None else open_storage(ctx.storage_url, ctx.settings.heartbeat_seconds)
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
    # Issue 11: named objectives for optuna-dashboard, and the settings `sensisearch report` reloads.
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([ctx.evaluator.metric, "latency_ms"])
    # The latest run's settings (a resume may raise --budget): what `sensisearch worker` on another
    # host starts from and what `report` rewrites the results with.
    store_settings(study, ctx)
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


def make_objective(ctx: StudyContext, run_trial: RunTrial | None = None) -> Callable[[optuna.Trial], tuple[float, float]]:
    """``run_trial``: builds, times and evaluates one configuration (default: in this process)."""
    run_trial = run_trial or ctx.pipeline.run
    host, device = worker_host(), worker_device(ctx.backend.name)
    # Issue 10, multi-fidelity: what a searched trial needs to stop after its subset, read from the storage here.
    snapshots = None if ctx.pipeline.subset is None else _fidelity.SnapshotSource(ctx, ctx.pipeline.subset)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        # The baseline mark was stored by enqueue_baselines.
        baseline_name = TrialRecord.from_attrs(trial.number, trial.user_attrs).baseline
        config = proposed_config(ctx, trial, baseline_name)
        try:
            repeat = decide_trial(ctx, trial, config, baseline_name)
        except KeyboardInterrupt:
            # Interrupted while waiting for the budget decision: queued again like a running trial.
            requeue_interrupted(trial, config, baseline_name)
            raise
        if repeat is not None:
            return repeat
        trial_dir = ctx.trials_dir / f"{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        trial_json = trial_dir / "trial.json"
        header = {
            "number": trial.number,
            "baseline": baseline_name,
            "model": {"path": str(ctx.model_path.resolve()), "sha256": ctx.info.sha256},
            "backend": ctx.backend.describe(),
            "config": config.to_dict(),
        }
        # Baselines are never stopped early: they evaluate every image at once.
        snapshot = snapshots.snapshot(trial.study) if snapshots is not None and baseline_name is None else None
        try:
            outcome = run_trial(config, trial_dir, study_reference_ms(trial.study), snapshot)
            check_metric_value(outcome.evaluation.value, outcome.evaluation.metric)
        except KeyboardInterrupt:
            requeue_interrupted(trial, config, baseline_name)
            write_json_atomic(trial_json, {**header, "status": "interrupted"})
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}" if not isinstance(exc, SensisearchError) else str(exc)
            failed = TrialRecord(trial.number, baseline=baseline_name, config=config.to_dict(), trial_json=str(trial_json), error=error,
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
        measured = measured_fields(trial.study, outcome, baseline_name, trial_dir, ctx.settings)
        if outcome.paired is None and outcome.latency_record and "source" in outcome.latency_record:
            store_predicted_reference(trial.study, outcome.latency_record)  # issue 10: the predicted FP32 scale
        if outcome.subset is not None:
            measured["subset"] = outcome.subset.to_dict()
        worst_class = None
        if evaluation.per_class is not None and ctx.settings.max_class_drop is not None:
            reference = evaluation.per_class if baseline_name == "fp32" else _fp32_per_class(trial.study)
            skipped = classes_to_skip(evaluation.per_class_instances, ctx.settings.min_class_instances)
            measured["class_guard_skipped"] = skipped
            if reference is None:
                log.warning("trial %d: no FP32 per-class scores yet, class guard not applied", trial.number)
            else:
                worst_class = worst_class_drop(reference, evaluation.per_class, skip=skipped)
                trial.set_constraint("class_drop", worst_class["drop"] - ctx.settings.max_class_drop)
        record = TrialRecord(
            trial.number,
            baseline=baseline_name,
            metric=evaluation.metric,
            metrics=dict(evaluation.metrics),
            latency=outcome.latency_record or outcome.latency.to_dict(),  # type: ignore[typeddict-item]
            config=config.to_dict(),
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
    _store(trial, TrialRecord(trial.number, baseline=baseline_name, config=config.to_dict(),
                              config_key=effective_config_key(config), role=_budget.INTERRUPTED))
    trial.study.enqueue_trial(dict(trial.params), user_attrs=TrialRecord.baseline_attrs(baseline_name) if baseline_name else None)


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
    decision = _budget.await_decision(trial.study, trial.number, key, baseline_name is not None, ctx.settings.budget)
    if decision.action == _budget.EVALUATE:
        trial.set_user_attr(TrialRecord.attr_key("role"), _budget.EVALUATE)
        return None
    if decision.action == _budget.OVER_BUDGET:
        trial.set_user_attr(TrialRecord.attr_key("role"), _budget.OVER_BUDGET)
        trial.study.stop()
        raise optuna.TrialPruned(f"budget of {ctx.settings.budget} distinct configurations reached")
    assert decision.of is not None
    original = trial.study.get_trials(deepcopy=False)[decision.of]
    _store(trial, TrialRecord(trial.number, baseline=baseline_name, config=config.to_dict(), config_key=key,
                              role=_budget.DUPLICATE, duplicate_of=decision.of))
    log.info("trial %d repeats trial %d's configuration: not evaluated again", trial.number, decision.of)
    if original.state == optuna.trial.TrialState.COMPLETE and original.values:
        return original.values[0], original.values[1]
    if original.state == optuna.trial.TrialState.PRUNED:  # issue 10: stopped after its subset
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


def run_study(
    ctx: StudyContext, on_trial: Callable[[TrialEvent], None] | None = None, study: optuna.Study | None = None
) -> optuna.Study:
    """Run trials until the study holds ``budget`` finished trials; resumes where it stopped.

    ``study``: an already opened study (see :func:`open_study`), to avoid opening the storage twice.
    """
    study = study or open_study(ctx)
    # Trials of a worker that died are failed (and re-queued) before counting.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    enqueue_baselines(ctx, study)
    enqueue_seeds(ctx, study)
    budget = ctx.settings.budget
    guard = _RunGuard()

    def watch(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # Counts the trials of every worker sharing the storage, so N workers stop together.
        record = TrialRecord.from_trial(trial)
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

    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [watch, artifact_pruner(ctx)]
    if on_trial is not None:
        callbacks.append(lambda s, t: on_trial(_event(s, t, budget)))
    # Issue 12: every trial's build, timing and evaluation in a child process (unless --isolation none).
    with trial_runner(ctx) as run_trial:
        objective = make_objective(ctx, run_trial)
        if finished_count(study) < budget or _budget.missing_baselines(study, baseline_names(ctx)):
            study.optimize(objective, callbacks=callbacks, catch=(Exception,), gc_after_trial=False)
        else:
            log.info("study '%s' already has %d finished trials (budget %d)", ctx.study_name, finished_count(study), budget)
        _raise_if_reference_failed(study, guard)
        if guard.exhausted:
            log.warning("%s; stopping with %d of %d trials", _budget.EXHAUSTED_MESSAGE, finished_count(study), budget)
        complete_baselines(ctx, study, objective, callbacks)
    _raise_if_reference_failed(study, guard)
    return study


@dataclass
class _RunGuard:
    """What the run loop's callback noticed: a failed reference, an exhausted search space."""

    reference_error: str | None = None
    exhausted: bool = False
    duplicates_in_a_row: int = 0
    undecided_failures: int = 0
    stuck_error: str | None = None


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
    while missing := _budget.missing_baselines(study, names):
        if "absent" in missing.values():
            enqueue_baselines(ctx, study)
        if any(state in ("waiting", "absent") for state in missing.values()):
            log.info("running the missing baselines: %s", ", ".join(missing))
            study.optimize(objective, n_trials=1, callbacks=callbacks, catch=(Exception,), gc_after_trial=False)
            continue
        log.info("waiting for baselines another worker runs (or its heartbeat to go stale): %s", ", ".join(missing))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        time.sleep(min(1.0, ctx.settings.heartbeat_seconds / 2))


def _event(study: optuna.Study, trial: optuna.trial.FrozenTrial, budget: int) -> TrialEvent:
    best_value = best_latency = None
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if complete:
        best = max(complete, key=lambda t: (t.values[0], -t.values[1]))
        best_value, best_latency = best.values[0], best.values[1]
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
        error=TrialRecord.recorded_error(trial) or TrialRecord.from_trial(trial).stopped_early,
        seconds=seconds,
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
    """Issue 10: the sentence on partial-INT8 configurations slower than FP32, if they are."""
    prediction_check: PredictionCheck | None = None


def write_results(ctx: StudyContext, study: optuna.Study) -> StudySummary:
    """pareto.json/.csv, winner/ and report.md from what the storage holds now."""
    recs = records(study)
    front = pareto_front(recs)
    references: list[dict[str, Any]] = []
    references_file = ctx.out / "references.json"
    if ctx.settings.compare_ort_quantizer and Precision.INT8 in ctx.space.precisions:
        # Once per output folder: a resumed study reuses the scored references.
        if references_file.is_file():
            references = json.loads(references_file.read_text())
        else:
            references = run_references(ctx, ctx.space.default_calibration.samples)
    fp32 = baseline(recs, "fp32")
    write_pareto(front, None if fp32 is None else fp32.value, ctx.out)
    choice = choose_winner(recs, ctx.settings.max_drop, ctx.settings.min_speedup)
    thresholds = None
    if choice.record is not None and choice.record.config:
        winner_config = TrialConfig.from_dict(choice.record.config)
        if ctx.calibration is not None or not winner_config.uses_int8:
            thresholds = ranges_to_dict(ctx.pipeline.ranges_for(winner_config, every_tensor=True))
        else:  # `sensisearch report` without cached statistics: the ranges the trial itself recorded
            thresholds = recorded_thresholds(choice.record, ctx.out)
    extra = {
        "task": ctx.task,
        # The whole preset (kind, mean/std, channel order, layout), so a deployment feeds the winner what it was scored on.
        "preprocess": ctx.evaluation.preprocess.to_dict(),
        "profile": ctx.backend.profile.name,
        "latency_batch": ctx.settings.latency_batch,
        "objective": ctx.settings.objective,
        "timing_batch": None if ctx.pipeline.timing is None else ctx.pipeline.timing.batch,
    }
    winner_dir = export_winner(
        choice, recs, ctx.out, ctx.model_path, ctx.info.sha256, ctx.backend.describe(), ctx.settings.max_drop,
        thresholds, extra,
    )
    review = build_review(ctx, recs, front, choice, references)
    files = write_review(review, ctx.out)
    check = read_prediction_check(study.user_attrs)  # issue 10: stage 2's predicted vs measured
    context = dataclasses.replace(report_context(ctx, references), prediction_check=None if check is None else PredictionCheck.from_dict(check))
    report = write_report(
        ctx.out, recs, front, choice, context,
        review_markdown=review_markdown(files, ctx.out), float_evidence=review.float_layer_evidence,
    )
    verdict, text = int8_speed_verdict(recs)
    return StudySummary(recs, front, choice, winner_dir, report, verdict, text, partial_int8_verdict(recs), context.prediction_check)


def report_context(ctx: StudyContext, references: list[dict[str, Any]]) -> ReportContext:
    return ReportContext(
        metric=ctx.evaluator.metric,
        model_path=ctx.model_path,
        model_sha256=ctx.info.sha256,
        num_layers=len(ctx.info.layers),
        backend=ctx.backend.describe(),
        latency_batch=ctx.settings.latency_batch,
        budget=ctx.settings.budget,
        precisions=tuple(p.value for p in ctx.space.precisions),
        algorithms=tuple(a.value for a in ctx.space.algorithms),
        sample_counts=tuple(ctx.space.sample_counts),
        max_drop=ctx.settings.max_drop,
        fp16_note=ctx.backend.capabilities.fp16_note,
        warnings=tuple(ctx.warnings),
        references=tuple(references),
        axis_label=None if ctx.pipeline.timing is None else ctx.pipeline.timing.axis_label,
        objective=ctx.settings.objective,
        timing_batch=None if ctx.pipeline.timing is None else ctx.pipeline.timing.batch,
        min_speedup=ctx.settings.min_speedup,
        max_class_drop=ctx.settings.max_class_drop,
        min_class_instances=ctx.settings.min_class_instances,
    )
