"""A configuration's deployable ONNX and backend artifact: placement -> ranges -> Q/DQ + Cast ONNX -> build.

The Q/DQ placement is planned once per configuration and handed to both the range
lookup and the emitter. :class:`ArtifactPipeline` is shared by a study's trials, the
sensitivity probes, the latency table and ``sensisearch build --config`` (with the
recorded ranges), so a configuration always turns into the same artifact.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

import onnx

from sensisearch.backends.base import Backend, BuildResult
from sensisearch.calibration.ranges import CalibrationRanges
from sensisearch.model.analysis import ModelInfo
from sensisearch.progress import note_step
from sensisearch.quantize.config import TrialConfig
from sensisearch.quantize.emit import emit_deployable_onnx, save_model
from sensisearch.quantize.graph import GraphIndex
from sensisearch.quantize.placement import Placement, plan_placement, statistics_tensors
from sensisearch.quantize.ranges import TensorRange

DEPLOYABLE_NAME = "deployable.onnx"


class Phases:
    """Wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        note_step(name)  # what a progress line says runs now
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
        # Bias correction (a calibration choice): calibration feeds for its FP32 pass, set by the study;
        # shifts cached by layer fingerprint, so trials sharing a layer's quantization reuse its shift.
        self.bias_feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None
        self._bias_cache: dict[str, np.ndarray] = {}
        self.index = GraphIndex(model)  # the same graph every trial: index it once
        self._last_plan: tuple[str, Placement] | None = None

    def plan(self, config: TrialConfig) -> Placement:
        """Where Q/DQ goes for ``config`` on this backend (once per configuration).

        The placement is a pure function of the configuration here (model, index and profile are
        fixed), so the trial's latency-class key and its emit share one plan.
        """
        key = json.dumps(config.to_dict(), sort_keys=True)
        if self._last_plan is None or self._last_plan[0] != key:
            self._last_plan = (key, plan_placement(self.info, self.model, config, self.backend.profile, self.index))
        return self._last_plan[1]

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
            if config.uses_int8 and config.calibration.bias_correction:
                deployable = self.bias_corrected(deployable)
            path = out_dir / DEPLOYABLE_NAME
            save_model(deployable, path)
        return path, ranges

    def bias_corrected(self, deployable: onnx.ModelProto) -> onnx.ModelProto:
        """``deployable`` with every INT8 layer's mean output shift folded into its bias."""
        from sensisearch.calibration.bias import apply_bias_shifts, bias_shifts

        if self.bias_feeds is None:
            raise RuntimeError("bias correction needs calibration data, but the pipeline has none")
        shifts = bias_shifts(deployable, self.model, self.info.layers, self.bias_feeds(), cache=self._bias_cache)
        return apply_bias_shifts(deployable, shifts, self.backend.profile)

    def build(self, deployable: Path, out_dir: Path, config: TrialConfig) -> BuildResult:
        """Compile ``deployable`` with the backend (artifact written into ``out_dir``)."""
        return self.backend.build(deployable, out_dir, trial_config=config.to_dict(), layer_names=self.info.layer_names)
