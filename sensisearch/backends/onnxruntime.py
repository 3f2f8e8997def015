"""Embedded backend: ONNX Runtime on the CPU.

The deployable ONNX is compiled into an ORT session; the optimized graph ORT
produces (after Q/DQ fusion into integer kernels) is saved as the trial's
artifact, so ``evaluate`` and the winner export run exactly what was timed.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from sensisearch.backends.base import (
    Backend,
    BackendCapabilities,
    BuildResult,
    LatencySettings,
    LatencyStats,
    Runner,
)
from sensisearch.errors import SensisearchError
from sensisearch.model.tensor import TensorSpec
from sensisearch.op_types import FLOAT_WEIGHTED_OPS, INTEGER_KERNEL_OPS
from sensisearch.quantize.config import Precision
from sensisearch.quantize.profiles import ONNXRUNTIME_CPU, QuantizationProfile

log = logging.getLogger(__name__)


_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(bool)": np.dtype(np.bool_),
}


def default_threads() -> int:
    """Threads per session: all cores of this process, at most 4.

    Timing is most stable when the thread count is fixed and does not exceed the
    cores we may use; past 4 threads small CNNs gain nothing on CPU.
    """
    return max(1, min(4, _process_cores()))


def default_timing_threads() -> int:
    """Threads of a *timed* session: as :func:`default_threads`, but never every core of the process.

    A parallel section waits for its slowest thread, so a session that takes every core is
    stalled by anything else that runs for a moment (the study's own Python, the load monitor,
    the kernel, another job). On a 2-core machine (quiet, digits, the same sessions timed
    again and again) 2-thread INT8/FP32 ratios wandered between 1.70x and 2.31x in runs of a
    few seconds, while 1-thread ratios stayed within 2.857-2.898x. One core is left to the rest.
    """
    return max(1, min(4, _process_cores() - 1))


def _process_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorSpec(arg.name, shape, _ORT_DTYPES.get(arg.type, np.dtype(np.float32)))


def count_kernels(model: onnx.ModelProto) -> dict[str, int]:
    """Count weighted layers by the precision ORT really runs them in."""
    counts = {"int8": 0, "fp16": 0, "fp32": 0}
    for node in model.graph.node:
        if node.op_type in INTEGER_KERNEL_OPS:
            counts["int8"] += 1
        elif node.op_type in FLOAT_WEIGHTED_OPS:
            counts["fp32"] += 1
    # fp16 layers show up as float ops fed by Cast nodes; tell them apart by the
    # element type of their weight initializer.
    fp16_inits = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type in FLOAT_WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in fp16_inits:
            counts["fp16"] += 1
            counts["fp32"] -= 1
    return counts


class OnnxRuntimeRunner(Runner):
    def __init__(self, session: ort.InferenceSession, artifact: Path) -> None:
        self._session = session
        self.artifact = artifact
        self._inputs = [_spec(a) for a in session.get_inputs()]
        self._outputs = [_spec(a) for a in session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(self._output_names, dict(feeds))

    def timing_arm(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        # session.run bound once with its own feeds dict: the call is the inference and nothing else.
        run, names, fixed = self._session.run, self._output_names, dict(feeds)
        return lambda: run(names, fixed)

    def measure_latency(self, feeds: Mapping[str, np.ndarray], settings: LatencySettings) -> LatencyStats:
        feeds = dict(feeds)
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        run = self._session.run
        names = self._output_names
        for _ in range(settings.warmup_runs):
            run(names, feeds)
        samples: list[float] = []
        start = time.perf_counter()
        # Time each run separately so the median ignores the noisy neighbours of
        # a shared CPU; stop when both the run count and the time floor are met.
        while len(samples) < settings.max_runs:
            t0 = time.perf_counter()
            run(names, feeds)
            samples.append((time.perf_counter() - t0) * 1e3)
            if len(samples) >= settings.min_runs and time.perf_counter() - start >= settings.min_seconds:
                break
        return LatencyStats.from_samples(samples, batch)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime, CPU execution provider."""

    name = "onnxruntime"

    def __init__(
        self,
        threads: int | None = None,
        profile: QuantizationProfile = ONNXRUNTIME_CPU,
        precisions: tuple[Precision, ...] = (Precision.INT8, Precision.FP32),
    ) -> None:
        self.threads = threads or default_threads()
        self.timing_threads = threads or default_timing_threads()
        """Threads of timed sessions (:meth:`timing_backend`): ``threads`` when given, else one core fewer than the process has."""
        self._profile = profile
        self._precisions = precisions

    @property
    def profile(self) -> QuantizationProfile:
        return self._profile

    @property
    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(
            precisions=self._precisions,
            fp16_compute=False,
            fp16_note=(
                "ONNX Runtime's CPU provider has no fast FP16 convolution on x86: FP16 layers run "
                "with float16 weights and activations (real FP16 rounding) but no speed gain; "
                "judge FP16 speed on the GPU backend."
            ),
            artifact_suffix=".ort.onnx",
        )

    def session_options(self) -> ort.SessionOptions:
        """The options of every session this backend opens (threads, no spinning); profilers add to a fresh copy."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Idle ORT threads busy-wait by default and starve our own Python work
        # (pre-processing, NMS) between runs: evaluation of YOLOv5n ran ~3x
        # faster here with spinning off (benchmarks/detection_eval.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def build(
        self,
        onnx_path: Path,
        out_dir: Path,
        trial_config: Mapping[str, Any] | None = None,
        layer_names: Sequence[str] | None = None,
    ) -> BuildResult:
        out_dir.mkdir(parents=True, exist_ok=True)
        artifact = out_dir / (Path(onnx_path).name.removesuffix(".onnx") + self.capabilities.artifact_suffix)
        tmp = artifact.with_name(artifact.name + ".tmp")
        options = self.session_options()
        options.optimized_model_filepath = str(tmp)
        start = time.perf_counter()
        try:
            ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several exception types for bad graphs
            raise SensisearchError(f"ONNX Runtime could not build {onnx_path}: {str(exc).splitlines()[0]}") from exc
        seconds = time.perf_counter() - start
        os.replace(tmp, artifact)
        optimized = onnx.load(str(artifact), load_external_data=False)
        kernels = count_kernels(optimized)
        log.debug("built %s in %.2fs: %s", artifact, seconds, kernels)
        return BuildResult(artifact=artifact, seconds=seconds, layer_precisions=kernels)

    def load(self, artifact: Path) -> OnnxRuntimeRunner:
        if not Path(artifact).is_file():
            raise SensisearchError(f"artifact {artifact} does not exist; build it first")
        options = self.session_options()
        # The artifact is already optimized; re-running the same passes is cheap
        # and keeps fused ops (com.microsoft domain) valid.
        try:
            session = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise SensisearchError(f"ONNX Runtime could not load {artifact}: {str(exc).splitlines()[0]}") from exc
        return OnnxRuntimeRunner(session, Path(artifact))

    @property
    def separate_timing_sessions(self) -> bool:
        return self.timing_threads != self.threads

    def timing_backend(self) -> OnnxRuntimeBackend:
        """This backend with ``timing_threads`` per session (itself when they are the same)."""
        if not self.separate_timing_sessions:
            return self
        # A copy taken now, not a new OnnxRuntimeBackend: a subclass (a wrapped or instrumented backend) stays
        # itself, with its state as it is at this timing.
        twin = copy.copy(self)
        twin.threads = self.timing_threads
        return twin

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "profile": self.profile.name,
            "onnxruntime": ort.__version__,
            "threads": self.threads,
            "timing_threads": self.timing_threads,
            "providers": ["CPUExecutionProvider"],
        }
