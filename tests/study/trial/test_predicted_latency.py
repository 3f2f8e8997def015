"""Issue 10: trial latency predicted away from the target; stage 2 ``verify --backend``; the honest verdict."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from scipy.stats import spearmanr

from sensisearch.cli import main
from sensisearch.latency import ESTIMATE_LABEL, PRECISION_COST, MacEstimate
from sensisearch.model.analysis import analyze_model
from sensisearch.study.trial._predicted import partial_int8_verdict
from sensisearch.quantize.config import Precision, TrialConfig
from sensisearch.study.store._record import TrialRecord
from sensisearch.study.store._timing import PairedTiming
from sensisearch.study.store._results import choose_winner
from sensisearch.study.review._report import int8_speed_verdict

STUDY = "digits_resnet"


def _run_tensorrt_profile_study(out: Path) -> optuna.Study:
    assert main([
        "run", "--example", "digits", "--out", str(out), "--budget", "3", "--backend", "onnxruntime", "--profile", "tensorrt",
        "--sample-counts", "128", "--eval-limit", "300",
    ]) == 0
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")


def test_tensorrt_profile_study_predicts_latency_and_verify_measures_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    study = _run_tensorrt_profile_study(out)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 4  # FP32, all-INT8 and the searched ones

    # Every trial's latency is the MAC estimate of its own configuration, computed here independently; nothing was timed.
    info, model = analyze_model(Path(study.user_attrs["model_path"]))
    estimate = MacEstimate.for_model(model, info)
    for t in complete:
        original = t.user_attrs.get("duplicate_of")
        if original is not None:  # a repeated proposal is not built again: it takes the first one's figures
            assert t.values == study.trials[original].values
            continue
        latency = t.user_attrs["latency"]
        precisions = json.loads((out / "trials" / f"{t.number:04d}" / "trial.json").read_text())["config"]["precisions"]
        assert latency["source"] == "estimate" and latency["label"] == ESTIMATE_LABEL
        assert latency["speedup"] == pytest.approx(estimate.speedup(precisions), rel=1e-9)
        assert t.values[1] == pytest.approx(1.0 / estimate.speedup(precisions), rel=1e-9)  # the objective: cost, FP32 = 1
        assert "paired" not in t.user_attrs  # no paired timing
    int8 = next(t for t in complete if t.user_attrs.get("baseline") == "int8")
    # Every layer INT8: the FP32 weight over the INT8 weight per MAC (the published ratios, see latency/_estimate.py).
    assert int8.user_attrs["latency"]["speedup"] == pytest.approx(PRECISION_COST[Precision.FP32] / PRECISION_COST[Precision.INT8])

    report = (out / "report.md").read_text()
    assert ESTIMATE_LABEL in report and "relative cost estimate" in report and "8.00x" not in report
    assert "paired with FP32" not in report  # the paired-timing wording never describes a predicted figure
    assert "predicted, not measured" in report  # the winner and the verdict say their speed is unverified
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto and all(p["speedup_source"] == "estimate" and p["speedup_ci95"] is None for p in pareto)
    assert "verified_trials" not in study.user_attrs  # the automatic tournament was skipped: this CPU is not the target

    # Stage 2, from the settings stored in the study (settings.json is gone).
    (out / "settings.json").unlink()
    result = subprocess.run(
        # --force: verify refuses a busy machine (test_verified_answer checks that); the rank check runs anywhere.
        [sys.executable, "-m", "sensisearch", "verify", str(out), "--backend", "onnxruntime", "--rounds", "30", "--force"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")
    verified = {int(n): e for n, e in study.user_attrs["verified_trials"].items()}
    assert len(verified) >= 3
    for number in verified:
        assert (out / "verify" / "onnxruntime" / f"{number:04d}").is_dir()  # built from deployable.onnx here
        assert verified[number]["timing"]["backend"] == "onnxruntime"
    # The rank correlation the CLI prints is spearmanr over the stored predicted vs verified speed-ups (FP32 left out).
    trials = {t.number: t for t in study.trials}
    numbers = sorted(n for n in verified if trials[n].user_attrs.get("baseline") != "fp32")
    predicted = [trials[n].user_attrs["latency"]["speedup"] for n in numbers]
    measured = [verified[n]["timing"]["speedup"] for n in numbers]
    expected = float(spearmanr(predicted, measured).statistic)
    check = study.user_attrs["prediction_check"]
    assert check["n"] == len(numbers) and check["spearman"] == pytest.approx(expected)
    printed = re.search(r"Spearman rank correlation of predicted vs verified speed-up on onnxruntime: (-?[0-9.]+) over (\d+) trials", result.stdout)
    assert printed is not None, result.stdout
    assert float(printed.group(1)) == pytest.approx(expected, abs=0.005) and int(printed.group(2)) == len(numbers)
    report = (out / "report.md").read_text()
    assert "## Predicted vs measured speed-up" in report and "verified on onnxruntime" in report
    assert "Predicted vs measured speed-up" in (out / "report.html").read_text()


def _record(number: int, precisions: dict[str, str], speedup: float, ci: tuple[float, float] | None,
            baseline: str | None = None, value: float = 90.0) -> TrialRecord:
    paired = None if ci is None else PairedTiming(
        speedup, ci, 0.1, 1.0 / speedup, 1.0, 1.0 / speedup, 1.0, 30, 1.0, "ci", (), median_ms=1.0 / speedup
    )
    latency = {"median_ms": 1.0 / speedup}
    if ci is None:
        latency.update(source="estimate", label=ESTIMATE_LABEL, unit="relative cost (FP32 = 1)", speedup=speedup)
    return TrialRecord(number, state="COMPLETE", value=value, baseline=baseline, metric="top1", latency=latency,  # type: ignore[arg-type]
                       paired=paired, config=TrialConfig({k: Precision(v) for k, v in precisions.items()}))


def test_partial_int8_verdict_counts_the_significantly_slower_ones() -> None:
    layers = ["a", "b", "c"]
    fp32 = _record(0, dict.fromkeys(layers, "fp32"), 1.0, (1.0, 1.0), "fp32")
    int8 = _record(1, dict.fromkeys(layers, "int8"), 0.93, (0.90, 0.96), "int8")
    partial = [
        _record(2, {"a": "int8", "b": "fp32", "c": "fp32"}, 0.80, (0.78, 0.83)),
        _record(3, {"a": "int8", "b": "int8", "c": "fp32"}, 0.97, (0.95, 0.99)),
        _record(4, {"a": "fp32", "b": "int8", "c": "int8"}, 0.99, (0.96, 1.02)),  # CI reaches 1: not significant
    ]
    text = partial_int8_verdict([fp32, int8, *partial])
    assert text is not None
    assert "2 of 3 partial-INT8 configurations" in text and "significantly slower" in text
    assert "typically 0.89x" in text and "0.80-0.97x" in text  # median and range of the two slower ones
    assert "accuracy-only listing" in text
    assert partial_int8_verdict([fp32, int8, partial[2]]) is None  # none significantly slower: no sentence


def test_partial_int8_verdict_and_winner_with_predicted_latency() -> None:
    layers = ["a", "b"]
    fp32 = _record(0, dict.fromkeys(layers, "fp32"), 1.0, None, "fp32", value=90.0)
    int8 = _record(1, dict.fromkeys(layers, "int8"), 8.0, None, "int8", value=85.0)
    slow = _record(2, {"a": "int8", "b": "fp32"}, 0.9, None, value=89.8)
    fast = _record(3, {"a": "fp32", "b": "int8"}, 2.0, None, value=89.5)
    recs = [fp32, int8, slow, fast]
    text = partial_int8_verdict(recs)
    # The estimate is a relative cost: the sentence gives costs above FP32's 1, never a speed ratio.
    assert text is not None and "1 of 2" in text and "estimated relative cost above FP32's 1" in text and ESTIMATE_LABEL in text
    assert "typically 1.11" in text and "x the speed" not in text  # 1 / 0.9
    faster, verdict = int8_speed_verdict(recs)
    assert faster is True and "predicted" in verdict and "paired" not in verdict
    choice = choose_winner(recs, max_drop=1.0)
    # all-INT8 loses 5 points; of the two within 1 point only trial 3 is predicted faster than FP32.
    assert choice.record is fast and choice.qualified and "unverified" in choice.reason and "verify" in choice.reason


def test_stage_2_runs_on_another_machine_and_leaves_the_study_record(tmp_path: Path) -> None:
    """`verify --backend` runs on the target, whose CPU is not the study machine's: the device may
    differ there (and for `report`), the study's recorded identity stays as it was, and `run`
    on a machine the study was not made on is still refused."""
    out = tmp_path / "run"
    assert main([
        "run", "--example", "digits", "--out", str(out), "--budget", "1", "--backend", "onnxruntime", "--profile", "tensorrt",
        "--sample-counts", "128", "--eval-limit", "200", "--no-verify",
    ]) == 0
    # As if the study had been made on another machine.
    other = "Other CPU x64 x86_64"
    study_file = out / "study.json"
    recorded = json.loads(study_file.read_text())
    recorded["identity"]["device"] = other
    study_file.write_text(json.dumps(recorded))
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")
    study.set_user_attr("identity", {**study.user_attrs["identity"], "device": other})

    verify = subprocess.run(
        # --force: verify refuses a busy machine (test_verified_answer checks that); the record is under test here.
        [sys.executable, "-m", "sensisearch", "verify", str(out), "--backend", "onnxruntime", "--rounds", "10", "--force"],
        capture_output=True, text=True, timeout=600,
    )
    assert verify.returncode == 0, verify.stderr
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["verified_trials"]
    assert json.loads(study_file.read_text())["identity"]["device"] == other
    assert study.user_attrs["identity"]["device"] == other
    report = subprocess.run([sys.executable, "-m", "sensisearch", "report", str(out)], capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr

    resumed = subprocess.run(
        [sys.executable, "-m", "sensisearch", "run", "--example", "digits", "--out", str(out), "--budget", "2", "--backend",
         "onnxruntime", "--profile", "tensorrt", "--sample-counts", "128", "--eval-limit", "200"],
        capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode != 0 and "Traceback" not in resumed.stderr
    assert other in resumed.stderr and "the machine" in resumed.stderr


def test_estimate_is_printed_as_a_relative_cost_never_a_speed_up(tmp_path: Path) -> None:
    """A foreign profile without a latency table: the summary and report.md give the estimate as a
    relative cost (FP32 = 1), no "N x" figure for it, and no integer-kernels column (ONNX Runtime's
    kernels on a TensorRT graph are not TensorRT's)."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "sensisearch", "run", "--example", "digits", "--out", str(out), "--budget", "1",
         "--backend", "onnxruntime", "--profile", "tensorrt", "--sample-counts", "64", "--eval-limit", "200"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    summary = result.stdout
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")
    int8 = next(t for t in study.trials if t.user_attrs.get("baseline") == "int8")
    cost = 1.0 / int8.user_attrs["latency"]["speedup"]
    for text in (summary, report):
        assert "integer kernels" not in text
        assert "x estimated" not in text and "estimated, no CI" not in text
        # No "1.23x"-style figure anywhere: every speed figure of this study is an estimate.
        assert re.search(r"\d\.\d\dx", text) is None, re.search(r".{60}\d\.\d\dx.{20}", text)
        assert f"cost {cost:.2f} (FP32 = 1" in text  # all-INT8 as a relative cost
    assert "relative cost (FP32 = 1)" in summary  # the front's column says what its figure is
    assert "speed-up (95% CI)" not in summary  # nothing verified: no speed-up column repeating the cost
    assert "Baselines" in report and f"All-INT8's estimated cost {cost:.2f} (FP32 = 1)" in report
