"""Reading user ``.npy`` / ``.npz`` files with one-line errors for damaged files.

numpy reports a damaged file through many exception types, depending on where the
damage is: an empty or cut ``.npy`` raises ``EOFError`` or ``ValueError``, a cut
``.npz`` ``zipfile.BadZipFile``, a flipped bit in a stored member ``BadZipFile``
(CRC), in a compressed one ``zlib.error``, and a member that is not an array comes
back as ``bytes``. Every reader of user arrays goes through here, so each of those
is one :class:`~sensisearch.errors.SensisearchError` naming the file.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence

from pathlib import Path

import numpy as np

from sensisearch.errors import SensisearchError

# Everything numpy and zipfile raise for a file that is empty, cut short or corrupt.
DAMAGED_FILE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    name = "zlib.error" if isinstance(exc, zlib.error) else type(exc).__name__  # its bare name is just "error"
    return f"{name}: {text}" if text else name


def read_npy(path: Path, where: str, mmap: bool = True) -> np.ndarray:
    """The array of an ``.npy`` (memory-mapped by default); one line when it is damaged."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except DAMAGED_FILE_ERRORS as exc:
        raise SensisearchError(
            f"{where}: not a readable .npy array ({_reason(exc)}): empty, cut short or not an .npy file; "
            "write it again with numpy.save"
        ) from exc


def _npz_error(where: str, exc: BaseException) -> SensisearchError:
    return SensisearchError(
        f"{where}: not a readable .npz file ({_reason(exc)}): empty, cut short or corrupt; "
        "write it again with numpy.savez"
    )


def npz_keys(path: Path, where: str) -> list[str]:
    """The array names in an ``.npz``, without reading the arrays."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)
    except DAMAGED_FILE_ERRORS as exc:
        raise _npz_error(where, exc) from exc


def read_npz(path: Path, where: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz``, read fully (which checks each member's CRC).

    Names missing from the file are left out; the caller says which it needs.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {n: data[n] for n in names if n in data.files}
    except DAMAGED_FILE_ERRORS as exc:
        raise _npz_error(where, exc) from exc
    for name, value in arrays.items():
        # np.load hands back a member without the .npy header as raw bytes.
        if not isinstance(value, np.ndarray):
            raise SensisearchError(
                f"{where}: '{name}' is not a numpy array (no .npy header); write the file with numpy.savez"
            )
    return arrays
