"""The whole study, end to end, on the embedded CPU backend (real ORT, real Optuna storage)."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import onnx
import optuna
import pytest

from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
from sensisearch.cli import main
from sensisearch.evaluation.classification import ClassificationEvaluator
from sensisearch.evaluation.datasets import Preprocess, load_images
from sensisearch.examples import load_example
from sensisearch.study import TrialRecord
from sensisearch.study.run import finished_count

# Whole studies in subprocesses (minutes): left out of the quick lowest-versions CI run.
pytestmark = pytest.mark.slow


def _run(*args: str) -> int:
    # Trial counts are this file's subject: plain TPE, whose budget is all trials (the default guided
    # study takes its probes' share off it; tests/study/run/test_default_guided.py covers that).
    return main(["run", "--sampler", "tpe", "--search", "full", *args])


@pytest.fixture(scope="module")
def digits_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    code = _run(
        # --budget counts searched configurations; the FP32 and INT8 baselines come on top.
        "--example", "digits", "--budget", "4", "--out", str(out), "--latency-seconds", "0.2",
        "--sample-counts", "64,128", "--seed", "1", "--verify-seconds", "5",
    )
    assert code == 0
    return out


def test_study_writes_every_output(digits_study: Path) -> None:
    out = digits_study
    assert (out / "study.db").is_file()
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == 6
    for trial_dir in trials:
        record = json.loads((trial_dir / "trial.json").read_text())
        assert record["status"] in ("complete", "failed")
        if record["status"] == "complete":
            assert (trial_dir / "deployable.onnx").is_file()
            onnx.checker.check_model(onnx.load(str(trial_dir / "deployable.onnx")), full_check=True)
            assert Path(record["artifact"]).is_file()
            assert set(record["timings"]) >= {"thresholds", "emit", "build", "latency", "evaluate"}
            assert record["latency"]["runs"] >= 30
    baselines = [json.loads((t / "trial.json").read_text())["baseline"] for t in trials[:2]]
    assert baselines == ["fp32", "int8"]
    front = json.loads((out / "pareto.json").read_text())
    # How many trials the front holds depends on the measured speeds; that its members do not dominate
    # one another does not. The front ranks the verified figure once verify ran (the in-study one stays in
    # "latency" beside it, and may order two members the other way).
    for p in front:
        assert p["median_ms"] == (p["latency"]["verified"]["median_ms"] if p["verified"] else p["latency"]["median_ms"])
    points = [(p["value"], p["median_ms"]) for p in front]
    assert points and len(set(points)) == len(points)
    for a in points:
        assert not any(b != a and b[0] >= a[0] and b[1] <= a[1] for b in points), f"{a} is dominated within the front"
    with (out / "pareto.csv").open() as f:
        assert [int(row["trial"]) for row in csv.DictReader(f)] == [p["number"] for p in front]
    report = (out / "report.md").read_text()
    for heading in ("## Baselines", "## Pareto front", "## Winner", "## What each precision choice did"):
        assert heading in report


def test_all_int8_baseline_runs_integer_kernels(digits_study: Path) -> None:
    """Every INT8 layer of the bundled example really runs an integer kernel in ONNX Runtime.

    (Its speed-up over FP32 is a benchmark figure, printed by benchmarks/study_phases.py
    and the report, not asserted here.)"""
    int8 = json.loads((digits_study / "trials" / "0001" / "trial.json").read_text())
    fp32 = json.loads((digits_study / "trials" / "0000" / "trial.json").read_text())
    layers = len(int8["config"]["precisions"])
    assert int8["build"]["layer_precisions"]["int8"] == layers
    assert fp32["build"]["layer_precisions"]["int8"] == 0



def test_report_speed_verdict_follows_the_recorded_baseline_latencies(digits_study: Path) -> None:
    """The report's INT8 verdict is the one the stored paired speed-up implies: faster only when the
    lower bound of all-INT8's (verified) speed-up CI exceeds 1."""
    from sensisearch.study.store._results import baseline, records

    study = optuna.load_study(study_name="digits_resnet", storage=f"sqlite:///{digits_study / 'study.db'}")
    fp32_trial = next(t for t in study.trials if t.user_attrs.get("baseline") == "fp32")
    # Optuna's own second objective is the in-study drift-free median.
    assert fp32_trial.values[1] == fp32_trial.user_attrs["latency"]["median_ms"]
    int8 = baseline(records(study), "int8")
    assert int8.is_verified  # the verify tournament ran after the last trial
    report = (digits_study / "report.md").read_text()
    lo, hi = int8.speedup_ci95
    if lo > 1.0:
        assert f"All-INT8 runs {int8.speedup:.2f}x (95% CI {lo:.2f}-{hi:.2f}, verified) faster than FP32" in report
        assert "INT8 brings no" not in report
    else:
        assert f"all-INT8 runs at {int8.speedup:.2f}x (95% CI {lo:.2f}-{hi:.2f}, verified)" in report
        assert "All-INT8 runs" not in report


