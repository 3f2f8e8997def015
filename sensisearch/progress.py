"""Plain progress lines for long phases, through ``logging`` (logger ``sensisearch.progress``).

A terminal shows progress bars (the CLI's); a log file or CI log needs lines. Each
phase logs when it starts and ends, and while it runs at most one line per
``interval`` seconds with its count and ETA. The CLI shows this logger's INFO
lines when its output is not a terminal, and always in ``--log-file``.

Counts alone go quiet inside one long step (a trial whose build takes twenty
minutes, the verify tournament's timing): :class:`Heartbeat` logs the phase's
line on a timer from a small thread, naming what runs now (:func:`doing`,
:func:`note_step`, set by the study as it goes). Nothing runs, and nothing is
logged, while the logger is off (a terminal without ``--log-file``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

LOGGER_NAME = "sensisearch.progress"
# "at least once a minute" with margin: a line every 30 s of a long phase.
DEFAULT_INTERVAL_SECONDS = 30.0

_interval = DEFAULT_INTERVAL_SECONDS


def set_interval(seconds: float) -> None:
    """Seconds between progress lines of a long phase, for every :class:`PhaseProgress` created after this."""
    global _interval
    if seconds <= 0:
        raise ValueError(f"progress interval must be positive, got {seconds}")
    _interval = float(seconds)


def default_interval() -> float:
    return _interval


@dataclass
class _Now:
    """What runs right now, for the heartbeat line: an activity (``trial 4``) and its step (``build``)."""

    activity: str | None = None
    step: str | None = None
    since: float = 0.0


_now = _Now()
_now_lock = threading.Lock()


@contextlib.contextmanager
def doing(activity: str) -> Iterator[None]:
    """Mark ``activity`` (e.g. ``trial 4``) as running now, until the block ends."""
    with _now_lock:
        previous = (_now.activity, _now.step, _now.since)
        _now.activity, _now.step, _now.since = activity, None, time.monotonic()
    try:
        yield
    finally:
        with _now_lock:
            _now.activity, _now.step, _now.since = previous


def note_step(step: str) -> None:
    """The current activity's step (``build``, ``latency``, ``evaluate``), from whichever process sees it."""
    with _now_lock:
        if _now.step != step:
            _now.step, _now.since = step, time.monotonic()


def running_now() -> str:
    """``trial 4, build for 0:01:05``, or '' when nothing is marked."""
    with _now_lock:
        activity, step, since = _now.activity, _now.step, _now.since
    if activity is None:
        return ""
    where = f"{activity}, {step}" if step else activity
    return f"{where} for {format_seconds(time.monotonic() - since)}"


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
    interval: float = field(default_factory=default_interval)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger(LOGGER_NAME))
    expected_seconds: float | None = None
    """How long the phase should take, for an ETA before (or without) counts, e.g. a time-capped tournament."""
    total: int | None = None
    """The count the phase goes to, when known before the first :meth:`step`."""
    seconds_per_item: float | None = None
    """Measured seconds per item, when the caller knows better than elapsed/done (items not counted took time too,
    e.g. a study's baselines); the ETA then is this times the items left."""
    _started: float | None = None
    _last: float = 0.0
    _done: int = 0
    _total: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self, detail: str = "") -> None:
        self._started = self._last = time.monotonic()
        if self._total is None:
            self._total = self.total
        self.logger.info("%s: started%s", self.name, f" ({detail})" if detail else "")

    def step(self, done: int, total: int | None, force: bool = False) -> None:
        if self._started is None:
            self.start()
        with self._lock:
            self._done, self._total = done, total
        self._line(force)

    def beat(self) -> None:
        """The phase's line if none was logged for ``interval`` seconds: the heartbeat inside one long step."""
        self._line(False)

    def eta(self, elapsed: float) -> str:
        """The ETA part of a line: from the rate so far, else from ``expected_seconds``; '' when neither says."""
        done, total = self._done, self._total
        if total and self.seconds_per_item is not None:
            return f"ETA {format_seconds(self.seconds_per_item * max(0, total - done))}"
        if total and done > 0:
            return f"ETA {format_seconds(elapsed / done * max(0, total - done))}"
        if total:
            return "ETA unknown until the first one finishes"
        if self.expected_seconds is not None:
            left = self.expected_seconds - elapsed
            return f"ETA {format_seconds(left)}" if left > 0 else f"ETA any moment (expected {format_seconds(self.expected_seconds)})"
        return ""

    def _line(self, force: bool) -> None:
        with self._lock:
            now = time.monotonic()
            if self._started is None or (not force and now - self._last < self.interval):
                return
            self._last = now
            elapsed = now - self._started
            unit = f" {self.unit}" if self.unit else ""
            count = f"{self._done}/{self._total}{unit}" if self._total else (f"{self._done}{unit}" if self._done or unit else "")
            parts = [p for p in (count, f"{format_seconds(elapsed)} elapsed", self.eta(elapsed)) if p]
            now_running = running_now()
            self.logger.info("%s: %s%s", self.name, ", ".join(parts), f"; now {now_running}" if now_running else "")

    def end(self, detail: str = "") -> None:
        elapsed = 0.0 if self._started is None else time.monotonic() - self._started
        self.logger.info("%s: finished in %s%s", self.name, format_seconds(elapsed), f" ({detail})" if detail else "")


class Heartbeat:
    """``with Heartbeat(progress):`` a thread calls ``progress.beat()`` so a line comes at least every interval.

    Started only when the progress logger would show the line: a terminal (rich's bars,
    no log file) gets no thread and no output. The thread holds no lock while it
    sleeps and never touches the study, so it is safe beside Optuna's own heartbeat.
    """

    def __init__(self, progress: PhaseProgress) -> None:
        self.progress = progress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.progress.logger.isEnabledFor(logging.INFO):
            self._thread = threading.Thread(target=self._run, name=f"progress: {self.progress.name}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        progress = self.progress
        while not self._stop.wait(max(0.05, progress._last + progress.interval - time.monotonic())):
            progress.beat()
