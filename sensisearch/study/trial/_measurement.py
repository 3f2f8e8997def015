"""What a trial measures besides its metric: paired timing settings, the FP32 reference, the drop CI.

The runner calls three things from here: :func:`timing_plan` once per study,
:func:`study_reference_ms` before a trial, and :func:`measured_fields` after it
(which also stores the FP32 baseline's reference latency and per-image results
as study attributes, the first time).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sensisearch.measure import LoadPolicy, PairedTimingSettings
from sensisearch.study.trial import _accuracy
from sensisearch.study.store._record import (
    fp32_per_image_attrs,
    read_fp32_per_image,
    read_reference_ms,
    reference_ms_attrs,
)
from sensisearch.study.store._classes import LatencyClass, latency_class_attrs, read_latency_class
from sensisearch.study.store._timing import PairedTiming
from sensisearch.study.trial._pipeline import TimingPlan

if TYPE_CHECKING:
    from pathlib import Path

    import optuna

    from sensisearch.backends.factory import BackendSettings
    from sensisearch.model.tensor import TensorSpec
    from sensisearch.study.store._record import TrialRecord
    from sensisearch.study.trial._pipeline import TrialOutcome
    from sensisearch.study.config._settings import StudySettings

log = logging.getLogger(__name__)

DEFAULT_THROUGHPUT_BATCH = 8
"""ONNX Runtime CPU: a batch where per-image overheads are amortised but memory stays small."""
IN_STUDY_MIN_ROUNDS = 30
"""A 95% CI of a median over fewer rounds is mostly the bootstrap's own noise."""


def opt_batch(shapes: tuple[str, ...] | list[str] | None) -> int | None:
    """The batch of a TensorRT profile's opt shape (``name:MIN/OPT/MAX``, dims ``AxBxCxD``), if given."""
    for spec in shapes or ():
        _, _, dims = str(spec).rpartition(":")
        parts = dims.split("/")
        if len(parts) == 3:
            try:
                return int(parts[1].split("x")[0])
            except ValueError:
                return None
    return None


def timing_plan(settings: StudySettings, backend_settings: BackendSettings, spec: TensorSpec | None) -> tuple[TimingPlan, list[str]]:
    """How the study times trials, and warnings (e.g. a static batch that overrides the requested one)."""
    warnings: list[str] = []
    if settings.measurement.objective == "throughput":
        batch = settings.measurement.throughput_batch or opt_batch(backend_settings.shapes) or DEFAULT_THROUGHPUT_BATCH
        flag = "--throughput-batch"
    else:
        batch, flag = settings.backend.latency_batch, "--latency-batch"
    static = None if spec is None else spec.static_batch
    if static is not None and static != batch:
        warnings.append(f"{flag} {batch}: the model's input has a fixed batch of {static}; timing at batch {static}")
        batch = static
    timing = PairedTimingSettings(
        min_rounds=IN_STUDY_MIN_ROUNDS,
        max_rounds=max(IN_STUDY_MIN_ROUNDS, 2000),
        target_ci_width=settings.measurement.timing_target_ci,
        max_seconds=settings.measurement.timing_seconds,
        seed=settings.search.seed,
    )
    return TimingPlan(settings.measurement.objective, batch, timing, load=in_study_load_policy(backend_settings)), warnings


def needed_cores(backend_settings: BackendSettings) -> int:
    """Cores a timed session needs: ONNX Runtime's intra-op threads of a timed session on CPU, one host thread for a GPU backend."""
    if backend_settings.name not in (None, "onnxruntime", "auto"):
        return 1
    from sensisearch.backends.onnxruntime import default_timing_threads

    return max(1, backend_settings.threads or default_timing_threads())


def in_study_load_policy(backend_settings: BackendSettings) -> LoadPolicy:
    """In-study timing waits less than verify does: a trial's figure is refined or re-timed later anyway
    (its latency class pools the next timing; the tournament re-times what decides the result)."""
    return LoadPolicy(needed_cores=needed_cores(backend_settings), max_wait_s=2.0, max_retries=2, retry_wait_s=0.5)


def class_figure(study: optuna.Study, key: str | None, target_ci_width: float) -> dict[str, Any] | None:
    """The ``known_latency`` a trial of latency class ``key`` reuses instead of being timed: the class's
    pooled figure once the class is settled (its CI meets the target, or it was timed often enough);
    None: time it (first member, or a refinement that pools its rounds)."""
    cls = read_latency_class(study.user_attrs, key)
    if cls is None or not cls.ratios or not cls.settled(target_ci_width):
        return None
    figure = cls.figure()
    return {**cls.last, **figure, "candidate_times_ms": [], "stopped_by": "latency_class"}


