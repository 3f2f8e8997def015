"""Where a run's lines go: never blocking the worker, into --log-file too, and stop requests as a flag.

A worker whose stdout is a pipe nobody reads must not stop inside its trial (its
heartbeat thread would keep beating, so no other worker notices): a line that
does not fit into the pipe right now goes to the log file instead. A terminal
shows progress bars; a log gets plain lines (the ``sensisearch.progress`` logger).
"""

from __future__ import annotations

import io
import logging
import os
import select
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sensisearch.progress import LOGGER_NAME
from sensisearch.study import StopFlag, StopRequested

# Writes of at most PIPE_BUF bytes to a pipe that select() reports writable do not block.
_CHUNK = 4096


@dataclass
class RunOutput(io.TextIOBase):
    """A text stream over ``fd`` that never blocks, copying every line to ``log`` when given.

    What the descriptor cannot take right now (a full pipe) is written to ``log``
    only (or dropped without one) and counted in ``dropped``.
    """

    fd: int
    log: IO[str] | None = None
    dropped: int = 0
    _broken: bool = False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def fileno(self) -> int:
        return self.fd

    def write(self, text: str) -> int:
        if self.log is not None:
            self.log.write(text)
            self.log.flush()
        data = text.encode(errors="replace")
        for start in range(0, len(data), _CHUNK):
            chunk = data[start:start + _CHUNK]
            if self._broken:
                self.dropped += len(chunk)
                continue
            try:
                _, ready, _ = select.select([], [self.fd], [], 0)
                if not ready:
                    self.dropped += len(chunk)
                    continue
                os.write(self.fd, chunk)
            except (BrokenPipeError, OSError):
                self._broken = True
                self.dropped += len(chunk)
        return len(text)

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()


def open_log(path: Path | None) -> IO[str] | None:
    if path is None:
        return None
    from sensisearch.errors import SensisearchError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a", encoding="utf-8", buffering=1)
    except OSError as exc:
        raise SensisearchError(f"--log-file {path}: cannot write it ({exc.strerror}); pick a writable path") from exc


def reset_output(consoles: list[Any]) -> None:
    """Consoles back on the process's own sys.stdout/sys.stderr and no plain progress lines: what a command
    starts from (a run routed them for itself; a later command in the same process must not inherit that)."""
    for console in consoles:
        console.file = None  # rich then writes to whatever sys.stdout / sys.stderr is at the time
    progress = logging.getLogger(LOGGER_NAME)
    for handler in list(progress.handlers):
        progress.removeHandler(handler)
    progress.setLevel(logging.WARNING)


def route_output(consoles: list[Any], log_path: Path | None) -> IO[str] | None:
    """Point the CLI's consoles at never-blocking streams (and the log file); plain progress lines when not a terminal."""
    log = open_log(log_path)
    for console in consoles:
        fd = (sys.stderr if console.stderr else sys.stdout).fileno()
        console.file = RunOutput(fd, log)
    terminal = all(os.isatty((sys.stderr if c.stderr else sys.stdout).fileno()) for c in consoles)
    progress = logging.getLogger(LOGGER_NAME)
    progress.propagate = False  # plain lines with a time stamp, not the rich log format
    for handler in list(progress.handlers):
        progress.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if not terminal:
        # Progress is the run's output, like its summary: stdout. stderr keeps only what went
        # wrong, so a bad input is still exactly one line there.
        to_stdout = logging.StreamHandler(RunOutput(sys.stdout.fileno()))
        to_stdout.setFormatter(formatter)
        progress.addHandler(to_stdout)
    if log is not None:
        to_log = logging.StreamHandler(log)
        to_log.setFormatter(formatter)
        progress.addHandler(to_log)
    progress.setLevel(logging.INFO if progress.handlers else logging.WARNING)
    return log


@dataclass
class StopSignals:
    """SIGTERM and Ctrl-C set ``flag``; a second one during shutdown exits at once.

    The handler raises only inside code marked interruptible (a trial computed in
    this process); everywhere else the loops see the flag at their next check, so a
    signal landing in a finalizer (where Python drops exceptions) is not lost.
    """

    flag: StopFlag = field(default_factory=StopFlag)
    previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        if self.flag.is_set():
            os.write(2, f"{name} again during shutdown: exiting now; re-run the same command to resume\n".encode())
            os._exit(exit_code(signum))
        self.flag.set(name, signum)
        if self.flag.in_interruptible:
            raise StopRequested(name)


def exit_code(signum: int | None) -> int:
    return 143 if signum == signal.SIGTERM else 130
