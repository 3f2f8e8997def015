"""Every trial in its own process: a hang, a crash or an OOM kill fails one trial, not the worker.

TensorRT builds hang, segfault in the parser or builder, or run out of device or
host memory. The worker (the Optuna objective, with its storage connection and
heartbeat thread) therefore never builds, times or evaluates itself: a prepared
trial server (:mod:`sensisearch.study.run._trial_server`) forks one child per trial, in
its own process group. The worker waits with a deadline per phase
(``--build-timeout`` until the engine is loaded, ``--eval-timeout`` from then),
kills the child's process group when one passes, and turns a timeout, a signal
death or a non-zero exit into one :class:`TrialProcessError` line with the tail of
the child's stderr. The runner records that as the FAILED trial's reason and the
study goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from sensisearch.errors import SensisearchError

if TYPE_CHECKING:
    from sensisearch.quantize.config import TrialConfig
    from sensisearch.study.trial._fidelity import EarlyStopSnapshot
    from sensisearch.study.trial._pipeline import TrialOutcome
    from sensisearch.study.config._settings import StudySettings

log = logging.getLogger(__name__)

# (config, out_dir, reference_ms, early_stop snapshot or None[, known_latency]) -> outcome: TrialPipeline.run's signature.
RunTrial = Callable[..., "TrialOutcome"]

CHILD_MODULE = "sensisearch.study.run._trial_server"
STDERR_NAME = "stderr.log"
_RESULT_NAME = ".outcome.pickle"
SERVER_LOG_NAME = "trial-server.log"
# How much of the child's stderr a failed trial's reason quotes (one line in the storage).
STDERR_TAIL_LINES = 5
STDERR_TAIL_BYTES = 4096
# After SIGKILL the kernel reaps within milliseconds; this only bounds a wedged server.
_REAP_SECONDS = 30.0


class TrialProcessError(SensisearchError):
    """A trial's child process timed out, died from a signal or exited non-zero (one line, with stderr's tail)."""


@dataclass(frozen=True)
class IsolationSettings:
    build_timeout: float = 1800.0
    eval_timeout: float = 3600.0

    @classmethod
    def from_settings(cls, settings: StudySettings) -> IsolationSettings:
        return cls(build_timeout=settings.build_timeout, eval_timeout=settings.eval_timeout)


_TIMEOUT_FLAG = {"build": "--build-timeout", "evaluate": "--eval-timeout"}


def signal_reason(code: int) -> str:
    """What a negative exit code (``-signal``) means, for the trial's reason."""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGKILL:
        return f"killed by {name} (likely out of memory: the kernel's OOM killer sends it)"
    return f"killed by {name}"


