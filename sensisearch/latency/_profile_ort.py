"""ONNX Runtime's per-node profiler, several configurations interleaved.

``SessionOptions.enable_profiling`` writes a Chrome-trace JSON per session: one
``"cat": "Node"`` event per node and run, named ``<node>_kernel_time``, with
``dur`` in microseconds and ``args.op_name`` the (fused) op type. The sessions of
all configurations are loaded side by side and run in rounds, in a new random
order each round, so drift on a shared machine hits every configuration alike;
each node's time is its median over the runs after ``warmup``.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    from sensisearch.backends.onnxruntime import OnnxRuntimeBackend

log = logging.getLogger(__name__)

KERNEL_SUFFIX = "_kernel_time"


def node_medians(events: Sequence[Mapping[str, Any]], warmup: int = 1) -> dict[tuple[str, str], float]:
    """``(node name, op type) -> median kernel ms`` from one session's profile events (first ``warmup`` runs dropped)."""
    durations: dict[tuple[str, str], list[float]] = defaultdict(list)
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith(KERNEL_SUFFIX):
            continue
        op = str(event.get("args", {}).get("op_name", ""))
        durations[(name[: -len(KERNEL_SUFFIX)], op)].append(float(event["dur"]) / 1e3)
    return {key: float(np.median(v[warmup:] if len(v) > warmup else v)) for key, v in durations.items()}


def profile_interleaved(
    backend: OnnxRuntimeBackend,
    artifacts: Mapping[str, Path],
    feeds: Mapping[str, np.ndarray],
    repeats: int,
    work_dir: Path,
    seed: int = 0,
    warmup: int = 1,
) -> dict[str, dict[tuple[str, str], float]]:
    """Per configuration name, its per-node median kernel times (ms) over ``repeats`` interleaved runs."""
    work_dir.mkdir(parents=True, exist_ok=True)
    sessions: dict[str, ort.InferenceSession] = {}
    for name, artifact in artifacts.items():
        # The backend's own session options (threads, no spinning), plus the profiler.
        options = backend.session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(work_dir / f"profile-{name}")
        sessions[name] = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
    order = list(sessions)
    rng = random.Random(seed)
    for _ in range(repeats + warmup):
        rng.shuffle(order)
        for name in order:
            sessions[name].run(None, dict(feeds))
    out = {}
    for name, session in sessions.items():
        path = Path(session.end_profiling())
        out[name] = node_medians(json.loads(path.read_text()), warmup)
        path.unlink(missing_ok=True)
    return out
