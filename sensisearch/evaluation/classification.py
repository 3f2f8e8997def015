"""Top-1 / Top-5 accuracy of a classifier over labelled images."""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from sensisearch.backends.base import Runner
from sensisearch.errors import SensisearchError
from sensisearch.evaluation.base import EvaluationResult, Evaluator
from sensisearch.evaluation.datasets import ImageArray, Preprocess


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per row: is the label among the k largest logits (bool)."""
    k = min(k, logits.shape[1])
    # argpartition is O(C) per row, unlike a full sort.
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Number of rows whose label is among the k largest logits."""
    return int(topk_hits(logits, labels, k).sum())


class ClassificationEvaluator(Evaluator):
    """Top-1 (primary, in %) and Top-5 over an :class:`ImageArray` with labels."""

    def __init__(
        self,
        data: ImageArray,
        preprocess: Preprocess,
        input_name: str,
        batch_size: int = 64,
        metric: str = "top1",
    ) -> None:
        if data.labels is None:
            raise SensisearchError(
                f"--eval-data {data.source}: no labels found; use class subfolders, an .npz with labels=, or idx label files"
            )
        if metric not in ("top1", "top5"):
            raise SensisearchError(f"--metric {metric}: a classifier reports top1 or top5")
        self.data = data
        self.preprocess = preprocess
        self.input_name = input_name
        self.batch_size = batch_size
        self.metric = metric
        # Preprocess once: evaluation is the inner loop of every trial.
        self._inputs = preprocess.apply(data.images, data.layout)

    def _batch_size_for(self, runner: Runner) -> tuple[int, bool]:
        """Batch size for this runner, and whether every batch must have exactly that size.

        A dynamic batch dimension takes ``batch_size`` images at a time; a static
        one (usually 1) is filled exactly, the last batch padded with repeats.
        """
        spec = next((s for s in runner.inputs if s.name == self.input_name), None)
        if spec is None:
            raise SensisearchError(f"model has no input '{self.input_name}' (inputs: {[s.name for s in runner.inputs]})")
        if spec.static_batch is not None:
            return spec.static_batch, True
        return self.batch_size, False

    def evaluate(self, runner: Runner) -> EvaluationResult:
        labels = self.data.labels
        assert labels is not None
        batch, fixed = self._batch_size_for(runner)
        correct1 = correct5 = 0
        correct: list[np.ndarray] = []
        start = time.perf_counter()
        num_classes = None
        for begin in range(0, len(self._inputs), batch):
            x = self._inputs[begin : begin + batch]
            real = x.shape[0]
            if fixed and real < batch:
                x = np.concatenate([x, np.repeat(x[-1:], batch - real, axis=0)])  # outputs of the repeats are dropped
            logits = runner.run({self.input_name: x})[0][:real]
            logits = logits.reshape(logits.shape[0], -1).astype(np.float32, copy=False)
            num_classes = logits.shape[1]
            y = labels[begin : begin + batch]
            if y.max(initial=0) >= num_classes:
                raise SensisearchError(
                    f"--eval-data {self.data.source}: label {int(y.max())} but the model outputs {num_classes} classes"
                )
            hits1, hits5 = topk_hits(logits, y, 1), topk_hits(logits, y, 5)
            correct1 += int(hits1.sum())
            correct5 += int(hits5.sum())
            correct.append(hits1 if self.metric == "top1" else hits5)
        seconds = time.perf_counter() - start
        n = len(self._inputs)
        return EvaluationResult(
            metric=self.metric,
            metrics={"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n},
            count=n,
            timings={"inference": seconds},
            per_image=np.concatenate(correct),
        )

    def latency_feeds(self, batch_size: int) -> Mapping[str, np.ndarray]:
        reps = -(-batch_size // len(self._inputs))
        x = np.concatenate([self._inputs] * reps)[:batch_size] if reps > 1 else self._inputs[:batch_size]
        return {self.input_name: np.ascontiguousarray(x)}

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric, "task": "classification", "images": len(self.data), "source": str(self.data.source)}