def stderr_tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    """The last non-empty lines of ``path`` joined with `` | `` (one line), or ''."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - STDERR_TAIL_BYTES))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (the child called setsid); gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class IsolatedTrialRunner:
    """Runs trials through a prepared trial server; ``run`` has :meth:`TrialPipeline.run`'s signature.

    The server is started (and prepares the study) on ``start``, before the first
    trial, so trials pay only for a fork. If it dies it is started again for the
    next trial.
    """

    def __init__(self, settings: StudySettings, isolation: IsolationSettings, log_dir: Path) -> None:
        self.settings = settings
        self.isolation = isolation
        self.log_dir = log_dir
        self.last_child_pid: int | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    # ------------------------------------------------------------ server
    def start(self) -> None:
        self.close()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        server_log = open(self.log_dir / SERVER_LOG_NAME, "ab")
        try:
            self._server = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=server_log, start_new_session=True,
            )
        finally:
            server_log.close()
        self._buffer = b""
        self._send({"settings": self.settings.to_dict()})
        deadline = time.monotonic() + self.isolation.build_timeout
        message = self._receive(deadline)
        if message is None or "ready" not in message:
            tail = stderr_tail(self.log_dir / SERVER_LOG_NAME)
            self.close()
            why = "did not get ready in time" if message is None else "exited while preparing"
            raise TrialProcessError(f"trial server {why}" + (f"; stderr: {tail}" if tail else ""))
        log.debug("trial server %d ready", message["ready"])

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        with contextlib.suppress(OSError):
            server.stdin.close()  # type: ignore[union-attr]
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            kill_group(server.pid)
            server.wait()
        with contextlib.suppress(OSError):
            server.stdout.close()  # type: ignore[union-attr]

    def __enter__(self) -> IsolatedTrialRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, message: dict[str, Any]) -> None:
        assert self._server is not None and self._server.stdin is not None
        self._server.stdin.write((json.dumps(message) + "\n").encode())
        self._server.stdin.flush()

    def _receive(self, deadline: float) -> dict[str, Any] | None:
        """The next message; None at the deadline. Raises EOFError when the server is gone."""
        assert self._server is not None and self._server.stdout is not None
        fd = self._server.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with selectors.DefaultSelector() as selector:
                selector.register(fd, selectors.EVENT_READ)
                if not selector.select(remaining):
                    return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("trial server closed its output")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    # ------------------------------------------------------------ trials
    def run(
        self, config: TrialConfig, out_dir: Path, reference_ms: float | None = None, early_stop: EarlyStopSnapshot | None = None,
        known_latency: Mapping[str, Any] | None = None,
    ) -> TrialOutcome:
        if self._server is None or self._server.poll() is not None:
            self.start()
        out_dir.mkdir(parents=True, exist_ok=True)
        stderr_path = out_dir / STDERR_NAME
        result_path = out_dir / _RESULT_NAME
        result_path.unlink(missing_ok=True)
        self._send({
            "config": config.to_dict(), "out_dir": str(out_dir), "stderr": str(stderr_path), "result": str(result_path),
            "reference_ms": reference_ms,
            # The child cannot open the storage; what the early-stop decision needs comes along.
            "early_stop": None if early_stop is None else early_stop.to_dict(),
            # Its latency class's figure, when the class is timed already (the child cannot read the storage).
            "known_latency": None if known_latency is None else dict(known_latency),
        })
        phase = "build"
        deadline = time.monotonic() + self.isolation.build_timeout
        child: int | None = None
        error: str | None = None
        timed_out: str | None = None
        code: int | None = None
        try:
            while code is None:
                message = self._receive(deadline)
                if message is None:
                    if timed_out is not None:  # killed, yet no exit report: the server is wedged
                        break
                    timed_out = phase
                    if child is not None:
                        kill_group(child)
                    else:  # the server never forked: it is the one hanging
                        self.close()
                        break
                    deadline = time.monotonic() + _REAP_SECONDS
                elif "child" in message:
                    child = self.last_child_pid = int(message["child"])
                elif "phase" in message:
                    if message["phase"] == "evaluate" and phase != "evaluate" and timed_out is None:
                        deadline = time.monotonic() + self.isolation.eval_timeout
                    phase = message["phase"]
                elif "error" in message:
                    error = str(message["error"])
                elif "exit" in message:
                    code = int(message["exit"])
        except EOFError:
            self.close()
            if child is not None:
                kill_group(child)
            tail = stderr_tail(self.log_dir / SERVER_LOG_NAME)
            raise TrialProcessError(f"the trial server died during {phase}" + (f"; stderr: {tail}" if tail else "")) from None
        if child is not None:
            kill_group(child)  # anything the trial started and left behind
        if timed_out is not None:
            limit = self.isolation.build_timeout if timed_out == "build" else self.isolation.eval_timeout
            reason = f"{timed_out} timed out after {limit:g} s ({_TIMEOUT_FLAG[timed_out]}); its process group was killed"
            raise TrialProcessError(self._with_tail(reason, stderr_path))
        if code == 0 and result_path.is_file():
            with open(result_path, "rb") as fh:
                outcome: TrialOutcome = pickle.load(fh)
            result_path.unlink()
            if stderr_path.is_file() and stderr_path.stat().st_size == 0:
                stderr_path.unlink()  # nothing to say: no empty file per trial
            return outcome
        if error is not None:
            raise TrialProcessError(error)
        if code is not None and code < 0:
            reason = f"trial process {signal_reason(code)} during {phase}"
        else:
            reason = f"trial process exited with code {code} during {phase}"
        raise TrialProcessError(self._with_tail(reason, stderr_path))

    @staticmethod
    def _with_tail(reason: str, stderr_path: Path) -> str:
        tail = stderr_tail(stderr_path)
        return f"{reason}; stderr: {tail}" if tail else reason
