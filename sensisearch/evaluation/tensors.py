"""Already-preprocessed input tensors: ``.npy`` and input-keyed ``.npz``.

- ``.npy``: one float array ``[N, ...]`` for a single-input model; each row is
  one sample exactly as the model takes it.
- input-keyed ``.npz`` (ModelOpt's ``--calibration_data_path`` format):
  ``{input_name: array [N, ...]}``, one array per model input, the same ``N``.

An ``.npz`` with an ``images`` array is the older uint8 image format
(:func:`sensisearch.evaluation.datasets.load_npz`); :func:`load_feed_source`
tells the two apart by their keys. Both kinds of source serve feed dicts in a
given sample order (:meth:`TensorData.feeds`, :meth:`ImageFeeds.feeds`) plus a
content fingerprint for caches.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from sensisearch.errors import SensisearchError
from sensisearch.evaluation._arrays import npz_keys, read_npy, read_npz
from sensisearch.fileio import sha256_file

if TYPE_CHECKING:
    from sensisearch.evaluation.datasets import ImageArray
    from sensisearch.evaluation.preprocess import Preprocess
    from sensisearch.model.tensor import TensorSpec

log = logging.getLogger(__name__)


@dataclass
class TensorData:
    """Preprocessed inputs, one ``[N, ...]`` array per model input name."""

    arrays: dict[str, np.ndarray]
    source: Path
    fingerprint: str

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def feeds(self, order: Sequence[int] | None = None, batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of up to ``batch_size`` samples, in ``order`` (default: stored order)."""
        indices = np.arange(len(self)) if order is None else np.asarray(order, dtype=np.int64)
        for start in range(0, len(indices), batch_size):
            rows = indices[start : start + batch_size]
            yield {name: np.ascontiguousarray(array[rows]) for name, array in self.arrays.items()}


@dataclass
class ImageFeeds:
    """Decoded images plus their preprocessing, served like :class:`TensorData`."""

    data: "ImageArray"
    preprocess: "Preprocess"
    input_name: str

    @property
    def fingerprint(self) -> str:
        return f"{self.data.fingerprint}|{self.preprocess.to_dict()}"

    def __len__(self) -> int:
        return len(self.data)

    def feeds(self, order: Sequence[int] | None = None, batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
        return self.data.feeds(self.preprocess, self.input_name, order, batch_size)


FeedSource = TensorData | ImageFeeds


def _check_array(array: np.ndarray, spec: "TensorSpec", where: str, key: str) -> None:
    """Dtype and shape of one input's samples against the model input."""
    expected = np.dtype(spec.dtype)
    if array.dtype != expected:
        hint = " (uint8 images go in an .npz as images=)" if array.dtype == np.uint8 else ""
        raise SensisearchError(
            f"{where}: {key} is {array.dtype} but model input '{spec.name}' takes {expected}; "
            f"save the preprocessed tensor as {expected}{hint}"
        )
    model_shape = list(spec.shape)
    if array.ndim != len(model_shape) or array.shape[0] < 1:
        raise SensisearchError(
            f"{where}: {key} has shape {list(array.shape)} but model input '{spec.name}' is {model_shape}; "
            f"stack the samples along a first axis: [N, {', '.join(str(d) for d in model_shape[1:])}]"
        )
    wrong = [i for i, d in enumerate(model_shape[1:], 1) if d is not None and array.shape[i] != d]
    if wrong:
        raise SensisearchError(
            f"{where}: {key} has shape {list(array.shape)} but model input '{spec.name}' is {model_shape} "
            f"(axis {wrong[0]} differs); preprocess to the model's input shape"
        )


def _existing_file(path: Path, flag: str) -> tuple[Path, str]:
    """``path`` and how error lines name it (``--calib-data FILE``); one line when it is not a file."""
    path = Path(path)
    where = f"{flag} {path}".strip()
    if not path.is_file():
        raise SensisearchError(f"{where}: no such file")
    return path, where


def load_npy(path: Path, inputs: Sequence["TensorSpec"], flag: str = "") -> TensorData:
    """A ``.npy`` of preprocessed samples ``[N, ...]`` for a single-input model (memory-mapped)."""
    path, where = _existing_file(path, flag)
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise SensisearchError(
            f"{where}: an .npy feeds one input but the model has {len(inputs)} ({names}); "
            "save an .npz with one array per input name"
        )
    array = read_npy(path, where)
    _check_array(array, inputs[0], where, "the array")
    return TensorData({inputs[0].name: array}, path, sha256_file(path))


def load_input_npz(path: Path, inputs: Sequence["TensorSpec"], flag: str = "") -> TensorData:
    """An ``.npz`` keyed by model input name, ``{name: [N, ...]}`` for every input, the same N."""
    path, where = _existing_file(path, flag)
    keys = npz_keys(path, where)
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in keys]
    if missing:
        raise SensisearchError(
            f"{where}: no array for model input(s) {', '.join(repr(n) for n in missing)} (keys: {sorted(keys)}); "
            "save one array per model input name"
        )
    extra = sorted(set(keys) - set(names))
    if extra:
        log.warning("%s: ignoring arrays that are not model inputs: %s", where, ", ".join(extra))
    arrays = read_npz(path, where, names)
    for spec in inputs:
        _check_array(arrays[spec.name], spec, where, f"'{spec.name}'")
    counts = {n: int(a.shape[0]) for n, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise SensisearchError(f"{where}: the inputs hold different sample counts {counts}; save the same N for every input")
    fingerprint = hashlib.sha256(f"{sha256_file(path)}|{','.join(names)}".encode()).hexdigest()
    return TensorData(arrays, path, fingerprint)


def load_feed_source(
    path: Path, inputs: Sequence["TensorSpec"], flag: str, preprocess: "Preprocess | None" = None
) -> FeedSource:
    """Calibration (or timing) inputs from any supported path.

    ``.npy`` -> :class:`TensorData`; ``.npz`` keyed by the model inputs ->
    :class:`TensorData`; ``.npz`` with ``images`` (uint8), an image or idx
    folder, or an Ultralytics dataset YAML -> :class:`ImageFeeds` (single-input models).
    """
    from sensisearch.evaluation.datasets import load_images

    path = Path(path)
    where = f"{flag} {path}".strip()
    if not path.exists():
        raise SensisearchError(f"{where}: no such file or directory")
    if path.is_file() and path.suffix == ".npy":
        return load_npy(path, inputs, flag)
    if path.is_file() and path.suffix == ".npz":
        keys = npz_keys(path, where)
        names = {s.name for s in inputs}
        if "images" in keys and "images" not in names:
            pass  # the uint8 image format, below
        elif names & set(keys):
            return load_input_npz(path, inputs, flag)
        else:
            raise SensisearchError(
                f"{where}: .npz has neither an 'images' array nor arrays named after the model inputs "
                f"{sorted(names)} (keys: {sorted(keys)}); save images= (uint8) or one float array per input name"
            )
    if len(inputs) != 1:
        raise SensisearchError(
            f"{where}: images feed one input but the model has {len(inputs)}; "
            "save an .npz with one preprocessed array per input name"
        )
    from sensisearch.evaluation.preprocess import Preprocess

    preprocess = preprocess or Preprocess()
    return ImageFeeds(load_images(path, inputs[0], flag, preprocess), preprocess, inputs[0].name)
