"""Pick a backend by name; ``auto`` prefers a GPU engine that can really run here."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from sensisearch.backends.base import Backend
from sensisearch.errors import SensisearchError
from sensisearch.quantize.profiles import PROFILES

BACKENDS = ("auto", "onnxruntime", "tensorrt", "tensorrt-rtx")
# Tests only: ``module:Class`` of a backend that replaces any --backend, built as
# ``Class(settings)``. It is how the isolation tests make a build hang or crash in
# the trial child (an environment variable, because the child is another process).
TEST_BACKEND_ENV = "SENSISEARCH_TEST_BACKEND"


@dataclass(frozen=True)
class BackendSettings:
    """What a backend is built from (the study's ``--backend`` and builder flags)."""

    name: str = "auto"
    threads: int | None = None
    """ONNX Runtime intra-op threads (None: its default)."""
    shapes: tuple[str, ...] | None = None
    """TensorRT optimization profiles, ``name:MIN/OPT/MAX``."""
    workspace_mb: int | None = None
    opt_level: int = 3
    latency_batch: int = 1
    """The batch the engine is timed at (TensorRT's profile OPT)."""
    eval_batch: int = 1
    """The largest batch evaluation feeds (with ``latency_batch``, TensorRT's profile MAX)."""


@dataclass(frozen=True)
class BackendChoice:
    backend: Backend
    reason: str
    can_run: bool
    run_reason: str


def _onnxruntime(settings: BackendSettings) -> Backend:
    from sensisearch.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(threads=settings.threads)


def _tensorrt(settings: BackendSettings, flavor: str, out: Path | None) -> Backend:
    from sensisearch.backends.tensorrt import make_tensorrt_backend

    return make_tensorrt_backend(
        flavor,
        workspace_mb=settings.workspace_mb,
        opt_level=settings.opt_level,
        shapes=settings.shapes,
        # One timing cache per study, reused by every trial and by later runs.
        timing_cache=None if out is None else out / "timing.cache",
        opt_batch=settings.latency_batch,
        max_batch=max(settings.eval_batch, settings.latency_batch),
    )


def choose_backend(settings: BackendSettings, out: Path | None = None) -> BackendChoice:
    """The backend ``settings.name``, why it was chosen, and whether it can run here."""
    test_backend = os.environ.get(TEST_BACKEND_ENV)
    if test_backend:
        return BackendChoice(_test_backend(test_backend, settings), f"test backend from {TEST_BACKEND_ENV}", True, "test")
    name = settings.name
    if name in ("onnxruntime", "ort"):
        return BackendChoice(_onnxruntime(settings), "requested with --backend onnxruntime", True, "runs on this CPU")
    if name in ("tensorrt", "tensorrt-rtx"):
        from sensisearch.backends.tensorrt import can_run_tensorrt

        backend = _tensorrt(settings, name, out)
        ok, why = can_run_tensorrt(name)
        return BackendChoice(backend, f"requested with --backend {name}", ok, why)
    if name == "auto":
        from sensisearch.backends.tensorrt import can_run_tensorrt

        reasons = []
        for flavor in ("tensorrt", "tensorrt-rtx"):
            ok, why = can_run_tensorrt(flavor)
            if ok:
                return BackendChoice(_tensorrt(settings, flavor, out), f"auto: {why}", True, why)
            reasons.append(f"{flavor}: {why}")
        return BackendChoice(
            _onnxruntime(settings), "auto: no TensorRT engine can run here (" + "; ".join(reasons) + ")", True, "runs on this CPU"
        )
    raise SensisearchError(f"--backend {name}: unknown backend (use one of {', '.join(BACKENDS)})")


def _test_backend(spec: str, settings: BackendSettings) -> Backend:
    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SensisearchError(f"{TEST_BACKEND_ENV}={spec}: cannot import it ({exc}); give module:Class") from exc
    return cls(settings)


def make_backend(settings: BackendSettings, out: Path | None = None) -> Backend:
    return choose_backend(settings, out).backend


def with_profile(backend: Backend, profile: str | None) -> tuple[Backend, str | None]:
    """``backend`` emitting Q/DQ for quantization profile ``profile``; plus a warning that latency is then predicted, not timed.

    ONNX Runtime runs any Q/DQ graph exactly (Q/DQ semantics are defined by the
    ONNX spec), so with ``--profile tensorrt`` it scores the accuracy of exactly
    the graph TensorRT would get; its *speed* on that graph says nothing about
    TensorRT's. A TensorRT backend only takes its own profile (it rejects the
    uint8 / non-zero zero points of the ONNX Runtime one).
    """
    if profile is None or profile == backend.profile.name:
        return backend, None
    from sensisearch.backends.onnxruntime import OnnxRuntimeBackend

    if not isinstance(backend, OnnxRuntimeBackend):
        raise SensisearchError(
            f"--profile {profile}: backend {backend.name} only builds its own profile ({backend.profile.name}); "
            "use --backend onnxruntime to score another target's graph here"
        )
    replaced = OnnxRuntimeBackend(threads=backend.threads, profile=PROFILES[profile], precisions=backend.capabilities.precisions)
    # The study then predicts the target's latency instead of timing it here (a foreign profile's speed means nothing).
    warning = (
        f"--profile {profile} on {backend.name}: accuracy is exactly that of the {profile} Q/DQ graph; latency is not "
        f"timed here ({backend.name}'s speed on that graph says nothing about {profile}'s) but predicted: from "
        "--latency-table if given, else estimated (MACs x precision weight); verify on the target with "
        f"`sensisearch verify RUN_DIR --backend {profile}`"
    )
    return replaced, warning
