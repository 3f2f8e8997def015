"""Vectorized greedy NMS in NumPy with ``torchvision.ops.nms`` semantics, and the
YOLOv5 v7.0 and Ultralytics YOLOv8/YOLO11 ``non_max_suppression`` post-processing built on it.

``torchvision.ops.nms`` (CPU kernel): sort by score, descending and stable; walk
the boxes in that order; keep a box that is not suppressed and suppress every
later box whose IoU with it is ``> iou_threshold``. IoU is computed in the
boxes' dtype (float32 here) as ``inter / (area_i + area_j - inter)`` and compared
with the threshold as a double. That is what is reproduced here, exactly: the
work per kept box is one vectorized IoU against the later boxes of its class.

YOLOv5 makes NMS per class by adding ``class * 7680`` to the coordinates (in
float32, which rounds them: high class ids get a coarser grid). Boxes of
different classes then never overlap, so running greedy NMS per class on the
same offset coordinates and merging by score gives the identical keep list;
:func:`batched_nms` does that, and stops once ``max_keep`` boxes are kept (the
keep list is in descending score order, so truncating later is the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_WH = 7680
"""YOLOv5's class offset (pixels) for per-class NMS."""


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray | None,
    iou_threshold: float,
    max_keep: int | None = None,
    class_offset: float | None = MAX_WH,
) -> np.ndarray:
    """Greedy NMS, per class when ``classes`` is given; returns kept indices by descending score.

    Same result as ``torchvision.ops.nms(boxes + classes[:, None] * class_offset, scores, iou_threshold)[:max_keep]``
    (float32 boxes stay float32, including the offset). With ``class_offset=None``
    the boxes are used as they are and only same-class boxes suppress each other.
    """
    boxes = np.asarray(boxes)
    if boxes.dtype not in (np.float32, np.float64):
        boxes = boxes.astype(np.float32)
    scores = np.asarray(scores)
    n = int(boxes.shape[0])
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if classes is None:
        classes = np.zeros(n, dtype=np.int64)
    else:
        classes = np.asarray(classes).astype(np.int64, copy=False)
        if class_offset:
            boxes = boxes[:, :4] + classes[:, None].astype(boxes.dtype) * boxes.dtype.type(class_offset)
    boxes = boxes[:, :4]
    max_keep = n if max_keep is None else min(int(max_keep), n)
    if max_keep <= 0:
        return np.empty(0, dtype=np.int64)
    threshold = float(iou_threshold)  # compared as a double, like torchvision

    order = np.argsort(-scores, kind="stable")  # torchvision: stable descending sort
    sclasses = classes[order]
    # Regroup by class (stable: each group stays in descending score order) so the
    # boxes a kept box can suppress - the later ones of its class - are one
    # contiguous slice.
    grouping = np.argsort(sclasses, kind="stable")
    gboxes = boxes[order[grouping]]
    x1, y1, x2, y2 = (np.ascontiguousarray(gboxes[:, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    gclasses = sclasses[grouping]
    bounds = np.flatnonzero(np.diff(gclasses)) + 1
    group_end = np.empty(n, dtype=np.int64)
    for s, e in zip(np.concatenate(([0], bounds)), np.concatenate((bounds, [n]))):
        group_end[s:e] = e
    slot_of = np.empty(n, dtype=np.int64)  # score position -> grouped slot
    slot_of[grouping] = np.arange(n)
    slots = slot_of.tolist()
    ends = group_end.tolist()

    suppressed = np.zeros(n, dtype=bool)  # by grouped slot
    zero = boxes.dtype.type(0)
    keep: list[int] = []
    for p in range(n):
        g = slots[p]
        if suppressed[g]:
            continue
        keep.append(p)
        if len(keep) >= max_keep:
            break
        s, e = g + 1, ends[g]
        if s >= e:
            continue
        # IoU in the boxes' dtype, as torchvision's CPU kernel computes it.
        w = np.minimum(x2[g], x2[s:e])
        w -= np.maximum(x1[g], x1[s:e])
        np.maximum(w, zero, out=w)
        h = np.minimum(y2[g], y2[s:e])
        h -= np.maximum(y1[g], y1[s:e])
        np.maximum(h, zero, out=h)
        inter = w
        inter *= h
        union = areas[g] + areas[s:e]
        union -= inter
        inter /= union
        suppressed[s:e] |= inter.astype(np.float64) > threshold
    return order[np.asarray(keep, dtype=np.int64)]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None) -> np.ndarray:
    """Class-agnostic greedy NMS with ``torchvision.ops.nms`` semantics."""
    return batched_nms(boxes, scores, None, iou_threshold, max_keep=max_keep)


def xywh2xyxy(x: np.ndarray) -> np.ndarray:
    y = np.empty_like(x)
    half_w = x[:, 2] / 2
    half_h = x[:, 3] / 2
    y[:, 0] = x[:, 0] - half_w
    y[:, 1] = x[:, 1] - half_h
    y[:, 2] = x[:, 0] + half_w
    y[:, 3] = x[:, 1] + half_h
    return y


@dataclass(frozen=True)
class NmsSettings:
    conf_threshold: float = 0.001
    iou_threshold: float = 0.6
    max_det: int = 300
    max_nms: int = 30000
    multi_label: bool = True
    agnostic: bool = False


def yolov5_nms(prediction: np.ndarray, settings: NmsSettings = NmsSettings()) -> np.ndarray:
    """YOLOv5 v7.0 ``non_max_suppression`` for one image.

    ``prediction`` is ``[anchors, 5 + nc]`` (cx, cy, w, h, objectness, class
    probabilities), float32. Returns ``[k, 6]`` float32 rows
    ``(x1, y1, x2, y2, score, class)`` in input pixels, by descending score.
    """
    x = prediction
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    conf = float(settings.conf_threshold)  # a Python float compares in float32, as in PyTorch
    x = x[x[:, 4] > conf]
    if not x.shape[0]:
        return np.zeros((0, 6), dtype=np.float32)
    cls_scores = x[:, 5:] * x[:, 4:5]  # conf = obj_conf * cls_conf
    return _select_and_nms(xywh2xyxy(x[:, :4]), cls_scores, settings)


def yolov8_nms(prediction: np.ndarray, settings: NmsSettings = NmsSettings(iou_threshold=0.7)) -> np.ndarray:
    """Ultralytics (YOLOv8 / YOLO11) ``ops.non_max_suppression`` for one image.

    ``prediction`` is ``[4 + nc, anchors]`` (the export's transposed layout: cx,
    cy, w, h, then class scores; no objectness). Candidates are the anchors whose
    best class score passes ``conf_threshold``; after that the selection and NMS
    are YOLOv5's (same ``max_wh`` class offset, ``max_nms``, multi-label rule).
    Returns ``[k, 6]`` float32 rows as :func:`yolov5_nms`.
    """
    x = prediction
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    conf = float(settings.conf_threshold)
    x = x[:, x[4:].max(0) > conf].T  # filter before transposing: far fewer anchors to copy
    if not x.shape[0]:
        return np.zeros((0, 6), dtype=np.float32)
    return _select_and_nms(xywh2xyxy(np.ascontiguousarray(x[:, :4])), np.ascontiguousarray(x[:, 4:]), settings)


def _select_and_nms(box: np.ndarray, cls_scores: np.ndarray, settings: NmsSettings) -> np.ndarray:
    """Shared tail of both layouts: (multi-label) class selection, ``max_nms`` cut, per-class NMS."""
    conf = float(settings.conf_threshold)
    multi_label = settings.multi_label and cls_scores.shape[1] > 1
    if multi_label:
        i, j = np.nonzero(cls_scores > conf)
        score = cls_scores[i, j]
    else:
        j = cls_scores.argmax(1)
        score = cls_scores[np.arange(len(j)), j]
        i = np.flatnonzero(score > conf)
        j, score = j[i], score[i]
    n = score.shape[0]
    if not n:
        return np.zeros((0, 6), dtype=np.float32)
    order = np.argsort(-score, kind="stable")
    if n > settings.max_nms:
        order = order[: settings.max_nms]
    i, j, score = i[order], j[order], score[order]
    boxes = box[i]
    keep = batched_nms(boxes, score, None if settings.agnostic else j, settings.iou_threshold, max_keep=settings.max_det)
    out = np.empty((keep.size, 6), dtype=np.float32)
    out[:, :4] = boxes[keep]
    out[:, 4] = score[keep]
    out[:, 5] = j[keep]
    return out
