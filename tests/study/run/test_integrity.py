"""Issue 9: a study is one experiment — nothing overwritten, mixed or repeated; every bad input one clear line.

Real parts throughout: the CLI in subprocesses, real ONNX Runtime, a real SQLite
Optuna storage shared by two processes, real signals (SIGTERM, kill -9).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import optuna
import pytest
from onnx import TensorProto, helper

from conftest import shared_data_dir

from sensisearch.examples import load_example
from sensisearch.onnx_compat import make_model
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
from sensisearch.study import TrialRecord, effective_config_key
from sensisearch.study.search._budget import (
    DUPLICATE,
    EVALUATE,
    OVER_BUDGET,
    WAIT,
    TrialSeededSampler,
    TrialView,
    counted_trials,
    decide,
)

SHARED = shared_data_dir()
# Plain TPE: these tests count trials against --budget, which the default guided study shares with its probes.
PLAIN_TPE = ["--sampler", "tpe", "--search", "full"]
FAST = ["--latency-seconds", "0.05", "--sample-counts", "64", *PLAIN_TPE]


def _cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sensisearch", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def _popen(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sensisearch", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "COLUMNS": "200"},
    )


def _trials(out: Path, name: str = "digits_resnet") -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials(deepcopy=False)


def _records(out: Path) -> list[TrialRecord]:
    return [TrialRecord.from_trial(t) for t in _trials(out)]


# ---------------------------------------------------------------------------- the budget rule (pure)

def _v(number: int, state: str, key: str | None, role: str | None, baseline: bool = False, own_error: bool = False) -> TrialView:
    return TrialView(number, state, key, role, baseline, own_error)


@pytest.mark.parametrize(
    ("trials", "number", "key", "baseline", "budget", "expected"),
    [
        # nothing before it: evaluate
        ([], 0, "a", False, 1, (EVALUATE, None)),
        # same key evaluated and complete: duplicate of it
        ([_v(0, "COMPLETE", "a", EVALUATE)], 1, "a", False, 5, (DUPLICATE, 0)),
        # same key still evaluating: wait for its values
        ([_v(0, "RUNNING", "a", EVALUATE)], 1, "a", False, 5, (WAIT, 0)),
        # a lower trial has not decided yet: wait, whatever its key
        ([_v(0, "RUNNING", None, None)], 1, "b", False, 5, (WAIT, 0)),
        # a higher-numbered undecided trial is never waited for (no cycles)
        ([_v(2, "RUNNING", None, None)], 1, "b", False, 5, (EVALUATE, None)),
        # a repeat of a baseline's configuration is a duplicate too
        ([_v(0, "COMPLETE", "int8", EVALUATE, baseline=True)], 3, "int8", False, 5, (DUPLICATE, 0)),
        # baselines do not count: budget 1 with two baselines done still evaluates one searched trial
        ([_v(0, "COMPLETE", "f", EVALUATE, True), _v(1, "COMPLETE", "i", EVALUATE, True)], 2, "x", False, 1, (EVALUATE, None)),
        # budget taken by lower trials, including one in flight: over budget
        ([_v(0, "COMPLETE", "x", EVALUATE), _v(1, "RUNNING", "y", EVALUATE)], 2, "z", False, 2, (OVER_BUDGET, None)),
        # a baseline is never over budget
        ([_v(0, "COMPLETE", "x", EVALUATE), _v(1, "COMPLETE", "y", EVALUATE)], 2, "f", True, 1, (EVALUATE, None)),
        # duplicates, over-budget and interrupted trials do not count; a failure of its own does
        ([_v(0, "COMPLETE", "x", DUPLICATE), _v(1, "PRUNED", "y", OVER_BUDGET), _v(2, "FAIL", "w", EVALUATE)], 3, "z", False, 1, (EVALUATE, None)),
        ([_v(0, "FAIL", "w", EVALUATE, own_error=True)], 1, "z", False, 1, (OVER_BUDGET, None)),
        # the configuration of an interrupted trial (failed, re-queued) is evaluated again
        ([_v(0, "FAIL", "w", EVALUATE)], 1, "w", False, 3, (EVALUATE, None)),
    ],
)
def test_decide(trials: list[TrialView], number: int, key: str, baseline: bool, budget: int, expected: tuple[str, int | None]) -> None:
    decision = decide(number, key, baseline, trials, budget)
    assert (decision.action, decision.of) == expected


def test_counted_trials_count_only_finished_distinct_searched_configurations() -> None:
    trials = [
        _v(0, "COMPLETE", "f", EVALUATE, baseline=True), _v(1, "COMPLETE", "a", EVALUATE), _v(2, "COMPLETE", "a", DUPLICATE),
        _v(3, "FAIL", "b", EVALUATE, own_error=True), _v(4, "FAIL", "c", EVALUATE), _v(5, "RUNNING", "d", EVALUATE),
        _v(6, "PRUNED", "e", OVER_BUDGET),
    ]
    assert counted_trials(trials) == 2


def test_effective_key_ignores_what_does_not_change_the_model() -> None:
    layers = {"a": Precision.INT8, "b": Precision.FP32}
    minmax = effective_config_key(TrialConfig(layers, CalibrationChoice(CalibrationAlgorithm.MINMAX, 64, 99.9)))
    assert minmax == effective_config_key(TrialConfig(layers, CalibrationChoice(CalibrationAlgorithm.MINMAX, 64, 99.999)))
    pct = CalibrationAlgorithm.PERCENTILE
    assert effective_config_key(TrialConfig(layers, CalibrationChoice(pct, 64, 99.9))) != effective_config_key(
        TrialConfig(layers, CalibrationChoice(pct, 64, 99.999))
    )


# ---------------------------------------------------------------------------- resumed sampler

def _proposals(sampler_factory, tmp_path: Path, name: str) -> tuple[list[tuple], list[tuple]]:
    url = f"sqlite:///{tmp_path / (name + '.db')}"

    def objective(trial: optuna.Trial) -> float:
        return sum(trial.suggest_categorical(f"x{i}", [0, 1, 2, 3]) for i in range(6))

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    first = optuna.create_study(study_name=name, storage=url, sampler=sampler_factory())
    first.optimize(objective, n_trials=5)
    # A new process resumes: a new sampler object with the same seed.
    resumed = optuna.load_study(study_name=name, storage=url, sampler=sampler_factory())
    resumed.optimize(objective, n_trials=5)
    params = [tuple(sorted(t.params.items())) for t in resumed.trials]
    return params[:5], params[5:]


def test_resumed_study_does_not_replay_the_first_run(tmp_path: Path) -> None:
    # The reference: Optuna's TPE seeded once replays its start-up proposals after a resume.
    before, after = _proposals(lambda: optuna.samplers.TPESampler(seed=0), tmp_path, "plain")
    assert before == after
    before, after = _proposals(lambda: TrialSeededSampler(0), tmp_path, "seeded")
    assert not set(before) & set(after)
    # and one worker's study stays reproducible
    again_before, _ = _proposals(lambda: TrialSeededSampler(0), tmp_path, "seeded2")
    assert again_before == before


# ---------------------------------------------------------------------------- bad inputs, table-driven

def _image_output_model(path: Path) -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 3, 3], np.full(9, 0.1, np.float32).tolist())
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 32, 32])], [w],
    )
    onnx.save(make_model(graph, opset=13), path)
    return path


def _bad_inputs(tmp: Path) -> list[tuple[str, list[str], str, tuple[str, ...]]]:
    """(case, argv, text the error line must name, texts that must not appear anywhere)."""
    example = load_example("digits")
    digits = ["run", "--example", "digits", *FAST]
    toml = {}
    for key, value in [("budget_float", "budget = 2.5"), ("budget_text", 'budget = "ten"'),
                       ("counts_scalar", "sample_counts = 128"), ("drop_text", 'max_drop = "1.0"')]:
        toml[key] = tmp / f"{key}.toml"
        toml[key].write_text(f'example = "digits"\n{value}\n')
    (tmp / "a_file").write_text("not a folder")
    (tmp / "evals.py").write_text(
        "def nan(runner):\n    return float('nan')\n"
        "def text(runner):\n    return 'good'\n"
        "def boom(runner):\n    raise RuntimeError('evaluator exploded')\n"
    )
    custom = ["run", "--model", str(example.model), "--calib-data", str(example.calib_data), *FAST, "--budget", "2"]
    cases = [
        ("std 0", [*digits, "--std", "0"], "--std", ()),
        ("eval-limit negative", [*digits, "--eval-limit", "-1990"], "--eval-limit", ()),
        ("eval-limit 0", [*digits, "--eval-limit", "0"], "--eval-limit", ()),
        ("latency-seconds -1", [*digits, "--latency-seconds", "-1"], "--latency-seconds", ()),
        ("iou 2", [*digits, "--iou", "2"], "--iou", ()),
        ("max-class-drop on a classifier", [*digits, "--max-class-drop", "2"], "--max-class-drop", ()),
        ("precisions fp32 only", [*digits, "--precisions", "fp32"], "--precisions", ()),
        ("heartbeat 0", [*digits, "--heartbeat-seconds", "0"], "--heartbeat-seconds", ()),
        ("toml budget 2.5", ["run", str(toml["budget_float"])], "budget", ()),
        ("toml budget text", ["run", str(toml["budget_text"])], "budget", ()),
        ("toml sample_counts scalar", ["run", str(toml["counts_scalar"])], "sample_counts", ()),
        ("toml max_drop text", ["run", str(toml["drop_text"])], "max_drop", ()),
        ("sqlite in a missing folder", [*digits, "--storage", f"sqlite:///{tmp}/no/such/dir/s.db"], "--storage", ()),
        ("storage not a url", [*digits, "--storage", "notaurl"], "--storage", ()),
        ("postgres refused", [*digits, "--storage", "postgresql://u:secretpw@127.0.0.1:1/db"], "--storage", ("secretpw",)),
        ("postgres+psycopg2 refused", [*digits, "--storage", "postgresql+psycopg2://u:secretpw@127.0.0.1:1/db"], "--storage", ("secretpw",)),
        ("mysql refused", [*digits, "--storage", "mysql://u:secretpw@127.0.0.1:1/db"], "--storage", ("secretpw",)),
        ("out is a file", [*digits, "--out", str(tmp / "a_file")], "--out", ()),
        ("evaluate an image-output model", ["evaluate", "--model", str(_image_output_model(tmp / "img.onnx")),
                                            "--eval-data", str(example.eval_data)], "--model", ()),
        ("evaluator returns NaN", [*custom, "--evaluator", "evals:nan"], "FP32 reference", ()),
        ("evaluator returns text", [*custom, "--evaluator", "evals:text"], "FP32 reference", ()),
        ("evaluator raises", [*custom, "--evaluator", "evals:boom"], "FP32 reference", ()),
    ]
    yolo = SHARED / "yolov5n.onnx"
    if yolo.is_file():
        images = SHARED / "coco-dev" / "images"
        cases.append(("yolo as a classifier", ["run", "--model", str(yolo), "--task", "classification",
                                               "--eval-data", str(images if images.is_dir() else SHARED / "coco-dev"), *FAST], "--model", ()))
    if os.geteuid() != 0:  # root writes anywhere
        readonly = tmp / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
        cases.append(("read-only out", [*digits, "--out", str(readonly / "out")], "--out", ()))
    return cases


@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_every_bad_input_is_one_line_and_nonzero(tmp_path: Path) -> None:
    failures = []
    for case, argv, must_name, secrets in _bad_inputs(tmp_path):
        if argv[0] == "run" and "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "out" / case.replace(" ", "_"))]
        result = _cli(*argv, cwd=tmp_path)
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        problems = []
        if result.returncode == 0:
            problems.append("exit 0")
        if "Traceback" in result.stderr or len(error_lines) != 1:
            problems.append("not exactly one error line / traceback")
        elif must_name not in error_lines[0]:
            problems.append(f"error does not name {must_name}")
        if any(s in result.stderr + result.stdout for s in secrets):
            problems.append("secret printed")
        if problems:
            failures.append(f"{case}: {problems}: {result.stderr[-600:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_build_refuses_a_config_missing_a_layer_or_with_an_unknown_precision(tmp_path: Path) -> None:
    out = tmp_path / "study"
    ok = _cli("run", "--example", "digits", "--budget", "1", "--out", str(out), *FAST, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    data = json.loads((out / "trials" / "0001" / "trial.json").read_text())
    layers = sorted(data["config"]["precisions"])
    missing = json.loads(json.dumps(data))
    del missing["config"]["precisions"][layers[0]]
    int4 = json.loads(json.dumps(data))
    int4["config"]["precisions"][layers[0]] = "int4"
    for name, config, must_name in (("missing", missing, layers[0]), ("int4", int4, "int4")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        result = _cli("build", "--config", str(path), "--backend", "onnxruntime", "--out", str(tmp_path / f"{name}.onnx"), cwd=tmp_path)
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode != 0 and len(error_lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "--config" in error_lines[0] and must_name in error_lines[0], error_lines
        assert not (tmp_path / f"{name}.onnx").exists()


# ---------------------------------------------------------------------------- one study per --out

def _hashes(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and "cache" not in p.parts
    }


@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_second_model_into_an_existing_out_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "study"
    first = _cli("run", "--example", "digits", "--budget", "2", "--out", str(out), *FAST, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = _hashes(out)
    assert {"study.json", "pareto.json", "report.md", "winner/config.json", "trials/0000/trial.json"} <= set(before)
    mnist = next((SHARED / "mnist").glob("*.onnx"), None) if (SHARED / "mnist").is_dir() else None
    other = mnist or _image_output_model(tmp_path / "other.onnx")
    for extra in ([], ["--study-name", "digits_resnet"]):  # also when the study name is forced to match
        second = _cli("run", "--model", str(other), "--example", "digits", "--budget", "2", "--out", str(out), *extra, *FAST, cwd=tmp_path)
        error_lines = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode != 0 and len(error_lines) == 1 and "--out" in error_lines[0], second.stderr
        assert _hashes(out) == before


@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_resume_with_other_evaluation_data_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "study"
    assert _cli("run", "--example", "digits", "--budget", "1", "--out", str(out), *FAST, cwd=tmp_path).returncode == 0
    before = _hashes(out)
    shared_storage = ["--storage", f"sqlite:///{out / 'study.db'}"]
    for argv, must_name in (
        (["--out", str(out), "--eval-limit", "200"], "--eval-data"),
        # another --out on the same storage and study: the identity stored in the study refuses it
        (["--out", str(tmp_path / "elsewhere"), "--eval-limit", "200", *shared_storage], "--eval-data"),
    ):
        result = _cli("run", "--example", "digits", "--budget", "3", *argv, *FAST, cwd=tmp_path)
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode != 0 and len(error_lines) == 1 and must_name in error_lines[0], result.stderr
    assert _hashes(out) == before


# ---------------------------------------------------------------------------- baselines survive kill -9

@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
@pytest.mark.parametrize(("baseline_trial", "name"), [(0, "fp32"), (1, "int8")])
def test_kill_during_a_baseline_then_rerun_completes_both_baselines(tmp_path: Path, baseline_trial: int, name: str) -> None:
    out = tmp_path / "study"
    # Long timing makes each trial last seconds, so the kill lands inside the baseline: paired timing
    # stops at its CI target, so ask for a width it cannot reach before the 4 s cap.
    argv = ["run", "--example", "digits", "--budget", "2", "--out", str(out), "--sample-counts", "64", *PLAIN_TPE,
            "--heartbeat-seconds", "1", "--latency-seconds", "4", "--timing-target-ci", "0.0001"]
    proc = _popen(*argv, cwd=tmp_path)
    deadline = time.monotonic() + 300
    target = out / "trials" / f"{baseline_trial:04d}"
    while not target.is_dir() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    killed = [(r.number, r.state, r.role) for r in _records(out) if r.baseline == name]
    # really killed inside the baseline
    assert killed and all(state == "RUNNING" for _, state, _ in killed), (killed, proc.returncode, err[-2000:])
    rerun = _cli("run", "--example", "digits", "--budget", "2", "--out", str(out), "--sample-counts", "64", *PLAIN_TPE,
                 "--heartbeat-seconds", "1", "--latency-seconds", "0.05", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    records = _records(out)
    for baseline in ("fp32", "int8"):
        assert any(r.baseline == baseline and r.state == "COMPLETE" and r.role == EVALUATE for r in records), baseline
    assert not any(r.state == "RUNNING" for r in records)
    assert counted_trials([_view(r) for r in records]) == 2


def _view(r: TrialRecord) -> TrialView:
    return TrialView(r.number, r.state, r.config_key, r.role, r.baseline is not None, r.error is not None)


# ---------------------------------------------------------------------------- two workers, one storage

@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_two_processes_on_one_storage_evaluate_exactly_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "study"
    argv = ["run", "--example", "digits", "--budget", "12", "--out", str(out), *FAST,
            # a small space makes repeated proposals likely, so the rule is exercised
            "--algorithms", "minmax,percentile", "--percentiles", "99.9,99.99"]
    # Output to files, not pipes: a worker waits for a baseline the other runs, so reading one
    # worker's pipe to the end while the other's fills up would deadlock the test itself.
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with log.open("w") as fh:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sensisearch", *argv], cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT,
                text=True, env={**os.environ, "COLUMNS": "200"},
            ))
    for p, log in zip(procs, logs):
        p.wait(timeout=900)
        err = log.read_text()
        assert p.returncode == 0, err
        assert "Traceback" not in err
    records = _records(out)
    searched = [r for r in records if r.baseline is None and r.role == EVALUATE and r.state in ("COMPLETE", "FAIL")]
    assert len(searched) == 12
    evaluated_keys = [r.config_key for r in records if r.role == EVALUATE and r.state in ("COMPLETE", "FAIL")]
    assert len(evaluated_keys) == len(set(evaluated_keys)), "a configuration was evaluated twice"
    # the keys recorded are the configurations' own keys (independent recomputation)
    for r in records:
        if r.role == EVALUATE and r.config is not None:
            assert r.config_key == effective_config_key(r.config)
    for r in records:
        if r.role == DUPLICATE:
            original = records[r.duplicate_of]
            assert original.config_key == r.config_key and original.number < r.number
            if original.state == "COMPLETE":
                assert r.value == original.value
    assert not any(r.state == "RUNNING" for r in records)
    assert {r.baseline for r in records if r.state == "COMPLETE"} >= {"fp32", "int8"}


# ---------------------------------------------------------------------------- signals

@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_sigterm_marks_the_trial_failed_requeues_it_and_exits_nonzero(tmp_path: Path) -> None:
    out = tmp_path / "study"
    argv = ["run", "--example", "digits", "--budget", "2", "--out", str(out), "--sample-counts", "64", *PLAIN_TPE, "--latency-seconds", "3"]
    proc = _popen(*argv, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not (out / "trials" / "0000").is_dir() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    trials = _trials(out)
    assert not any(t.state.name == "RUNNING" for t in trials)
    interrupted = [t for t in trials if TrialRecord.from_trial(t).role == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0].state.name == "FAIL"
    waiting = [t for t in trials if t.state.name == "WAITING" and TrialRecord.from_trial(t).baseline == "fp32"]
    assert waiting, "the interrupted baseline was not queued again"
    rerun = _cli("run", "--example", "digits", "--budget", "2", "--out", str(out), *FAST, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert any(r.baseline == "fp32" and r.state == "COMPLETE" for r in _records(out))


def test_sigterm_while_waiting_for_the_budget_decision_requeues_the_trial(tmp_path: Path) -> None:
    """A searched trial waits while a lower-numbered trial of another worker runs; a SIGTERM
    during that wait fails it as interrupted (not counted) and queues its parameters again."""
    out = tmp_path / "study"
    first = _cli("run", "--example", "digits", "--budget", "1", "--out", str(out), *FAST, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    study = optuna.load_study(study_name="digits_resnet", storage=f"sqlite:///{out / 'study.db'}")
    other_worker = study.ask()  # RUNNING, no heartbeat yet, no role: every later trial waits for it
    proc = _popen("run", "--example", "digits", "--budget", "3", "--out", str(out), *FAST, cwd=tmp_path)
    deadline = time.monotonic() + 300
    waiting_trial = None
    while waiting_trial is None and time.monotonic() < deadline and proc.poll() is None:
        waiting_trial = next(
            (t for t in _trials(out) if t.number > other_worker.number and t.state.name == "RUNNING"
             and TrialRecord.from_trial(t).config_key is not None), None,
        )
        time.sleep(0.2)
    assert waiting_trial is not None, "no trial started waiting for the other worker's trial"
    time.sleep(1.0)  # inside await_decision's wait loop
    proc.send_signal(signal.SIGTERM)
    # One signal is enough: it sets a flag the wait loop checks, so it cannot be lost in a finalizer.
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    trials = {t.number: t for t in _trials(out)}
    interrupted = trials[waiting_trial.number]
    assert interrupted.state.name == "FAIL" and TrialRecord.from_trial(interrupted).role == "interrupted"
    requeued = [t for t in trials.values() if t.state.name == "WAITING" and t.number > interrupted.number]
    # an enqueued trial holds its parameters as Optuna's "fixed_params" until it runs
    assert any(t.system_attrs.get("fixed_params") == interrupted.params for t in requeued), (
        "the interrupted trial's parameters were not queued again"
    )
    assert trials[other_worker.number].state.name == "RUNNING"  # another worker's trial is not touched
