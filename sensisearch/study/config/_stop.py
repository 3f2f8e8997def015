"""Stopping a run on request: a signal sets a flag, and the loops that can stop safely look at it.

A signal handler that raises runs wherever the main thread happens to be, also
inside a finalizer (a database connection being collected), where Python prints
"Exception ignored" and drops the exception: the request is lost. A flag is never
lost. The run loop, the wait for a budget decision and the trial runner check it
between steps; code that can only be stopped by an exception (a trial computed in
this process) marks itself :meth:`StopFlag.interruptible`, and only there the
handler raises too.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator


class StopRequested(KeyboardInterrupt):
    """Raised by code that saw the stop flag: the running trial is failed and queued again.

    A KeyboardInterrupt so that Optuna fails the running trial and re-raises it
    (it catches only ``Exception`` subclasses the caller names).
    """

    def __init__(self, reason: str = "interrupted") -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class StopFlag:
    """Set once by a signal (or a test); read by every loop that can stop between steps."""

    _event: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None
    """What asked to stop: "terminated (SIGTERM)" or "interrupted"."""
    signal_number: int | None = None
    _interruptible: int = 0

    def set(self, reason: str, signal_number: int | None = None) -> None:
        if not self._event.is_set():
            self.reason, self.signal_number = reason, signal_number
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`StopRequested` when a stop was asked for."""
        if self._event.is_set():
            raise StopRequested(self.reason or "interrupted")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True (at once) when a stop is asked for."""
        return self._event.wait(seconds)

    @property
    def in_interruptible(self) -> bool:
        return self._interruptible > 0

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Code that checks no flag (a trial computed in this process): a signal may raise inside it."""
        self.check()
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1
