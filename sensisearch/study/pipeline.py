"""One trial, start to finish: placement -> thresholds -> deployable ONNX -> build -> latency -> accuracy.

The Q/DQ placement is planned once per trial and handed to both the range lookup
and the emitter. :class:`ArtifactPipeline` (plan, ranges, emit, build) is shared by
the study's :class:`TrialPipeline` and ``sensisearch build --config``
(:func:`sensisearch.study.build.build_from_config`, with the recorded ranges), so a
configuration always turns into the same artifact.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import onnx

from sensisearch.backends.base import Backend, BuildResult, LatencySettings, LatencyStats
from sensisearch.evaluation.base import EvaluationResult, Evaluator
from sensisearch.model.analysis import ModelInfo
from sensisearch.quantize.config import Precision, TrialConfig
from sensisearch.quantize.emit import emit_deployable_onnx, save_model
from sensisearch.quantize.graph import GraphIndex
from sensisearch.quantize.placement import Placement, plan_placement, statistics_tensors
from sensisearch.quantize.ranges import TensorRange
from sensisearch.study.calibrate import CalibrationRanges

log = logging.getLogger(__name__)

DEPLOYABLE_NAME = "deployable.onnx"


@dataclass
class TrialOutcome:
    config: TrialConfig
    deployable: Path
    build: BuildResult
    latency: LatencyStats
    evaluation: EvaluationResult
    timings: dict[str, float] = field(default_factory=dict)
    ranges: dict[str, TensorRange] = field(default_factory=dict)
    """Calibrated range of every tensor any backend profile may quantize, so the
    configuration can be rebuilt for another backend without calibration data."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "thresholds": ranges_to_dict(self.ranges),
            "deployable_onnx": str(self.deployable),
            "artifact": str(self.build.artifact),
            "build": {"seconds": self.build.seconds, "layer_precisions": dict(self.build.layer_precisions), **dict(self.build.details)},
            "latency": self.latency.to_dict(),
            "evaluation": self.evaluation.to_dict(),
            "timings": self.timings,
        }


