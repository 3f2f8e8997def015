"""YOLO ONNX detectors scored with COCO mAP (pycocotools).

Two output layouts are recognised (:func:`yolo_output`): YOLOv5's decoded
``[N, anchors, 5 + classes]`` and Ultralytics YOLOv8/YOLO11's
``[N, 4 + classes, anchors]`` (no objectness), each with its own validation
defaults (:meth:`DetectionSettings.for_layout`).

The YOLOv5 pipeline reproduces YOLOv5 v7.0 ``val.py`` for a square ONNX model:
letterbox preprocessing (:mod:`sensisearch.evaluation.letterbox`), decoded
``[N, anchors, 5 + classes]`` outputs, multi-label per-class NMS
(:mod:`sensisearch.evaluation.nms`), boxes scaled back and clipped, COCO json
rounding (bbox to 3 decimals, score to 5) and ``COCOeval``. On the shared
``coco-dev`` set it gives the README's reference numbers.

Images are decoded and letterboxed once into a memory-mapped tensor store
(:mod:`sensisearch.evaluation.tensor_store`), so a trial's evaluation costs
little more than its inference.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sensisearch.backends.base import Runner
from sensisearch.errors import SensisearchError
from sensisearch.evaluation.base import EvaluationResult, Evaluator, PartialEvaluation
from sensisearch.evaluation.image_files import IMAGE_SUFFIXES
from sensisearch.evaluation.letterbox import (
    LETTERBOX_STYLES,
    PAD_VALUE,
    LetterboxStyle,
    scale_boxes_to_original,
)
from sensisearch.evaluation.nms import NmsSettings, yolov5_nms, yolov8_nms
from sensisearch.evaluation.tensor_store import TensorStore
from sensisearch.measure import DetectionMatches
from sensisearch.model.tensor import TensorSpec

log = logging.getLogger(__name__)

METRICS = ("mAP50-95", "mAP50")
YOLO_STRIDE_SETS = ((8, 16, 32), (8, 16, 32, 64))  # P5 and P6 models; YOLOv5 has 3 anchors per cell, v8 one
DEFAULT_DYNAMIC_BATCH = 8
OUTPUT_LAYOUTS = ("yolov5", "yolov8")


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DetectionSettings:
    """Post-processing and preprocessing of the detector evaluation.

    The defaults are YOLOv5 v7.0 ``val.py``'s and give the shared/data README's
    reference numbers. ``iou_threshold=0.6`` is what that reference uses
    (``val.py --iou-thres`` default); 0.65 is the other setting ``val.py`` is
    run with (by ``train.py`` on COCO) and scores this model 0.3585 / 0.5534.
    """

    conf_threshold: float = 0.001
    iou_threshold: float = 0.6
    max_det: int = 300
    max_nms: int = 30000
    """At most this many candidate boxes (by score) go into NMS."""
    multi_label: bool = True
    """Every class whose score passes ``conf_threshold`` yields a box."""
    agnostic: bool = False
    """Class-agnostic NMS (YOLOv5's ``--single-cls``); per-class when False."""
    input_size: int = 640
    """Letterbox size when the model's spatial input dimensions are dynamic."""
    pad_value: int = PAD_VALUE
    letterbox: LetterboxStyle = "yolov5"
    """Step-1 resize of the letterbox: YOLOv5 v7.0's or Ultralytics' (see :mod:`.letterbox`)."""

    def __post_init__(self) -> None:
        if self.letterbox not in LETTERBOX_STYLES:
            raise SensisearchError(f"unknown letterbox style {self.letterbox!r}; use one of {', '.join(LETTERBOX_STYLES)}")

    @classmethod
    def for_layout(cls, layout: str, **overrides: Any) -> "DetectionSettings":
        """The model family's own validation defaults, then ``overrides`` (e.g. ``iou_threshold``).

        ``yolov5``: YOLOv5 v7.0 ``val.py`` (NMS IoU 0.6). ``yolov8``: Ultralytics'
        ``DetectionValidator`` (conf 0.001, NMS IoU 0.7, max 300 detections,
        multi-label, its letterbox).
        """
        if layout == "yolov8":
            base: dict[str, Any] = {"iou_threshold": 0.7, "letterbox": "ultralytics"}
        elif layout == "yolov5":
            base = {}
        else:
            raise SensisearchError(f"unknown detector output layout {layout!r}; use one of {', '.join(OUTPUT_LAYOUTS)}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def nms(self) -> NmsSettings:
        return NmsSettings(
            conf_threshold=self.conf_threshold,
            iou_threshold=self.iou_threshold,
            max_det=self.max_det,
            max_nms=self.max_nms,
            multi_label=self.multi_label,
            agnostic=self.agnostic,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "conf_threshold": self.conf_threshold,
            "iou_threshold": self.iou_threshold,
            "max_det": self.max_det,
            "max_nms": self.max_nms,
            "multi_label": self.multi_label,
            "agnostic": self.agnostic,
            "input_size": self.input_size,
            "pad_value": self.pad_value,
            "letterbox": self.letterbox,
        }


# --------------------------------------------------------------------------- model recognition
def _shape_of(item: Any) -> tuple[int | None, ...] | None:
    shape = getattr(item, "shape", item)
    if isinstance(shape, (tuple, list)):
        return tuple(d if isinstance(d, int) and not isinstance(d, bool) and d >= 0 else None for d in shape)
    return None


def _output_shapes(model: Any) -> list[tuple[int | None, ...]]:
    """Output shapes of a Runner, a model-info object, a list of TensorSpecs/shapes, or one shape."""
    outputs = getattr(model, "outputs", model)
    if isinstance(outputs, (tuple, list)) and outputs and all(isinstance(d, int) or d is None for d in outputs):
        outputs = [outputs]  # a single shape
    if not isinstance(outputs, (tuple, list)):
        return []
    shapes = [_shape_of(o) for o in outputs]
    return [s for s in shapes if s is not None]


def _input_hw(model: Any) -> tuple[int | None, int | None] | None:
    inputs = getattr(model, "inputs", None)
    if not isinstance(inputs, (tuple, list)) or not inputs:
        return None
    shape = _shape_of(inputs[0])
    if shape is None or len(shape) != 4:
        return None
    return shape[2], shape[3]


def _expected_anchor_counts(h: int, w: int) -> set[int]:
    return {3 * sum((h // s) * (w // s) for s in strides) for strides in YOLO_STRIDE_SETS}


def yolov5_output_index(
    model: Any, input_hw: tuple[int | None, int | None] | None = None, num_classes: int | None = None
) -> int | None:
    """Index of the first output shaped like YOLOv5's ``[N, anchors, 5 + classes]``, or None."""
    if input_hw is None:
        input_hw = _input_hw(model)
    for index, shape in enumerate(_output_shapes(model)):
        if len(shape) != 3:
            continue
        anchors, width = shape[1], shape[2]
        if width is None or width < 6:
            continue
        if num_classes is not None and width != 5 + num_classes:
            continue
        if anchors is not None:
            if anchors <= width:
                continue  # e.g. YOLOv8's transposed [N, 4 + classes, anchors]
            if input_hw is not None and input_hw[0] and input_hw[1]:
                if anchors not in _expected_anchor_counts(input_hw[0], input_hw[1]):
                    continue
        return index
    return None


def _expected_v8_anchor_counts(h: int, w: int) -> set[int]:
    # One anchor per cell (YOLOv8/YOLO11's anchor-free head); three per cell too, for
    # anchor-based heads exported in this layout (the tests rewrite YOLOv5n so).
    cells = {sum(math.ceil(h / s) * math.ceil(w / s) for s in strides) for strides in YOLO_STRIDE_SETS}
    return cells | {3 * c for c in cells}


def yolov8_output_index(
    model: Any, input_hw: tuple[int | None, int | None] | None = None, num_classes: int | None = None
) -> int | None:
    """Index of the first output shaped like Ultralytics YOLOv8/YOLO11's ``[N, 4 + classes, anchors]``, or None.

    With a known input size the anchor count must be ``sum(ceil(H/s) * ceil(W/s))``
    over strides 8/16/32 (or 8..64), one anchor per cell; the anchors axis is
    always the longer one (8400 vs 84 at 640 for COCO).
    """
    if input_hw is None:
        input_hw = _input_hw(model)
    for index, shape in enumerate(_output_shapes(model)):
        if len(shape) != 3:
            continue
        width, anchors = shape[1], shape[2]
        if width is None or width < 5:
            continue
        if num_classes is not None and width != 4 + num_classes:
            continue
        if anchors is not None:
            if anchors <= width:
                continue  # YOLOv5's [N, anchors, 5 + classes]
            if input_hw is not None and input_hw[0] and input_hw[1]:
                if anchors not in _expected_v8_anchor_counts(input_hw[0], input_hw[1]):
                    continue
        return index
    return None


@dataclass(frozen=True)
class YoloOutput:
    """Which output holds the detections, and in which layout."""

    index: int
    layout: str
    """``yolov5`` (``[N, anchors, 5 + classes]``) or ``yolov8`` (``[N, 4 + classes, anchors]``)."""


def yolo_output(
    model: Any, input_hw: tuple[int | None, int | None] | None = None, num_classes: int | None = None
) -> YoloOutput | None:
    """The detection output of a YOLOv5 or Ultralytics YOLOv8/YOLO11 export, or None.

    ``model`` is what :func:`is_yolov5_detector` takes. A fully dynamic
    ``[N, ?, 85]`` output counts as YOLOv5, ``[N, 84, ?]`` as YOLOv8.
    """
    index = yolov5_output_index(model, input_hw, num_classes)
    if index is not None:
        return YoloOutput(index, "yolov5")
    index = yolov8_output_index(model, input_hw, num_classes)
    if index is not None:
        return YoloOutput(index, "yolov8")
    return None


def is_yolo_detector(model: Any, input_hw: tuple[int | None, int | None] | None = None) -> bool:
    """True for a YOLOv5 or YOLOv8/YOLO11 detection export (see :func:`yolo_output`)."""
    return yolo_output(model, input_hw) is not None


def is_yolov5_detector(
    model: Any, input_hw: tuple[int | None, int | None] | None = None, num_classes: int | None = None
) -> bool:
    """True when ``model`` has a YOLOv5-style decoded output ``[N, anchors, 5 + classes]``.

    ``model`` may be a Runner or any object with ``.outputs`` (TensorSpecs or
    shapes), a list of output shapes, or one shape. When the input size is known
    (``input_hw`` or ``model.inputs``) the anchor count must be
    ``3 * sum((H/s) * (W/s))`` over strides 8/16/32 (or 8..64 for P6 models).
    """
    return yolov5_output_index(model, input_hw, num_classes) is not None


def parse_class_names(value: Any) -> list[str] | None:
    """YOLOv5's ``names`` metadata (a dict repr ``{0: 'person', ...}`` or a list) -> list, else None."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return None
    if isinstance(value, dict):
        try:
            keys = sorted(int(k) for k in value)
        except (TypeError, ValueError):
            return None
        if keys != list(range(len(keys))):
            return None
        return [str(value[k] if k in value else value[str(k)]) for k in keys]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def read_onnx_class_names(onnx_path: Path) -> list[str] | None:
    """Class names from the ONNX ``metadata_props['names']`` YOLOv5 writes at export, or None."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for bad files
        raise SensisearchError(f"cannot read ONNX model {onnx_path}: {_one_line(exc) or type(exc).__name__}; pass a valid .onnx file") from exc
    for prop in model.metadata_props:
        if prop.key == "names":
            names = parse_class_names(prop.value)
            if names is None:
                log.warning("ignoring unparsable 'names' metadata in %s", onnx_path)
            return names
    return None


# --------------------------------------------------------------------------- COCO data
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_coco_annotations(path: Path) -> dict[str, Any]:
    """Read and check a COCO instances json (``images``, ``annotations``, ``categories``)."""
    path = Path(path)
    if not path.is_file():
        raise SensisearchError(f"annotation file {path} does not exist; pass a COCO instances json (e.g. instances_val2017.json)")
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise SensisearchError(f"annotation file {path} is not valid JSON ({exc.msg} at line {exc.lineno}); pass a COCO instances json") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SensisearchError(f"annotation file {path} cannot be read ({_one_line(exc)}); pass a COCO instances json") from exc
    return _check_coco_dict(data, path)


def _check_coco_dict(data: Any, path: Path) -> dict[str, Any]:
    """The structural checks of :func:`load_coco_annotations`, for a json already parsed (or built in memory)."""
    if not isinstance(data, dict):
        raise SensisearchError(f"annotation file {path} is not COCO instances format (top level is a {type(data).__name__}, not an object); pass a COCO instances json")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise SensisearchError(
            f"annotation file {path} is not COCO instances format: missing list(s) {', '.join(repr(k) for k in missing)}; "
            "pass a json with 'images', 'annotations' and 'categories'"
        )
    if not data["categories"]:
        raise SensisearchError(f"annotation file {path} has no categories; add the dataset's 'categories' list")
    for key, fields in (("images", ("id", "file_name")), ("categories", ("id", "name")), ("annotations", ("image_id", "category_id", "bbox"))):
        for entry in data[key]:
            if not isinstance(entry, dict) or any(f not in entry for f in fields):
                raise SensisearchError(
                    f"annotation file {path} is not COCO instances format: an entry of '{key}' lacks {', '.join(fields)}; "
                    "fix or regenerate the json"
                )
    return data


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; an error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SensisearchError(f"images folder {folder} does not exist or is not a folder; pass the folder holding the images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SensisearchError(
            f"images folder {folder} contains no images ({'/'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))}); pass the folder holding the images"
        )
    return files


def coco80_to_coco91() -> list[int]:
    """The standard YOLO class index -> COCO category id list (for reference and tests)."""
    return [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
            35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
            64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]  # fmt: skip


def _norm_name(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())


def category_mapping(
    categories: Sequence[Mapping[str, Any]],
    num_classes: int,
    class_names: Sequence[str] | None = None,
    source: str = "the annotation file",
) -> list[int]:
    """Model class index -> COCO category id.

    With ``class_names`` the mapping is by name (case- and ``_``-insensitive),
    and every model class must be a category. Without, the model must predict
    exactly as many classes as there are categories, and class k is the k-th
    category by id (for COCO's 80: the standard coco80 -> coco91 list).
    """
    cats = sorted(categories, key=lambda c: int(c["id"]))
    if class_names is not None:
        if len(class_names) != num_classes:
            raise SensisearchError(
                f"the model predicts {num_classes} classes but has {len(class_names)} class names; "
                "pass class names matching the model output (or none to map by category order)"
            )
        by_name: dict[str, int] = {}
        for c in cats:
            by_name.setdefault(_norm_name(c["name"]), int(c["id"]))
        unknown = [n for n in class_names if _norm_name(n) not in by_name]
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:5])
            raise SensisearchError(
                f"{len(unknown)} of the model's {num_classes} class names are not categories of {source} "
                f"(first: {shown}); use annotations for the model's classes or pass matching class names"
            )
        return [by_name[_norm_name(n)] for n in class_names]
    if num_classes != len(cats):
        raise SensisearchError(
            f"the model predicts {num_classes} classes but {source} has {len(cats)} categories; "
            "use annotations for the model's classes or pass the model's class names"
        )
    return [int(c["id"]) for c in cats]


# --------------------------------------------------------------------------- predictions
@dataclass
class DetectionPredictions:
    """Detections per evaluated image, in original-image pixels."""

    image_ids: list[int]
    detections: list[np.ndarray]
    """Per image ``[k, 6]`` float32: x1, y1, x2, y2, score, class index."""
    timings: dict[str, float] = field(default_factory=dict)
    num_classes: int | None = None
    """Classes the model predicts (``anchors`` row width - 5)."""

    @property
    def num_detections(self) -> int:
        return int(sum(d.shape[0] for d in self.detections))


def _quiet_coco(data: Mapping[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dict(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_results(predictions: DetectionPredictions, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO result dicts exactly as YOLOv5 ``save_one_json`` writes them (bbox 3 decimals, score 5)."""
    cat = list(category_ids)
    results: list[dict[str, Any]] = []
    for image_id, det in zip(predictions.image_ids, predictions.detections):
        if det.shape[0] == 0:
            continue
        xyxy = det[:, :4]
        box = np.empty_like(xyxy)  # xyxy2xywh, then centre -> top-left, in float32 as in PyTorch
        box[:, 0] = (xyxy[:, 0] + xyxy[:, 2]) / 2
        box[:, 1] = (xyxy[:, 1] + xyxy[:, 3]) / 2
        box[:, 2] = xyxy[:, 2] - xyxy[:, 0]
        box[:, 3] = xyxy[:, 3] - xyxy[:, 1]
        box[:, :2] -= box[:, 2:] / 2
        for b, score, c in zip(box.tolist(), det[:, 4].tolist(), det[:, 5].astype(np.int64).tolist()):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": cat[c],
                    "bbox": [round(b[0], 3), round(b[1], 3), round(b[2], 3), round(b[3], 3)],
                    "score": round(score, 5),
                }
            )
    return results


# --------------------------------------------------------------------------- evaluator
class CocoDetectionEvaluator(Evaluator):
    """COCO mAP of a YOLO detector (YOLOv5 ``[N, anchors, 5 + classes]`` or
    YOLOv8/YOLO11 ``[N, 4 + classes, anchors]`` output, told apart per runner).

    ``metric`` is ``"mAP50-95"`` (default) or ``"mAP50"``; both are always
    reported, in points. ``image_ids`` and ``limit`` restrict the evaluation to a
    subset (ids in annotation-file order, then the first ``limit``) for fast studies.
    ``annotations`` is a COCO instances json, or the same content as a dict (e.g.
    :func:`~sensisearch.evaluation.yolo_dataset.yolo_to_coco`'s, whose
    ``file_name`` entries are relative to ``images_dir``). ``batch_size`` is the
    batch for a model with a dynamic batch dimension (default 8); a static one is
    used as it is.
    """

    def __init__(
        self,
        images_dir: Path,
        annotations: Path | Mapping[str, Any],
        *,
        settings: DetectionSettings | None = None,
        cache_dir: Path | None = None,
        input_spec: TensorSpec | None = None,
        class_names: Sequence[str] | None = None,
        metric: str = "mAP50-95",
        image_ids: Sequence[int] | None = None,
        limit: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        if metric not in METRICS:
            raise SensisearchError(f"unknown detection metric {metric!r}; use one of {', '.join(METRICS)}")
        self.metric = metric
        self.settings = settings or DetectionSettings()
        self.images_dir = Path(images_dir)
        in_memory = isinstance(annotations, Mapping)
        if in_memory:
            info = annotations.get("info") if isinstance(annotations.get("info"), Mapping) else {}
            self.annotations = Path(str(info.get("source") or "<in-memory annotations>"))
        else:
            self.annotations = Path(annotations)  # type: ignore[arg-type]
        self._flat_images_dir = not in_memory
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        if batch_size is not None and batch_size < 1:
            raise SensisearchError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size = batch_size

        # Input geometry: the model's static H, W, else the settings' square size.
        size = self.settings.input_size
        self.input_name = "images"
        self.input_shape: tuple[int, int] = (size, size)
        self.static_batch: int | None = None
        if input_spec is not None:
            self.input_name = input_spec.name
            if len(input_spec.shape) != 4 or (input_spec.shape[1] not in (None, 3)):
                raise SensisearchError(
                    f"model input {input_spec.name!r} has shape {list(input_spec.shape)}; a YOLOv5 detector takes [N, 3, H, W] images"
                )
            h, w = input_spec.shape[2], input_spec.shape[3]
            self.input_shape = (h or size, w or size)
            self.static_batch = input_spec.static_batch

        data = _check_coco_dict(dict(annotations), self.annotations) if in_memory else load_coco_annotations(self.annotations)
        self._categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        self._category_names = {int(c["id"]): str(c["name"]) for c in self._categories}
        images = list(data["images"])
        if image_ids is not None:
            wanted = {int(i) for i in image_ids}
            known = {int(im["id"]) for im in images}
            unknown = sorted(wanted - known)
            if unknown:
                raise SensisearchError(
                    f"{len(unknown)} requested image ids are not in {self.annotations} (first: {', '.join(map(str, unknown[:5]))}); "
                    "pass ids listed in its 'images'"
                )
            images = [im for im in images if int(im["id"]) in wanted]
        if limit is not None:
            if limit < 1:
                raise SensisearchError(f"image limit must be at least 1, got {limit}")
            images = images[:limit]
        if not images:
            raise SensisearchError(f"annotation file {self.annotations} lists no images to evaluate; check its 'images' (or the subset)")
        self.image_ids = [int(im["id"]) for im in images]
        self.image_paths = self._resolve_images(images)
        self._coco = _quiet_coco(data)
        self._store: TensorStore | None = None
        self._category_ids: list[int] | None = None
        if self.class_names is not None:
            self._category_ids = category_mapping(self._categories, len(self.class_names), self.class_names, str(self.annotations))

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_yolo_dataset(cls, yaml_path: Path, split: str = "val", flag: str = "--eval-data", **kwargs: Any) -> "CocoDetectionEvaluator":
        """An evaluator over an Ultralytics dataset YAML's ``split``: YOLO txt labels as COCO ground truth.

        Class names default to the YAML's ``names`` (category id = class index + 1).
        """
        from sensisearch.evaluation.yolo_dataset import load_yolo_dataset, yolo_to_coco

        dataset = load_yolo_dataset(Path(yaml_path), split, flag)
        kwargs.setdefault("class_names", dataset.names)
        return cls(dataset.root, yolo_to_coco(dataset), **kwargs)

    def _resolve_images(self, images: list[Mapping[str, Any]]) -> list[Path]:
        if self._flat_images_dir:
            list_images(self.images_dir)  # clear error for a missing or empty folder
        elif not self.images_dir.is_dir():
            raise SensisearchError(f"images folder {self.images_dir} does not exist or is not a folder; pass the dataset root")
        paths: list[Path] = []
        missing: list[str] = []
        for im in images:
            name = str(im["file_name"])
            path = self.images_dir / name
            if not path.is_file():
                alt = self.images_dir / Path(name).name
                path = alt if alt.is_file() else path
            if not path.is_file():
                missing.append(name)
            paths.append(path)
        if missing:
            raise SensisearchError(
                f"{len(missing)} of {len(images)} images listed in {self.annotations} are missing from {self.images_dir} "
                f"(first: {', '.join(missing[:3])}); point the images folder at the one holding them"
            )
        return paths

    # ------------------------------------------------------------------ data
    @property
    def store(self) -> TensorStore:
        """The preprocessed images (built, or memory-mapped from the cache, on first use)."""
        if self._store is None:
            self._store = TensorStore.build(
                self.image_paths, self.input_shape, self.cache_dir, self.settings.pad_value, self.settings.letterbox
            )
        return self._store

    def latency_feeds(self, batch_size: int) -> Mapping[str, np.ndarray]:
        n = len(self.image_paths)
        indices = [i % n for i in range(batch_size)]
        return {self.input_name: self.store.batch(indices)}

    def describe(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "task": "coco-detection",
            "annotations": str(self.annotations),
            "images_dir": str(self.images_dir),
            "images": len(self.image_ids),
            "input_shape": list(self.input_shape),
            "settings": self.settings.to_dict(),
            "class_names": "model" if self.class_names is not None else "annotation categories",
        }

    # ------------------------------------------------------------------ runner checks
    def _check_runner(self, runner: Runner) -> tuple[str, YoloOutput, int]:
        """Input name, detection output and batch size for this runner."""
        inputs = runner.inputs
        names = [s.name for s in inputs]
        if self.input_name in names:
            spec = inputs[names.index(self.input_name)]
        elif len(inputs) == 1:
            spec = inputs[0]
        else:
            raise SensisearchError(
                f"the model has inputs {names} and none is {self.input_name!r}; a YOLOv5 detector has one image input"
            )
        not_detector = (
            "the model is not a YOLO detector (input {inp}, outputs {outs}); expected one [N, 3, H, W] image input "
            "and a decoded [N, anchors, 5 + classes] (YOLOv5) or [N, 4 + classes, anchors] (YOLOv8/YOLO11) output, exported without NMS"
        )
        outs = ", ".join(str(list(s.shape)) for s in runner.outputs)
        if len(spec.shape) != 4 or spec.shape[1] not in (None, 3) or yolo_output(runner.outputs, (None, None)) is None:
            raise SensisearchError(not_detector.format(inp=list(spec.shape), outs=outs))
        h, w = spec.shape[2], spec.shape[3]
        if (h is not None and h != self.input_shape[0]) or (w is not None and w != self.input_shape[1]):
            raise SensisearchError(
                f"model input {spec.name!r} is {h}x{w} but the evaluator letterboxes to {self.input_shape[0]}x{self.input_shape[1]}; "
                "build the evaluator from the same model (or set the input size)"
            )
        output = yolo_output(runner.outputs, (h, w))
        if output is None:
            raise SensisearchError(not_detector.format(inp=list(spec.shape), outs=outs))
        batch = spec.static_batch or self.batch_size or DEFAULT_DYNAMIC_BATCH
        return spec.name, output, batch

    def _categories_for(self, num_classes: int) -> list[int]:
        if self._category_ids is None:
            self._category_ids = category_mapping(self._categories, num_classes, None, str(self.annotations))
        elif len(self._category_ids) != num_classes:
            raise SensisearchError(
                f"the model predicts {num_classes} classes but its class names list {len(self._category_ids)}; "
                "pass class names matching the model output"
            )
        return self._category_ids

    # ------------------------------------------------------------------ evaluation
    def predict(self, runner: Runner, positions: Sequence[int] | None = None) -> DetectionPredictions:
        """Run every image (or those at ``positions``, in that order) through the runner and post-process:
        detections in original pixels."""
        input_name, output, batch = self._check_runner(runner)
        out_index = output.index
        decode = yolov8_nms if output.layout == "yolov8" else yolov5_nms
        t0 = time.perf_counter()
        store = self.store
        t_pre = time.perf_counter() - t0
        t_inf = t_nms = 0.0
        nms_settings = self.settings.nms()
        order = list(range(len(store))) if positions is None else [int(p) for p in positions]
        n = len(order)
        detections: list[np.ndarray] = []
        buf = np.empty((batch, 3, *self.input_shape), dtype=np.float32)
        num_classes: int | None = None
        full_batches = self._needs_full_batch(runner, input_name)
        start = 0
        while start < n:
            t0 = time.perf_counter()
            idx = order[start : min(start + batch, n)]
            real = len(idx)
            if real < batch and full_batches:
                idx += [idx[-1]] * (batch - real)  # static batch: pad with repeats, drop their outputs
            x = store.batch(idx, out=buf[: len(idx)])
            t1 = time.perf_counter()
            try:
                out = runner.run({input_name: x})[out_index]
            except Exception as exc:  # noqa: BLE001 - backends raise their own types
                # Some exports declare a dynamic batch but hard-code 1 inside (e.g. a
                # Reshape to [1, 3, 85, 80, 80]); they still run one image at a time.
                if start > 0 or full_batches or len(idx) == 1:
                    raise
                log.warning(
                    "the model declares a dynamic batch but fails at batch %d (%s); evaluating one image at a time",
                    len(idx), _one_line(str(exc))[:200],
                )
                batch = 1
                continue
            t2 = time.perf_counter()
            out = np.asarray(out)
            v8 = output.layout == "yolov8"
            rows, width = (out.shape[2], out.shape[1]) if v8 and out.ndim == 3 else (out.shape[1:3] if out.ndim == 3 else (0, 0))
            if out.ndim != 3 or out.shape[0] != len(idx) or width < (5 if v8 else 6) or rows <= width:
                expected = "[N, 4 + classes, anchors] YOLOv8" if v8 else "decoded [N, anchors, 5 + classes] YOLOv5"
                raise SensisearchError(
                    f"the model's detection output has shape {list(out.shape)} for a batch of {len(idx)}; expected a {expected} output"
                )
            if num_classes is None:
                num_classes = width - (4 if v8 else 5)
                self._categories_for(num_classes)
            for k in range(real):
                det = decode(out[k], nms_settings)
                meta = store.meta(idx[k])
                scale_boxes_to_original(det, meta.gain[0], meta.pad, meta.orig_shape)
                detections.append(det)
            t3 = time.perf_counter()
            t_pre += t1 - t0
            t_inf += t2 - t1
            t_nms += t3 - t2
            start += real
        return DetectionPredictions(
            image_ids=[self.image_ids[p] for p in order],
            detections=detections,
            timings={"preprocess": t_pre, "inference": t_inf, "nms": t_nms},
            num_classes=num_classes,
        )

    @staticmethod
    def _needs_full_batch(runner: Runner, input_name: str) -> bool:
        for spec in runner.inputs:
            if spec.name == input_name:
                return spec.static_batch is not None
        return True

    def score(self, predictions: DetectionPredictions, image_ids: Sequence[int] | None = None) -> EvaluationResult:
        """COCO mAP of these predictions, over ``image_ids`` (default: all predicted images)."""
        t0 = time.perf_counter()
        ids = list(predictions.image_ids if image_ids is None else image_ids)
        category_ids = self._categories_for(predictions.num_classes or len(self._categories))
        metrics, per_class, matches = self._cocoeval(predictions, category_ids, ids)
        timings = dict(predictions.timings)
        timings["cocoeval"] = time.perf_counter() - t0
        instances = {
            self._class_name(int(cat_id), category_ids): int(n)
            for cat_id, n in zip(matches.category_ids, matches.instance_counts())
            if n > 0
        }
        return EvaluationResult(
            metric=self.metric, metrics=metrics, count=len(ids), per_class=per_class, timings=timings,
            per_image=matches, per_class_instances=instances,
        )

    def evaluate(self, runner: Runner) -> EvaluationResult:
        return self.score(self.predict(runner))

    # ------------------------------------------------------------------ staged (multi-fidelity)
    def image_count(self) -> int | None:
        return len(self.image_ids)

    def evaluate_part(self, runner: Runner, positions: Sequence[int]) -> PartialEvaluation:
        chosen = np.unique(np.asarray(positions, dtype=np.int64))
        predictions = self.predict(runner, chosen.tolist())
        return PartialEvaluation(chosen, self.score(predictions), predictions)

    def evaluate_rest(self, runner: Runner, part: PartialEvaluation) -> EvaluationResult:
        """Infer the other images only, then score all predictions together, in annotation order.

        COCOeval matches each (image, class) on its own and accumulates over the
        sorted image ids, so the merged predictions score exactly as one full
        :meth:`evaluate` (tests compare them). The subset's COCOeval matching runs
        again here (cheap next to inference); its inference does not.
        """
        done: DetectionPredictions = part.state
        rest = np.setdiff1d(np.arange(len(self.image_ids)), part.positions)
        more = self.predict(runner, rest.tolist())
        by_position = dict(zip(part.positions.tolist(), done.detections))
        by_position.update(zip(rest.tolist(), more.detections))
        timings = {k: done.timings.get(k, 0.0) + more.timings.get(k, 0.0) for k in {*done.timings, *more.timings}}
        merged = DetectionPredictions(
            image_ids=list(self.image_ids),
            detections=[by_position[p] for p in range(len(self.image_ids))],
            timings=timings,
            num_classes=done.num_classes or more.num_classes,
        )
        return self.score(merged)

    def per_image_subset(self, per_image: Any, positions: Sequence[int]) -> DetectionMatches:
        ids = [self.image_ids[int(p)] for p in positions]
        return per_image.restricted_to(ids)

    def _class_name(self, category_id: int, category_ids: Sequence[int]) -> str:
        if self.class_names is not None and category_id in category_ids:
            return self.class_names[list(category_ids).index(category_id)]
        return self._category_names[category_id]

    def _cocoeval(
        self, predictions: DetectionPredictions, category_ids: Sequence[int], image_ids: list[int]
    ) -> tuple[dict[str, float], dict[str, float], DetectionMatches]:
        from pycocotools.cocoeval import COCOeval

        wanted = set(image_ids)
        subset = DetectionPredictions(
            image_ids=[i for i in predictions.image_ids if i in wanted],
            detections=[d for i, d in zip(predictions.image_ids, predictions.detections) if i in wanted],
        )
        results = coco_results(subset, category_ids)
        if not results:  # loadRes cannot take an empty list; nothing detected scores 0
            return {"mAP50-95": 0.0, "mAP50": 0.0}, {}, self._matches_without_detections(image_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            dt = self._coco.loadRes(results)
            ev = COCOeval(self._coco, dt, "bbox")
            ev.params.imgIds = list(image_ids)
            # Only the numbers we report: area "all", 100 detections. The per-(image, class)
            # matching and the precision for these are identical to the full 12-number run.
            ev.params.areaRng = [[0, 1e10]]
            ev.params.areaRngLbl = ["all"]
            ev.params.maxDets = [100]
            ev.evaluate()
            ev.accumulate()
        matches = DetectionMatches.from_cocoeval(ev)
        precision = ev.eval["precision"][:, :, :, 0, -1]  # [iou thresholds, recall, classes]

        def mean_valid(p: np.ndarray) -> float:
            valid = p[p > -1]
            return float(valid.mean()) if valid.size else -1.0

        map5095 = mean_valid(precision)
        map50 = mean_valid(precision[0])
        metrics = {"mAP50-95": max(map5095, 0.0) * 100.0, "mAP50": max(map50, 0.0) * 100.0}
        per_class: dict[str, float] = {}
        for k, cat_id in enumerate(ev.params.catIds):
            ap = mean_valid(precision[:, :, k])
            if ap >= 0:  # classes without ground truth in these images have no AP
                per_class[self._class_name(int(cat_id), category_ids)] = ap * 100.0
        return metrics, per_class, matches

    def _matches_without_detections(self, image_ids: Sequence[int]) -> DetectionMatches:
        """Ground-truth counts as COCOeval would see them (crowd boxes ignored), no detections."""
        images = sorted(set(int(i) for i in image_ids))
        categories = sorted(int(c) for c in self._coco.getCatIds())
        counts = np.zeros((len(images), len(categories)), dtype=np.int32)
        row, col = {im: r for r, im in enumerate(images)}, {c: k for k, c in enumerate(categories)}
        for ann in self._coco.loadAnns(self._coco.getAnnIds(imgIds=images)):
            if not ann.get("iscrowd", 0) and 0 <= ann.get("area", 0) <= 1e10:
                counts[row[int(ann["image_id"])], col[int(ann["category_id"])]] += 1
        return DetectionMatches.without_detections(images, categories, counts)

