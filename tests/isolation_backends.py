"""Backends that misbehave on purpose, for the isolation tests (loaded in the trial child via
``SENSISEARCH_TEST_BACKEND=isolation_backends:MisbehavingBackend``).

They are the real ONNX Runtime backend, except that the action named in the file
``$SENSISEARCH_TEST_ACTION_FILE`` happens first: ``hang`` (build sleeps forever
after starting a grandchild ``sleep``), ``segv`` (the build kills itself with
SIGSEGV), ``exit`` (the build exits with code 3), ``hang-eval`` (timing never
returns). ``ACTION@int8`` applies it only to the all-INT8 configuration. The file
is read at each build, so one trial server serves every case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sensisearch.backends.onnxruntime import OnnxRuntimeBackend

ACTION_FILE_ENV = "SENSISEARCH_TEST_ACTION_FILE"
GRANDCHILD_PID_NAME = "grandchild.pid"


def _action(trial_config: dict[str, Any] | None) -> str:
    path = os.environ.get(ACTION_FILE_ENV)
    text = Path(path).read_text().strip() if path and Path(path).is_file() else ""
    action, _, only = text.partition("@")
    if only == "int8":
        precisions = set((trial_config or {}).get("precisions", {}).values())
        return action if precisions == {"int8"} else ""
    return action


class _HangingRunner:
    def __init__(self, runner: Any) -> None:
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def __enter__(self) -> "_HangingRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self._runner.close()

    def measure_latency(self, *args: Any, **kwargs: Any) -> Any:
        print("timing forever", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)

    def timing_arm(self, *args: Any, **kwargs: Any) -> Any:
        # Paired timing asks for the arm first: hang there, as a wedged engine would.
        return self.measure_latency()

    throughput_arm = timing_arm


class MisbehavingBackend(OnnxRuntimeBackend):
    def __init__(self, settings: Any) -> None:
        super().__init__(threads=settings.threads)
        self._pending_eval_action = ""

    def build(self, onnx_path: Path, out_dir: Path, *args: Any, **kwargs: Any) -> Any:
        action = _action(kwargs.get("trial_config"))
        if action == "hang":
            sleeper = subprocess.Popen(["sleep", "1000"])
            (out_dir / GRANDCHILD_PID_NAME).write_text(str(sleeper.pid))
            print("builder: waiting for a lock that never comes", file=sys.stderr, flush=True)
            while True:
                time.sleep(60)
        if action == "segv":
            print("builder: parsing layer 7", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSEGV)
        if action == "exit":
            print("builder: fatal error, giving up", file=sys.stderr, flush=True)
            os._exit(3)
        self._pending_eval_action = action
        return super().build(onnx_path, out_dir, *args, **kwargs)

    def load(self, artifact: Path) -> Any:
        runner = super().load(artifact)
        return _HangingRunner(runner) if self._pending_eval_action == "hang-eval" else runner