def test_winner_re_evaluated_from_disk_gives_recorded_accuracy(digits_study: Path) -> None:
    config = json.loads((digits_study / "winner" / "config.json").read_text())
    example = load_example("digits")
    assert config["model"]["sha256"] == __import__("hashlib").sha256(example.model.read_bytes()).hexdigest()
    backend = OnnxRuntimeBackend()
    artifact = digits_study / "winner" / config["files"]["artifact"]
    deployable = digits_study / "winner" / config["files"]["deployable_onnx"]
    with backend.load(artifact) as runner:
        data = load_images(example.eval_data, runner.inputs[0], "--eval-data")
        evaluator = ClassificationEvaluator(data, Preprocess(tuple(example.mean), tuple(example.std)), runner.inputs[0].name)
        assert evaluator.evaluate(runner).value == pytest.approx(config["value"], abs=1e-9)
    # The portable deployable ONNX, rebuilt from scratch, scores the same.
    rebuilt = backend.build(deployable, digits_study / "rebuilt")
    with backend.load(rebuilt.artifact) as runner:
        assert evaluator.evaluate(runner).value == pytest.approx(config["value"], abs=1e-9)
    # `sensisearch build --config` remakes it from config.json alone (recorded model + ranges).
    out = digits_study / "from_config.onnx"
    assert main(["build", "--config", str(digits_study / "winner" / "config.json"), "--out", str(out)]) == 0
    with backend.load(out) as runner:
        assert evaluator.evaluate(runner).value == pytest.approx(config["value"], abs=1e-9)


def test_rerun_with_larger_budget_resumes(digits_study: Path) -> None:
    storage = f"sqlite:///{digits_study / 'study.db'}"
    before = optuna.load_study(study_name="digits_resnet", storage=storage)
    finished_before = {t.number: t.datetime_complete for t in before.trials if t.state.is_finished()}
    assert _run("--example", "digits", "--budget", "6", "--out", str(digits_study), "--latency-seconds", "0.2",
                "--sample-counts", "64,128", "--seed", "1", "--verify-seconds", "5") == 0
    after = optuna.load_study(study_name="digits_resnet", storage=storage)
    assert finished_count(after) == 6  # distinct searched configurations; baselines and repeats on top
    trials_after = len(after.trials)
    for number, completed in finished_before.items():
        assert after.trials[number].datetime_complete == completed  # not rerun
    # Same budget again: nothing new runs.
    assert _run("--example", "digits", "--budget", "6", "--out", str(digits_study), "--latency-seconds", "0.2",
                "--sample-counts", "64,128", "--seed", "1", "--verify-seconds", "5") == 0
    assert len(optuna.load_study(study_name="digits_resnet", storage=storage).trials) == trials_after


def load_example_spec(mnist_dir: Path):  # noqa: ANN201 - the MNIST model's input spec
    from sensisearch.model.analysis import analyze_model

    return analyze_model(mnist_dir / "mnist_cnn.onnx")[0].inputs[0]


def test_mnist_short_study_produces_front(mnist_dir: Path, tmp_path: Path) -> None:
    """A real model someone else trained, with real MNIST digits (first 1000 for speed)."""
    out = tmp_path / "mnist"
    code = _run(
        "--model", str(mnist_dir / "mnist_cnn.onnx"), "--eval-data", str(mnist_dir), "--calib-data", str(mnist_dir),
        "--mean", "0.5", "--std", "0.5", "--budget", "4", "--out", str(out), "--eval-limit", "1000",
        "--calib-limit", "256", "--sample-counts", "128,256", "--latency-seconds", "0.2", "--compare-ort-quantizer",
    )
    assert code == 0
    front = json.loads((out / "pareto.json").read_text())
    assert len(front) >= 1
    # ONNX Runtime's own quantizer, scored beside the front on the same data.
    references = json.loads((out / "references.json").read_text())
    assert [r["name"] for r in references] == ["ort-quantize_static minmax", "ort-quantize_static percentile 99.99"]
    backend = OnnxRuntimeBackend()
    data = load_images(mnist_dir, load_example_spec(mnist_dir), "--eval-data")
    evaluator = ClassificationEvaluator(
        dataclasses.replace(data, images=data.images[:1000], labels=data.labels[:1000]), Preprocess((0.5,), (0.5,)), "input"
    )
    for ref in references:
        build = backend.build(Path(ref["deployable_onnx"]), tmp_path / "check")
        with backend.load(build.artifact) as runner:
            assert evaluator.evaluate(runner).value == pytest.approx(ref["value"], abs=1e-9)
    assert "ort-quantize_static minmax" in (out / "report.md").read_text()
    fp32 = json.loads((out / "trials" / "0000" / "trial.json").read_text())
    assert fp32["baseline"] == "fp32"
    # Cross-check against the full-set reference: the first 1000 dev images are a subset.
    assert fp32["evaluation"]["value"] > 98.0


