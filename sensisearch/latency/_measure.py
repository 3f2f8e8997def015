"""Measure a :class:`LatencyTable` with the study's own pipeline (plan, emit, build) and a backend's profiler."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from sensisearch.latency._attribution import AttributedKernels, NameAttribution, charge
from sensisearch.latency._table import ConfigProfile, LatencyTable, boundary_count, boundary_tensors, entry_layers, fit_table
from sensisearch.quantize.config import CalibrationChoice, Precision, TrialConfig

if TYPE_CHECKING:
    from sensisearch.artifact import ArtifactPipeline

log = logging.getLogger(__name__)


def profiling_configs(layers: Sequence[str], precisions: Sequence[Precision], calibration: CalibrationChoice) -> dict[str, TrialConfig]:
    """All-FP32; per lower precision: all of it, two complementary checkerboards with FP32 (many boundaries), and
    all of it but the first / last quarter of the layers in FP32 (one boundary each, like "all-INT8 minus top-k")."""
    configs = {"fp32": TrialConfig.uniform(list(layers), Precision.FP32, calibration)}
    quarter = max(1, len(layers) // 4)
    for precision in precisions:
        if precision is Precision.FP32:
            continue
        p = precision.value
        configs[f"all-{p}"] = TrialConfig.uniform(list(layers), precision, calibration)
        for parity in (0, 1):
            configs[f"checker{parity}-{p}"] = TrialConfig(
                {n: precision if i % 2 == parity else Precision.FP32 for i, n in enumerate(layers)}, calibration
            )
        configs[f"{p}-but-first-quarter"] = TrialConfig(
            {n: Precision.FP32 if i < quarter else precision for i, n in enumerate(layers)}, calibration
        )
        configs[f"{p}-but-last-quarter"] = TrialConfig(
            {n: Precision.FP32 if i >= len(layers) - quarter else precision for i, n in enumerate(layers)}, calibration
        )
    return configs


def attribute(nodes: Mapping[tuple[str, str], float], attribution: NameAttribution) -> AttributedKernels:
    """ONNX Runtime's per-node times (ms) -> per layer, per Q/DQ tensor and the rest, with kernel counts."""
    return charge((attribution.ort_node(node, op), ms) for (node, op), ms in nodes.items())


def end_to_end_ms(
    pipeline: ArtifactPipeline, artifacts: Mapping[str, Path], feeds: Mapping[str, np.ndarray], reference: str, seconds: float,
) -> dict[str, float]:
    """Each artifact's ``session.run`` time without the profiler: paired interleaved timing against ``reference``.

    Returned as the reference's median in the same rounds / the paired speed-up, so every figure shares one
    reference time and keeps the ratio that paired timing measures (the only stable figure on a shared machine).
    """
    from sensisearch.measure import PairedTimingSettings, time_interleaved

    timing = pipeline.backend.timing_backend()
    runners = {name: timing.load(path) for name, path in artifacts.items()}
    try:
        arms = {name: runner.timing_arm(feeds) for name, runner in runners.items()}
        paired = time_interleaved(arms, reference, PairedTimingSettings(max_seconds=seconds, min_rounds=10))
    finally:
        for runner in runners.values():
            runner.close()
    reference_ms = paired[reference].reference_median_ms
    return {name: reference_ms / latency.speedup for name, latency in paired.items()}


def measure_table(
    pipeline: ArtifactPipeline,
    calibration: CalibrationChoice,
    feeds: Mapping[str, np.ndarray],
    work_dir: Path,
    *,
    model_path: Path,
    precisions: Sequence[Precision] = (Precision.INT8, Precision.FP32),
    repeats: int = 20,
    seed: int = 0,
    device: str = "cpu",
    keep: bool = False,
    timing_seconds: float = 10.0,
) -> LatencyTable:
    """Profile :func:`profiling_configs` with the backend's profiler (ONNX Runtime: interleaved), time them end to end
    without it (:func:`end_to_end_ms`, at most ``timing_seconds``; 0 skips it) and fit the table."""
    from sensisearch.latency._profile_ort import profile_interleaved

    info, model = pipeline.info, pipeline.model
    configs = profiling_configs(info.layer_names, precisions, calibration)
    attribution = NameAttribution(model, info, pipeline.index)
    artifacts: dict[str, Path] = {}
    placements = {}
    attributed: dict[str, AttributedKernels] = {}
    timed: dict[str, float] = {}
    try:
        for name, config in configs.items():
            placement = pipeline.plan(config)
            placements[name] = placement
            deployable, _ = pipeline.emit(config, work_dir / name, placement=placement)
            artifacts[name] = pipeline.build(deployable, work_dir / name, config).artifact
        if pipeline.backend.name == "onnxruntime":
            # The timing sessions' threads, as the end-to-end anchor below and every study timing use: per-kernel
            # INT8 gains differ with the thread count (digits all-INT8: 2.9x at 1 thread, 1.7-2.3x at 2 on 2 cores),
            # so kernels profiled at another count than the anchor mis-predict mixes the anchor cannot rescale.
            profiler = pipeline.backend.timing_backend()
            nodes = profile_interleaved(profiler, artifacts, feeds, repeats, work_dir / "profiles", seed)  # type: ignore[arg-type]
            attributed = {name: attribute(nodes[name], attribution) for name in configs}
        else:  # TensorRT: trtexec's per-layer profiler on each built engine (GPU machine)
            from sensisearch.latency._profile_tensorrt import attribute_tensorrt, trtexec_profile

            for name, artifact in artifacts.items():
                layers = trtexec_profile(artifact, work_dir / name / "profile.json", iterations=max(repeats, 10))
                attributed[name] = attribute_tensorrt(layers, attribution)
        if timing_seconds > 0:
            timed = end_to_end_ms(pipeline, artifacts, feeds, "fp32", timing_seconds)
    finally:
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    profiles = []
    for name, config in configs.items():
        kernels = attributed[name]
        placement = placements[name]
        profiles.append(ConfigProfile(
            name=name, precisions={n: p.value for n, p in config.precisions.items()}, layer_ms=kernels.layer_ms,
            qdq_ms=kernels.qdq_ms, rest_ms=kernels.rest_ms, total_ms=kernels.total_ms, qdq_tensors=tuple(placement.tensors),
            boundaries=boundary_count(placement, model, pipeline.index),
            boundary_set=tuple(boundary_tensors(placement, model, pipeline.index)),
            entry_layers=tuple(entry_layers(
                info, {n: p.value for n, p in config.precisions.items()}, set(boundary_tensors(placement, model, pipeline.index))
            )),
            layer_kernels=kernels.layer_kernels, qdq_kernels=kernels.qdq_kernels, rest_kernels=kernels.rest_kernels,
            end_to_end_ms=timed.get(name),
        ))
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    threads = getattr(pipeline.backend.timing_backend(), "threads", None) if pipeline.backend.name == "onnxruntime" else None
    table = fit_table(
        profiles, info.layer_names, model=str(model_path), model_sha256=info.sha256,
        profile=pipeline.backend.profile.name, backend=pipeline.backend.name, device=device, repeats=repeats, batch=batch,
        threads=threads,
    )
    table.bind(model, info)
    for record, config in zip(table.configs, configs.values()):
        record["predicted_ms"] = table.predict(config.precisions)
        record["predicted_kernel_ms"] = table.kernel_ms(config.precisions)
    return table
