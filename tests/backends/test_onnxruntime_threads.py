"""Timed ONNX Runtime sessions leave a core to the rest of the machine; evaluation sessions use them all."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from sensisearch.backends.onnxruntime import OnnxRuntimeBackend, default_threads, default_timing_threads


@contextmanager
def first_cores(n: int) -> Iterator[None]:
    """This thread (which opens the sessions) limited to the process's first ``n`` cores, as on a small machine."""
    saved = os.sched_getaffinity(0)
    if len(saved) < n:
        pytest.skip(f"needs {n} cores, this process has {len(saved)}")
    os.sched_setaffinity(0, sorted(saved)[:n])
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def threads_of_this_process() -> int:
    return len(os.listdir("/proc/self/task"))


def new_threads_when_loading(backend: OnnxRuntimeBackend, model: Path) -> int:
    """Threads a loaded session added to the process: ONNX Runtime's intra-op pool (the caller is the last thread)."""
    before = threads_of_this_process()
    with backend.load(model):
        return threads_of_this_process() - before


@pytest.mark.parametrize("cores", [2, 3])
def test_a_timed_session_leaves_one_core_free_and_evaluation_uses_all(mnist_dir: Path, tmp_path: Path, cores: int) -> None:
    model = mnist_dir / "mnist_cnn.onnx"
    with first_cores(cores):
        assert (default_threads(), default_timing_threads()) == (cores, cores - 1)
        backend = OnnxRuntimeBackend()
        timing = backend.timing_backend()
        assert backend.separate_timing_sessions and timing is not backend and not timing.separate_timing_sessions
        assert (backend.threads, timing.threads) == (cores, cores - 1)
        # Counted by the OS, not read back from our own settings: the pool ORT really started.
        assert new_threads_when_loading(backend, model) == cores - 1
        assert new_threads_when_loading(timing, model) == cores - 2
        # The timed backend records both counts with every trial.
        assert backend.describe()["threads"] == cores and backend.describe()["timing_threads"] == cores - 1


def test_an_explicit_thread_count_is_used_for_timing_too(mnist_dir: Path) -> None:
    with first_cores(2):
        backend = OnnxRuntimeBackend(threads=2)
        assert not backend.separate_timing_sessions and backend.timing_backend() is backend
        assert new_threads_when_loading(backend.timing_backend(), mnist_dir / "mnist_cnn.onnx") == 1
    with first_cores(1):
        assert default_timing_threads() == 1  # never zero
