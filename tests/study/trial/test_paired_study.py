"""Measurements you can ship on, wired into the study: paired timing per trial, the verify
tournament, the significant-speed-up winner rule, accuracy-drop CIs, --objective throughput."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import optuna
import pytest

from sensisearch.backends.base import LatencySettings, LatencyStats, Runner
from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
from sensisearch.backends.tensorrt.runtime import parse_gpu_state
from sensisearch.cli import main
from sensisearch.evaluation.base import EvaluationResult, Evaluator
from sensisearch.examples import load_example
from sensisearch.measure import DetectionMatches, PairedTimingSettings, accuracy_points, resample_weights, time_interleaved
from sensisearch.model.analysis import analyze_model
from sensisearch.model.tensor import TensorSpec
from sensisearch.study.trial import _accuracy
from sensisearch.study.trial._measurement import classes_to_skip, opt_batch
from sensisearch.quantize.config import TrialConfig
from sensisearch.study.store._record import TrialRecord
from sensisearch.study.store._timing import PairedTiming, Verification
from sensisearch.study.review._verify import select_for_verification
from sensisearch.study.trial._pipeline import TimingPlan, TrialPipeline
from sensisearch.study.store._results import NOT_SIGNIFICANT, choose_winner, records
from sensisearch.study.run import worst_class_drop

# Whole studies in subprocesses (minutes): left out of the quick lowest-versions CI run.
pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- a drifting fake GPU-like runner
class SimulatedMachine:
    """Simulated time; from ``slow_from`` to ``slow_until`` seconds every run takes 1.5x longer."""

    def __init__(self, slow_from: float, slow_until: float, noise: float = 0.02, seed: int = 0) -> None:
        self.now = 0.0
        self.slow_from, self.slow_until = slow_from, slow_until
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def run(self, base_ms: float) -> float:
        factor = 1.5 if self.slow_from <= self.now < self.slow_until else 1.0
        ms = base_ms * factor * self.rng.lognormal(0.0, self.noise)
        self.now += ms / 1e3
        return ms


class DriftingRunner(Runner):
    """A runner that times itself (as the TensorRT runner does with CUDA events) on a drifting machine."""

    def __init__(self, machine: SimulatedMachine, base_ms: float) -> None:
        self.machine, self.base_ms = machine, base_ms

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("input", (None, 1, 32, 32), np.dtype(np.float32))]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("logits", (None, 10), np.dtype(np.float32))]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.machine.run(self.base_ms)
        return [np.zeros((1, 10), np.float32)]

    def timing_arm(self, feeds: Mapping[str, np.ndarray]):  # noqa: ANN201
        return lambda: self.machine.run(self.base_ms)  # returns its own ms, a float

    def measure_latency(self, feeds: Mapping[str, np.ndarray], settings: LatencySettings) -> LatencyStats:
        return LatencyStats.from_samples([self.machine.run(self.base_ms) for _ in range(settings.min_runs)], 1)


class FixedFeeds(Evaluator):
    metric = "top1"

    def evaluate(self, runner: Runner) -> EvaluationResult:  # pragma: no cover - not used here
        raise NotImplementedError

    def latency_feeds(self, batch_size: int) -> Mapping[str, np.ndarray]:
        return {"input": np.zeros((batch_size, 1, 32, 32), np.float32)}


def test_pipeline_paired_timing_recovers_true_ratio_through_drift_and_unpaired_does_not() -> None:
    """The trial pipeline's paired timing (self-timed arms, as on a GPU) sees the true 2.5x through a
    1.5x slow window; FP32 timed once early and the candidate later inside the window does not."""
    machine = SimulatedMachine(slow_from=0.3, slow_until=1.5)
    example = load_example("digits")
    info, model = analyze_model(example.model)
    # The drift is under test, not the A/A control or load sensing (their own tests cover them).
    plan = TimingPlan("latency", 1, PairedTimingSettings(min_rounds=60, max_rounds=2000, target_ci_width=0.02, max_seconds=60),
                      control=False)

    class ReferenceOnMachine(OnnxRuntimeBackend):
        def load(self, artifact: Path) -> Runner:  # the FP32 reference, loaded for each timing
            return DriftingRunner(machine, 20.0)

    pipeline = TrialPipeline(model, info, ReferenceOnMachine(), FixedFeeds(), None, LatencySettings(), 1, plan)
    pipeline._reference_artifact = Path("fp32-reference")  # never built: the backend above loads it
    timed = pipeline.time_paired(DriftingRunner(machine, 8.0))
    paired, block = timed.paired, timed.block
    assert block == 1  # 8 ms runs need no blocks
    assert machine.now > 1.5  # the timing crossed the whole slow window
    assert paired.speedup == pytest.approx(2.5, rel=0.02)
    assert paired.speedup_ci95[0] <= 2.5 <= paired.speedup_ci95[1] * 1.01
    # Unpaired, as before: FP32 once at the start (quiet), the candidate later (inside the slow window).
    machine.now = 0.0
    fp32 = DriftingRunner(machine, 20.0).measure_latency({}, LatencySettings(min_runs=10)).median_ms
    machine.now = 0.4
    int8 = DriftingRunner(machine, 8.0).measure_latency({}, LatencySettings(min_runs=10)).median_ms
    assert abs(fp32 / int8 - 2.5) / 2.5 > 0.25  # ~1.67x: the drift, not the model


def test_self_timed_arms_use_their_own_milliseconds() -> None:
    """An arm returning a float is timed by that float, not by the host clock."""
    ticks = iter(np.arange(0, 1e6, 1.0))  # host clock: +1 s per call, whatever ran
    result = time_interleaved(
        {"ref": lambda: 4.0, "fast": lambda: 1.0}, "ref",
        PairedTimingSettings(min_rounds=5, max_rounds=5, warmup_runs=0, max_seconds=1e9), clock=lambda: float(next(ticks)),
    )
    assert result["fast"].speedup == 4.0 and result["fast"].candidate_median_ms == 1.0


# --------------------------------------------------------------------------- accuracy CIs
def test_classification_drop_ci_equals_brute_force_paired_bootstrap() -> None:
    """drop_estimate == the paired bootstrap written out by hand with the same resample draws,
    and its width matches the normal theory of a paired difference of proportions."""
    rng = np.random.default_rng(7)
    n = 2000
    fp32 = rng.random(n) < 0.937
    candidate = fp32.copy()
    flip = rng.choice(n, 40, replace=False)  # 40 discordant images
    candidate[flip] = ~candidate[flip]
    estimate = _accuracy.drop_estimate(fp32, candidate, "top1", n_resamples=400, seed=3)
    weights = resample_weights(n, 400, seed=3)
    brute = np.array([100 * (w @ fp32 - w @ candidate) / w.sum() for w in weights])
    assert estimate.drop == pytest.approx(100 * (fp32.mean() - candidate.mean()), abs=1e-12)
    assert estimate.ci95 == pytest.approx(tuple(np.quantile(brute, [0.025, 0.975])), abs=1e-9)
    d = fp32.astype(float) - candidate.astype(float)
    half_width = 1.96 * 100 * d.std(ddof=1) / np.sqrt(n)
    assert (estimate.ci95[1] - estimate.ci95[0]) / 2 == pytest.approx(half_width, rel=0.15)


def test_worker_bootstrap_follows_the_stored_fp32_results() -> None:
    """The worker's reused bootstrap gives each trial what a fresh one gives, and a changed FP32 record
    (another evaluation set on resume) is a new reference, not the old one's resamples."""
    rng = np.random.default_rng(11)
    fp32 = rng.random(600) < 0.93
    other_fp32 = rng.random(600) < 0.80
    candidate = fp32.copy()
    candidate[rng.choice(600, 25, replace=False)] ^= True
    bootstraps = _accuracy.FP32Bootstraps(n_resamples=250, seed=4)
    for reference in (fp32, other_fp32, fp32):
        got = bootstraps.estimate(_accuracy.encode(reference), candidate, "top1")
        assert got == _accuracy.drop_estimate(reference, candidate, "top1", n_resamples=250, seed=4)
        assert got.drop == pytest.approx(100 * (reference.mean() - candidate.mean()), abs=1e-12)
    # Results that cannot be paired (another image count): no CI, as before.
    assert bootstraps.estimate(_accuracy.encode(fp32), candidate[:-1], "top1") is None