FAILING_EVALUATOR = '''
import numpy as np

from pathlib import Path

# A file, not a module global: each trial runs in its own child process.
CALLS = Path("calls.txt")


def score(runner):
    """Agreement of the model's argmax with itself on fixed inputs; fails on the 2nd call."""
    n = (int(CALLS.read_text()) if CALLS.is_file() else 0) + 1
    CALLS.write_text(str(n))
    if n == 2:
        raise ValueError("evaluator exploded on purpose")
    x = np.random.default_rng(0).normal(size=(8, 1, 32, 32)).astype(np.float32)
    logits = runner.run({runner.inputs[0].name: x})[0]
    return {"confidence": float(np.max(logits, axis=1).mean())}
'''


def test_failed_trial_is_recorded_and_study_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's evaluator that raises: that trial is FAILED with its reason, the others complete."""
    (tmp_path / "failing_eval.py").write_text(FAILING_EVALUATOR)
    monkeypatch.chdir(tmp_path)
    example = load_example("digits")
    out = tmp_path / "out"
    code = _run("--model", str(example.model), "--calib-data", str(example.calib_data), "--mean", "0.5", "--std", "0.5",
                "--evaluator", "failing_eval:score", "--budget", "1", "--out", str(out), "--latency-seconds", "0.1",
                "--sample-counts", "64")
    assert code == 0
    study = optuna.load_study(study_name="digits_resnet", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    failed = json.loads((out / "trials" / "0001" / "trial.json").read_text())
    assert failed["status"] == "failed" and "evaluator exploded on purpose" in failed["error"]
    assert "trial 1: ValueError: evaluator exploded on purpose" in (out / "report.md").read_text()


def test_kill_9_and_resume_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL the worker in the middle of a trial; the re-run fails that trial by its stale
    heartbeat, re-queues its configuration, and finishes the budget with every trial kept."""
    import os
    import signal
    import time

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "sensisearch", "run", "--example", "digits", "--budget", "5", "--out", str(out),
            "--latency-seconds", "1.5", "--sample-counts", "64", "--heartbeat-seconds", "1",
            "--sampler", "tpe", "--search", "full"]  # counts trials against --budget, which the guided default shares with its probes
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # Wait until trial 2 is running (two trials finished), then kill -9.
    while time.monotonic() < deadline and not (out / "trials" / "0002").exists():
        time.sleep(0.05)
    assert (out / "trials" / "0002").exists(), "study did not reach trial 2"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    storage = f"sqlite:///{out / 'study.db'}"
    before = optuna.load_study(study_name="digits_resnet", storage=storage)
    assert before.trials[2].state == optuna.trial.TrialState.RUNNING
    kept = {t.number: t.values for t in before.trials if t.state == optuna.trial.TrialState.COMPLETE}
    time.sleep(2.5)  # past the grace period (2 x heartbeat)
    assert subprocess.run(args, capture_output=True, timeout=300).returncode == 0
    after = optuna.load_study(study_name="digits_resnet", storage=storage)
    assert after.trials[2].state == optuna.trial.TrialState.FAIL
    complete = [t for t in after.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # the killed trial does not use up budget: 2 baselines + 5 searched, none a repeat
    assert len([t for t in complete if TrialRecord.from_trial(t).role == "evaluate"]) == 7
    for number, values in kept.items():
        assert after.trials[number].values == values
    # The killed configuration was queued again and ran.
    retried = [t for t in after.trials if t.system_attrs.get("failed_trial") == 2]
    assert retried and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == before.trials[2].params


def test_winner_rebuilds_as_tensorrt_plan_from_config_alone(digits_study: Path, tmp_path: Path) -> None:
    """The user flow of remaking the winner for the GPU: `sensisearch build --config winner/config.json
    --backend tensorrt-rtx` builds a .plan on this CPU (TensorRT-RTX builds ahead of time)."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install -e '.[tensorrt-rtx]')")
    plan = tmp_path / "winner.plan"
    config = json.loads((digits_study / "winner" / "config.json").read_text())
    assert main(["build", "--config", str(digits_study / "winner" / "config.json"), "--backend", "tensorrt-rtx",
                 "--out", str(plan)]) == 0
    assert plan.is_file() and plan.stat().st_size > 0
    sidecar = json.loads(plan.with_name(plan.name + ".json").read_text())
    assert sidecar["onnx"]["sha256"] and sidecar["trial_config"] == config["config"]
    # The network TensorRT parsed has exactly the configuration's precision on every layer.
    assert sidecar["network_precisions"] == config["config"]["precisions"]
    assert not sidecar["precision_problems"]