def ranges_to_dict(ranges: dict[str, TensorRange]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, r in ranges.items():
        entry: dict[str, Any] = {"amax": r.amax, "nonnegative": r.nonnegative}
        if r.min is not None:
            entry["min"] = r.min
        out[name] = entry
    return out


def ranges_from_dict(data: dict[str, Any]) -> dict[str, TensorRange]:
    """Inverse of :func:`ranges_to_dict`; dicts written before ``min`` existed give ``min=None``."""
    return {
        name: TensorRange(
            amax=float(v["amax"]),
            nonnegative=bool(v["nonnegative"]),
            min=None if v.get("min") is None else float(v["min"]),
        )
        for name, v in data.items()
    }


class Phases:
    """Wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class ArtifactPipeline:
    """A configuration's deployable ONNX and backend artifact, from calibrated ranges.

    ``thresholds`` (the study's cached statistics) is only needed when the ranges
    are not given, i.e. not for ``sensisearch build --config``.
    """

    def __init__(
        self, model: onnx.ModelProto, info: ModelInfo, backend: Backend, thresholds: CalibrationRanges | None = None
    ) -> None:
        self.model = model
        self.info = info
        self.backend = backend
        self.thresholds = thresholds
        self.index = GraphIndex(model)  # the same graph every trial: index it once

    def plan(self, config: TrialConfig) -> Placement:
        """Where Q/DQ goes for ``config`` on this backend (once per trial)."""
        return plan_placement(self.info, self.model, config, self.backend.profile, self.index)

    def ranges_for(
        self, config: TrialConfig, every_tensor: bool = False, placement: Placement | None = None
    ) -> dict[str, TensorRange]:
        """Ranges ``placement`` (planned for ``config`` if not given) needs; empty without INT8.

        ``every_tensor`` gives the ranges of every tensor any profile may
        quantize: what a config.json records so another backend can rebuild it.
        """
        if not config.uses_int8:
            return {}
        if self.thresholds is None:
            raise RuntimeError("INT8 layers need calibration statistics, but none were collected")
        if every_tensor:
            tensors = statistics_tensors(self.model, self.info, self.index)
        else:
            tensors = (placement or self.plan(config)).threshold_tensors
        return self.thresholds.ranges(tensors, config.calibration)

    @staticmethod
    def missing_ranges(placement: Placement, ranges: Mapping[str, TensorRange]) -> list[str]:
        """Tensors of ``placement`` whose Q/DQ needs a range that ``ranges`` lacks."""
        return [t for t in placement.threshold_tensors if t not in ranges]

    def emit(
        self,
        config: TrialConfig,
        out_dir: Path,
        phases: Phases | None = None,
        ranges: Mapping[str, TensorRange] | None = None,
        placement: Placement | None = None,
    ) -> tuple[Path, dict[str, TensorRange]]:
        """Write ``out_dir/deployable.onnx``; ``ranges`` (e.g. from a config.json) skip calibration.

        ``placement`` is planned here when not given. Returns the path and the ranges used.
        """
        phases = phases or Phases()
        out_dir.mkdir(parents=True, exist_ok=True)
        with phases("thresholds"):
            placement = placement or self.plan(config)
            ranges = dict(ranges) if ranges is not None else self.ranges_for(config, placement=placement)
            missing = self.missing_ranges(placement, ranges)
            if missing:
                raise RuntimeError(f"no calibrated range for {len(missing)} tensors (first: {missing[0]})")
        with phases("emit"):
            deployable = emit_deployable_onnx(self.model, self.info, placement, ranges, self.backend.profile)
            path = out_dir / DEPLOYABLE_NAME
            save_model(deployable, path)
        return path, ranges

    def build(self, deployable: Path, out_dir: Path, config: TrialConfig) -> BuildResult:
        """Compile ``deployable`` with the backend (artifact written into ``out_dir``)."""
        return self.backend.build(deployable, out_dir, trial_config=config.to_dict(), layer_names=self.info.layer_names)


class TrialPipeline(ArtifactPipeline):
    """One study trial: :class:`ArtifactPipeline` plus latency and accuracy."""

    def __init__(
        self,
        model: onnx.ModelProto,
        info: ModelInfo,
        backend: Backend,
        evaluator: Evaluator,
        thresholds: CalibrationRanges | None,
        latency_settings: LatencySettings,
        latency_batch: int = 1,
    ) -> None:
        super().__init__(model, info, backend, thresholds)
        self.evaluator = evaluator
        self.latency_settings = latency_settings
        self.latency_batch = latency_batch

    def run(self, config: TrialConfig, out_dir: Path) -> TrialOutcome:
        phases = Phases()
        deployable, ranges = self.emit(config, out_dir, phases)
        with phases("build"):
            build = self.build(deployable, out_dir, config)
        with phases("load"):
            runner = self.backend.load(build.artifact)
        with runner:
            with phases("latency"):
                latency = runner.measure_latency(self.evaluator.latency_feeds(self.latency_batch), self.latency_settings)
            with phases("evaluate"):
                evaluation = self.evaluator.evaluate(runner)
        requested = {p.value: len(config.layers_with(p)) for p in Precision}
        log.info(
            "%s=%.3f median=%.3fms (layers asked %s, ran %s)",
            evaluation.metric, evaluation.value, latency.median_ms, requested, dict(build.layer_precisions),
        )
        return TrialOutcome(
            config=config,
            deployable=deployable,
            build=build,
            latency=latency,
            evaluation=evaluation,
            timings=phases.seconds,
            # Every tensor's range, not only this placement's: the record then rebuilds the configuration for
            # any backend, and results rewritten from the records (`report`, another worker) match the study's.
            ranges=self.ranges_for(config, every_tensor=True) if config.uses_int8 else ranges,
        )
