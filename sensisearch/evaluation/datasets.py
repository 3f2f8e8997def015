"""Image data for calibration and classification: arrays, idx files, folders.

Every loader returns an :class:`ImageArray`: uint8 images in NHWC order plus
optional integer labels, and a fingerprint that identifies the data for caches.
Preprocessing to the model's float input happens per batch
(:class:`Preprocess`), so one decoded copy serves calibration and evaluation.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from sensisearch.errors import SensisearchError
from sensisearch.fileio import sha256_file
from sensisearch.model.tensor import TensorSpec

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})


@dataclass(frozen=True)
class Preprocess:
    """x = (pixel * scale - mean) / std, per channel, NCHW float32."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0

    def to_dict(self) -> dict[str, object]:
        return {"mean": list(self.mean), "std": list(self.std), "scale": self.scale}

    def apply(self, images_nhwc: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 NCHW."""
        x = images_nhwc.astype(np.float32) * np.float32(self.scale)
        channels = x.shape[-1]
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        if mean.size not in (1, channels) or std.size not in (1, channels):
            raise SensisearchError(
                f"--mean/--std have {mean.size}/{std.size} values but the images have {channels} channel(s); "
                "give one value or one per channel"
            )
        x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@dataclass
class ImageArray:
    """Decoded images (uint8, NHWC) with optional labels."""

    images: np.ndarray
    labels: np.ndarray | None
    source: Path
    fingerprint: str
    class_names: list[str] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, preprocess: Preprocess, batch_size: int, order: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Preprocessed float32 NCHW batches, in ``order`` (default: stored order)."""
        indices = np.arange(len(self)) if order is None else np.asarray(order)
        for start in range(0, len(indices), batch_size):
            yield preprocess.apply(self.images[indices[start : start + batch_size]])


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


def load_npz(path: Path) -> ImageArray:
    try:
        with np.load(path) as data:
            if "images" not in data:
                raise SensisearchError(f"{path}: .npz has no 'images' array (keys: {sorted(data.keys())}); save images= and labels=")
            images = data["images"]
            labels = data["labels"].astype(np.int64) if "labels" in data else None
    except (OSError, ValueError) as exc:
        raise SensisearchError(f"{path}: not a readable .npz file ({exc})") from exc
    if images.dtype != np.uint8:
        raise SensisearchError(f"{path}: 'images' must be uint8 pixels 0..255, got {images.dtype}")
    images = _as_nhwc(images, path)
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise SensisearchError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    return ImageArray(np.ascontiguousarray(images), labels, path, _hash_file(path))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
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


def _decode(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    import cv2  # imported lazily: only folders of image files need it

    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), flag)
    if image is None:
        raise SensisearchError(f"{path}: cannot decode image; remove it or convert it to JPEG/PNG")
    if image.shape[0] != height or image.shape[1] != width:
        interpolation = cv2.INTER_AREA if image.shape[0] > height else cv2.INTER_LINEAR
        image = cv2.resize(image, (width, height), interpolation=interpolation)
    if channels == 1:
        return image[..., None]
    return image[..., ::-1]  # BGR -> RGB


def _folder_fingerprint(files: Sequence[Path], root: Path, extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_image_folder(directory: Path, input_spec: TensorSpec) -> ImageArray:
    """ImageFolder layout (one subfolder per class, sorted names = class indices)
    or a flat folder of images without labels (calibration)."""
    _, channels, height, width = _chw(input_spec, directory)
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
    images = np.stack([_decode(p, height, width, channels) for p in files])
    fingerprint = _folder_fingerprint(files, directory, f"{channels}x{height}x{width}")
    names = [d.name for d in class_dirs] if class_dirs else None
    return ImageArray(images, np.asarray(labels, np.int64) if class_dirs else None, directory, fingerprint, names)


def _chw(spec: TensorSpec, source: Path) -> tuple[int | None, int, int, int]:
    if len(spec.shape) != 4 or any(d is None for d in spec.shape[1:]):
        raise SensisearchError(
            f"model input '{spec.name}' has shape {list(spec.shape)}; image data needs a static [N,C,H,W] input ({source})"
        )
    n, c, h, w = spec.shape
    return n, int(c), int(h), int(w)  # type: ignore[arg-type]


def load_images(path: Path, input_spec: TensorSpec, flag: str) -> ImageArray:
    """Load ``path`` (an .npz, an idx folder, or an image folder) for a model input.

    ``flag`` names the option the path came from, for error messages.
    """
    path = Path(path)
    if not path.exists():
        raise SensisearchError(f"{flag} {path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".npz":
            raise SensisearchError(f"{flag} {path}: expected a directory or an .npz file with images= and labels=")
        data = load_npz(path)
    else:
        data = load_idx_dir(path) or load_image_folder(path, input_spec)
    if len(data) == 0:
        raise SensisearchError(f"{flag} {path}: the data set is empty")
    _, channels, height, width = _chw(input_spec, path)
    if data.images.shape[1:] != (height, width, channels):
        h, w, c = data.images.shape[1:]
        raise SensisearchError(
            f"{flag} {path}: images are {c}x{h}x{w} (CxHxW) but model input '{input_spec.name}' "
            f"expects {channels}x{height}x{width}; resize the data or pick the matching model"
        )
    return data
