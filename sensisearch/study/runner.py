"""Run (or resume) a study: prepare everything once, then trials until the budget is met."""

from __future__ import annotations

import json
import logging
import math
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection

import optuna

from sensisearch.backends.base import LatencySettings
from sensisearch.backends.factory import choose_backend
from sensisearch.errors import SensisearchError
from sensisearch.fileio import write_json_atomic
from sensisearch.quantize.config import CalibrationChoice, Precision, TrialConfig
from sensisearch.study._context import StudyContext
from sensisearch.study._isolation import RunTrial, trial_runner
from sensisearch.study._measurement import accuracy_json, classes_to_skip, measured_fields, study_reference_ms, timing_plan
from sensisearch.study._record import TrialRecord, WorstClass
from sensisearch.study._seeds import apply_sensitivity, enqueue_seeds, make_sampler, with_profile
from sensisearch.study._storage import open_storage
from sensisearch.study._worker import artifact_pruner, store_settings, worker_device, worker_host
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


def prepare(settings: StudySettings, on_statistics: StatisticsProgress | None = None, calibrate: bool = True) -> StudyContext:
    """Load the model and data, pick the backend, collect calibration statistics (cached).

    ``on_statistics(seen, total)`` reports the statistics pass; ``calibrate=False``
    (rewriting results of a finished study) only reads cached statistics, never runs a pass.
    """
    resolved = resolve_inputs(settings)
    settings = resolved.settings
    out = settings.out or Path("runs") / resolved.model_path.stem
    out.mkdir(parents=True, exist_ok=True)
    backend_settings = settings.backend_settings()
    choice = choose_backend(backend_settings, out)
    if not choice.can_run:
        raise SensisearchError(
            f"--backend {settings.backend}: builds here but cannot run engines ({choice.run_reason}); "
            "run the study on the GPU machine, or use --backend onnxruntime here and `sensisearch build` there"
        )
    backend, profile_warning = with_profile(choice.backend, settings.profile)  # issue 10: --profile
    precisions = tuple(settings.precisions or backend.capabilities.precisions)
    unsupported = [p.value for p in precisions if p not in backend.capabilities.precisions]
    if unsupported:
        log.warning("backend %s: %s offered anyway (%s)", backend.name, unsupported, backend.capabilities.fp16_note)
    evaluation = build_evaluation(settings, resolved.input_spec, resolved.model, out, need_calibration=Precision.INT8 in precisions)
    calib_source = evaluation.calibration
    calibration = None
    sample_counts: tuple[int, ...] = tuple(settings.sample_counts)
    if Precision.INT8 in precisions:
        if calib_source is None:
            raise SensisearchError("INT8 needs calibration data: pass --calib-data DIR (or --precisions fp16,fp32)")
        sample_counts = capped_sample_counts(settings.sample_counts, calib_source.size)
        calibration = prepare_calibration(
            resolved.model_path, resolved.model, resolved.info, calib_source, sample_counts,
            seed=settings.seed, cache_dir=settings.cache_dir or out / "cache", threads=settings.threads,
            progress=on_statistics, cached_only=not calibrate,
        )
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
    pipeline = TrialPipeline(
        resolved.model, resolved.info, backend, evaluation.evaluator, calibration,
        LatencySettings(min_seconds=settings.timing_seconds), settings.latency_batch, timing,
    )
    storage_url = settings.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    ctx = StudyContext(
        settings=settings, out=out, model_path=resolved.model_path, model=resolved.model, info=resolved.info,
        backend_settings=backend_settings, backend=backend, evaluation=evaluation, space=space, pipeline=pipeline,
        calibration=calibration, storage_url=storage_url, study_name=settings.study_name or resolved.model_path.stem,
        model_warnings=tuple(resolved.warnings) + ((profile_warning,) if profile_warning else ()), backend_reason=choice.reason,
    )
    return apply_sensitivity(ctx)  # issue 10: sensitivity profile and compact space when the search uses them


def make_storage(url: str, heartbeat_seconds: int) -> optuna.storages.BaseStorage | str:
    """An RDB storage (SQLite, PostgreSQL, MySQL) with heartbeats, else the URL as given.

    With heartbeats a worker that dies (kill -9, lost machine) leaves a RUNNING
    trial whose heartbeat stops; after the grace period any worker marks it
    FAILED and queues its configuration once more, so nothing is lost.
    """
    if url.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql"):
        # Issue 12: one checked opener (psycopg 3, pool for many workers, masked one-line errors).
        return open_storage(url, heartbeat_seconds)
    return url


