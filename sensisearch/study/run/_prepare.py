"""Prepare a study once: inputs, backend, evaluation, search space, identity checks and calibration statistics."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection

import onnx
import optuna

from sensisearch.backends.base import LatencySettings
from sensisearch.backends.factory import choose_backend
from sensisearch.errors import SensisearchError
from sensisearch.quantize.config import CalibrationChoice, Precision
from sensisearch.study.trial import _fidelity
from sensisearch.study.run._context import StudyContext
from sensisearch.study.trial._measurement import timing_plan
from sensisearch.study.run._seeding import apply_sensitivity
from sensisearch.backends.factory import with_profile
from sensisearch.study.trial._predicted import latency_predictor, latency_source_identity
from sensisearch.study.run._identity import (
    REVIEW_MAY_DIFFER,
    StudyIdentity,
    check_out_identity,
    check_out_owner,
    identity_of,
    refusal,
    write_study_file,
)
from sensisearch.study.store._storage import mask_url, open_storage
from sensisearch.calibration.ranges import prepare_calibration
from sensisearch.study.trial._pipeline import TrialPipeline
from sensisearch.study.config._settings import StudySettings, bias_choices, resolve_search
from sensisearch.study.search._space import SearchSpace, capped_sample_counts
from sensisearch.study.config._inputs import build_evaluation, hold_out, resolve_inputs

if TYPE_CHECKING:
    from sensisearch.backends.base import Backend
    from sensisearch.calibration.statistics import StatisticsProgress

log = logging.getLogger(__name__)


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
    if reviewing and settings.backend.latency_table is not None and not Path(settings.backend.latency_table).is_file():
        # Stage 2 on the target need not have the study machine's copy of the table: the
        # trials' predictions are recorded; only the table's identity cannot be checked.
        log.warning("latency table %s is not on this host: its identity is not checked", settings.backend.latency_table)
        settings = settings.replace(latency_table=None)
        ignore = (*ignore, "timing")
    out = settings.storage.out or Path("runs") / resolved.model_path.stem
    study_name = settings.storage.study_name or resolved.model_path.stem
    # Nothing is written into another study's --out, and the storage is
    # opened and checked before calibration or any other long work.
    if settings.data.task == "classification":
        check_classifier_output(resolved.model, f"--task classification with --model {resolved.model_path}")
    check_out_owner(out, study_name, resolved.info.sha256)
    make_out_dir(out)
    storage_url = settings.storage.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    storage = open_storage(storage_url, settings.execution.heartbeat_seconds)
    # A resumed study keeps the sampler and search it was made with unless a flag names another.
    settings = resolve_search(settings, _stored_settings(storage, study_name))
    backend_settings = settings.backend_settings()
    choice = choose_backend(backend_settings, out)
    if not choice.can_run:
        raise SensisearchError(
            f"--backend {settings.backend.backend}: builds here but cannot run engines ({choice.run_reason}); "
            "run the study on the GPU machine, or use --backend onnxruntime here and `sensisearch build` there"
        )
    backend, profile_warning = with_profile(choice.backend, settings.search.profile)  # --profile
    # A foreign profile or --latency-table: trials take their latency from a predictor, untimed.
    predictor = latency_predictor(settings, choice.backend.profile.name, backend, resolved.model, resolved.info)
    precisions = tuple(settings.search.precisions or target_precisions(backend))
    unsupported = [p.value for p in precisions if p not in backend.capabilities.precisions]
    if unsupported and settings.search.precisions is not None:  # the target's own FP16 (no --precisions) is no surprise
        log.warning("backend %s: %s offered anyway (%s)", backend.name, unsupported, backend.capabilities.fp16_note)
    evaluation = build_evaluation(settings, resolved.input_spec, resolved.model, out, need_calibration=Precision.INT8 in precisions)
    if settings.acceptance.holdout and settings.search.fidelity_subset:
        raise SensisearchError("--fidelity-subset with --holdout: a trial scored in stages cannot leave the held-out images "
                               "out; use one of the two")
    evaluation = hold_out(evaluation, settings.acceptance.holdout, settings.search.seed)  # search images only
    check_task_settings(settings, evaluation.task, resolved.model)
    calib_source = evaluation.calibration
    calibration = None
    sample_counts: tuple[int, ...] = tuple(settings.search.sample_counts)
    if Precision.INT8 in precisions:
        if calib_source is None:
            raise SensisearchError("INT8 needs calibration data: pass --calib-data DIR (or --precisions fp16,fp32)")
        sample_counts = capped_sample_counts(settings.search.sample_counts, calib_source.size)
    default_samples = sample_counts[0] if len(sample_counts) == 1 else sample_counts[min(1, len(sample_counts) - 1)]
    space = SearchSpace(
        layers=tuple(layer.name for layer in resolved.info.layers),
        precisions=precisions,
        algorithms=tuple(settings.search.algorithms),
        sample_counts=sample_counts,
        percentiles=tuple(settings.search.percentiles),
        default_calibration=CalibrationChoice(settings.search.default_algorithm, default_samples, 99.99),
        bias_correction=bias_choices(settings) if Precision.INT8 in precisions else (False,),
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
            seed=settings.search.seed, cache_dir=settings.data.cache_dir or out / "cache", threads=settings.backend.threads,
            progress=on_statistics, cached_only=not calibrate,
        )
    pipeline = TrialPipeline(
        resolved.model, resolved.info, backend, evaluation.evaluator, calibration,
        LatencySettings(min_seconds=settings.measurement.timing_seconds), settings.backend.latency_batch, timing, predictor=predictor,
        subset=_fidelity.subset_plan(settings, evaluation.evaluator, evaluation.task),  # subset first
    )
    if calib_source is not None and True in space.bias_correction:
        source = calib_source
        batch = source.static_batch or 8
        # The study's calibration order; bias_shifts stops after its sample count.
        pipeline.bias_feeds = lambda: ({source.input_name: b} for b in source.batches(list(range(source.size)), batch))
    ctx = StudyContext(
        settings=settings, out=out, model_path=resolved.model_path, model=resolved.model, info=resolved.info,
        backend_settings=backend_settings, backend=backend, evaluation=evaluation, space=space, pipeline=pipeline,
        calibration=calibration, storage_url=storage_url, study_name=study_name,
        model_warnings=tuple(resolved.warnings) + ((profile_warning,) if profile_warning else ()), backend_reason=choice.reason,
        storage=storage, identity=identity, identity_may_differ=ignore,
    )
    return apply_sensitivity(ctx)  # sensitivity profile and compact space when the search uses them


def _stored_settings(storage: optuna.storages.BaseStorage, study_name: str) -> dict[str, Any] | None:
    """The settings a stored study recorded ({} for one made before they were recorded); None: no such study yet."""
    from sensisearch.study.store._worker import SETTINGS_ATTR

    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    return dict(storage.get_study_user_attrs(study_id).get(SETTINGS_ATTR) or {})


def target_precisions(backend: Backend) -> tuple[Precision, ...]:
    """The precisions a study offers when ``--precisions`` is not given: the target's.

    Scored off-target (``--profile tensorrt`` on ONNX Runtime) the target has FP16
    kernels, so INT8, FP16 and FP32 are offered; FP16 layers then run with real
    float16 weights and activations here, so their accuracy is the target's.
    """
    own = tuple(backend.capabilities.precisions)
    if backend.profile.name == "tensorrt" and Precision.FP16 not in own:
        return (Precision.INT8, Precision.FP16, Precision.FP32)
    return own


def make_out_dir(out: Path) -> None:
    """Create ``--out`` and check it is writable, with one line when it is not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A probe of this process's own: two workers starting on one --out must not delete each other's.
        with tempfile.TemporaryFile(dir=out, prefix=".sensisearch-write-check-"):
            pass
    except OSError as exc:
        raise SensisearchError(f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__}); pass a writable folder") from exc


def check_task_settings(settings: StudySettings, task: str, model: onnx.ModelProto) -> None:
    """Settings that only make sense for some tasks, and a classifier's output shape."""
    if settings.acceptance.max_class_drop is not None and task != "detection":
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
