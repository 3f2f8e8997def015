"""Per-image results of a trial, and its accuracy drop vs FP32 with a paired bootstrap CI.

Evaluators fill ``EvaluationResult.per_image``: a classifier's bool correctness
per image, a detector's :class:`~sensisearch.measure.DetectionMatches`. The FP32
baseline's are stored once as a study attribute (base64 of the same bytes) so any
worker can compute a drop; every trial's own go to ``trials/NNNN/per_image.npz``.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import TYPE_CHECKING, Callable, Union

import numpy as np

from sensisearch.fileio import write_bytes_atomic
from sensisearch.measure import DetectionMatches, DropEstimate, PairedBootstrap, accuracy_points, map50_95_points, map50_points

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)

PerImage = Union[np.ndarray, DetectionMatches]
PER_IMAGE_NAME = "per_image.npz"
_CORRECT = "correct"

# Primary metric -> per-image metric function (points) for the paired bootstrap.
_DETECTION_METRICS: dict[str, Callable[[DetectionMatches, np.ndarray | None], float]] = {
    "mAP50-95": map50_95_points,
    "mAP50": map50_points,
}


def per_image_to_bytes(per_image: PerImage) -> bytes:
    """An ``.npz``: ``correct`` for a classifier, :meth:`DetectionMatches.to_bytes` for a detector."""
    if isinstance(per_image, DetectionMatches):
        return per_image.to_bytes()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{_CORRECT: np.asarray(per_image, dtype=bool)})
    return buffer.getvalue()


def per_image_from_bytes(data: bytes) -> PerImage:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if _CORRECT in npz.files:
            return np.asarray(npz[_CORRECT], dtype=bool)
    return DetectionMatches.from_bytes(data)


def encode(per_image: PerImage) -> str:
    return base64.b64encode(per_image_to_bytes(per_image)).decode("ascii")


def decode(text: str) -> PerImage:
    return per_image_from_bytes(base64.b64decode(text))


def save_per_image(per_image: PerImage, trial_dir: Path) -> Path:
    return write_bytes_atomic(trial_dir / PER_IMAGE_NAME, per_image_to_bytes(per_image))


def load_per_image(path: Path) -> PerImage:
    return per_image_from_bytes(path.read_bytes())


def metric_function(metric: str, per_image: PerImage) -> Callable[[PerImage, np.ndarray | None], float] | None:
    """The per-image metric behind ``metric`` in points, or None when it cannot be recomputed per image."""
    if isinstance(per_image, DetectionMatches):
        return _DETECTION_METRICS.get(metric)  # type: ignore[return-value]
    # A classifier's per-image array is correctness by the primary metric (top1 or top5).
    return accuracy_points  # type: ignore[return-value]


def drop_bootstrap(reference: PerImage, metric: str, n_resamples: int, seed: int = 0) -> PairedBootstrap | None:
    """The paired bootstrap of FP32 minus a candidate against ``reference``; None if ``metric`` is not per-image."""
    fn = metric_function(metric, reference)
    return None if fn is None else PairedBootstrap(reference, fn, n_resamples, seed=seed)  # type: ignore[arg-type]


def drop_estimate(reference: PerImage, candidate: PerImage, metric: str, n_resamples: int, seed: int = 0) -> DropEstimate | None:
    """FP32 minus candidate, in points, with its paired bootstrap 95% CI over images; None if not computable."""
    return estimate_with(drop_bootstrap(reference, metric, n_resamples, seed), candidate, metric)


def estimate_with(bootstrap: PairedBootstrap | None, candidate: PerImage, metric: str) -> DropEstimate | None:
    """``bootstrap.drop(candidate)``, or None (said in the log) when the candidate's results cannot be paired."""
    reference = None if bootstrap is None else bootstrap.reference_items
    if bootstrap is None or type(reference) is not type(candidate) or len(reference) != len(candidate):  # type: ignore[arg-type]
        log.warning("no drop CI for metric %s: per-image results are missing or do not match FP32's", metric)
        return None
    return bootstrap.drop(candidate)


class FP32Bootstraps:
    """One worker's bootstrap against the study's stored FP32 per-image results, reused by every trial.

    Keyed by the stored text itself, so a study whose FP32 results change (another
    evaluation set on resume) gets a new one; the reference side of every resample
    is then computed once per worker instead of once per trial (:class:`PairedBootstrap`).
    """

    def __init__(self, n_resamples: int, seed: int) -> None:
        self.n_resamples = n_resamples
        self.seed = seed
        self._key: tuple[str, str] | None = None
        self._bootstrap: PairedBootstrap | None = None

    def estimate(self, encoded_fp32: str, candidate: PerImage, metric: str) -> DropEstimate | None:
        key = (encoded_fp32, metric)
        if key != self._key:
            self._bootstrap = drop_bootstrap(decode(encoded_fp32), metric, self.n_resamples, self.seed)
            self._key = key
        return estimate_with(self._bootstrap, candidate, metric)
