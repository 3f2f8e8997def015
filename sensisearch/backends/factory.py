"""Pick a backend by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sensisearch.backends.base import Backend
from sensisearch.errors import SensisearchError

if TYPE_CHECKING:
    from sensisearch.study.settings import StudySettings

BACKENDS = ("onnxruntime",)


def make_backend(settings: "StudySettings") -> Backend:
    name = settings.backend
    if name in ("onnxruntime", "ort", "auto"):
        from sensisearch.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(threads=settings.threads)
    raise SensisearchError(f"--backend {name}: unknown backend (available: {', '.join(BACKENDS)})")
