"""The evaluator interface: score a loaded artifact on a fixed data set.

Classification Top-1, COCO mAP and a user's own Python function all implement
:class:`Evaluator`, so the study treats them the same.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from sensisearch.backends.base import Runner

if TYPE_CHECKING:
    from sensisearch.measure import DetectionMatches


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
    per_image: np.ndarray | DetectionMatches | None = None
    """Per-image results for paired bootstrap CIs (not in :meth:`to_dict`; store
    it separately): a classifier's bool correctness by the primary metric, in
    dataset order; a detector's :class:`~sensisearch.measure.DetectionMatches`."""
    per_class_instances: dict[str, int] | None = None
    """Ground-truth instances per class (detectors: non-crowd boxes), keyed like ``per_class``."""

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
            "per_class_instances": None if self.per_class_instances is None else dict(self.per_class_instances),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], per_image: np.ndarray | DetectionMatches | None = None) -> "EvaluationResult":
        """Inverse of :meth:`to_dict` (``value`` is derived, so not read); ``per_image`` travels separately."""
        per_class = data.get("per_class")
        instances = data.get("per_class_instances")
        return cls(
            metric=str(data["metric"]),
            metrics={str(k): float(v) for k, v in dict(data["metrics"]).items()},
            count=int(data["count"]),
            per_class=None if per_class is None else {str(k): float(v) for k, v in dict(per_class).items()},
            timings={str(k): float(v) for k, v in dict(data.get("timings", {})).items()},
            per_image=per_image,
            per_class_instances=None if instances is None else {str(k): int(v) for k, v in dict(instances).items()},
        )


@dataclass
class PartialEvaluation:
    """The first part of a staged evaluation (multi-fidelity): some images scored, the rest still to run.

    :meth:`Evaluator.evaluate_rest` finishes it without running these images again,
    and gives exactly what :meth:`Evaluator.evaluate` gives for all of them.
    """

    positions: np.ndarray
    """Sorted positions (in the evaluator's image order) of the images evaluated so far."""
    result: EvaluationResult
    """Scores over these images only (``per_image`` in their order)."""
    state: Any = None
    """The evaluator's own record of these images (predictions, correctness), kept to finish the evaluation."""


class Evaluator(abc.ABC):
    """Scores a runner. Higher metric values are better."""

    metric: str

    @abc.abstractmethod
    def evaluate(self, runner: Runner) -> EvaluationResult: ...

    # Multi-fidelity: evaluate a fixed subset first, then, if the trial goes on, the rest.
    def image_count(self) -> int | None:
        """Images a staged evaluation can split; None when this evaluator scores only all at once (a user's function)."""
        return None

    def evaluate_part(self, runner: Runner, positions: Sequence[int]) -> PartialEvaluation:
        """Score the images at ``positions`` only (see :class:`PartialEvaluation`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot evaluate a subset of its images")

    def evaluate_rest(self, runner: Runner, part: PartialEvaluation) -> EvaluationResult:
        """Score the images ``part`` has not, and return the result over all images, equal to :meth:`evaluate`'s."""
        raise NotImplementedError(f"{type(self).__name__} cannot evaluate a subset of its images")

    def per_image_subset(self, per_image: Any, positions: Sequence[int]) -> Any:
        """A full evaluation's ``per_image`` restricted to the images at ``positions`` (as :meth:`evaluate_part` gives them)."""
        raise NotImplementedError(f"{type(self).__name__} cannot evaluate a subset of its images")

    @abc.abstractmethod
    def latency_feeds(self, batch_size: int) -> Mapping[str, np.ndarray]:
        """A representative input batch used to time the runner."""

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric}


class ImageSubset(Evaluator):
    """An evaluator seen through a fixed subset of its images: the subset is its whole data set.

    How a study holds images out of the search (``--holdout``): trials score on the
    search images only, and the front is confirmed afterwards on the others, which no
    choice of the search has seen (the best of many trials on the same images is
    optimistically scored there: the winner's curse). Built on the inner evaluator's
    :meth:`Evaluator.evaluate_part`, so the subset's scores are exactly what
    ``evaluate_part`` gives for these positions.
    """

    def __init__(self, inner: Evaluator, positions: Sequence[int], role: str) -> None:
        total = inner.image_count()
        chosen = np.unique(np.asarray(positions, dtype=np.int64))
        if total is None:
            raise ValueError(f"{type(inner).__name__} scores only all its images at once; it has no subsets")
        if chosen.size == 0 or chosen[0] < 0 or chosen[-1] >= total:
            raise ValueError(f"subset positions must be 1..{total} distinct positions in 0..{total - 1}")
        self.inner = inner
        self.positions = chosen
        """Sorted positions in the inner evaluator's image order."""
        self.role = role
        """What the subset is for ("search" or "holdout"), as :meth:`describe` says."""
        self.metric = inner.metric

    def evaluate(self, runner: Runner) -> EvaluationResult:
        return self.inner.evaluate_part(runner, self.positions).result

    def image_count(self) -> int | None:
        return int(self.positions.size)

    def evaluate_part(self, runner: Runner, positions: Sequence[int]) -> PartialEvaluation:
        local = np.unique(np.asarray(positions, dtype=np.int64))
        part = self.inner.evaluate_part(runner, self.positions[local])
        return PartialEvaluation(local, part.result, part.state)

    def evaluate_rest(self, runner: Runner, part: PartialEvaluation) -> EvaluationResult:
        # The inner evaluator finishes a part over *all* its images, the held-out ones included;
        # a study refuses --fidelity-subset with --holdout, so nothing asks for this.
        raise NotImplementedError("a subset of an evaluator's images cannot be finished in stages")

    def per_image_subset(self, per_image: Any, positions: Sequence[int]) -> Any:
        raise NotImplementedError("a subset of an evaluator's images cannot be finished in stages")

    def latency_feeds(self, batch_size: int) -> Mapping[str, np.ndarray]:
        return self.inner.latency_feeds(batch_size)

    def describe(self) -> dict[str, Any]:
        inner = self.inner.describe()
        return {**inner, "images": int(self.positions.size), "subset": {"role": self.role, "of": self.inner.image_count()}}


def images_requested(requested: float, total: int) -> int:
    """How many of ``total`` images a ``--fidelity-subset`` / ``--holdout`` value asks for: a fraction below 1
    (rounded, at least one image) or a whole count."""
    return max(1, int(round(requested * total))) if requested < 1 else int(requested)


def holdout_positions(total: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(search, held-out) positions of ``total`` images, ``size`` held out, both sorted and disjoint.

    Drawn at random with their own seed stream (not the first or last images: evaluation
    sets are often ordered by class or source), the same for every worker of a study.
    """
    if not 0 < size < total:
        raise ValueError(f"held-out size {size} must be in 1..{total - 1}")
    held = np.sort(np.random.default_rng([seed, 0x401D]).choice(total, size=size, replace=False)).astype(np.int64)
    return np.setdiff1d(np.arange(total, dtype=np.int64), held), held
