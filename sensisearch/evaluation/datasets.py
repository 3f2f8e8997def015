"""Image data for calibration and classification: arrays, idx files, folders.

Every loader returns an :class:`ImageArray`: uint8 images in NHWC order plus
optional integer labels, and a fingerprint that identifies the data for caches.
Resizing to the model input (the preset's resize, crop or letterbox) happens
once at load; scaling, mean/std, channel order and layout happen per batch
(:class:`~sensisearch.evaluation.preprocess.Preprocess`), so one decoded copy
serves calibration and evaluation.

Preprocessed float tensors (``.npy``, input-keyed ``.npz``) are loaded by
:mod:`sensisearch.evaluation.tensors`; Ultralytics dataset YAMLs by
:mod:`sensisearch.evaluation.yolo_dataset`.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from sensisearch.errors import SensisearchError
from sensisearch.evaluation._arrays import npz_keys, read_npz
from sensisearch.evaluation.image_files import IMAGE_SUFFIXES
from sensisearch.evaluation.preprocess import InputGeometry, Preprocess
from sensisearch.fileio import sha256_file
from sensisearch.model.tensor import TensorSpec

__all__ = ["IMAGE_SUFFIXES", "ImageArray", "Preprocess", "load_idx_dir", "load_image_folder", "load_images", "load_npz"]

log = logging.getLogger(__name__)



@dataclass
class ImageArray:
    """Decoded images (uint8, NHWC) with optional labels."""

    images: np.ndarray
    labels: np.ndarray | None
    source: Path
    fingerprint: str
    class_names: list[str] | None = None
    extra: dict[str, object] = field(default_factory=dict)
    layout: str = "nchw"
    """Layout of the model input the images are for (``nchw`` or ``nhwc``)."""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, preprocess: Preprocess, batch_size: int, order: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Preprocessed float32 batches in the model's layout, in ``order`` (default: stored order)."""
        indices = np.arange(len(self)) if order is None else np.asarray(order)
        for start in range(0, len(indices), batch_size):
            yield preprocess.apply(self.images[indices[start : start + batch_size]], self.layout)

    def feeds(
        self, preprocess: Preprocess, input_name: str, order: Sequence[int] | None = None, batch_size: int = 32
    ) -> Iterator[dict[str, np.ndarray]]:
        """``{input_name: batch}`` feed dicts, like :meth:`TensorData.feeds <sensisearch.evaluation.tensors.TensorData.feeds>`."""
        for batch in self.batches(preprocess, batch_size, order):
            yield {input_name: batch}


def _hash_file(path: Path) -> str:
    return sha256_file(path)


def _as_nhwc(images: np.ndarray, source: Path) -> np.ndarray:
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4:
        # NCHW with 1 or 3 channels -> NHWC; NHWC passes through.
        if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            return images.transpose(0, 2, 3, 1)
        return images
    raise SensisearchError(f"{source}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W]; got shape {list(images.shape)}")


def load_npz(path: Path, flag: str = "") -> ImageArray:
    """An .npz of uint8 ``images`` (and optional ``labels``). Input-keyed float
    .npz files are :func:`sensisearch.evaluation.tensors.load_input_npz`'s."""
    where = f"{flag} {path}".strip()
    keys = npz_keys(path, where)
    if "images" not in keys:
        raise SensisearchError(
            f"{where}: .npz has neither an 'images' array nor arrays named after the model inputs "
            f"(keys: {sorted(keys)}); save images= and labels=, or one float array per input name"
        )
    arrays = read_npz(path, where, ["images", "labels"])
    images = arrays["images"]
    labels = arrays["labels"].astype(np.int64) if "labels" in arrays else None
    if images.dtype != np.uint8:
        raise SensisearchError(f"{path}: 'images' must be uint8 pixels 0..255, got {images.dtype}")
    images = _as_nhwc(images, path)
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise SensisearchError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    return ImageArray(np.ascontiguousarray(images), labels, path, _hash_file(path))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # a cut or corrupt .gz fails only while reading
        raise SensisearchError(
            f"{path}: cannot read the idx file ({type(exc).__name__}: {' '.join(str(exc).split())}); "
            "download or decompress it again"
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SensisearchError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SensisearchError(f"{path}: idx header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def load_idx_dir(directory: Path) -> ImageArray | None:
    """MNIST-style idx files (``*images-idx3-ubyte[.gz]`` + ``*labels-idx1-ubyte[.gz]``)."""
    image_files = sorted(directory.glob("*images-idx3-ubyte*"))
    if not image_files:
        return None
    if len(image_files) > 1:
        raise SensisearchError(f"{directory}: several idx image files ({', '.join(p.name for p in image_files)}); keep one per folder")
    image_file = image_files[0]
    label_file = directory / image_file.name.replace("images-idx3", "labels-idx1")
    images = _read_idx(image_file)
    labels = _read_idx(label_file).astype(np.int64) if label_file.exists() else None
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise SensisearchError(f"{label_file}: {labels.shape[0]} labels for {images.shape[0]} images")
    fingerprint = hashlib.sha256((_hash_file(image_file) + (_hash_file(label_file) if labels is not None else "")).encode()).hexdigest()
    return ImageArray(np.ascontiguousarray(images[..., None]), labels, directory, fingerprint)


def decode_image(path: Path, geometry: InputGeometry, preprocess: Preprocess) -> np.ndarray:
    """One image file -> uint8 RGB (or gray) HWC at the model's input size, by the preset's resize."""
    import cv2  # imported lazily: only folders of image files need it

    flag = cv2.IMREAD_GRAYSCALE if geometry.channels == 1 else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), flag)
    if image is None:
        raise SensisearchError(f"{path}: cannot decode image; remove it or convert it to JPEG/PNG")
    if geometry.channels != 1:
        image = np.ascontiguousarray(image[..., ::-1])  # BGR -> RGB; Preprocess.apply flips back for BGR models
    return preprocess.fit(image, geometry.height, geometry.width)


