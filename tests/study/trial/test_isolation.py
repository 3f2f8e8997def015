"""Trial isolation: a hang, a segfault or a non-zero exit fails one trial, and nothing is left running.

Real trial server, real ONNX Runtime builds of the digits example; the misbehaving
builds come from ``tests/isolation_backends.py``, loaded in the child through
``SENSISEARCH_TEST_BACKEND``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import optuna
import pytest

from sensisearch.cli import main
from sensisearch.quantize.config import Precision
from sensisearch.study.run._context import StudyContext
from sensisearch.study.run import child_settings
from sensisearch.study.trial._isolation import (
    IsolatedTrialRunner,
    RESULT_NAME,
    IsolationSettings,
    TrialProcessError,
    load_outcome,
    save_outcome,
    signal_reason,
    stderr_tail,
)
from sensisearch.study.store._record import TrialRecord
from sensisearch.study.run import prepare
from sensisearch.study.config._settings import merge_settings

from outcome_compare import assert_same_outcome

# Whole studies in subprocesses (minutes): left out of the quick lowest-versions CI run.
pytestmark = pytest.mark.slow

from conftest import TESTS
BACKEND = "isolation_backends:MisbehavingBackend"
# Long enough for a normal digits trial on a busy shared machine; the hang tests wait this long.
TIMEOUT = float(os.environ.get("SENSISEARCH_TEST_ISOLATION_TIMEOUT", "12"))  # raise it on an overloaded machine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def misbehaving_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The test backend in this process and in every child; yields the action file."""
    action = tmp_path_factory.mktemp("action") / "action"
    action.write_text("")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SENSISEARCH_TEST_BACKEND", BACKEND)
        mp.setenv("SENSISEARCH_TEST_ACTION_FILE", str(action))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        mp.syspath_prepend(str(TESTS))
        yield action


@pytest.fixture(scope="module")
def digits_ctx(tmp_path_factory: pytest.TempPathFactory, misbehaving_env: Path) -> StudyContext:
    out = tmp_path_factory.mktemp("iso")
    settings = merge_settings(
        {}, {"example": "digits", "out": out, "latency_seconds": 0.05, "sample_counts": [64], "eval_limit": 400}, None
    )
    return prepare(settings)


@pytest.fixture(scope="module")
def runner(digits_ctx: StudyContext) -> Iterator[IsolatedTrialRunner]:
    with IsolatedTrialRunner(child_settings(digits_ctx), IsolationSettings(build_timeout=TIMEOUT, eval_timeout=TIMEOUT), digits_ctx.out) as r:
        yield r


def test_isolated_trial_equals_the_in_process_one(digits_ctx: StudyContext, runner: IsolatedTrialRunner, misbehaving_env: Path) -> None:
    misbehaving_env.write_text("")
    config = digits_ctx.space.uniform(Precision.INT8)
    isolated = runner.run(config, digits_ctx.trials_dir / "same-child")
    reference = digits_ctx.pipeline.run(config, digits_ctx.trials_dir / "same-parent")
    assert runner.last_child_pid is not None and runner.last_child_pid != os.getpid()
    assert isolated.evaluation.metrics == reference.evaluation.metrics
    assert isolated.evaluation.count == reference.evaluation.count == 400
    assert dict(isolated.build.layer_precisions) == dict(reference.build.layer_precisions)
    assert isolated.ranges == reference.ranges
    assert isolated.deployable.read_bytes() == reference.deployable.read_bytes()
    assert _gone(runner.last_child_pid)
    # Nothing of the hand-over is left in the trial folder.
    assert not list((digits_ctx.trials_dir / "same-child").glob(".outcome*"))


def test_a_real_outcome_crosses_the_process_boundary_field_by_field(
    digits_ctx: StudyContext, runner: IsolatedTrialRunner, misbehaving_env: Path, tmp_path: Path
) -> None:
    """What the child computed is what the parent gets. Two runs differ in their timings, so the exact
    comparison is of one in-process outcome through the same files the child writes; the isolated run
    must then agree with it on everything that does not depend on the clock, with the same types."""
    misbehaving_env.write_text("")
    config = digits_ctx.space.uniform(Precision.INT8)
    reference = digits_ctx.pipeline.run(config, tmp_path / "in-process")
    save_outcome(reference, tmp_path / RESULT_NAME)
    assert_same_outcome(load_outcome(tmp_path / RESULT_NAME), reference)

    isolated = runner.run(config, tmp_path / "isolated")
    assert isinstance(isolated.evaluation.per_image, np.ndarray) and isolated.evaluation.per_image.dtype == bool
    assert np.array_equal(isolated.evaluation.per_image, reference.evaluation.per_image)
    clock_free = dataclasses.replace(
        isolated, deployable=reference.deployable, build=dataclasses.replace(isolated.build, artifact=reference.build.artifact,
        seconds=reference.build.seconds), latency=reference.latency, timings=reference.timings, paired=reference.paired,
        latency_record=reference.latency_record, timed=reference.timed,
        evaluation=dataclasses.replace(isolated.evaluation, timings=reference.evaluation.timings),
    )
    assert_same_outcome(clock_free, reference)
    assert type(isolated.paired) is type(reference.paired) and type(isolated.latency) is type(reference.latency)
    assert set(isolated.latency_record or {}) == set(reference.latency_record or {})


