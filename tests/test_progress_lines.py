"""Progress lines on a timer when the output is not a terminal: inside one long trial and during verify.

The interval is the library's (``sensisearch.progress.set_interval``); these tests
use about a second instead of the CLI's 30 s so the lines come within a short run.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from sensisearch import progress
from sensisearch.progress import Heartbeat, PhaseProgress, doing, note_step

ETA = re.compile(r"ETA \d+:\d\d:\d\d")


@pytest.fixture
def short_interval() -> Iterator[float]:
    before = progress.default_interval()
    progress.set_interval(0.3)
    yield 0.3
    progress.set_interval(before)


def _collector(level: int = logging.INFO) -> tuple[logging.Logger, list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(f"{progress.LOGGER_NAME}.test{id(lines)}")
    logger.propagate = False
    logger.addHandler(Keep())
    logger.setLevel(level)
    return logger, lines


def test_one_long_step_gets_periodic_lines_with_an_eta_and_what_runs(short_interval: float) -> None:
    logger, lines = _collector()
    trials = PhaseProgress("trials", "configurations", logger=logger)
    trials.start("budget 4")
    trials.step(1, 4, force=True)  # one trial done: the rate gives the ETA
    with Heartbeat(trials), doing("trial 2"):
        note_step("build")
        time.sleep(short_interval * 4.5)  # one step, no count: only the heartbeat speaks
    beats = [line for line in lines if "now trial 2, build for" in line]
    assert len(beats) >= 3, lines
    assert all(ETA.search(line) and "1/4 configurations" in line for line in beats), beats


def test_before_any_count_the_eta_comes_from_the_expected_duration(short_interval: float) -> None:
    logger, lines = _collector()
    verify = PhaseProgress("verify", logger=logger, expected_seconds=60)
    verify.start()
    with Heartbeat(verify), doing("verify tournament of 3 trials"):
        note_step("timing")
        time.sleep(short_interval * 3.5)
    beats = [line for line in lines if line.startswith("verify: ") and "elapsed" in line]
    assert len(beats) >= 2 and all(re.search(r"ETA 0:0\d:\d\d; now verify tournament of 3 trials, timing", b) for b in beats), lines


def test_no_thread_and_no_line_when_the_logger_is_off(short_interval: float) -> None:
    """A terminal without --log-file: rich draws the bars, the progress logger stays at WARNING."""
    logger, lines = _collector(logging.WARNING)
    phase = PhaseProgress("trials", logger=logger)
    phase.start()
    with Heartbeat(phase) as beat:
        assert beat._thread is None
        time.sleep(short_interval * 2)
    assert lines == []


@pytest.mark.slow
def test_a_run_logged_to_a_file_shows_timed_lines_inside_a_trial_and_during_verify(tmp_path: Path, short_interval: float) -> None:
    """The CLI in this process (not a terminal), every trial's timing made ~3 s long, verify 3 s."""
    from sensisearch.cli import main

    progress.set_interval(1.0)
    log = tmp_path / "run.log"
    code = main([
        "run", "--example", "digits", "--budget", "1", "--out", str(tmp_path / "study"), "--sample-counts", "64",
        "--eval-limit", "300", "--isolation", "none", "--latency-seconds", "3", "--timing-target-ci", "0.0001",
        "--verify-seconds", "3", "--log-file", str(log), "--cache-dir", str(tmp_path / "cache"),
    ])
    assert code == 0
    text = log.read_text()
    inside = [line for line in text.splitlines() if re.search(r"trials: 0/1 configurations, .*; now trial \d+, latency for", line)]
    # Until a trial has finished there is no rate; from then on every line has one.
    first_done = text.index("trial 0: top1")
    assert all("ETA unknown until the first one finishes" in line for line in inside if text.index(line) < first_done), text
    timed = [line for line in inside if text.index(line) > first_done]
    assert len(timed) >= 3 and all(ETA.search(line) for line in timed), text
    verifying = [line for line in text.splitlines() if re.search(r" verify: .*elapsed.*; now verify tournament", line)]
    assert len(verifying) >= 2 and all(ETA.search(line) or "ETA any moment" in line for line in verifying), text