def pool_into_class(study: optuna.Study, number: int, outcome: TrialOutcome) -> None:
    """Record trial ``number`` as a member of its latency class, pooling its rounds when it was timed."""
    key = outcome.latency_class
    if key is None or outcome.paired is None:
        return
    cls = read_latency_class(study.user_attrs, key)
    timed = outcome.timed
    if timed is not None:
        last = {k: v for k, v in timed.paired.to_dict().items() if k != "candidate_times_ms"}
        last["runs_per_round"] = timed.block
        under_load = bool(timed.paired.load_record is not None and timed.paired.load_record.under_load)
        control = None if timed.control is None else timed.control.ratio
        cls = LatencyClass.first(key, timed.ratios, last, under_load, control) if cls is None else cls.pooled(
            timed.ratios, last, under_load, control)
    if cls is None:  # reused a figure whose class vanished meanwhile: nothing to add to
        return
    for attr, value in latency_class_attrs(cls.with_member(number)).items():
        study.set_user_attr(attr, value)


def study_reference_ms(study: optuna.Study) -> float | None:
    """The study's FP32 reference latency, once the FP32 baseline trial has fixed it."""
    return read_reference_ms(study.user_attrs)


def measured_fields(
    study: optuna.Study, outcome: TrialOutcome, baseline: str | None, trial_dir: Path, settings: StudySettings,
    fp32_bootstraps: _accuracy.FP32Bootstraps | None = None,
) -> dict[str, Any]:
    """``TrialRecord`` fields from the paired timing and the per-image results; the FP32 baseline
    also fixes the study's reference latency and FP32 per-image results (study attributes).

    ``fp32_bootstraps``: the worker's bootstrap against the stored FP32 results, reused
    across its trials (None: one made for this trial)."""
    fields: dict[str, Any] = {}
    if outcome.paired is not None:
        fields["paired"] = PairedTiming.of(outcome.paired, outcome.timing_facts)
        if baseline == "fp32" and study_reference_ms(study) is None and outcome.latency_record:
            for key, value in reference_ms_attrs(outcome.latency_record["reference_ms"]).items():
                study.set_user_attr(key, value)
    evaluation = outcome.evaluation
    if evaluation.per_class_instances is not None:
        fields["per_class_instances"] = dict(evaluation.per_class_instances)
    per_image = evaluation.per_image
    if per_image is None:
        return fields
    fields["per_image"] = str(_accuracy.save_per_image(per_image, trial_dir))
    encoded = read_fp32_per_image(study.user_attrs)
    if baseline == "fp32" and encoded is None:
        encoded = _accuracy.encode(per_image)
        for key, value in fp32_per_image_attrs(encoded).items():
            study.set_user_attr(key, value)
    if encoded is None:
        log.warning("no FP32 per-image results in the study yet: no drop CI for this trial (verify computes it)")
        return fields
    started = time.perf_counter()
    # FP32's own trial too: its drop against itself is 0, and the FP32 side it computes is what every later trial reuses.
    bootstraps = fp32_bootstraps or _accuracy.FP32Bootstraps(settings.measurement.drop_resamples, settings.search.seed)
    estimate = bootstraps.estimate(encoded, per_image, evaluation.metric)
    if estimate is not None:
        fields["drop_ci95"] = [estimate.ci95[0], estimate.ci95[1]]
        fields["drop_within_noise"] = estimate.within_noise
        log.debug("drop CI (%d resamples) in %.2f s", settings.measurement.drop_resamples, time.perf_counter() - started)
    return fields


def classes_to_skip(instances: dict[str, int] | None, min_instances: int) -> list[str]:
    """Classes with fewer ground-truth instances than ``min_instances``: too few for a per-class AP to mean much."""
    if not instances:
        return []
    return sorted(name for name, n in instances.items() if n < min_instances)


def accuracy_json(record: TrialRecord) -> dict[str, Any]:
    """The ``accuracy`` block of ``trial.json``: drop CI vs FP32 and what the class guard skipped."""
    return {
        "accuracy": {
            "drop_ci95": record.drop_ci95,
            "drop_within_noise": record.drop_within_noise,
            "per_image": record.per_image,
            "per_class_instances": record.per_class_instances,
            "class_guard_skipped": record.class_guard_skipped,
        }
    }
