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
import ctypes
import faulthandler
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from sensisearch.errors import SensisearchError
from sensisearch.progress import note_step

if TYPE_CHECKING:
    from sensisearch.study.config._stop import StopFlag
    from sensisearch.quantize.config import TrialConfig
    from sensisearch.study.trial._fidelity import EarlyStopSnapshot
    from sensisearch.study.trial._pipeline import TrialOutcome
    from sensisearch.study.config._settings import StudySettings

log = logging.getLogger(__name__)

# (config, out_dir, reference_ms, early_stop snapshot or None[, known_latency]) -> outcome: TrialPipeline.run's signature.
RunTrial = Callable[..., "TrialOutcome"]

CHILD_MODULE = "sensisearch.study.run._trial_server"
STDERR_NAME = "stderr.log"
RESULT_NAME = ".outcome.json"
"""The child's outcome (:meth:`TrialOutcome.to_full_dict`); its per-image results beside it as ``.outcome.npz``.
Data only, never a pickle: --out may be on a shared file system, writable by others than this worker,
and unpickling a file (even through an allow-list) lets whoever wrote it choose what the worker calls."""
PER_IMAGE_SUFFIX = ".npz"
# How often the wait for the trial server looks at the stop flag.
_STOP_POLL_SECONDS = 0.25
SERVER_LOG_NAME = "trial-server.log"
# How much of the child's stderr a failed trial's reason quotes (one line in the storage).
STDERR_TAIL_LINES = 5
STDERR_TAIL_BYTES = 4096
# After SIGKILL the kernel reaps within milliseconds; this only bounds a wedged server.
_REAP_SECONDS = 30.0


def save_outcome(outcome: TrialOutcome, path: Path) -> None:
    """Write ``outcome`` as ``path`` (JSON) plus, when it has per-image results, ``path.with_suffix('.npz')``.

    The JSON is written last and atomically: once it exists, both files are complete.
    """
    from sensisearch.fileio import write_bytes_atomic
    from sensisearch.study.trial import _accuracy

    data = outcome.to_full_dict()
    per_image = outcome.evaluation.per_image
    data["per_image"] = per_image is not None
    if per_image is not None:
        write_bytes_atomic(path.with_suffix(PER_IMAGE_SUFFIX), _accuracy.per_image_to_bytes(per_image))
    # default=str: free-form backend details (a Path, say) arrive as the text trial.json shows.
    write_bytes_atomic(path, json.dumps(data, default=str).encode())


def load_outcome(path: Path) -> TrialOutcome:
    """Read what :func:`save_outcome` wrote; anything else raises one :class:`TrialProcessError` line naming the file.

    Only JSON and a NumPy ``.npz`` without object arrays (``allow_pickle=False``) are
    read, so the files can hold data, never code. Beyond parsing, the outcome must
    write back exactly what was read: an unknown key or a value of the wrong type is
    refused, not coerced.
    """
    from sensisearch.study.trial import _accuracy
    from sensisearch.study.trial._pipeline import TrialOutcome

    where = path
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("per_image"), bool):
            raise ValueError("not a JSON object with a per_image flag")
        has_per_image = data.pop("per_image")
        per_image = None
        if has_per_image:
            where = path.with_suffix(PER_IMAGE_SUFFIX)
            per_image = _accuracy.per_image_from_bytes(where.read_bytes())
            where = path
        outcome = TrialOutcome.from_dict(data, per_image)
        written = json.loads(json.dumps(outcome.to_full_dict(), default=str))
        difference = _first_difference(data, written)
        if difference is not None:
            raise ValueError(difference)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, IndexError, zipfile.BadZipFile, RecursionError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise TrialProcessError(f"{where}: not a trial outcome ({text}); is something else writing into --out?") from None
    return outcome


def _first_difference(read: Any, written: Any, at: str = "") -> str | None:
    """Where ``read`` (the file) and ``written`` (what its outcome writes) differ, or None.

    Numbers compare by value (a float written as ``2`` reads back as ``2.0``); every
    other type must match exactly, NaN included.
    """
    where = at or "the outcome"
    if isinstance(read, dict) and isinstance(written, dict):
        for key in read:
            if key not in written:
                return f"unknown key {at + '.' if at else ''}{key}"
        for key in written:
            if key not in read:
                return f"missing key {at + '.' if at else ''}{key}"
            found = _first_difference(read[key], written[key], f"{at}.{key}" if at else str(key))
            if found is not None:
                return found
        return None
    if isinstance(read, list) and isinstance(written, list):
        if len(read) != len(written):
            return f"{where} has {len(read)} entries, expected {len(written)}"
        for i, (a, b) in enumerate(zip(read, written)):
            found = _first_difference(a, b, f"{at}[{i}]")
            if found is not None:
                return found
        return None
    numbers = (int, float)
    if isinstance(read, numbers) and isinstance(written, numbers) and not isinstance(read, bool) and not isinstance(written, bool):
        if read == written or (read != read and written != written):  # NaN equals NaN here
            return None
        return f"{where} is {read!r}, which reads back as {written!r}"
    if type(read) is type(written) and read == written:
        return None
    return f"{where} is {type(read).__name__} {_short(read)}, expected {type(written).__name__}"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