def _folder_fingerprint(files: Sequence[Path], root: Path, extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_image_folder(directory: Path, input_spec: TensorSpec, preprocess: Preprocess | None = None) -> ImageArray:
    """ImageFolder layout (one subfolder per class, sorted names = class indices)
    or a flat folder of images without labels (calibration)."""
    preprocess = preprocess or Preprocess()
    geometry = preprocess.geometry(input_spec, directory)
    class_dirs = sorted(p for p in directory.iterdir() if p.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    if class_dirs:
        for index, class_dir in enumerate(class_dirs):
            for path in sorted(class_dir.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(path)
                    labels.append(index)
    else:
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SensisearchError(f"{directory}: no images found (expected class subfolders of .jpg/.png files, an .npz, or idx files)")
    return _decoded(files, directory, geometry, preprocess, np.asarray(labels, np.int64) if class_dirs else None,
                    [d.name for d in class_dirs] if class_dirs else None)


def _decoded(
    files: Sequence[Path], root: Path, geometry: InputGeometry, preprocess: Preprocess,
    labels: np.ndarray | None, names: list[str] | None,
) -> ImageArray:
    images = np.stack([decode_image(p, geometry, preprocess) for p in files])
    # The resize depends on the preset (and its crop / pad), so it is part of the key.
    fit = {k: v for k, v in preprocess.to_dict().items() if k in ("kind", "crop_fraction", "pad_value")}
    fingerprint = _folder_fingerprint(files, root, f"{geometry.channels}x{geometry.height}x{geometry.width}|{fit}")
    return ImageArray(images, labels, root, fingerprint, names, layout=geometry.layout)


def load_image_list(files: Sequence[Path], root: Path, input_spec: TensorSpec, preprocess: Preprocess | None = None) -> ImageArray:
    """Unlabelled images from a list of files (e.g. an Ultralytics dataset's split), for calibration."""
    preprocess = preprocess or Preprocess()
    if not files:
        raise SensisearchError(f"{root}: no images found")
    return _decoded(list(files), root, preprocess.geometry(input_spec, root), preprocess, None, None)


def load_images(path: Path, input_spec: TensorSpec, flag: str, preprocess: Preprocess | None = None) -> ImageArray:
    """Load ``path`` (an .npz of uint8 images, an idx folder, an image folder, or an
    Ultralytics dataset YAML's ``val`` images) for a model input.

    ``flag`` names the option the path came from, for error messages. Float
    tensors (``.npy``, input-keyed ``.npz``) are :func:`sensisearch.evaluation.tensors.load_feed_source`'s.
    """
    preprocess = preprocess or Preprocess()
    path = Path(path)
    if not path.exists():
        raise SensisearchError(f"{flag} {path}: no such file or directory")
    geometry = preprocess.geometry(input_spec, path)
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            from sensisearch.evaluation.yolo_dataset import load_yolo_dataset

            dataset = load_yolo_dataset(path, flag=flag)
            data = load_image_list(dataset.image_paths, dataset.root, input_spec, preprocess)
            data.class_names = list(dataset.names)
        elif path.suffix == ".npy":
            raise SensisearchError(
                f"{flag} {path}: an .npy holds preprocessed tensors, not labelled images; use it as calibration data "
                "(or save uint8 images= and labels= in an .npz for evaluation)"
            )
        elif path.suffix != ".npz":
            raise SensisearchError(
                f"{flag} {path}: expected a directory or an .npz file with images= and labels= "
                "(or an .npy of input tensors, or an Ultralytics dataset .yaml)"
            )
        else:
            data = load_npz(path, flag)
    else:
        data = load_idx_dir(path) or load_image_folder(path, input_spec, preprocess)
    if len(data) == 0:
        raise SensisearchError(f"{flag} {path}: the data set is empty")
    data.layout = geometry.layout
    channels, height, width = geometry.channels, geometry.height, geometry.width
    if data.images.shape[1:] != (height, width, channels):
        h, w, c = data.images.shape[1:]
        raise SensisearchError(
            f"{flag} {path}: images are {c}x{h}x{w} (CxHxW) but model input '{input_spec.name}' "
            f"expects {channels}x{height}x{width}; resize the data or pick the matching model"
        )
    return data
