"""The trial server: prepares the study once, then forks one child process per trial.

Run as ``python -m sensisearch.study.run._trial_server`` by
:class:`sensisearch.study.trial._isolation.IsolatedTrialRunner`; the protocol is one JSON
object per line. The first line on stdin is ``{"settings": StudySettings.to_dict()}``;
the server prepares the study from it (model, backend, evaluator, calibration
statistics from the on-disk cache) and answers ``{"ready": pid}``. Then, per line
``{"config": ..., "out_dir": ..., "stderr": ..., "result": ..., "reference_ms": ..., "early_stop": ...}``
it forks a child
that runs the trial pipeline and answers, in any order::

    {"child": pid}                                     the server, after the fork
    {"phase": "build"} / {"phase": "evaluate"}         the child, as it goes
    {"error": "Type: message"}                         the child, if the pipeline raised
    {"exit": code}                                     the server, when the child is gone:
                                                       0, the exit code, or -signal

On success the child writes the :class:`~sensisearch.study.trial._pipeline.TrialOutcome`
into ``result`` as JSON, its per-image results beside it as an ``.npz``
(:func:`~sensisearch.study.trial._isolation.save_outcome`): data only, never a pickle.

Why a forking server instead of starting ``python`` per trial: importing ONNX
Runtime and Optuna, parsing the model and loading the calibration statistics and
evaluation tensors costs seconds; a fork of a prepared process costs milliseconds,
so isolation adds little to a trial (``benchmarks/workers.py`` measures it). The
server itself is single-threaded and never opens the study storage, so forking it
is safe, unlike forking the worker (heartbeat thread, database connections).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sensisearch.study.trial._isolation import die_with_parent

if TYPE_CHECKING:
    from sensisearch.backends.base import Backend, BuildResult, Runner

def send(fd: int, message: dict[str, Any]) -> None:
    """One JSON line; short writes to a pipe are atomic, so server and child never interleave."""
    try:
        os.write(fd, (json.dumps(message) + "\n").encode())
    except OSError:
        pass  # the parent is gone; the child finishes or dies with it


class PhaseReportingBackend:
    """The study's backend, saying when the build starts and when the engine is loaded.

    The parent applies ``--build-timeout`` until the engine is loaded and
    ``--eval-timeout`` from then on (latency and evaluation).
    """

    def __init__(self, backend: Backend, report: Callable[[str], None]) -> None:
        self._backend = backend
        self._report = report

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def build(self, *args: Any, **kwargs: Any) -> BuildResult:
        self._report("build")
        return self._backend.build(*args, **kwargs)

    def load(self, *args: Any, **kwargs: Any) -> Runner:
        self._report("evaluate")
        return self._backend.load(*args, **kwargs)


def run_child(ctx: Any, spec: dict[str, Any], message_fd: int) -> None:
    """In the forked child: run one trial, then ``os._exit`` (never return into the server loop)."""
    from sensisearch.errors import SensisearchError
    from sensisearch.quantize.config import TrialConfig

    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()  # its own process group: the parent kills the trial and whatever it started at once
        die_with_parent()
        with open(spec["stderr"], "ab") as log_file:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
        ctx.pipeline.backend = PhaseReportingBackend(ctx.pipeline.backend, lambda p: send(message_fd, {"phase": p}))
        send(message_fd, {"phase": "build"})
        config = TrialConfig.from_dict(spec["config"])
        early_stop = None
        if spec.get("early_stop") is not None:  # subset first, stop when clearly out
            from sensisearch.study.trial._fidelity import EarlyStopSnapshot

            early_stop = EarlyStopSnapshot.from_dict(spec["early_stop"])
        try:
            outcome = ctx.pipeline.run(config, Path(spec["out_dir"]), spec.get("reference_ms"), early_stop, spec.get("known_latency"))
        except Exception as exc:  # reported to the parent, which fails the trial with it
            traceback.print_exc()
            text = str(exc) if isinstance(exc, SensisearchError) else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            send(message_fd, {"error": text})
        else:
            from sensisearch.study.trial._isolation import save_outcome

            save_outcome(outcome, Path(spec["result"]))
            code = 0
    except BaseException:  # anything else: the exit code and stderr say it
        traceback.print_exc()
    finally:
        try:
            # The FP32 reference this trial loaded (and its temporary folder): os._exit runs no finalizer.
            close = getattr(ctx.pipeline, "close", None)
            if close is not None:
                close()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            # No finalizers, atexit handlers or buffered writes of the server's state.
            os._exit(code)


def prewarm(ctx: Any) -> None:
    """Pay ONNX Runtime's one-off set-up (its global environment, kernel registries) once, before forking.

    Measured on digits: without it every child paid it again. One thread only, so
    the server stays free of worker threads when it forks.
    """
    if ctx.backend.name != "onnxruntime":
        return
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    ort.InferenceSession(ctx.model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def build_reference_in_child(ctx: Any) -> None:
    """Build the FP32 reference once, in a forked child, so each trial child only loads it.

    Not in the server itself: a TensorRT build initialises CUDA, and a process
    that initialised CUDA must not fork children that use it (CUDA is not
    fork-safe). The server keeps only the artifact's path; the folder is the
    server's (:meth:`TrialPipeline.reference_dir`), so it outlives the builder.
    When the build fails, each trial builds its own reference and reports the error.
    """
    pipeline = ctx.pipeline
    # Trials with predicted latency are never timed, so they need no FP32 reference.
    if getattr(pipeline, "reference_dir", None) is None or getattr(pipeline, "predictor", None) is not None:
        return
    pipeline.reference_dir()
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            die_with_parent()
            # The A/A control too: built like a trial, once, instead of once per trial child.
            os.write(write_fd, f"{pipeline.reference_artifact()}\n{pipeline.control_artifact()}".encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        path = reader.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0 and path:
        reference, _, control = path.partition("\n")
        pipeline.adopt_reference(Path(reference), Path(control) if control else None)
    else:
        logging.getLogger(__name__).warning("building the FP32 reference failed; every trial builds its own")


def serve(stdin: Any, message_fd: int) -> int:
    from sensisearch.study.run._prepare import prepare
    from sensisearch.study.config._settings import StudySettings

    running: list[int] = []

    def worker_died(signum: int, frame: object) -> None:
        # The worker is gone (even kill -9): take the running trial's whole process
        # group along, including anything its build started, then go.
        for pid in running:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(1)

    signal.signal(signal.SIGTERM, worker_died)
    die_with_parent(signal.SIGTERM)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    first = stdin.readline()
    if not first:
        return 0
    settings = StudySettings.from_dict(json.loads(first)["settings"])
    ctx = prepare(settings)
    prewarm(ctx)
    build_reference_in_child(ctx)
    send(message_fd, {"ready": os.getpid()})
    for line in stdin:
        spec = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(ctx, spec, message_fd)
        running.append(pid)
        send(message_fd, {"child": pid})
        _, status = os.waitpid(pid, 0)
        running.remove(pid)
        send(message_fd, {"exit": os.waitstatus_to_exitcode(status)})
    return 0


def main() -> int:
    # The protocol owns fd 1; anything printed goes to stderr (the server log).
    message_fd = os.dup(1)
    os.dup2(2, 1)
    return serve(sys.stdin, message_fd)


if __name__ == "__main__":
    sys.exit(main())
