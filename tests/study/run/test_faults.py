"""A study left alone overnight: dead trials, full disks, stuck pipes and signals.

Real processes throughout: the CLI in subprocesses, a real SQLite Optuna storage,
real signals, a real tmpfs for the disk.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from sensisearch.study import TrialRecord
from sensisearch.study.search._budget import counted_trials, view_of

from conftest import REPO
# Plain TPE: these tests count trials against --budget, which the default guided study shares with its probes.
PLAIN_TPE = ["--sampler", "tpe", "--search", "full"]
FAST = ["--latency-seconds", "0.05", "--sample-counts", "64", "--eval-limit", "300", "--no-verify", *PLAIN_TPE]
_F_SETPIPE_SZ = 1031


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sensisearch", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="digits_resnet", storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials(deepcopy=False)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------- dead trials

@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_killed_trial_is_failed_at_once_and_an_immediate_rerun_finishes_the_budget(tmp_path: Path) -> None:
    """kill -9 inside a searched trial, then the same command at once (default 30 s heartbeat): the dead
    trial is failed and re-run by the second run, which never reports the study complete beside a RUNNING trial."""
    out = tmp_path / "study"
    # Long timing: the kill lands inside a trial.
    slow = ["run", "--example", "digits", "--budget", "2", "--out", str(out), "--sample-counts", "64", "--eval-limit", "300", *PLAIN_TPE,
            "--no-verify", "--latency-seconds", "4", "--timing-target-ci", "0.0001", "--isolation", "none"]
    proc = subprocess.Popen([sys.executable, "-m", "sensisearch", *slow], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 300
    while not (out / "trials" / "0002").is_dir() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = [t.number for t in _trials(out) if t.state.name == "RUNNING"]
    assert killed, "the kill did not land inside a trial"
    rerun = _cli("run", "--example", "digits", "--budget", "2", "--out", str(out), *FAST, "--isolation", "none", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    trials = _trials(out)
    assert not [t.number for t in trials if t.state.name == "RUNNING"]
    assert counted_trials([view_of(t) for t in trials]) == 2
    for number in killed:
        dead = trials[number]
        assert dead.state.name == "FAIL" and TrialRecord.recorded_error(dead) is None  # not counted
        # its configuration was queued again and evaluated
        assert any(t.system_attrs.get("failed_trial") == number and t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in trials)


# ---------------------------------------------------------------------------- disk full

@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201 - yields the mount point
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow  # two whole studies on a tmpfs; whole-study tests run in the main suite only
def test_disk_full_stops_the_study_with_one_line_and_no_budget_lost(tmp_path: Path, small_disk: Path) -> None:
    out = small_disk / "study"
    argv = ["run", "--example", "digits", "--budget", "4", "--out", str(out), *FAST, "--isolation", "none",
            "--cache-dir", str(tmp_path / "cache")]
    full = _cli(*argv, cwd=tmp_path)
    assert full.returncode != 0, full.stderr
    errors = _error_lines(full.stderr)
    assert len(errors) == 1 and "disk space" in errors[0] and str(out) in errors[0], full.stderr
    assert "internal error" not in full.stderr and "Traceback" not in full.stderr
    before = [view_of(t) for t in _trials(out)]
    assert counted_trials(before) < 4
    assert not any(TrialRecord.from_trial(t).environmental and TrialRecord.recorded_error(t) for t in _trials(out))
    # Space freed: the same command completes the whole budget, retrying what the disk failed.
    subprocess.run(["mount", "-o", "remount,size=128m", str(small_disk)], check=True)
    again = _cli(*argv, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    trials = _trials(out)
    assert counted_trials([view_of(t) for t in trials]) == 4
    assert not any(t.state.name == "RUNNING" for t in trials)
    for t in trials:
        if TrialRecord.from_trial(t).environmental is not None:
            assert t.state.name == "FAIL"
            assert not view_of(t).evaluated or TrialRecord.recorded_error(t) is None  # never counted


# ---------------------------------------------------------------------------- output and signals

def test_a_worker_whose_output_pipe_nobody_reads_still_finishes(tmp_path: Path) -> None:
    """stdout and stderr a one-page pipe that is never read: the run must not stop inside its trials."""
    out = tmp_path / "study"
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, _F_SETPIPE_SZ, 4096)
    log = tmp_path / "run.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sensisearch", "run", "--example", "digits", "--budget", "3", "--out", str(out), *FAST,
         "--isolation", "none", "-v", "--log-file", str(log)],  # -v: far more output than the pipe holds
        cwd=tmp_path, stdout=write_end, stderr=write_end, env=_env(),
    )
    os.close(write_end)
    try:
        proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the run stalled on its full output pipe")
    finally:
        os.close(read_end)
    assert proc.returncode == 0
    text = log.read_text()
    # the log has every line the terminal would have had, phases and trials
    assert "trials: started" in text and "trials: finished" in text and "trial 0:" in text and "winner:" in text


_FINALIZER_SCENARIO = textwrap.dedent("""
    import gc, os, signal, sys, time

    design = sys.argv[1]
    if design == "raising-handler":
        # The design before the flag: SIGTERM's handler raised a KeyboardInterrupt subclass wherever
        # the main thread was, and the run relied on that exception unwinding it.
        class Terminated(KeyboardInterrupt):
            pass

        def handler(signum, frame):
            raise Terminated()

        signal.signal(signal.SIGTERM, handler)

        def check():
            pass  # nothing to look at: the exception was the only messenger
        region = None
    else:
        from sensisearch.cli import StopSignals

        signals = StopSignals().install()
        check = signals.flag.check
        # "interruptible": code that checks no flag, where the flag design's handler raises too.
        region = signals.flag.interruptible() if design == "flag-interruptible" else None

    class Connection:  # a storage connection collected while the run goes on
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs here, inside the finalizer, where Python drops what it raises

    try:
        if region is not None:
            region.__enter__()
        Connection()
        gc.collect()
        if region is not None:
            region.__exit__(None, None, None)
        for step in range(3):  # the rest of the run, checking between steps
            check()
            time.sleep(0.05)
        print("signal lost", flush=True)
    except KeyboardInterrupt:
        print("stop requested", flush=True)
