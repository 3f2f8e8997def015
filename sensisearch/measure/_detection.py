"""Per-image COCO detection matches that re-accumulate to pycocotools' mAP exactly.

After ``COCOeval.evaluate()``, ``evalImgs`` holds, per (category, area range,
image), each detection's score, its match at the 10 IoU thresholds and its
ignore flags, plus the ground truth's ignore flags. :class:`DetectionMatches`
keeps that (area "all", maxDets 100) in flat numpy arrays, small enough to store
with a trial, and :meth:`DetectionMatches.accumulate` recomputes mAP@[.5:.95]
and mAP@.5 from it, optionally with per-image multiplicities.

Hand-written, not ``COCOeval.accumulate()``: a paired bootstrap over images needs
hundreds of re-accumulations with images drawn several times, and
``COCOeval.accumulate`` takes no weights; the only way to weight it is to re-run
``COCOeval.evaluate`` on a duplicated image list (0.5-1.5 s per resample for
YOLOv5n on coco-dev). Even unweighted it is slower: measured on the real YOLOv5n /
coco-dev results (34,831 detections, 2-core shared machine at load ~2.4),
``COCOeval.accumulate`` 59 ms per call against 2.9 ms here (20x; see
``benchmarks/paired_timing.py --coco``). It is vectorized over categories and
IoU thresholds (:func:`_interpolated_precision` says how it stays exact) and
reproduces ``accumulate() + summarize()`` stats[0]/[1] bit-for-bit without
weights, and COCOeval on the duplicated image list with them
(tests/measure/test_measure.py checks both on the real YOLOv5n, and ties).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from pycocotools.cocoeval import COCOeval

# pycocotools' Params.setDetParams, computed the same way so values match bit-for-bit.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = 100
_FIELDS = ("image_ids", "category_ids", "det_image", "det_category", "det_score", "det_matched", "det_ignore", "gt_counts")


@dataclass(frozen=True, eq=False)
class DetectionMatches:
    """COCOeval's per-image matching (area "all", at most 100 detections per image and class).

    Detections are stored in COCOeval's accumulation order: by category, then
    image (sorted id), then score rank within the image.
    """

    image_ids: np.ndarray
    """``[I]`` int64 COCO image ids, sorted (COCOeval's order); the bootstrap items."""
    category_ids: np.ndarray
    """``[K]`` int64 COCO category ids, sorted."""
    det_image: np.ndarray
    """``[D]`` int32 index into ``image_ids``."""
    det_category: np.ndarray
    """``[D]`` int32 index into ``category_ids``."""
    det_score: np.ndarray
    """``[D]`` float64 detection score."""
    det_matched: np.ndarray
    """``[D, 10]`` bool: matched to a ground truth at each IoU threshold 0.5:0.05:0.95."""
    det_ignore: np.ndarray
    """``[D, 10]`` bool: matched to an ignored (crowd) ground truth, so neither TP nor FP."""
    gt_counts: np.ndarray
    """``[I, K]`` int32 non-ignored ground-truth boxes per image and category (crowd excluded)."""

    def __len__(self) -> int:
        return int(self.image_ids.size)

    @property
    def num_detections(self) -> int:
        return int(self.det_score.size)

    def instance_counts(self) -> np.ndarray:
        """``[K]`` non-ignored ground-truth instances per category (``category_ids`` order)."""
        return self.gt_counts.sum(axis=0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_cocoeval(cls, ev: COCOeval) -> "DetectionMatches":
        """Extract from a COCOeval after ``evaluate()`` (bbox, useCats, any areaRng/maxDets lists).

        Uses the area range ``[0, 1e10]`` ("all") and maxDets 100, the ones behind
        stats[0] and stats[1]; both must be among ``ev.params``.
        """
        p = ev.params
        if not p.useCats:
            raise ValueError("DetectionMatches needs COCOeval with useCats=1")
        area_ranges = [list(a) for a in p.areaRng]
        if [0, 1e10] not in area_ranges or MAX_DETS not in p.maxDets:
            raise ValueError("COCOeval params must include area range [0, 1e10] and maxDets 100")
        if not np.array_equal(np.asarray(p.iouThrs), IOU_THRESHOLDS):
            raise ValueError("COCOeval params must use the standard IoU thresholds 0.5:0.05:0.95")
        image_ids = np.asarray(p.imgIds, dtype=np.int64)  # evaluate() sorted and deduplicated them
        category_ids = np.asarray(p.catIds, dtype=np.int64)
        n_img, n_area = image_ids.size, len(area_ranges)
        area_index = area_ranges.index([0, 1e10])
        gt_counts = np.zeros((n_img, category_ids.size), dtype=np.int32)
        images: list[np.ndarray] = []
        cats: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        matched: list[np.ndarray] = []
        ignored: list[np.ndarray] = []
        for k in range(category_ids.size):
            base = k * n_area * n_img + area_index * n_img
            for i in range(n_img):
                e = ev.evalImgs[base + i]
                if e is None:
                    continue
                gt_counts[i, k] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
                # evaluate() ran with maxDets[-1]; accumulate() re-cuts at 100.
                d = min(len(e["dtScores"]), MAX_DETS)
                if d == 0:
                    continue
                images.append(np.full(d, i, dtype=np.int32))
                cats.append(np.full(d, k, dtype=np.int32))
                scores.append(np.asarray(e["dtScores"][:d], dtype=np.float64))
                # pycocotools' test for "matched" is a nonzero gt id; keep exactly that.
                matched.append(np.asarray(e["dtMatches"])[:, :d].T != 0)
                ignored.append(np.asarray(e["dtIgnore"])[:, :d].T != 0)
        t = IOU_THRESHOLDS.size
        return cls(
            image_ids=image_ids,
            category_ids=category_ids,
            det_image=np.concatenate(images) if images else np.zeros(0, np.int32),
            det_category=np.concatenate(cats) if cats else np.zeros(0, np.int32),
            det_score=np.concatenate(scores) if scores else np.zeros(0, np.float64),
            det_matched=np.concatenate(matched) if matched else np.zeros((0, t), bool),
            det_ignore=np.concatenate(ignored) if ignored else np.zeros((0, t), bool),
            gt_counts=gt_counts,
        )

    @classmethod
    def without_detections(cls, image_ids: Sequence[int], category_ids: Sequence[int], gt_counts: np.ndarray) -> "DetectionMatches":
        """Matches of a model that detected nothing (COCOeval cannot load an empty result)."""
        t = IOU_THRESHOLDS.size
        return cls(
            image_ids=np.asarray(image_ids, dtype=np.int64),
            category_ids=np.asarray(category_ids, dtype=np.int64),
            det_image=np.zeros(0, np.int32),
            det_category=np.zeros(0, np.int32),
            det_score=np.zeros(0, np.float64),
            det_matched=np.zeros((0, t), bool),
            det_ignore=np.zeros((0, t), bool),
            gt_counts=np.asarray(gt_counts, dtype=np.int32),
        )

    def restricted_to(self, image_ids: Sequence[int]) -> "DetectionMatches":
        """The matches of the images ``image_ids`` only: what COCOeval over just those images gives.

        COCOeval matches each (image, category) on its own, so dropping the other
        images' rows keeps every remaining match; the order (category, image, rank) stays.
        """
        wanted = np.unique(np.asarray(image_ids, dtype=np.int64))
        rows = np.searchsorted(self.image_ids, wanted)
        if rows.size and (rows.max() >= len(self) or not np.array_equal(self.image_ids[rows], wanted)):
            raise ValueError("restricted_to: some image ids are not among these matches")
        new_row = np.full(len(self), -1, dtype=np.int64)
        new_row[rows] = np.arange(rows.size)
        keep = new_row[self.det_image] >= 0
        return DetectionMatches(
            image_ids=wanted,
            category_ids=self.category_ids,
            det_image=new_row[self.det_image[keep]].astype(np.int32),
            det_category=self.det_category[keep],
            det_score=self.det_score[keep],
            det_matched=self.det_matched[keep],
            det_ignore=self.det_ignore[keep],
            gt_counts=self.gt_counts[rows],
        )

    # ------------------------------------------------------------------ storage
    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{name: getattr(self, name) for name in _FIELDS})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "DetectionMatches":
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return cls(**{name: npz[name] for name in _FIELDS})

    # ------------------------------------------------------------------ metric
    def precision(self, weights: np.ndarray | None = None) -> np.ndarray:
        """``[T, R, K]`` interpolated precision, -1 for categories without ground truth.

        ``weights``: per-image int multiplicities (``[I]``); an image drawn w
        times counts as w copies of itself placed next to each other in image
        order, which is what COCOeval gives for that duplicated image list.
        """
        if weights is None:
            ranking = self._ranking
            return _interpolated_precision(ranking.tps, ranking.ignored, ranking.category, self.gt_counts.sum(axis=0),
                                           self.category_ids.size)
        weights = np.asarray(weights, dtype=np.int64)
        if weights.shape != (len(self),) or (weights < 0).any():
            raise ValueError(f"weights must be {len(self)} non-negative integers, one per image")
        npig = weights @ self.gt_counts.astype(np.int64)
        ranking = self._ranking
        columns = _repeat_segments(ranking.tie_starts, ranking.category.size, weights[ranking.image[ranking.tie_starts]])
        ignored = None if ranking.ignored is None else ranking.ignored[:, columns]
        return _interpolated_precision(ranking.tps[:, columns], ignored, ranking.category[columns], npig,
                                       self.category_ids.size)

    @functools.cached_property
    def _ranking(self) -> _Ranking:
        """The detections as COCOeval accumulates them, computed once and reused by every resample.

        Per category, a stable sort by descending score of the detections in image order (lexsort is
        stable). With images drawn several times, COCOeval's ranking is this one with each image's copies
        next to each other: equal scores keep image order, so the copies of one image's detections of one
        class with one score (a tie) follow each other as a block, and every other detection's copies sit
        in a row. Repeating each tie block reproduces it without sorting again.
        """
        ranked = np.lexsort((-self.det_score, self.det_category))
        category, image, score = self.det_category[ranked], self.det_image[ranked], self.det_score[ranked]
        ignore = np.ascontiguousarray(self.det_ignore[ranked].T)  # [T, D]
        tps = np.ascontiguousarray(self.det_matched[ranked].T) & ~ignore
        same = (category[1:] == category[:-1]) & (image[1:] == image[:-1]) & (score[1:] == score[:-1])
        return _Ranking(tps, ignore if ignore.any() else None, category, image, np.flatnonzero(np.r_[True, ~same]))

    def accumulate(self, weights: np.ndarray | None = None) -> tuple[float, float]:
        """(mAP@[.5:.95], mAP@.5) as fractions, as COCOeval ``stats[0]``, ``stats[1]`` (-1 when undefined)."""
        precision = self.precision(weights)
        return _mean_valid(precision), _mean_valid(precision[0])


@dataclass(frozen=True)
class _Ranking:
    tps: np.ndarray
    """``[T, D]`` bool: true positive at each IoU threshold, in ranking order."""
    ignored: np.ndarray | None
    """``[T, D]`` bool: matched to a crowd box (neither true nor false positive); None when none is."""
    category: np.ndarray
    image: np.ndarray
    tie_starts: np.ndarray
    """Where each tie block starts: detections of one image and class with equal scores (mostly one each)."""


def _repeat_segments(starts: np.ndarray, total: int, reps: np.ndarray) -> np.ndarray:
    """Indices ``0..total-1`` with the segment beginning at ``starts[s]`` repeated ``reps[s]`` times, whole."""
    lengths = np.diff(np.r_[starts, total])
    expanded = lengths * reps
    segment = np.repeat(np.arange(starts.size), expanded)
    local = np.arange(int(expanded.sum())) - np.repeat(np.cumsum(expanded) - expanded, expanded)
    return starts[segment] + local % lengths[segment]


def _interpolated_precision(tps: np.ndarray, ignored: np.ndarray | None, category: np.ndarray, npig: np.ndarray,
                            n_cat: int) -> np.ndarray:
    """pycocotools' ``accumulate`` precision ``[T, R, K]`` of ranked detections (``[T, D']`` true-positive and
    ignored flags, sorted by category, then descending score; every other detection is a false positive),
    with ``npig[k]`` ground truths per category.

    Vectorized over categories and IoU thresholds (pycocotools, and this module before, loop over both:
    5-7 ms per call on YOLOv5n / 40 coco-dev images, most of a paired bootstrap's time; a trial's 200
    resamples now 4.35x faster, paired, ``benchmarks/paired_timing.py --coco``). Bit-for-bit the same
    floats, from the same integer counts:
    - Recall is ``tp / npig``, nondecreasing along a category's run, so pycocotools' ``searchsorted(rc,
      recThrs, "left")`` lands on the first detection whose TP count reaches the least count giving that
      recall in float division (:func:`_least_counts`): the n-th true positive of the run.
    - Precision ``tp / (fp + tp + eps)`` rises only at a true positive, so its envelope (the running max
      from the right) at the n-th true positive is the max over the run's true positives from the n-th on:
      a running max over true positives only, restarted at each (IoU threshold, category) run. A complex
      ``maximum`` compares the real part first, so the run's number there restarts it, and the precision in
      the imaginary part is carried exactly.
    """
    n_iou, n_rec = tps.shape[0], RECALL_THRESHOLDS.size
    precision = np.full((n_iou, n_rec, n_cat), -1.0)
    cats = np.flatnonzero(npig > 0)
    if cats.size == 0:
        return precision
    length = tps.shape[1]
    if length == 0:  # nothing detected: every recall threshold unreached
        precision[:, :, cats] = 0.0
        return precision
    bounds = np.searchsorted(category, np.arange(n_cat + 1), side="left")
    rows, cols = np.nonzero(tps)  # the true positives, row by row, in ranking order
    flat = rows * length + cols
    # first[t, k]: index in (rows, cols) of the first true positive of category k's run in row t.
    first = np.searchsorted(flat, np.arange(n_iou)[:, None] * length + bounds[None, :], side="left")  # [T, K + 1]
    runs = category[cols]
    before = np.arange(flat.size) - first[rows, runs]  # true positives before this one in its run
    # The detections before it in its run are true positives, ignored ones or false positives.
    fp = cols - bounds[runs] - before
    if ignored is not None:
        ignored_count = np.cumsum(ignored, axis=1, dtype=np.int32)  # int32: 20x faster than int64 (numpy 2.4)
        starts = bounds[:-1]
        ignored_before = np.where(starts > 0, ignored_count[:, np.maximum(starts - 1, 0)], 0)  # [T, K]
        fp = fp - (ignored_count[rows, cols] - ignored_before[rows, runs])
    tp = (before + 1).astype(np.float64)
    fp = fp.astype(np.float64)
    pr = tp / (fp + tp + np.spacing(1))
    run_id = -(rows.astype(np.float64) * n_cat + runs)  # grows along the reversed order: restarts the max
    envelope = np.maximum.accumulate((run_id + 1j * pr)[::-1])[::-1].imag
    needed = np.maximum(_least_counts(npig[cats], RECALL_THRESHOLDS), 1)  # [K', R]; recall 0: the run's best
    found = first[:, cats][:, :, None] + needed[None, :, :] - 1  # [T, K', R]
    valid = needed[None, :, :] <= (first[:, cats + 1] - first[:, cats])[:, :, None]  # never reached: 0
    values = np.zeros(found.shape)
    values[valid] = envelope[found[valid]]
    precision[:, :, cats] = values.transpose(0, 2, 1)
    return precision


def _least_counts(npig: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``[K, R]`` the least integer n with ``n / npig[k] >= thresholds[r]`` in float64 division (the
    recall pycocotools compares), from the rounded product corrected by the division itself."""
    total = npig.astype(np.float64)[:, None]
    n = np.maximum(np.ceil(thresholds[None, :] * total).astype(np.int64), 0)
    while True:  # a step or none: the product is off by at most a rounding
        low = (n > 0) & ((n - 1) / total >= thresholds[None, :])
        high = n / total < thresholds[None, :]
        if not (low.any() or high.any()):
            return n
        n = n - low + high


def _mean_valid(precision: np.ndarray) -> float:
    """pycocotools ``summarize``: mean over entries > -1, or -1 when there are none."""
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def map50_95_points(matches: DetectionMatches, weights: np.ndarray | None = None) -> float:
    """mAP@[.5:.95] in points (a ``metric_fn`` for :func:`paired_bootstrap_drop`)."""
    return max(matches.accumulate(weights)[0], 0.0) * 100.0


def map50_points(matches: DetectionMatches, weights: np.ndarray | None = None) -> float:
    """mAP@.5 in points (a ``metric_fn`` for :func:`paired_bootstrap_drop`)."""
    return max(matches.accumulate(weights)[1], 0.0) * 100.0
