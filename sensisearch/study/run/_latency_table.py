"""``sensisearch latency-table``: the study's model and inputs profiled into a latency table."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from sensisearch.artifact import ArtifactPipeline
from sensisearch.backends.factory import choose_backend, with_profile
from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
from sensisearch.calibration.ranges import prepare_calibration
from sensisearch.errors import SensisearchError
from sensisearch.latency import LatencyTable
from sensisearch.latency._measure import measure_table
from sensisearch.measure import machine_identity
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice
from sensisearch.quantize.profiles import PROFILES
from sensisearch.study.config._inputs import calibration_source, resolve_inputs
from sensisearch.study.config._settings import StudySettings


CALIBRATION_SAMPLES = 8
"""Profiling needs valid Q/DQ scales, not good ones: min-max over a few samples."""


def table_pipeline(
    settings: StudySettings, cache_dir: Path, profile: str | None, threads: int | None = None
) -> tuple[ArtifactPipeline, CalibrationChoice, dict[str, np.ndarray], Path]:
    """The study's model, pipeline and min-max ranges over a few ``--calib-data`` samples, plus one real input batch."""

    resolved = resolve_inputs(settings)
    settings = resolved.settings
    if settings.data.calib_data is None:
        raise SensisearchError("latency-table needs --calib-data (a few real inputs to calibrate and profile), or --example digits")
    spec = resolved.input_spec
    source = calibration_source(settings, resolved.model, spec)
    samples = min(CALIBRATION_SAMPLES, source.size)
    calibration = prepare_calibration(
        resolved.model_path, resolved.model, resolved.info, source, [samples], seed=0, cache_dir=cache_dir, threads=threads,
    )
    if settings.backend.backend in (None, "onnxruntime"):
        backend = OnnxRuntimeBackend(threads=threads, profile=PROFILES[profile or "onnxruntime-cpu"])
    else:  # the target itself (TensorRT on the GPU machine): its own profile only

        choice = choose_backend(settings.backend_settings(), cache_dir)
        if not choice.can_run:
            raise SensisearchError(f"--backend {settings.backend.backend}: cannot run engines here ({choice.run_reason}); measure the table on the target")
        backend, _ = with_profile(choice.backend, profile)
    pipeline = ArtifactPipeline(resolved.model, resolved.info, backend, calibration)
    batch = next(iter(source.batches(list(range(source.size))[:1], spec.static_batch or 1)))
    return pipeline, CalibrationChoice(CalibrationAlgorithm.MINMAX, samples), {spec.name: np.ascontiguousarray(batch)}, resolved.model_path


def measure_latency_table(
    settings: StudySettings, out: Path, profile: str | None, repeats: int, device: str | None = None,
    cache_dir: Path | None = None,
) -> tuple[LatencyTable, Path]:
    """Profile the study's model on its backend into a latency table saved at ``out``; returns it and the model path."""
    if repeats < 1:
        raise SensisearchError(f"--repeats {repeats}: give at least 1 profiled run per configuration")
    if out.is_dir() or out.suffix.lower() != ".json":
        raise SensisearchError(f"--out {out}: give the table's .json file path")
    cache_dir = cache_dir or out.parent / ".sensisearch-cache"
    pipeline, calibration, feeds, model_path = table_pipeline(settings, cache_dir, profile, settings.backend.threads)
    device = device or machine_identity().cpu_model
    with tempfile.TemporaryDirectory(prefix="latency-table-") as tmp:
        table = measure_table(pipeline, calibration, feeds, Path(tmp), model_path=model_path, repeats=repeats, device=device)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.save(out)
    return table, model_path
