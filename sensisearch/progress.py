"""Plain progress lines for long phases, through ``logging`` (logger ``sensisearch.progress``).

A terminal shows progress bars (the CLI's); a log file or CI log needs lines. Each
phase logs when it starts and ends, and while it runs at most one line per
``interval`` seconds with its count and ETA. The CLI shows this logger's INFO
lines when its output is not a terminal, and always in ``--log-file``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

LOGGER_NAME = "sensisearch.progress"
# "at least once a minute" with margin: a line every 30 s of a long phase.
DEFAULT_INTERVAL_SECONDS = 30.0


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@dataclass
class PhaseProgress:
    """``start`` once, ``step(done, total)`` as it goes, ``end`` once."""

    name: str
    unit: str = ""
    interval: float = DEFAULT_INTERVAL_SECONDS
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger(LOGGER_NAME))
    _started: float | None = None
    _last: float = 0.0

    def start(self, detail: str = "") -> None:
        self._started = self._last = time.monotonic()
        self.logger.info("%s: started%s", self.name, f" ({detail})" if detail else "")

    def step(self, done: int, total: int | None, force: bool = False) -> None:
        now = time.monotonic()
        if self._started is None:
            self.start()
            assert self._started is not None
        if not force and now - self._last < self.interval:
            return
        self._last = now
        elapsed = now - self._started
        unit = f" {self.unit}" if self.unit else ""
        if total and done > 0:
            eta = elapsed / done * max(0, total - done)
            self.logger.info("%s: %d/%d%s, %s elapsed, ETA %s", self.name, done, total, unit, format_seconds(elapsed), format_seconds(eta))
        else:
            self.logger.info("%s: %d%s, %s elapsed", self.name, done, unit, format_seconds(elapsed))

    def end(self, detail: str = "") -> None:
        elapsed = 0.0 if self._started is None else time.monotonic() - self._started
        self.logger.info("%s: finished in %s%s", self.name, format_seconds(elapsed), f" ({detail})" if detail else "")