""")


def _finalizer_scenario(tmp_path: Path, design: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "finalizer.py"
    script.write_text(_FINALIZER_SCENARIO)
    return subprocess.run([sys.executable, str(script), design], capture_output=True, text=True, timeout=120, env=_env())


def test_a_signal_inside_a_finalizer_is_lost_by_a_raising_handler_and_kept_by_the_flag(tmp_path: Path) -> None:
    """SIGTERM delivered while the main thread runs a finalizer (``__del__``): Python prints "Exception ignored"
    and drops whatever the handler raised. The old design (the handler raises) loses the request and the run
    goes on; the flag design keeps it, also where its handler raises (an interruptible region)."""
    old = _finalizer_scenario(tmp_path, "raising-handler")
    assert old.stdout.strip() == "signal lost", old.stderr
    assert "Exception ignored" in old.stderr and "Terminated" in old.stderr  # the scenario really happened
    for design in ("flag", "flag-interruptible"):
        new = _finalizer_scenario(tmp_path, design)
        assert new.stdout.strip() == "stop requested", (design, new.stderr)
    # Inside an interruptible region the raise is dropped just the same; the flag still stops the run.
    assert "Exception ignored" in new.stderr and "StopRequested" in new.stderr


def test_sigterm_while_waiting_for_another_workers_trial_exits_promptly(tmp_path: Path) -> None:
    out = tmp_path / "study"
    first = _cli("run", "--example", "digits", "--budget", "1", "--out", str(out), *FAST, "--isolation", "none", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    study = optuna.load_study(study_name="digits_resnet", storage=f"sqlite:///{out / 'study.db'}")
    other = study.ask()  # RUNNING, undecided: every later trial waits for it
    proc = subprocess.Popen([sys.executable, "-m", "sensisearch", "run", "--example", "digits", "--budget", "3", "--out", str(out),
                             *FAST, "--isolation", "none"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=_env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(t.number > other.number and t.state.name == "RUNNING" and TrialRecord.from_trial(t).config_key for t in _trials(out)):
            break
        time.sleep(0.2)
    time.sleep(1.0)
    for _ in range(5):  # five signals in quick succession, the first one counts; none may be lost
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "Traceback" not in err


def test_over_budget_and_repeated_proposals_say_what_they_are() -> None:
    from sensisearch.study.run._run_loop import _note

    assert _note(TrialRecord(10, role="over_budget")) == "over budget, not evaluated"
    assert _note(TrialRecord(11, role="duplicate", duplicate_of=4)) == "repeats trial 4, not evaluated again"
    assert _note(TrialRecord(12, role="evaluate")) is None


# ---------------------------------------------------------------------------- chaos

@pytest.mark.slow
def test_chaos_kill_9_at_random_moments_then_rerun_reaches_exactly_the_budget(tmp_path: Path) -> None:
    """Budget 20, SIGKILL at 10 seeded random moments (statistics, baselines, trials, verify), the same command again each time."""
    import hashlib
    import json
    import random

    rng = random.Random(20)
    out = tmp_path / "study"
    argv = ["run", "--example", "digits", "--budget", "20", "--out", str(out), "--latency-seconds", "0.05", "--sample-counts", "64", *PLAIN_TPE,
            "--eval-limit", "300", "--isolation", "none", "--verify-seconds", "2", "--cache-dir", str(tmp_path / "cache")]
    first_written: dict[Path, str] = {}

    def remember() -> None:
        for path in sorted((out / "trials").glob("*/trial.json")) if (out / "trials").is_dir() else []:
            text = path.read_bytes()
            try:
                status = json.loads(text).get("status")
            except ValueError:
                continue
            if status in ("complete", "failed", "stopped_early"):
                first_written.setdefault(path, hashlib.sha256(text).hexdigest())

    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-m", "sensisearch", *argv], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=_env())
        time.sleep(rng.uniform(2.0, 25.0))  # from the statistics pass to the verify tournament
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        remember()
    done = _cli(*argv, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr
    remember()
    trials = _trials(out)
    views = [view_of(t) for t in trials]
    assert not [t.number for t in trials if t.state.name == "RUNNING"]
    assert counted_trials(views) == 20
    keys = [v.key for v in views if v.evaluated and not v.baseline]
    assert len(keys) == len(set(keys)) == 20
    for path, digest in first_written.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} changed after it was first written"
    rebuilt = _cli("report", str(out), "--out", str(tmp_path / "rebuilt"), cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (tmp_path / "rebuilt" / "pareto.json").read_bytes() == (out / "pareto.json").read_bytes()