def test_hanging_build_is_killed_with_its_process_group(digits_ctx: StudyContext, runner: IsolatedTrialRunner, misbehaving_env: Path) -> None:
    misbehaving_env.write_text("hang")
    out = digits_ctx.trials_dir / "hang"
    with pytest.raises(TrialProcessError) as info:
        runner.run(digits_ctx.space.uniform(Precision.FP32), out)
    message = str(info.value)
    assert f"build timed out after {TIMEOUT:g} s (--build-timeout)" in message
    assert "builder: waiting for a lock that never comes" in message
    assert "\n" not in message
    grandchild = int((out / "grandchild.pid").read_text())
    # SIGKILL is delivered asynchronously: give a loaded machine a moment.
    assert _gone(runner.last_child_pid)  # type: ignore[arg-type]
    assert _gone(grandchild)  # the sleep the build started went with the group


def test_segfault_is_named(digits_ctx: StudyContext, runner: IsolatedTrialRunner, misbehaving_env: Path) -> None:
    misbehaving_env.write_text("segv")
    with pytest.raises(TrialProcessError, match=r"killed by SIGSEGV during build; stderr: .*builder: parsing layer 7"):
        runner.run(digits_ctx.space.uniform(Precision.FP32), digits_ctx.trials_dir / "segv")


def test_exit_code_is_named(digits_ctx: StudyContext, runner: IsolatedTrialRunner, misbehaving_env: Path) -> None:
    misbehaving_env.write_text("exit")
    with pytest.raises(TrialProcessError, match=r"exited with code 3 during build; stderr: builder: fatal error"):
        runner.run(digits_ctx.space.uniform(Precision.FP32), digits_ctx.trials_dir / "exit")


def test_hanging_evaluation_uses_the_eval_timeout(digits_ctx: StudyContext, runner: IsolatedTrialRunner, misbehaving_env: Path) -> None:
    misbehaving_env.write_text("hang-eval")
    with pytest.raises(TrialProcessError, match=rf"evaluate timed out after {TIMEOUT:g} s \(--eval-timeout\).*timing forever"):
        runner.run(digits_ctx.space.uniform(Precision.FP32), digits_ctx.trials_dir / "hang-eval")


def test_pipeline_error_keeps_its_message(digits_ctx: StudyContext, runner: IsolatedTrialRunner, misbehaving_env: Path) -> None:
    misbehaving_env.write_text("")
    config = digits_ctx.space.uniform(Precision.INT8)
    broken = digits_ctx.trials_dir / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "deployable.onnx").mkdir()  # the emitter cannot write its file: the pipeline raises
    with pytest.raises(TrialProcessError) as info:
        runner.run(config, broken)
    assert "deployable.onnx" in str(info.value)
    # The server survives a failed trial and runs the next one.
    misbehaving_env.write_text("")
    assert runner.run(config, digits_ctx.trials_dir / "after").evaluation.count == 400


def test_signal_reason_and_stderr_tail(tmp_path: Path) -> None:
    assert signal_reason(-11) == "killed by SIGSEGV"
    assert signal_reason(-9).startswith("killed by SIGKILL (likely out of memory")
    log = tmp_path / "stderr.log"
    log.write_text("".join(f"line {i}\n\n" for i in range(100)))
    assert stderr_tail(log) == "line 95 | line 96 | line 97 | line 98 | line 99"
    assert stderr_tail(tmp_path / "missing") == ""


@pytest.mark.parametrize(
    ("action", "reason"),
    [("hang@int8", f"build timed out after {TIMEOUT:g} s (--build-timeout)"), ("segv@int8", "killed by SIGSEGV during build")],
)
def test_study_completes_with_the_failed_trial_and_its_reason(
    tmp_path: Path, misbehaving_env: Path, action: str, reason: str
) -> None:
    misbehaving_env.write_text(action)
    out = tmp_path / "run"
    code = main([
        # --budget counts searched configurations: FP32 and INT8 baselines, then one searched trial.
        "run", "--example", "digits", "--budget", "1", "--out", str(out), "--latency-seconds", "0.05",
        "--sample-counts", "64", "--eval-limit", "300", "--build-timeout", str(TIMEOUT), "--seed", "3",
        "--sampler", "tpe", "--search", "full",  # the subject is one trial's failure, not the search's probes
    ])
    assert code == 0
    names = optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}")
    study = optuna.load_study(study_name=names[0], storage=f"sqlite:///{out / 'study.db'}")
    recs = [TrialRecord.from_trial(t) for t in study.trials]
    assert [r.state for r in recs] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert recs[1].baseline == "int8" and recs[1].error is not None and reason in recs[1].error
    assert recs[1].host and recs[1].device
    assert json.loads((out / "trials" / "0001" / "trial.json").read_text())["status"] == "failed"
    assert (out / "pareto.json").is_file() and (out / "report.md").is_file()


