"""Letterboxed images decoded once and kept as a memory-mapped uint8 tensor.

Every trial of a study evaluates the same images; decoding and letterboxing
them each time would cost more than the inference of a small detector. The
store does it once per (image files, input size, preprocessing settings) and
writes ``[N, 3, H, W]`` uint8 RGB to ``<cache_dir>/letterbox-<HxW>-<key>.npy``
plus the per-image geometry to ``...meta.npz``. Later evaluations (also in
other processes) only memory-map the file and turn batches into float32 /255.

The key hashes the resolved paths, sizes and modification times of the image
files, the input size, the pad value, the OpenCV version and a format version,
so an edited image or another OpenCV build gives a new file. Both files are
written to a temporary name and moved into place with ``os.replace``, so a
reader never sees a half-written store and concurrent writers do not clash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from sensisearch.errors import SensisearchError
from sensisearch.evaluation._arrays import DAMAGED_FILE_ERRORS
from sensisearch.evaluation.letterbox import PAD_VALUE, LetterboxMeta, LetterboxStyle, load_letterboxed

log = logging.getLogger(__name__)

STORE_FORMAT = "yolov5-v7.0-letterbox/1"


def _worker_count() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def store_key(
    paths: Sequence[Path], input_shape: tuple[int, int], pad_value: int = PAD_VALUE, style: LetterboxStyle = "yolov5"
) -> str:
    """Hash of everything the stored tensor depends on."""
    files = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise SensisearchError(f"image {p} is not readable ({exc.strerror}); check the images folder") from exc
        files.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps(
        {
            "format": STORE_FORMAT,
            "opencv": cv2.__version__,
            "input_shape": list(input_shape),
            "pad_value": int(pad_value),
            **({} if style == "yolov5" else {"style": style}),  # keeps existing YOLOv5 caches valid
            "files": files,
        },
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class TensorStore:
    """Letterboxed uint8 images ``[N, 3, H, W]`` (RGB) and their geometry."""

    def __init__(
        self,
        images: np.ndarray,
        orig_shapes: np.ndarray,
        gains: np.ndarray,
        pads: np.ndarray,
        paths: Sequence[Path],
        location: Path | None = None,
    ) -> None:
        self.images = images
        self.orig_shapes = np.asarray(orig_shapes, dtype=np.int64)
        self.gains = np.asarray(gains, dtype=np.float64)
        self.pads = np.asarray(pads, dtype=np.float64)
        self.paths = [Path(p) for p in paths]
        self.location = location
        """The .npy file when the store lives on disk, else None."""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def input_shape(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def meta(self, index: int) -> LetterboxMeta:
        h0, w0 = (int(v) for v in self.orig_shapes[index])
        return LetterboxMeta(
            orig_shape=(h0, w0),
            gain=(float(self.gains[index, 0]), float(self.gains[index, 1])),
            pad=(float(self.pads[index, 0]), float(self.pads[index, 1])),
        )

    def batch(self, indices: Sequence[int] | slice, out: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[B, 3, H, W]`` in 0..1: ``uint8 / 255`` computed in float32, as PyTorch does."""
        raw = self.images[indices]
        if out is None:
            out = np.empty(raw.shape, dtype=np.float32)
        np.divide(raw, np.float32(255.0), out=out, dtype=np.float32)
        return out

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        paths: Sequence[Path],
        input_shape: tuple[int, int],
        cache_dir: Path | None = None,
        pad_value: int = PAD_VALUE,
        style: LetterboxStyle = "yolov5",
    ) -> "TensorStore":
        """Load the store for these images from ``cache_dir``, creating it if needed.

        With ``cache_dir=None`` the images are preprocessed into memory.
        """
        paths = [Path(p) for p in paths]
        input_shape = (int(input_shape[0]), int(input_shape[1]))
        if cache_dir is None:
            images = np.empty((len(paths), 3, *input_shape), dtype=np.uint8)
            metas = cls._fill(images, paths, input_shape, pad_value, style)
            return cls(images, *cls._meta_arrays(metas), paths)

        cache_dir = Path(cache_dir)
        key = store_key(paths, input_shape, pad_value, style)
        stem = f"letterbox-{input_shape[0]}x{input_shape[1]}-{key[:24]}"
        data_path = cache_dir / f"{stem}.npy"
        meta_path = cache_dir / f"{stem}.meta.npz"
        store = cls._open(data_path, meta_path, paths, input_shape)
        if store is not None:
            return store
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SensisearchError(f"cannot create the cache folder {cache_dir} ({exc.strerror}); pass a writable cache dir") from exc
        log.info("preprocessing %d images into %s", len(paths), data_path)

        fd, tmp_data = tempfile.mkstemp(dir=cache_dir, prefix=f".{stem}.", suffix=".npy.tmp")
        os.close(fd)
        tmp_meta = None
        try:
            images = np.lib.format.open_memmap(tmp_data, mode="w+", dtype=np.uint8, shape=(len(paths), 3, *input_shape))
            metas = cls._fill(images, paths, input_shape, pad_value, style)
            images.flush()
            del images
            orig_shapes, gains, pads = cls._meta_arrays(metas)
            fd, tmp_meta = tempfile.mkstemp(dir=cache_dir, prefix=f".{stem}.", suffix=".meta.npz.tmp")
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, orig_shapes=orig_shapes, gains=gains, pads=pads, key=np.array(key))
            # Data first, metadata last: a store is only used when both exist.
            os.replace(tmp_data, data_path)
            os.replace(tmp_meta, meta_path)
        finally:
            for tmp in (tmp_data, tmp_meta):
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
        store = cls._open(data_path, meta_path, paths, input_shape)
        assert store is not None
        return store

    @classmethod
    def _open(cls, data_path: Path, meta_path: Path, paths: list[Path], input_shape: tuple[int, int]) -> "TensorStore | None":
        if not (data_path.is_file() and meta_path.is_file()):
            return None
        try:
            images = np.load(data_path, mmap_mode="r")
            with np.load(meta_path) as meta:
                orig_shapes, gains, pads = meta["orig_shapes"], meta["gains"], meta["pads"]
        except (*DAMAGED_FILE_ERRORS, KeyError) as exc:  # a cache cut short by a kill is rebuilt, not fatal
            log.warning("ignoring unreadable tensor cache %s: %s", data_path, exc)
            return None
        if images.shape != (len(paths), 3, *input_shape) or images.dtype != np.uint8 or len(orig_shapes) != len(paths):
            log.warning("ignoring tensor cache %s: unexpected shape %s", data_path, images.shape)
            return None
        return cls(images, orig_shapes, gains, pads, paths, location=data_path)

    @staticmethod
    def _fill(
        out: np.ndarray, paths: list[Path], input_shape: tuple[int, int], pad_value: int, style: LetterboxStyle = "yolov5"
    ) -> list[LetterboxMeta]:
        def one(i: int) -> LetterboxMeta:
            chw, meta = load_letterboxed(paths[i], input_shape, pad_value, style)
            out[i] = chw
            return meta

        if len(paths) <= 1:
            return [one(i) for i in range(len(paths))]
        with ThreadPoolExecutor(max_workers=_worker_count()) as pool:  # OpenCV releases the GIL
            return list(pool.map(one, range(len(paths))))

    @staticmethod
    def _meta_arrays(metas: list[LetterboxMeta]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        orig = np.array([m.orig_shape for m in metas], dtype=np.int64).reshape(-1, 2)
        gains = np.array([m.gain for m in metas], dtype=np.float64).reshape(-1, 2)
        pads = np.array([m.pad for m in metas], dtype=np.float64).reshape(-1, 2)
        return orig, gains, pads