def open_study(ctx: StudyContext) -> optuna.Study:
    sampler = make_sampler(ctx.settings.sampler, ctx.settings.seed)
    try:
        study = optuna.create_study(
            storage=make_storage(ctx.storage_url, ctx.settings.heartbeat_seconds), study_name=ctx.study_name,
            load_if_exists=True, directions=["maximize", "minimize"], sampler=sampler,
        )
    except (ValueError, ImportError, optuna.exceptions.StorageInternalError) as exc:
        raise SensisearchError(f"--storage {ctx.storage_url}: cannot open the study ({str(exc).splitlines()[0]})") from exc
    recorded = study.user_attrs.get("model_sha256")
    if recorded is None:
        study.set_user_attr("model_sha256", ctx.info.sha256)
        study.set_user_attr("model_path", str(ctx.model_path.resolve()))
        study.set_user_attr("metric", ctx.evaluator.metric)
        study.set_user_attr("layers", list(ctx.space.layers))
        study.set_user_attr("backend", ctx.backend.describe())
    elif recorded != ctx.info.sha256:
        raise SensisearchError(
            f"study '{ctx.study_name}' in {ctx.storage_url} was made for another model (sha256 {recorded[:12]}...); "
            "use a new --out or --study-name"
        )
    # Issue 11: named objectives for optuna-dashboard, and the settings `sensisearch report` reloads.
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([ctx.evaluator.metric, "latency_ms"])
    # The latest run's settings (a resume may raise --budget): what `sensisearch worker` on another
    # host starts from and what `report` rewrites the results with.
    store_settings(study, ctx)
    return study


def enqueue_baselines(ctx: StudyContext, study: optuna.Study) -> None:
    """All-FP32 first (the reference), then all-INT8 and all-FP16 where offered."""
    if study.trials:
        return  # resumed: the baselines were queued when the study was made
    order = [Precision.FP32, Precision.INT8, Precision.FP16]
    for precision in order:
        if precision in ctx.space.precisions:
            config = ctx.space.uniform(precision)
            study.enqueue_trial(ctx.space.params_for(config), user_attrs=TrialRecord.baseline_attrs(precision.value), skip_if_exists=True)


def finished_count(study: optuna.Study) -> int:
    """Trials that count against the budget.

    A trial FAILED by the heartbeat (its worker died) has no recorded error and
    is re-queued, so it does not use up budget; a trial that failed on its own
    (bad build, exception) does.
    """
    count = 0
    for t in study.get_trials(deepcopy=False, states=FINISHED_STATES):
        if t.state == optuna.trial.TrialState.FAIL and TrialRecord.recorded_error(t) is None:
            continue
        count += 1
    return count


def make_objective(ctx: StudyContext, run_trial: RunTrial | None = None) -> Callable[[optuna.Trial], tuple[float, float]]:
    """``run_trial``: builds, times and evaluates one configuration (default: in this process)."""
    run_trial = run_trial or ctx.pipeline.run
    host, device = worker_host(), worker_device(ctx.backend.name)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        config = ctx.space.suggest(trial)
        trial_dir = ctx.trials_dir / f"{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        # The baseline mark was stored by enqueue_baselines.
        baseline_name = TrialRecord.from_attrs(trial.number, trial.user_attrs).baseline
        trial_json = trial_dir / "trial.json"
        header = {
            "number": trial.number,
            "baseline": baseline_name,
            "model": {"path": str(ctx.model_path.resolve()), "sha256": ctx.info.sha256},
            "backend": ctx.backend.describe(),
            "config": config.to_dict(),
        }
        try:
            outcome = run_trial(config, trial_dir, study_reference_ms(trial.study))
        except Exception as exc:
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}" if not isinstance(exc, SensisearchError) else str(exc)
            failed = TrialRecord(
                trial.number, baseline=baseline_name, config=config.to_dict(), trial_json=str(trial_json), error=error,
                host=host, device=device,
            )
            _store(trial, failed)
            write_json_atomic(trial_json, {**header, "status": "failed", "error": error, "traceback": traceback.format_exc()})
            raise
        evaluation = outcome.evaluation
        measured = measured_fields(trial.study, outcome, baseline_name, trial_dir, ctx.settings)
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
        )
        _store(trial, record)
        write_json_atomic(trial_json, {**header, "status": "complete", **outcome.to_dict(), **accuracy_json(record)})
        return evaluation.value, outcome.median_ms

    return objective


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
    remaining = budget - finished_count(study)
    if remaining <= 0:
        log.info("study '%s' already has %d finished trials (budget %d)", ctx.study_name, finished_count(study), budget)
        return study
    def stop_at_budget(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        # Counts the trials of every worker sharing the storage, so N workers stop together.
        if finished_count(study) >= budget:
            study.stop()

    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [stop_at_budget, artifact_pruner(ctx)]
    if on_trial is not None:
        callbacks.append(lambda s, t: on_trial(_event(s, t, budget)))
    with trial_runner(ctx) as run_trial:
        study.optimize(
            make_objective(ctx, run_trial), n_trials=remaining, callbacks=callbacks, catch=(Exception,), gc_after_trial=False
        )
    return study


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
        error=TrialRecord.recorded_error(trial),
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
    report = write_report(
        ctx.out, recs, front, choice, report_context(ctx, references),
        review_markdown=review_markdown(files, ctx.out), float_evidence=review.float_layer_evidence,
    )
    verdict, text = int8_speed_verdict(recs)
    return StudySummary(recs, front, choice, winner_dir, report, verdict, text)


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