def test_per_image_results_round_trip_for_study_storage(tmp_path: Path) -> None:
    correct = np.random.default_rng(0).random(123) < 0.9
    assert np.array_equal(_accuracy.decode(_accuracy.encode(correct)), correct)
    path = _accuracy.save_per_image(correct, tmp_path)
    assert path.name == "per_image.npz" and np.array_equal(_accuracy.load_per_image(path), correct)
    assert accuracy_points(_accuracy.load_per_image(path)) == pytest.approx(100 * correct.mean())


def test_fp32_yolov5n_per_image_results_from_the_study_store_reaccumulate_to_published_map(
    coco_evaluator, yolo_fp32_predictions, tmp_path: Path  # noqa: ANN001
) -> None:
    """FP32 YOLOv5n's per-image matches, stored the way the study stores them (base64 study attribute,
    per_image.npz), re-accumulate exactly to the evaluator's mAP, which is the published 35.63 / 55.60."""
    result = coco_evaluator.score(yolo_fp32_predictions)
    from_attr = _accuracy.decode(_accuracy.encode(result.per_image))
    from_file = _accuracy.load_per_image(_accuracy.save_per_image(result.per_image, tmp_path))
    for stored in (from_attr, from_file):
        assert isinstance(stored, DetectionMatches)
        assert _accuracy.metric_function("mAP50-95", stored)(stored, None) == result.metrics["mAP50-95"]
        assert _accuracy.metric_function("mAP50", stored)(stored, None) == result.metrics["mAP50"]
    assert round(result.metrics["mAP50-95"], 2) == 35.63 and round(result.metrics["mAP50"], 2) == 55.60
    # A model against itself: drop 0 with a zero-width CI.
    same = _accuracy.drop_estimate(from_attr, from_file, "mAP50-95", n_resamples=20)
    assert same.drop == 0.0 and same.ci95 == (0.0, 0.0)


