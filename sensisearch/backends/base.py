"""The small interface every backend implements (after Polygraphy's runners).

The study only talks to :class:`Backend` and :class:`Runner`; which engine
compiles and runs the deployable ONNX (ONNX Runtime on the CPU, TensorRT,
TensorRT-RTX) is invisible to it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sensisearch.model.tensor import TensorSpec
from sensisearch.quantize.config import Precision
from sensisearch.quantize.profiles import QuantizationProfile


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can do on this machine."""

    precisions: tuple[Precision, ...]
    """Precisions the search may assign to a layer on this backend."""
    fp16_compute: bool
    """True when FP16 layers really compute in FP16 (not only round storage)."""
    fp16_note: str
    """What FP16 means on this backend, in one sentence, for the report."""
    artifact_suffix: str
    """File suffix of the built artifact, e.g. ``.onnx`` or ``.plan``."""


@dataclass(frozen=True)
class LatencySettings:
    warmup_runs: int = 10
    min_runs: int = 30
    max_runs: int = 1000
    min_seconds: float = 1.0
    """Keep timing until both ``min_runs`` and ``min_seconds`` are reached (or ``max_runs``)."""


@dataclass(frozen=True)
class LatencyStats:
    """Per-inference latency in milliseconds for one batch."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "mean_ms": self.mean_ms,
            "min_ms": self.min_ms,
            "runs": self.runs,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyStats":
        return cls(
            median_ms=float(data["median_ms"]), p90_ms=float(data["p90_ms"]), mean_ms=float(data["mean_ms"]),
            min_ms=float(data["min_ms"]), runs=int(data["runs"]), batch_size=int(data["batch_size"]),
        )

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], batch_size: int) -> "LatencyStats":
        values = np.asarray(samples_ms, dtype=np.float64)
        return cls(
            median_ms=float(np.median(values)),
            p90_ms=float(np.percentile(values, 90)),
            mean_ms=float(values.mean()),
            min_ms=float(values.min()),
            runs=int(values.size),
            batch_size=batch_size,
        )


@dataclass
class BuildResult:
    """What a build produced."""

    artifact: Path
    seconds: float
    layer_precisions: Mapping[str, int] = field(default_factory=dict)
    """How many quantizable layers really run in each precision, as far as the
    backend can tell (e.g. ``{"int8": 12, "fp32": 3}``)."""
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every field, ``details`` kept apart (``trial.json`` flattens them into its ``build``)."""
        return {
            "artifact": str(self.artifact), "seconds": self.seconds,
            "layer_precisions": dict(self.layer_precisions), "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BuildResult":
        return cls(
            artifact=Path(data["artifact"]), seconds=float(data["seconds"]),
            layer_precisions={str(k): int(v) for k, v in dict(data["layer_precisions"]).items()},
            details=dict(data["details"]),
        )


class Runner(abc.ABC):
    """A loaded artifact that runs batches."""

    @property
    @abc.abstractmethod
    def inputs(self) -> list[TensorSpec]: ...

    @property
    @abc.abstractmethod
    def outputs(self) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; returns the outputs in graph order."""

    @abc.abstractmethod
    def measure_latency(self, feeds: Mapping[str, np.ndarray], settings: LatencySettings) -> LatencyStats:
        """Time repeated runs of one batch after warm-up."""

    def timing_arm(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        """One batch on fixed ``feeds`` as a zero-argument callable, for interleaved paired timing.

        Bound once so each call costs only the inference (``run`` copies the feeds
        dict, which shows on sub-millisecond models). A callable that returns a
        ``float`` reports its own elapsed milliseconds (GPU: CUDA events), which
        :func:`sensisearch.measure.time_interleaved` uses instead of the host clock.
        """
        fixed = dict(feeds)
        return lambda: self.run(fixed)

    def throughput_arm(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        """Like :meth:`timing_arm`, but keeping every stream / execution context the backend offers busy."""
        return self.timing_arm(feeds)

    def timing_facts(self) -> dict[str, Any]:
        """What else the timing depended on, where visible (GPU clocks, other GPU processes); empty on CPU."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (sessions, device buffers)."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(abc.ABC):
    """Compiles a deployable ONNX into an artifact and loads it for running."""

    name: str

    @property
    @abc.abstractmethod
    def profile(self) -> QuantizationProfile:
        """How Q/DQ must be placed for this backend to run INT8 kernels."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> BackendCapabilities: ...

    @abc.abstractmethod
    def build(
        self,
        onnx_path: Path,
        out_dir: Path,
        trial_config: Mapping[str, Any] | None = None,
        layer_names: Sequence[str] | None = None,
    ) -> BuildResult:
        """Compile ``onnx_path`` into an artifact inside ``out_dir``.

        ``trial_config``/``layer_names`` let a backend record the configuration
        with the artifact and check that the built precisions match it.
        """

    @abc.abstractmethod
    def load(self, artifact: Path) -> Runner: ...

    @property
    def separate_timing_sessions(self) -> bool:
        """True when timed runs need sessions of their own (:meth:`timing_backend` differs from this backend)."""
        return False

    def timing_backend(self) -> Backend:
        """The backend whose loaded artifacts are timed: itself, unless timed sessions are set up differently
        from evaluation ones (ONNX Runtime on CPU leaves one core free when timing, see ``default_timing_threads``)."""
        return self

    def describe(self) -> dict[str, Any]:
        """Versions and settings, recorded with every trial."""
        return {"name": self.name, "profile": self.profile.name}
