"""``TensorRTBackend``: the deployable ONNX -> ``.plan`` (+ sidecar) -> GPU runner.

Building works wherever the flavor can build (TensorRT-RTX: on any CPU;
TensorRT 10/11: needs a GPU). Loading needs an NVIDIA GPU the plan was built
for; every reason it cannot load is a one-line :class:`SensisearchError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from sensisearch.backends.base import Backend, BackendCapabilities, BuildResult
from sensisearch.backends.tensorrt.builder import (
    PRECISION_SOURCE_INSPECTOR,
    BuilderSettings,
    ProfileShape,
    TimingCache,
    build_engine,
    parse_shapes,
)
from sensisearch.backends.tensorrt.flavor import (
    MachineInfo,
    TensorRTFlavor,
    can_run_on,
    probe_machine,
    require_flavor,
)
from sensisearch.backends.tensorrt.inspector import parse_inspector_json
from sensisearch.backends.tensorrt.sidecar import check_sidecar, read_sidecar
from sensisearch.errors import SensisearchError
from sensisearch.quantize.config import Precision
from sensisearch.quantize.profiles import TENSORRT, QuantizationProfile

log = logging.getLogger(__name__)

PLAN_SUFFIX = ".plan"


class TensorRTBackend(Backend):
    """TensorRT 10.x / 11.x or TensorRT-RTX, strongly typed, one path for all three."""

    def __init__(
        self,
        flavor: TensorRTFlavor,
        settings: BuilderSettings = BuilderSettings(),
        timing_cache: Path | None = None,
        device: int = 0,
        streams: int = 1,
        machine: MachineInfo | None = None,
    ) -> None:
        settings.validate(flavor)
        self.flavor = flavor
        self.settings = settings
        self.timing_cache = TimingCache(timing_cache) if timing_cache is not None else None
        self.device = device
        self.streams = streams
        self._machine = machine

    # ---------------------------------------------------------------- Backend
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.flavor.backend

    @property
    def machine(self) -> MachineInfo:
        if self._machine is None:
            self._machine = probe_machine(self.flavor, self.device)
        return self._machine

    @property
    def profile(self) -> QuantizationProfile:
        return TENSORRT

    @property
    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(
            precisions=(Precision.INT8, Precision.FP16, Precision.FP32),
            fp16_compute=True,
            fp16_note=(
                "FP16 layers run FP16 kernels on the GPU: the strongly typed network takes the ONNX's "
                "Cast + float16 weights as the layer's precision."
            ),
            artifact_suffix=PLAN_SUFFIX,
        )

    def can_run(self) -> tuple[bool, str]:
        return can_run_on(self.machine)

    def build(
        self,
        onnx_path: Path,
        out_dir: Path,
        trial_config: Mapping[str, Any] | None = None,
        layer_names: Iterable[str] | None = None,
    ) -> BuildResult:
        """Build ``out_dir/<onnx stem>.plan`` and its sidecar ``.plan.json``.

        ``trial_config`` (e.g. ``TrialConfig.to_dict()``) is recorded in the sidecar;
        ``layer_names`` (``ModelInfo.layer_names``) limits the precision check to
        the searched layers (default: every Conv/ConvTranspose/Gemm/MatMul with a
        constant weight).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plan = out_dir / (Path(onnx_path).name.removesuffix(".onnx") + PLAN_SUFFIX)
        result = build_engine(
            onnx_path,
            plan,
            self.flavor,
            self.settings,
            timing_cache=self.timing_cache,
            machine=self.machine,
            layer_names=layer_names,
            trial_config=trial_config,
        )
        ok, _ = self.can_run()
        if ok:
            self._record_inspector(result)
        return result

    def _record_inspector(self, result: BuildResult) -> None:
        """On a GPU: replace the network-level precision counts by what the engine runs."""
        from sensisearch.backends.tensorrt.runtime import deserialize, inspect_engine

        details = dict(result.details)
        layers = list(details.get("network_precisions") or {})
        try:
            _, engine = deserialize(self.flavor, result.artifact.read_bytes(), str(result.artifact))
            context = engine.create_execution_context()
            sidecar = read_sidecar(result.artifact)
            for name, ps in (sidecar.get("profiles") or [{}])[0].items():
                context.set_input_shape(name, tuple(ps["opt"]))
            summary = parse_inspector_json(inspect_engine(engine, context, self.flavor), layers)
        except Exception as exc:  # the inspector is a report, never a reason to fail a trial
            details["inspector_error"] = " ".join(str(exc).split())
            result.details = details
            return
        details["inspector"] = summary.to_dict()
        details["precision_source"] = PRECISION_SOURCE_INSPECTOR
        result.layer_precisions = summary.counts()
        result.details = details

    def load(self, artifact: Path) -> Any:
        artifact = Path(artifact)
        if not artifact.is_file():
            raise SensisearchError(f"{artifact}: plan not found; build it first (sensisearch build)")
        sidecar = read_sidecar(artifact)
        ok, why = self.can_run()
        if not ok:
            raise SensisearchError(f"{artifact.name}: cannot run a TensorRT engine here: {why}")
        check_sidecar(sidecar, self.machine, plan=artifact)
        from sensisearch.backends.tensorrt.runtime import TensorRTRunner

        return TensorRTRunner(self.flavor, artifact.read_bytes(), str(artifact), streams=self.streams)

    def describe(self) -> dict[str, Any]:
        machine = self.machine
        gpu = machine.gpu
        return {
            "name": self.name,
            "profile": self.profile.name,
            "tensorrt": self.flavor.to_dict(),
            "builder": self.settings.to_dict(),
            "timing_cache": None if self.timing_cache is None else str(self.timing_cache.path),
            "gpu": None if gpu is None else gpu.to_dict(),
            "driver": machine.driver.version,
            "can_run": self.can_run()[0],
        }


def make_tensorrt_backend(
    flavor: TensorRTFlavor | str | None = None,
    workspace_mb: int | None = None,
    opt_level: int = 3,
    shapes: str | Sequence[str] | Mapping[str, ProfileShape] | None = None,
    timing_cache: Path | None = None,
    *,
    opt_batch: int = 1,
    max_batch: int = 64,
    profiles: int = 1,
    compute_capabilities: Sequence[str] = (),
    device: int = 0,
    streams: int = 1,
) -> TensorRTBackend:
    """The TensorRT backend for the CLI.

    ``flavor``: ``"tensorrt"``, ``"tensorrt-rtx"``, a detected flavor, or None
    (full TensorRT if it imports, else TensorRT-RTX). ``shapes``: ``--shapes``
    strings (``name:MIN/OPT/MAX``). ``opt_batch`` / ``max_batch``: the default
    profile of a dynamic batch (latency batch / evaluation batch).
    ``timing_cache``: the study's cache file (e.g. ``<out>/timing.cache``).
    ``profiles``/``streams``: throughput mode (one profile and context per stream).
    """
    if not isinstance(flavor, TensorRTFlavor):
        flavor = require_flavor(flavor)
    if isinstance(shapes, Mapping):
        explicit = dict(shapes)
    else:
        explicit = parse_shapes(shapes)
    settings = BuilderSettings(
        workspace_mb=workspace_mb,
        opt_level=opt_level,
        shapes=explicit,
        opt_batch=opt_batch,
        max_batch=max(max_batch, opt_batch),
        profiles=max(profiles, streams),
        compute_capabilities=tuple(compute_capabilities),
    )
    return TensorRTBackend(flavor, settings, timing_cache=timing_cache, device=device, streams=streams)