def test_class_guard_skips_rare_classes_and_says_which() -> None:
    instances = {"person": 120, "toaster": 1, "car": 10, "kite": 9}
    skipped = classes_to_skip(instances, 10)
    assert skipped == ["kite", "toaster"]
    fp32 = {"person": 50.0, "toaster": 80.0, "car": 40.0, "kite": 30.0}
    trial = {"person": 48.0, "toaster": 0.0, "car": 37.0, "kite": 10.0}
    assert worst_class_drop(fp32, trial) == {"name": "toaster", "drop": 80.0}
    assert worst_class_drop(fp32, trial, skip=skipped) == {"name": "car", "drop": 3.0}


# --------------------------------------------------------------------------- winner rule on records
def _paired(speedup: float, lo: float, hi: float, ms: float) -> dict[str, Any]:
    return {"speedup": speedup, "speedup_ci95": [lo, hi], "ratio_iqr": 0.1, "candidate_median_ms": ms,
            "reference_median_ms": 10.0, "candidate_p90_ms": ms, "reference_p90_ms": 10.0, "rounds": 30,
            "seconds": 1.0, "stopped_by": "ci", "candidate_times_ms": []}


def _paired_study(rows: list[tuple[str | None, float, float, float, float]]) -> optuna.Study:
    """rows: (baseline, top1, speed-up, CI lo, CI hi); median_ms = 10 / speed-up."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for name, value, speedup, lo, hi in rows:
        ms = 10.0 / speedup
        record = TrialRecord(0, baseline=name, metric="top1", latency={"median_ms": ms, "p90_ms": ms},
                             config=TrialConfig({}), paired=PairedTiming.from_dict(_paired(speedup, lo, hi, ms)))
        study.add_trial(optuna.trial.create_trial(values=[value, ms], user_attrs=record.to_attrs()))
    return study


def test_candidate_whose_ci_reaches_one_is_never_the_winner() -> None:
    # 0 FP32; 1 all-INT8 1.02x [0.97, 1.08]; 2 fastest point estimate 1.6x but CI [0.95, 2.3];
    # 3 1.3x [1.25, 1.35] (significant); 4 1.4x [1.38, 1.42] but 2 points less accurate.
    study = _paired_study([
        ("fp32", 93.7, 1.0, 0.99, 1.01), ("int8", 93.5, 1.02, 0.97, 1.08), (None, 93.6, 1.6, 0.95, 2.3),
        (None, 93.4, 1.3, 1.25, 1.35), (None, 91.7, 1.4, 1.38, 1.42),
    ])
    recs = records(study)
    choice = choose_winner(recs, max_drop=1.0)
    assert choice.qualified and choice.record.number == 3
    # Asking for more than the best lower bound: nothing qualifies, and the report text says so with numbers.
    choice = choose_winner(recs, max_drop=1.0, min_speedup=1.3)
    assert not choice.qualified and NOT_SIGNIFICANT in choice.reason
    assert "all-INT8 1.02x (95% CI 0.97-1.08, in-study)" in choice.reason and "trial 3: 1.30x" in choice.reason
    # Randomised: whatever the figures, a winner's CI lower bound always exceeds min_speedup.
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows: list[tuple[str | None, float, float, float, float]] = [("fp32", 90.0, 1.0, 0.99, 1.01)]
        for _ in range(6):
            s = float(rng.uniform(0.8, 2.0))
            w = float(rng.uniform(0.01, 0.5))
            rows.append((None, float(rng.uniform(88.5, 90.5)), s, s - w, s + w))
        min_speedup = float(rng.uniform(0.9, 1.5))
        choice = choose_winner(records(_paired_study(rows)), max_drop=1.0, min_speedup=min_speedup)
        if choice.qualified:
            assert choice.record.speedup_ci95[0] > min_speedup


def test_verified_figures_replace_in_study_ones_and_only_verified_trials_win() -> None:
    study = _paired_study([("fp32", 93.7, 1.0, 0.99, 1.01), ("int8", 93.5, 1.5, 1.4, 1.6), (None, 93.6, 1.45, 1.4, 1.5)])
    from sensisearch.study.store._record import verified_attrs

    # The tournament finds all-INT8 not significantly faster and verifies only trials 0 and 1.
    entries = {0: Verification.from_dict({"timing": {**_paired(1.0, 1.0, 1.0, 10.0), "median_ms": 10.0}, "drop_ci95": None}),
               1: Verification.from_dict({"timing": {**_paired(1.03, 0.98, 1.07, 9.7), "median_ms": 9.7}, "drop_ci95": [-0.1, 0.5]})}
    for key, value in verified_attrs(entries).items():
        study.set_user_attr(key, value)
    recs = records(study)
    int8 = recs[1]
    assert int8.is_verified and int8.speedup == 1.03 and int8.median_ms == 9.7 and int8.in_study_ms == pytest.approx(10 / 1.5)
    assert int8.drop_ci == (-0.1, 0.5) and int8.paired_speedup == 1.5
    choice = choose_winner(recs, max_drop=1.0)
    assert not choice.qualified and NOT_SIGNIFICANT in choice.reason  # trial 2 is unverified: it cannot win


def test_noise_band_selection() -> None:
    # front (in-study): 0 FP32 (most accurate), 1 all-INT8 (fastest), 3; 2 is dominated by 3 but its CI overlaps 3's;
    # 4 is dominated and clearly slower than every front member.
    study = _paired_study([
        ("fp32", 93.7, 1.0, 0.99, 1.01), ("int8", 92.0, 2.0, 1.95, 2.05), (None, 93.0, 1.48, 1.40, 1.52),
        (None, 93.2, 1.5, 1.45, 1.55), (None, 92.5, 1.2, 1.18, 1.22),
    ])
    recs = [r for r in records(study)]
    # Only trials with an artifact on disk can be re-timed: give them all one.
    recs = [TrialRecord(**{**r.__dict__, "artifact": __file__}) for r in recs]
    assert [r.number for r in select_for_verification(recs)] == [0, 1, 3, 2]


def test_pure_helpers() -> None:
    assert opt_batch(["images:1x3x640x640/8x3x640x640/16x3x640x640"]) == 8 and opt_batch(None) is None
    state = parse_gpu_state("1980, 9501, 2100\n", "4242, python, 812\n")
    assert state == {"gpus": [{"sm_mhz": "1980", "mem_mhz": "9501", "max_sm_mhz": "2100"}],
                     "compute_processes": [{"pid": "4242", "name": "python", "used_mib": "812"}]}


# --------------------------------------------------------------------------- end to end on the digits example
@pytest.fixture(scope="module")
def unverified_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Throughput objective at batch 4, an impossible --min-speedup, no verify after the run."""
    out = tmp_path_factory.mktemp("paired")
    code = main([
        "run", "--example", "digits", "--budget", "3", "--out", str(out), "--sample-counts", "64", "--seed", "2",
        "--timing-max-seconds", "0.5", "--objective", "throughput", "--throughput-batch", "4", "--min-speedup", "50",
        "--no-verify", "--sampler", "tpe", "--search", "full",  # every trial timed: no budget shared with probes
    ])
    assert code == 0
    return out