class TrialProcessError(SensisearchError):
    """A trial's child process timed out, died from a signal or exited non-zero (one line, with stderr's tail)."""


@dataclass(frozen=True)
class IsolationSettings:
    build_timeout: float = 1800.0
    eval_timeout: float = 3600.0

    @classmethod
    def from_settings(cls, settings: StudySettings) -> IsolationSettings:
        return cls(build_timeout=settings.execution.build_timeout, eval_timeout=settings.execution.eval_timeout)


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


# prctl(PR_SET_PDEATHSIG): Linux sends this signal when the parent dies, so a
# worker killed with -9 takes its trial server, and the server its trial, along.
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def run_forked(work: Callable[[Path], None], scratch: Path, timeout: float, what: str, flag: str = "--build-timeout") -> None:
    """``work(scratch)`` in a forked child, in its own process group, with a deadline.

    For short jobs of the worker itself (the sensitivity probes) that build and run
    an engine: a builder that segfaults, exits or hangs fails this one job with a
    :class:`TrialProcessError` line (the reason and the tail of the child's stderr),
    not the worker. ``work`` hands its result back through files in ``scratch``.
    The child logs nothing and writes its output to ``scratch/stderr.log``: a lock
    another thread of this process held at the fork (a console's) would never be
    released in the child.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    stderr_path = scratch / STDERR_NAME
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            die_with_parent()
            logging.disable(logging.CRITICAL)
            # A crash is reported by its signal and what the job printed, not by a dump onto the parent's stderr.
            faulthandler.disable()
            fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # Python-level writers too: sys.stderr may be another object than fd 2 (a test runner's capture).
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            work(scratch)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            kill_group(pid)
            os.waitpid(pid, 0)
            raise TrialProcessError(IsolatedTrialRunner._with_tail(f"{what} timed out after {timeout:g} s ({flag})", stderr_path))
        time.sleep(0.02)
    code = os.waitstatus_to_exitcode(status)
    kill_group(pid)  # anything the job started goes with it
    if code < 0:
        raise TrialProcessError(IsolatedTrialRunner._with_tail(f"{signal_reason(code)} during {what}", stderr_path))
    if code != 0:
        raise TrialProcessError(IsolatedTrialRunner._with_tail(f"exited with code {code} during {what}", stderr_path))


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

    def __init__(self, settings: StudySettings, isolation: IsolationSettings, log_dir: Path, stop: StopFlag | None = None) -> None:
        self.settings = settings
        self.stop = stop
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
        result_path = out_dir / RESULT_NAME
        result_path.unlink(missing_ok=True)
        result_path.with_suffix(PER_IMAGE_SUFFIX).unlink(missing_ok=True)
        self._send({
            "config": config.to_dict(), "out_dir": str(out_dir), "stderr": str(stderr_path), "result": str(result_path),
            "reference_ms": reference_ms,
            # The child cannot open the storage; what the early-stop decision needs comes along.
            "early_stop": None if early_stop is None else early_stop.to_dict(),
            # Its latency class's figure, when the class is timed already (the child cannot read the storage).
            "known_latency": None if known_latency is None else dict(known_latency),
        })
        phase = "build"
        started = time.monotonic()
        # The whole trial's wall-clock limit, kept here in the parent: what the child reports
        # (a phase, a heartbeat) is no proof that it progresses, so nothing it sends extends this.
        trial_deadline = started + self.isolation.build_timeout + self.isolation.eval_timeout
        deadline = started + self.isolation.build_timeout
        child: int | None = None
        error: str | None = None
        timed_out: str | None = None
        code: int | None = None
        try:
            while code is None:
                # Short waits, so a stop request is seen within a fraction of a second.
                message = self._receive(min(deadline, time.monotonic() + _STOP_POLL_SECONDS))
                if message is None and time.monotonic() < deadline:
                    if self.stop is not None and self.stop.is_set() and timed_out is None:
                        if child is not None:
                            kill_group(child)
                            self._drain_exit(deadline=time.monotonic() + _REAP_SECONDS)
                        else:
                            self.close()
                        self.stop.check()
                    continue
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
                    note_step(str(message["phase"]))  # the child's phase, for the progress line
                    if message["phase"] == "evaluate" and phase != "evaluate" and timed_out is None:
                        deadline = min(time.monotonic() + self.isolation.eval_timeout, trial_deadline)
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
            try:
                outcome: TrialOutcome = load_outcome(result_path)
            finally:
                result_path.unlink(missing_ok=True)
                result_path.with_suffix(PER_IMAGE_SUFFIX).unlink(missing_ok=True)
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

    def _drain_exit(self, deadline: float) -> None:
        """After killing the child for a stop: read up to the server's exit report, so the protocol stays in step."""
        try:
            while (message := self._receive(deadline)) is not None:
                if "exit" in message:
                    return
        except EOFError:
            self.close()
            return
        self.close()  # no report in time: the server is wedged, start a fresh one next time

    @staticmethod
    def _with_tail(reason: str, stderr_path: Path) -> str:
        tail = stderr_tail(stderr_path)
        return f"{reason}; stderr: {tail}" if tail else reason