def test_a_hanging_probe_is_killed_at_its_deadline_which_names_both_flags(digits_ctx: StudyContext, misbehaving_env: Path) -> None:
    """A sensitivity probe builds and scores in one child, so its deadline is --build-timeout plus --eval-timeout,
    and the message names both: a user who raises only --build-timeout may still not give it enough."""
    from sensisearch.study.search._sensitivity import score_probe

    misbehaving_env.write_text("hang")
    inputs = dataclasses.replace(digits_ctx.sensitivity_inputs(), isolation=IsolationSettings(build_timeout=1.0, eval_timeout=1.5))
    with pytest.raises(TrialProcessError) as info:
        score_probe(inputs, digits_ctx.space.uniform(Precision.INT8), digits_ctx.out / "probe-hang")
    message = str(info.value)
    assert "probe timed out after 2.5 s (--build-timeout plus --eval-timeout)" in message
    assert "builder: waiting for a lock that never comes" in message
    assert not (digits_ctx.out / "probe-hang").exists()  # the killed child's build is removed


def test_a_probe_whose_build_segfaults_fails_that_probe_not_the_study(tmp_path: Path, misbehaving_env: Path) -> None:
    """The default guided search probes every layer before its trials, in this very process's worker.
    A builder that segfaults on all-INT8 must fail those probes (scored 0, named in sensitivity.json)
    and the all-INT8 trials, while the study runs on to a winner: this test process survives it."""
    misbehaving_env.write_text("segv@int8")
    out = tmp_path / "run"
    code = main([
        "run", "--example", "digits", "--budget", "8", "--out", str(out), "--latency-seconds", "0.05",
        "--sample-counts", "64", "--eval-limit", "300", "--build-timeout", str(TIMEOUT), "--seed", "3",
    ])
    assert code == 0
    profile = json.loads((out / "sensitivity.json").read_text())
    failed = profile["failed"]
    # Every all-INT8 probe (one per calibration algorithm) and nothing else: the other probes keep a layer in FP32.
    assert failed and all(f.startswith("all-int8 ") and "killed by SIGSEGV during probe" in f and "builder: parsing layer 7" in f
                          for f in failed), failed
    assert len(failed) >= len(profile["calibration_scores"]) and set(profile["calibration_scores"].values()) == {0.0}
    study = optuna.load_study(study_name=optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}")[0],
                              storage=f"sqlite:///{out / 'study.db'}")
    recs = [TrialRecord.from_trial(t) for t in study.trials]
    int8 = [r for r in recs if r.baseline == "int8"]
    assert int8 and all(r.state == "FAIL" and "killed by SIGSEGV" in (r.error or "") for r in int8)
    assert any(r.state == "COMPLETE" and r.baseline is None for r in recs), [(r.state, r.baseline, r.role, (r.error or "")[:60]) for r in recs]
    # The seeds whose probe failed were not queued: no searched trial repeats the all-INT8 crash.
    assert not any(r.seed and r.seed.startswith("all-int8") for r in recs)
    assert (out / "winner" / "config.json").is_file()


def test_fp32_reference_is_built_in_a_child_and_adopted(tmp_path: Path) -> None:
    """The trial server never builds an engine itself (a TensorRT build initialises CUDA, and a
    process that initialised CUDA must not fork): a forked child builds the FP32 reference, the
    server keeps its path, and the artifact is the same as one built in this process."""
    from sensisearch.study.run._trial_server import build_reference_in_child

    settings = merge_settings({}, {"example": "digits", "out": tmp_path / "run", "sample_counts": [64], "eval_limit": 100}, None)
    ctx = prepare(settings)
    builds: list[int] = []
    backend = ctx.pipeline.backend
    real_build = backend.build

    def recording_build(*args: object, **kwargs: object) -> object:
        builds.append(os.getpid())
        return real_build(*args, **kwargs)

    backend.build = recording_build  # type: ignore[method-assign]
    try:
        build_reference_in_child(ctx)
        adopted = ctx.pipeline.reference_artifact()  # must not build again here
        assert builds == [], "the server process built an engine"
        assert adopted.is_file() and adopted.parent == ctx.pipeline.reference_dir()
        backend.build = real_build  # type: ignore[method-assign]
        fresh = prepare(settings).pipeline
        try:
            assert fresh.reference_artifact().read_bytes() == adopted.read_bytes()
        finally:
            fresh.close()
    finally:
        backend.build = real_build  # type: ignore[method-assign]
        ctx.pipeline.close()
    assert not adopted.exists(), "the server owns the reference folder and deletes it on close"


def test_cuda_probe_in_a_subprocess_answers_like_the_direct_probe() -> None:
    from sensisearch.backends.tensorrt.flavor import probe_cuda_python, probe_cuda_python_isolated

    assert probe_cuda_python_isolated() == probe_cuda_python()
