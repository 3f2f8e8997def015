"""run_forked: a short job of the worker itself (a sensitivity probe) in a forked child with a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sensisearch.study.trial._isolation import TrialProcessError, run_forked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie answers kill(0) but is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_the_result_comes_back_through_the_scratch_folder(tmp_path: Path) -> None:
    parent = os.getpid()

    def job(folder: Path) -> None:
        (folder / "answer").write_text(f"{os.getpid()} {parent}")

    run_forked(job, tmp_path / "scratch", timeout=60, what="probe")
    child, seen_parent = map(int, (tmp_path / "scratch" / "answer").read_text().split())
    assert child != parent and seen_parent == parent


def test_a_segfault_is_named_with_what_the_child_printed(tmp_path: Path) -> None:
    def job(folder: Path) -> None:
        print("builder: parsing layer 7", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)

    with pytest.raises(TrialProcessError, match=r"^killed by SIGSEGV during probe; stderr: builder: parsing layer 7$"):
        run_forked(job, tmp_path / "scratch", timeout=60, what="probe")


def test_an_exception_is_a_non_zero_exit_with_its_traceback_tail(tmp_path: Path) -> None:
    def job(folder: Path) -> None:
        raise ValueError("no kernel for this node")

    with pytest.raises(TrialProcessError) as info:
        run_forked(job, tmp_path / "scratch", timeout=60, what="probe")
    message = str(info.value)
    assert message.startswith("exited with code 1 during probe; stderr: ")
    assert "ValueError: no kernel for this node" in message and "\n" not in message


def test_a_hang_is_killed_at_the_deadline_with_everything_it_started(tmp_path: Path) -> None:
    def job(folder: Path) -> None:
        sleeper = subprocess.Popen(["sleep", "1000"])
        (folder / "sleeper").write_text(str(sleeper.pid))
        print("waiting for a lock that never comes", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)

    started = time.monotonic()
    with pytest.raises(TrialProcessError, match=r"probe timed out after 2 s \(--build-timeout\); stderr: waiting for a lock"):
        run_forked(job, tmp_path / "scratch", timeout=2, what="probe")
    assert time.monotonic() - started < 30
    sleeper = int((tmp_path / "scratch" / "sleeper").read_text())
    deadline = time.monotonic() + 10
    while _alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(sleeper), "the job's own child outlived the deadline"
