"""A user's own evaluation function as an evaluator.

``--evaluator my_module:score`` loads ``score(runner) -> float | dict`` where a
dict maps metric names to values (points) and the first key is primary.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from sensisearch.backends.base import Runner
from sensisearch.errors import SensisearchError
from sensisearch.evaluation.base import EvaluationResult, Evaluator


def load_function(spec: str, search_dir: Path | None = None) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SensisearchError(f"--evaluator {spec}: expected MODULE:FUNCTION, e.g. my_eval:score")
    if search_dir is not None and str(search_dir) not in sys.path:
        sys.path.insert(0, str(search_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SensisearchError(f"--evaluator {spec}: cannot import {module_name} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SensisearchError(f"--evaluator {spec}: {module_name} has no function {attr}")
    return fn


class FunctionEvaluator(Evaluator):
    def __init__(self, fn: Callable[[Runner], float | Mapping[str, float]], feeds: Mapping[str, np.ndarray], metric: str = "score") -> None:
        self.fn = fn
        self._feeds = dict(feeds)
        self.metric = metric

    def evaluate(self, runner: Runner) -> EvaluationResult:
        result = self.fn(runner)
        if isinstance(result, Mapping):
            metrics = {str(k): float(v) for k, v in result.items()}
            metric = self.metric if self.metric in metrics else next(iter(metrics))
        else:
            metrics = {self.metric: float(result)}
            metric = self.metric
        return EvaluationResult(metric=metric, metrics=metrics, count=0)

    def latency_feeds(self, batch_size: int) -> Mapping[str, np.ndarray]:
        return self._feeds
