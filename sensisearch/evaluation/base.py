"""The evaluator interface: score a loaded artifact on a fixed data set.

Classification Top-1, COCO mAP and a user's own Python function all implement
:class:`Evaluator`, so the study treats them the same.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from sensisearch.backends.base import Runner


@dataclass
class EvaluationResult:
    """Scores of one evaluation. Metric values are in points (0-100)."""

    metric: str
    """Name of the primary metric, the one the study optimizes."""
    metrics: dict[str, float]
    """All metrics, including the primary one."""
    count: int
    """Number of evaluated samples (images)."""
    per_class: dict[str, float] | None = None
    """Per-class score (e.g. AP per class) where the task has one."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase, e.g. ``{"preprocess": .., "inference": .., "nms": ..}``."""

    @property
    def value(self) -> float:
        return self.metrics[self.metric]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value": self.value,
            "metrics": dict(self.metrics),
            "count": self.count,
            "per_class": None if self.per_class is None else dict(self.per_class),
            "timings": dict(self.timings),
        }


class Evaluator(abc.ABC):
    """Scores a runner. Higher metric values are better."""

    metric: str

    @abc.abstractmethod
    def evaluate(self, runner: Runner) -> EvaluationResult: ...

    @abc.abstractmethod
    def latency_feeds(self, batch_size: int) -> Mapping[str, np.ndarray]:
        """A representative input batch used to time the runner."""

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric}
