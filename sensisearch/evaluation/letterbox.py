"""YOLOv5 letterbox preprocessing, exactly as YOLOv5 v7.0 ``val.py`` does it.

For a square ONNX model ``val.py`` builds its data loader with ``rect=False``,
so every image goes through two steps (``utils/dataloaders.py`` at tag v7.0):

1. ``load_image``: resize so the long side equals the input size, with
   ``cv2.INTER_AREA`` when shrinking and ``cv2.INTER_LINEAR`` when enlarging;
   the new size is ``(int(w0 * r), int(h0 * r))`` (truncation: the switch to
   ``math.ceil`` came after v7.0, in PR #10558).
2. ``letterbox(img, 640, auto=False, scaleup=False)``: pad (value 114) to the
   input size, centred, with ``top = round(dh - 0.1)``, ``left = round(dw - 0.1)``.

Boxes are mapped back with ``scale_boxes(.., ratio_pad=((h/h0, w/w0), (dw, dh)))``:
subtract the pad, divide by the *height* gain of step 1, clip to the image.
For a non-square input ``(H, W)`` step 1 uses ``r = min(H/h0, W/w0)``, which is
the same as above for ``H == W``.

Ultralytics YOLOv8/YOLO11 validation (``ultralytics/data/base.py`` ``load_image``
with ``rect=False``, which its validator sets for exported models) differs only
in step 1: always ``cv2.INTER_LINEAR``, and the new size is
``min(ceil(w0 * r), size)``. That is the ``"ultralytics"`` style below; step 2
and the box mapping are the same ``LetterBox(scaleup=False, center=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from sensisearch.errors import SensisearchError

PAD_VALUE = 114
LETTERBOX_STYLES = ("yolov5", "ultralytics")
LetterboxStyle = Literal["yolov5", "ultralytics"]


@dataclass(frozen=True)
class LetterboxMeta:
    """Geometry of one letterboxed image, enough to map boxes back."""

    orig_shape: tuple[int, int]
    """(h0, w0) of the decoded original image."""
    gain: tuple[float, float]
    """(h/h0, w/w0): the resize ratio of step 1 (``val.py`` uses the first one)."""
    pad: tuple[float, float]
    """(dw, dh): half the padding added in x and y (may end in .5)."""


def resize_long_side(img: np.ndarray, new_shape: tuple[int, int], style: LetterboxStyle = "yolov5") -> np.ndarray:
    """Step 1 (``load_image``): fit the image into ``new_shape`` = (H, W), YOLOv5's or Ultralytics' way."""
    h0, w0 = img.shape[:2]
    r = min(new_shape[0] / h0, new_shape[1] / w0)
    if r != 1:
        if style == "ultralytics":
            size = (min(math.ceil(w0 * r), new_shape[1]), min(math.ceil(h0 * r), new_shape[0]))
            return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
        interp = cv2.INTER_LINEAR if r > 1 else cv2.INTER_AREA
        img = cv2.resize(img, (max(1, int(w0 * r)), max(1, int(h0 * r))), interpolation=interp)
    return img


def letterbox(
    img: np.ndarray,
    new_shape: tuple[int, int],
    pad_value: int = PAD_VALUE,
    scaleup: bool = False,
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Step 2 (YOLOv5 ``utils/augmentations.letterbox`` with ``auto=False``).

    Returns the padded image, the (extra) resize ratio and the pad (dw, dh).
    """
    shape = img.shape[:2]
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        r = min(r, 1.0)
    new_unpad = int(round(shape[1] * r)), int(round(shape[0] * r))
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    dw /= 2
    dh /= 2
    if shape[::-1] != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    return img, r, (dw, dh)


def preprocess_bgr(
    img: np.ndarray, new_shape: tuple[int, int], pad_value: int = PAD_VALUE, style: LetterboxStyle = "yolov5"
) -> tuple[np.ndarray, LetterboxMeta]:
    """BGR HWC uint8 image -> RGB CHW uint8 letterboxed image and its geometry."""
    h0, w0 = img.shape[:2]
    resized = resize_long_side(img, new_shape, style)
    h, w = resized.shape[:2]
    boxed, _, pad = letterbox(resized, new_shape, pad_value=pad_value, scaleup=False)
    chw = np.ascontiguousarray(boxed.transpose(2, 0, 1)[::-1])  # HWC->CHW, BGR->RGB
    return chw, LetterboxMeta(orig_shape=(h0, w0), gain=(h / h0, w / w0), pad=(float(pad[0]), float(pad[1])))


def read_image(path: Path) -> np.ndarray:
    """Decode an image as BGR uint8 (``cv2.imread``, as YOLOv5 does)."""
    img = cv2.imread(str(path))  # IMREAD_COLOR: 3 channels, EXIF orientation applied
    if img is None:
        raise SensisearchError(f"could not read image {path}: not an image file OpenCV can decode; remove or replace it")
    return img


def load_letterboxed(
    path: Path, new_shape: tuple[int, int], pad_value: int = PAD_VALUE, style: LetterboxStyle = "yolov5"
) -> tuple[np.ndarray, LetterboxMeta]:
    """Read one image file and letterbox it: RGB CHW uint8 plus geometry."""
    return preprocess_bgr(read_image(path), new_shape, pad_value, style)


def scale_boxes_to_original(boxes: np.ndarray, gain: float, pad: tuple[float, float], orig_shape: tuple[int, int]) -> np.ndarray:
    """YOLOv5 ``scale_boxes`` + ``clip_boxes`` in place on float32 xyxy boxes (input px -> original px).

    ``gain`` is the height gain ``h/h0`` (what ``val.py`` passes); arithmetic
    stays in the boxes' dtype, as in PyTorch.
    """
    dtype = boxes.dtype.type
    boxes[:, [0, 2]] -= dtype(pad[0])
    boxes[:, [1, 3]] -= dtype(pad[1])
    boxes[:, :4] /= dtype(gain)
    boxes[:, 0] = np.clip(boxes[:, 0], 0, orig_shape[1])
    boxes[:, 1] = np.clip(boxes[:, 1], 0, orig_shape[0])
    boxes[:, 2] = np.clip(boxes[:, 2], 0, orig_shape[1])
    boxes[:, 3] = np.clip(boxes[:, 3], 0, orig_shape[0])
    return boxes


def scale_boxes_to_input(boxes: np.ndarray, gain: float, pad: tuple[float, float]) -> np.ndarray:
    """Inverse of :func:`scale_boxes_to_original` (without clipping): original px -> input px."""
    out = np.array(boxes, dtype=np.float64, copy=True)
    out[:, :4] *= gain
    out[:, [0, 2]] += pad[0]
    out[:, [1, 3]] += pad[1]
    return out
