"""Failures of the machine, not of the configuration: they stop the study and never use up its budget.

A full disk, an unwritable ``--out``, a lost storage connection or a backend
library that will not load fail whatever configuration happens to run. Counting
such a trial would spend the budget on the environment; carrying on would fail
every following trial the same way. So the trial is failed with the reason
(marked environmental: not counted, retried by the next run) and the study stops
with one line saying what to free or fix.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from sensisearch.errors import SensisearchError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_UNWRITABLE = {errno.EACCES, errno.EROFS, errno.EPERM}
# Exception classes (by name, anywhere in the class's bases) that mean the storage
# connection or its commit failed, whatever the driver: no import of each driver here.
_STORAGE_ERRORS = ("OperationalError", "StorageInternalError", "InterfaceError", "DisconnectionError")
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "database or disk is full", "errno 28", "errno 122")
_LIBRARY_TEXT = ("cannot open shared object file", "undefined symbol", "libcuda", "libnvinfer")

# A trial writes about this many times the model (artifact, deployable ONNX, its
# reference copy) until the first trial tells the real size.
MODEL_SIZE_FACTOR = 4
# Room kept free beside a trial's files: the storage's journal and the logs.
FREE_SPACE_MARGIN_BYTES = 2 * 1024 * 1024


class EnvironmentalFailure(SensisearchError):
    """The machine failed the trial (disk, storage, library): stop, do not count, retry on the next run."""


@dataclass(frozen=True)
class Fault:
    kind: str
    """"disk", "unwritable", "storage" or "library"."""
    line: str
    """One line: what happened and what to free or fix."""


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def classify(exc: BaseException, out: Path | None = None) -> Fault | None:
    """The environmental fault behind ``exc`` (or its cause), None for a failure of the configuration."""
    where = f" on {out}" if out is not None else ""
    for e in _chain(exc):
        if isinstance(e, EnvironmentalFailure):
            return Fault("environment", str(e))
        text = str(e).lower()
        if isinstance(e, OSError) and e.errno in _DISK_FULL or any(t in text for t in _DISK_FULL_TEXT):
            return Fault("disk", f"out of disk space{where} ({_short(e)}): free space there (or pick another --out) and re-run the same command")
        if isinstance(e, OSError) and e.errno in _UNWRITABLE and e.filename is not None and (out is None or _under(e.filename, out)):
            return Fault("unwritable", f"--out {out or e.filename} is not writable ({_short(e)}): fix its permissions and re-run the same command")
        if _names(e) & set(_STORAGE_ERRORS):
            return Fault("storage", f"lost the study storage ({_short(e)}): check --storage (server up, disk free) and re-run the same command")
        if isinstance(e, ImportError) or (isinstance(e, OSError) and any(t in text for t in _LIBRARY_TEXT)):
            return Fault("library", f"a backend library does not load ({_short(e)}): install it (see `sensisearch doctor`) and re-run")
    return None


def classify_text(text: str, out: Path | None = None) -> Fault | None:
    """:func:`classify` for an error that crossed a process boundary as ``"Type: message"``."""
    lower = text.lower()
    where = f" on {out}" if out is not None else ""
    if any(t in lower for t in _DISK_FULL_TEXT):
        return Fault("disk", f"out of disk space{where} ({text[:200]}): free space there (or pick another --out) and re-run the same command")
    if lower.startswith(("importerror", "modulenotfounderror")) or any(t in lower for t in _LIBRARY_TEXT):
        return Fault("library", f"a backend library does not load ({text[:200]}): install it (see `sensisearch doctor`) and re-run")
    if lower.startswith(("permissionerror", "oserror: [errno 30]")) and out is not None and str(out) in text:
        return Fault("unwritable", f"--out {out} is not writable ({text[:200]}): fix its permissions and re-run the same command")
    return None


def _short(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"


def _under(filename: object, out: Path) -> bool:
    try:
        return Path(str(filename)).resolve().is_relative_to(out.resolve())
    except (OSError, ValueError):
        return False


def directory_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def trial_bytes_estimate(trials_dir: Path, model_bytes: int, recent: int = 5) -> int:
    """What the next trial will write: the largest of the last trials with files, else a multiple of the model."""
    sizes = []
    if trials_dir.is_dir():
        dirs = sorted((d for d in trials_dir.iterdir() if d.is_dir()), reverse=True)[:recent]
        sizes = [s for s in (directory_bytes(d) for d in dirs) if s > 0]
    return max(sizes) if sizes else MODEL_SIZE_FACTOR * model_bytes


def check_free_space(out: Path, needed: int) -> None:
    """Raise :class:`EnvironmentalFailure` before a trial that would not fit in ``out``."""
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return  # not there yet or not ours to measure: the trial's own writes will say
    if free < needed + FREE_SPACE_MARGIN_BYTES:
        raise EnvironmentalFailure(
            f"out of disk space on --out {out}: {free / 1e6:.1f} MB free, a trial writes about {needed / 1e6:.1f} MB "
            f"(+{FREE_SPACE_MARGIN_BYTES / 1e6:.0f} MB margin); free space there (or pick another --out) and re-run the same command"
        )
