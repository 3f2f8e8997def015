"""Top-1 / Top-5 accuracy of a classifier over labelled images."""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np

from sensisearch.backends.base import Runner
from sensisearch.errors import SensisearchError
from sensisearch.evaluation.base import EvaluationResult, Evaluator, PartialEvaluation
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

    def _hits(self, runner: Runner, positions: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, float]:
        """Top-1 and top-5 hits of the images at ``positions`` (all when None), in that order, and the seconds taken."""
        labels = self.data.labels
        assert labels is not None
        inputs = self._inputs if positions is None else self._inputs[positions]
        labels = labels if positions is None else labels[positions]
        batch, fixed = self._batch_size_for(runner)
        top1: list[np.ndarray] = []
        top5: list[np.ndarray] = []
        start = time.perf_counter()
        for begin in range(0, len(inputs), batch):
            x = inputs[begin : begin + batch]
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
            top1.append(topk_hits(logits, y, 1))
            top5.append(topk_hits(logits, y, 5))
        empty = np.zeros(0, dtype=bool)
        hits1 = np.concatenate(top1) if top1 else empty
        hits5 = np.concatenate(top5) if top5 else empty
        return hits1, hits5, time.perf_counter() - start

    def _result(self, hits1: np.ndarray, hits5: np.ndarray, seconds: float) -> EvaluationResult:
        n = len(hits1)
        return EvaluationResult(
            metric=self.metric,
            metrics={"top1": 100.0 * int(hits1.sum()) / n, "top5": 100.0 * int(hits5.sum()) / n},
            count=n,
            timings={"inference": seconds},
            per_image=hits1 if self.metric == "top1" else hits5,
        )

    def evaluate(self, runner: Runner) -> EvaluationResult:
        return self._result(*self._hits(runner, None))

    # ------------------------------------------------------------------ staged (multi-fidelity)
    def image_count(self) -> int | None:
        return len(self._inputs)

    def evaluate_part(self, runner: Runner, positions: Sequence[int]) -> PartialEvaluation:
        chosen = np.unique(np.asarray(positions, dtype=np.int64))
        hits1, hits5, seconds = self._hits(runner, chosen)
        return PartialEvaluation(chosen, self._result(hits1, hits5, seconds), (hits1, hits5, seconds))

    def evaluate_rest(self, runner: Runner, part: PartialEvaluation) -> EvaluationResult:
        # Each image's hit depends on its own logits only, so the two halves put back in
        # dataset order are the full evaluation's (tests compare with `evaluate`).
        done1, done5, done_seconds = part.state
        rest = np.setdiff1d(np.arange(len(self._inputs)), part.positions)
        hits1, hits5, seconds = self._hits(runner, rest)
        all1 = np.empty(len(self._inputs), dtype=bool)
        all5 = np.empty(len(self._inputs), dtype=bool)
        all1[part.positions], all1[rest] = done1, hits1
        all5[part.positions], all5[rest] = done5, hits5
        return self._result(all1, all5, done_seconds + seconds)

    def per_image_subset(self, per_image: Any, positions: Sequence[int]) -> np.ndarray:
        return np.asarray(per_image)[np.unique(np.asarray(positions, dtype=np.int64))]

    def latency_feeds(self, batch_size: int) -> Mapping[str, np.ndarray]:
        reps = -(-batch_size // len(self._inputs))
        x = np.concatenate([self._inputs] * reps)[:batch_size] if reps > 1 else self._inputs[:batch_size]
        return {self.input_name: np.ascontiguousarray(x)}

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric, "task": "classification", "images": len(self.data), "source": str(self.data.source)}