def test_trials_record_paired_latency_and_drop_ci(unverified_study: Path) -> None:
    out = unverified_study
    study = optuna.load_study(study_name="digits_resnet", storage=f"sqlite:///{out / 'study.db'}")
    reference_ms = study.user_attrs["reference_ms"]
    fp32_correct = _accuracy.decode(study.user_attrs["fp32_per_image"])
    for trial in study.trials:
        data = json.loads((out / "trials" / f"{trial.number:04d}" / "trial.json").read_text())
        latency = data["latency"]
        assert latency["objective"] == "throughput" and latency["batch_size"] == 4
        lo, hi = latency["speedup_ci95"]
        assert lo <= latency["speedup"] <= hi
        # The figure the front minimises is the study's FP32 reference over the paired speed-up.
        assert latency["median_ms"] == pytest.approx(reference_ms / latency["speedup"], rel=1e-12)
        assert trial.values[1] == latency["median_ms"] == trial.user_attrs["latency"]["median_ms"]
        assert latency["images_per_second"] == pytest.approx(4e3 / latency["median_ms"])
        assert trial.user_attrs["paired"]["speedup"] == latency["speedup"]
        assert data["paired"]["load"]["cpu_count"] >= 1
        # The drop CI is the paired bootstrap of this trial's per-image results against FP32's.
        correct = _accuracy.load_per_image(Path(data["accuracy"]["per_image"]))
        assert accuracy_points(correct) == pytest.approx(data["evaluation"]["value"], abs=1e-9)
        expected = _accuracy.drop_estimate(fp32_correct, correct, "top1", n_resamples=200, seed=2)
        assert data["accuracy"]["drop_ci95"] == pytest.approx(list(expected.ci95), abs=1e-12)
        assert data["accuracy"]["drop_within_noise"] == (expected.ci95[0] <= 0 <= expected.ci95[1])
    fp32 = json.loads((out / "trials" / "0000" / "trial.json").read_text())
    assert fp32["latency"]["reference_ms"] == reference_ms == fp32["latency"]["reference_median_ms"]
    report = (out / "report.md").read_text()
    assert "throughput, images/s at batch 4" in report and "Timing noise (in-study" in report
    assert "verified" not in report.split("## Pareto front")[1].split("## Winner")[0]


