"""Atomic file writes and file hashes, shared by every module that writes results.

A study must survive a crash at any moment: every file is written to a
temporary name in the same directory, flushed to disk, then renamed over the
target, so readers see the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[IO[bytes]]:
    """``with atomic_writer(p) as f: f.write(...)``: ``p`` appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give results the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_writer(path) as fh:
        fh.write(data)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_bytes_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """The JSON in ``path``; one line naming ``what`` (e.g. "latency table x.json") and ``fix`` when it cannot be read."""
    from sensisearch.errors import SensisearchError

    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SensisearchError(f"{what}: not readable JSON ({exc.__class__.__name__}: {exc}); {fix}") from exc
