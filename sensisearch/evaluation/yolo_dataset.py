"""Ultralytics dataset YAMLs (``data=coco.yaml``): images, YOLO txt labels, class names.

The YAML's ``path`` is the dataset root (relative to the YAML's folder; the
folder itself when absent); ``train``/``val``/``test`` are folders of images
(searched recursively) or ``.txt`` lists of image paths (relative to the list's
folder), or lists of those. ``names`` is a list or an ``{index: name}`` dict.

Labels follow Ultralytics' ``img2label_paths`` rule: the last ``/images/`` of
an image path becomes ``/labels/`` and the suffix ``.txt``; each line is
``class cx cy w h`` normalised to the image size (or ``class x1 y1 x2 y2 ...``,
a polygon, whose bounding box is used). An image without a label file has no
objects, as in Ultralytics.

:func:`yolo_to_coco` turns the split into a COCO ground-truth dict in memory
(category id = class index + 1, bbox in pixels of the EXIF-oriented image,
area = w * h, iscrowd 0) for :class:`~sensisearch.evaluation.detection.CocoDetectionEvaluator`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sensisearch.errors import SensisearchError
from sensisearch.evaluation.image_files import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class YoloDataset:
    """One split of an Ultralytics dataset."""

    yaml_path: Path
    root: Path
    split: str
    image_paths: list[Path]
    names: list[str]

    def label_path(self, image: Path) -> Path:
        return label_path_for(image)


def label_path_for(image: Path) -> Path:
    """Ultralytics ``img2label_paths``: ``.../images/x.jpg`` -> ``.../labels/x.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    text = str(image)
    if sa in text:
        head, _, tail = text.rpartition(sa)
        text = head + sb + tail
    return Path(text).with_suffix(".txt")


def _parse_names(value: Any, where: str) -> list[str]:
    if isinstance(value, dict):
        try:
            keys = sorted(int(k) for k in value)
        except (TypeError, ValueError):
            keys = []
        if keys and keys == list(range(len(keys))):
            by_int = {int(k): v for k, v in value.items()}
            return [str(by_int[k]) for k in keys]
    elif isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise SensisearchError(f"{where}: 'names' must be a list of class names or a {{0: name, 1: name, ...}} dict; add the dataset's class names")


def _images_in(entry: Path, where: str, key: str) -> list[Path]:
    if entry.is_dir():
        return sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if entry.is_file() and entry.suffix == ".txt":
        files = []
        for line in entry.read_text().splitlines():
            line = line.strip()
            if line:
                p = Path(line)
                # normpath, not resolve(): symlinked images keep their labels/ sibling
                files.append(p if p.is_absolute() else Path(os.path.normpath(entry.parent / p)))
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise SensisearchError(
                f"{where}: {len(missing)} images listed in {entry} ({key}) do not exist (first: {missing[0]}); fix the list or the 'path'"
            )
        return files
    raise SensisearchError(f"{where}: '{key}' path {entry} does not exist; set 'path' and '{key}' to the dataset's image folder or .txt list")


def load_yolo_dataset(yaml_path: Path, split: str = "val", flag: str = "") -> YoloDataset:
    """Read an Ultralytics dataset YAML and list the images of ``split``."""
    yaml_path = Path(yaml_path)
    where = f"{flag} {yaml_path}".strip()
    if not yaml_path.is_file():
        raise SensisearchError(f"{where}: no such file")
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - PyYAML comes with the dev environment
        raise SensisearchError(f"{where}: reading dataset YAMLs needs PyYAML; pip install pyyaml") from exc
    try:
        data = yaml.safe_load(yaml_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SensisearchError(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict):
        raise SensisearchError(f"{where}: not an Ultralytics dataset YAML (expected keys path, train, val, names)")
    if "names" not in data:
        raise SensisearchError(f"{where}: no 'names'; add the class names (a list, or a {{0: name}} dict)")
    names = _parse_names(data["names"], where)
    if split not in SPLITS:
        raise SensisearchError(f"{where}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    entry = data.get(split)
    if not entry:
        raise SensisearchError(f"{where}: no '{split}' entry; add the {split} images folder or .txt list")
    root = Path(str(data.get("path") or "."))
    if not root.is_absolute():
        root = Path(os.path.normpath(yaml_path.parent.absolute() / root))
    if not root.is_dir():
        raise SensisearchError(f"{where}: dataset 'path' {root} does not exist; set 'path' to the dataset root")
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for e in entries:
        p = Path(str(e))
        images += _images_in(p if p.is_absolute() else root / p, where, split)
    if not images:
        raise SensisearchError(f"{where}: '{split}' holds no images; point it at the image folder or .txt list")
    return YoloDataset(yaml_path, root, split, images, names)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as decoded with EXIF orientation applied (what OpenCV and Ultralytics see)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except OSError as exc:
        raise SensisearchError(f"{path}: cannot read image size ({exc}); remove it or convert it to JPEG/PNG") from exc
    if orientation in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
        w, h = h, w
    return w, h


def read_yolo_labels(path: Path, num_classes: int) -> np.ndarray:
    """``[k, 5]`` float64 rows ``class, cx, cy, w, h`` (normalised) from one label file; empty when absent."""
    if not path.is_file():
        return np.zeros((0, 5))
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts]
        except ValueError as exc:
            raise SensisearchError(f"{path}:{lineno}: not numbers ({line.strip()!r}); expected 'class cx cy w h'") from exc
        if len(values) == 5:
            cls, cx, cy, w, h = values
        elif len(values) >= 7 and len(values) % 2 == 1:  # polygon: class x1 y1 x2 y2 ...
            xy = np.asarray(values[1:]).reshape(-1, 2)
            (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
            cls, cx, cy, w, h = values[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        else:
            raise SensisearchError(f"{path}:{lineno}: {len(values)} values; expected 'class cx cy w h' or a polygon")
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise SensisearchError(f"{path}:{lineno}: class {parts[0]} is not one of the YAML's {num_classes} classes (0..{num_classes - 1})")
        rows.append((cls, cx, cy, w, h))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def yolo_to_coco(dataset: YoloDataset) -> dict[str, Any]:
    """COCO instances dict (ground truth) of the split; category id = class index + 1.

    ``file_name`` is the image path relative to ``dataset.root`` (absolute when
    outside it); bbox ``[(cx - w/2) W, (cy - h/2) H, w W, h H]`` clipped to the image.
    """
    images, annotations = [], []
    for image_id, path in enumerate(dataset.image_paths, 1):
        width, height = _image_size(path)
        try:
            file_name = str(path.relative_to(dataset.root))
        except ValueError:
            file_name = str(path)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        labels = read_yolo_labels(label_path_for(path), len(dataset.names))
        for cls, cx, cy, w, h in labels.tolist():
            x1 = min(max((cx - w / 2) * width, 0.0), width)
            y1 = min(max((cy - h / 2) * height, 0.0), height)
            x2 = min(max((cx + w / 2) * width, 0.0), width)
            y2 = min(max((cy + h / 2) * height, 0.0), height)
            bw, bh = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls) + 1,
                    "bbox": [x1, y1, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(dataset.names)]
    return {
        "info": {"description": f"{dataset.yaml_path} ({dataset.split})"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