def test_impossible_min_speedup_gives_no_winner_and_says_so(unverified_study: Path) -> None:
    config = json.loads((unverified_study / "winner" / "config.json").read_text())
    assert config["status"] == "best-effort" and NOT_SIGNIFICANT in config["reason"]
    report = (unverified_study / "report.md").read_text()
    assert NOT_SIGNIFICANT in report and "all-INT8" in report.split("## Winner")[1]


def test_verify_command_retimes_and_rewrites_results(unverified_study: Path) -> None:
    out = unverified_study
    # --force: verify now refuses a busy machine (test_verified_answer checks that); here the re-timing is under
    # test, on whatever machine the suite runs on.
    result = subprocess.run([sys.executable, "-m", "sensisearch", "verify", str(out), "--seconds", "3", "--force"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "verified trials 0, 1" in result.stderr
    study = optuna.load_study(study_name="digits_resnet", storage=f"sqlite:///{out / 'study.db'}")
    recs = records(study)
    verified = [r for r in recs if r.is_verified]
    assert {0, 1} <= {r.number for r in verified}
    fp32 = next(r for r in verified if r.baseline == "fp32")
    assert fp32.speedup == 1.0 and fp32.median_ms == pytest.approx(study.user_attrs["reference_ms"])
    for r in verified:
        assert r.median_ms == pytest.approx(study.user_attrs["reference_ms"] / r.speedup)
        assert r.verified is not None and r.verified.rounds >= 3
        trial_json = json.loads(Path(r.trial_json).read_text())
        # trial.json is the trial as it ran, never rewritten; the tournament's figures go beside it.
        assert "verified" not in trial_json
        assert json.loads(Path(r.trial_json).with_name("verified.json").read_text())["speedup"] == r.speedup
        # The in-study figure stays: the trial's own timing (the record reports its latency class's pooled
        # figure, keeping the trial's own beside it).
        assert trial_json["latency"]["speedup"] == r.paired.own_speedup
    front = json.loads((out / "pareto.json").read_text())
    assert all(p["verified"] for p in front)
    report = (out / "report.md").read_text()
    assert "verified" in report and "Timing noise (verify tournament)" in report
    assert NOT_SIGNIFICANT in report  # --min-speedup 50 came back from the run's settings


def test_verify_bad_run_dir_is_one_clear_line(tmp_path: Path) -> None:
    for args, must in (([str(tmp_path / "nope")], "no such run folder"), ([str(tmp_path)], "settings.json")):
        result = subprocess.run([sys.executable, "-m", "sensisearch", "verify", *args], capture_output=True, text=True, timeout=120)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert must in result.stderr
    result = subprocess.run([sys.executable, "-m", "sensisearch", "run", "--example", "digits", "--timing-target-ci", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--timing-target-ci 2" in result.stderr and "Traceback" not in result.stderr
