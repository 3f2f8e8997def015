"""Paired timing, bootstrap CIs and exact per-image COCO re-accumulation (sensisearch.measure)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from sensisearch.measure import (
    DetectionMatches,
    DropEstimate,
    MachineLoad,
    PairedBootstrap,
    PairedLatency,
    PairedTimingSettings,
    accuracy_points,
    bootstrap_ci,
    machine_identity,
    map50_95_points,
    noise_summary,
    paired_bootstrap_drop,
    resample_weights,
    time_interleaved,
    within_noise,
)
from sensisearch.measure._machine import LoadMonitor, parse_cpuinfo


# --------------------------------------------------------------------------- a drifting fake machine
class DriftingMachine:
    """Simulated time: each run advances it by ``base_ms * drift(now)`` with lognormal noise.

    The true speed-up of arm a over arm b is ``base_b / base_a`` at every instant,
    whatever the drift; only a measurement that pairs runs close in time sees it.
    """

    def __init__(self, drift: Callable[[float], float], noise: float = 0.03, seed: int = 0) -> None:
        self.now = 0.0
        self.drift = drift
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def clock(self) -> float:
        return self.now

    def arm(self, base_ms: float) -> Callable[[], None]:
        def run() -> None:
            self.now += base_ms / 1e3 * self.drift(self.now) * self.rng.lognormal(0.0, self.noise)

        return run


def slow_window(start: float, stop: float, factor: float = 1.5) -> Callable[[float], float]:
    return lambda t: factor if start <= t < stop else 1.0


def _unpaired_median_ms(machine: DriftingMachine, fn: Callable[[], None], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = machine.clock()
        fn()
        samples.append(machine.clock() - t0)
    return float(np.median(samples)) * 1e3


def test_paired_timing_recovers_true_ratio_under_drift_and_unpaired_does_not() -> None:
    # The machine is 1.5x slower from 0.5 s to 2 s of simulated time (another job ran).
    machine = DriftingMachine(slow_window(0.5, 2.0), noise=0.03, seed=1)
    fp32, int8 = machine.arm(20.0), machine.arm(8.0)
    true_ratio = 20.0 / 8.0

    # Unpaired, as a study did before: FP32 timed once early, the candidate later, inside the slow window.
    ref_ms = _unpaired_median_ms(machine, fp32, 20)  # 0 .. 0.4 s: quiet
    machine.now = 0.6
    cand_ms = _unpaired_median_ms(machine, int8, 20)  # inside the slow window
    unpaired = ref_ms / cand_ms
    assert abs(unpaired / true_ratio - 1) > 0.25  # ~1.67 instead of 2.5

    # Paired over the same drifting stretch of time (quiet, slow, quiet again).
    machine.now = 0.0
    settings = PairedTimingSettings(min_rounds=80, max_rounds=80, max_seconds=1e9)
    result = time_interleaved({"fp32": fp32, "int8": int8}, "fp32", settings, clock=machine.clock)
    paired = result["int8"]
    assert machine.now > 2.0  # the timing did span the slow window
    assert paired.rounds == 80
    assert abs(paired.speedup / true_ratio - 1) < 0.03
    lo, hi = paired.speedup_ci95
    assert lo <= true_ratio <= hi and hi - lo < 0.1 * true_ratio
    # The raw medians are drift-polluted; they are kept, but are not the speed figure.
    assert paired.reference_median_ms == pytest.approx(float(np.median(np.array(result["fp32"].candidate_times_ms))), rel=1e-6)
    assert len(paired.candidate_times_ms) == 80
    # The drift-free latency the front minimises: a fixed FP32 figure over the speed-up.
    assert paired.median_ms_for(20.0) == pytest.approx(8.0, rel=0.03)
    # The reference arm against itself.
    assert result["fp32"].speedup == 1.0 and result["fp32"].speedup_ci95 == (1.0, 1.0)


def test_tournament_recovers_every_ratio_with_a_linear_drift() -> None:
    machine = DriftingMachine(lambda t: 1.0 + 0.5 * t, noise=0.05, seed=2)  # the machine keeps slowing down
    bases = {"fp32": 12.0, "int8": 5.0, "front1": 7.0, "front2": 10.0}
    arms = {name: machine.arm(ms) for name, ms in bases.items()}
    result = time_interleaved(arms, "fp32", PairedTimingSettings(max_seconds=1e9), clock=machine.clock)
    for name, base in bases.items():
        assert result[name].speedup == pytest.approx(12.0 / base, rel=0.03), name
    # The raw median of the slowest arm is far off its base: drift is real here.
    assert result["fp32"].candidate_median_ms > 1.2 * 12.0


def test_stops_at_ci_target_or_cap() -> None:
    quiet = DriftingMachine(lambda t: 1.0, noise=0.01, seed=3)
    settings = PairedTimingSettings(min_rounds=20, max_rounds=500, target_ci_width=0.05, max_seconds=1e9)
    r = time_interleaved({"a": quiet.arm(10.0), "b": quiet.arm(5.0)}, "a", settings, clock=quiet.clock)["b"]
    assert r.stopped_by == "ci" and r.rounds == 20 and r.relative_ci_width <= 0.05

    noisy = DriftingMachine(lambda t: 1.0, noise=0.8, seed=4)
    r = time_interleaved({"a": noisy.arm(10.0), "b": noisy.arm(5.0)}, "a", settings, clock=noisy.clock)["b"]
    assert r.stopped_by == "max_rounds" and r.rounds == 500

    capped = DriftingMachine(lambda t: 1.0, noise=0.8, seed=5)
    settings = PairedTimingSettings(max_seconds=1.0)
    r = time_interleaved({"a": capped.arm(10.0), "b": capped.arm(5.0)}, "a", settings, clock=capped.clock)["b"]
    # 15 ms per round: the 1 s cap ends it after ~67 rounds (warm-up not counted).
    assert r.stopped_by == "max_seconds" and 60 <= r.rounds <= 70


def test_rounds_are_interleaved_in_shuffled_order() -> None:
    calls: list[str] = []
    arms = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    settings = PairedTimingSettings(warmup_runs=2, min_rounds=30, max_rounds=30, runs_per_round=2, max_seconds=1e9)
    ticks = iter(range(10**6))
    time_interleaved(arms, "a", settings, clock=lambda: float(next(ticks)))
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, every arm
    rounds = [calls[6 + 6 * r : 12 + 6 * r] for r in range(30)]
    assert all(sorted(r) == ["a", "a", "b", "b", "c", "c"] for r in rounds)  # each arm once per round, as a block
    assert len({tuple(r[::2]) for r in rounds}) > 1  # the order changes between rounds


def test_paired_latency_round_trips_and_rejects_unknown_reference() -> None:
    machine = DriftingMachine(lambda t: 1.0, seed=6)
    r = time_interleaved({"a": machine.arm(3.0), "b": machine.arm(2.0)}, "a", clock=machine.clock)["b"]
    data = json.loads(json.dumps(r.to_dict()))
    assert PairedLatency.from_dict(data) == r
    assert isinstance(r.load, MachineLoad)
    with pytest.raises(ValueError, match="reference"):
        time_interleaved({"a": machine.arm(1.0)}, "fp32", clock=machine.clock)


def test_noise_summary_and_machine_facts() -> None:
    machine = DriftingMachine(lambda t: 1.0, seed=7)
    results = time_interleaved(
        {"a": machine.arm(3.0), "b": machine.arm(2.0), "c": machine.arm(1.0)}, "a", clock=machine.clock
    )
    line = noise_summary([results["b"], results["c"]])
    assert "\n" not in line and "2 paired timings" in line and "load avg" in line
    model, flags = parse_cpuinfo("processor\t: 0\nmodel name\t: Test CPU @ 2GHz\nflags\t\t: fpu avx2 avx512_vnni sse\n")
    assert model == "Test CPU @ 2GHz" and {"avx2", "avx512_vnni"} <= flags
    identity = machine_identity()
    assert identity.cpu_count and identity.cpu_model
    assert set(identity.cpu_flags) <= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimddp", "i8mm"}
    assert type(identity).from_dict(json.loads(json.dumps(identity.to_dict()))) == identity


def test_cpu_steal_from_proc_stat_deltas(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n")
    monitor = LoadMonitor(stat).start()
    stat.write_text("cpu  150 0 70 900 10 0 0 70 0 0\ncpu0 1 2 3\n")
    load = monitor.stop()
    assert load.cpu_steal == pytest.approx(30 / (50 + 20 + 100 + 30))
    assert LoadMonitor(tmp_path / "missing").start().stop().cpu_steal is None


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_mean_matches_normal_theory() -> None:
    rng = np.random.default_rng(10)
    values = rng.normal(10.0, 2.0, 2000)
    lo, hi = bootstrap_ci(values, np.mean, n_resamples=4000, seed=1)
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert (lo + hi) / 2 == pytest.approx(values.mean(), abs=0.1 * half)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.07)


def test_bootstrap_median_matches_scipy() -> None:
    from scipy import stats

    rng = np.random.default_rng(11)
    values = rng.lognormal(0.0, 0.3, 300)
    ours = bootstrap_ci(values, np.median, n_resamples=5000, seed=2)
    theirs = stats.bootstrap((values,), np.median, n_resamples=5000, method="percentile", random_state=3).confidence_interval
    width = theirs.high - theirs.low
    assert ours[0] == pytest.approx(theirs.low, abs=0.1 * width)
    assert ours[1] == pytest.approx(theirs.high, abs=0.1 * width)


def test_bootstrap_exact_on_tiny_sample() -> None:
    # All 5^5 = 3125 equally likely resamples of 5 values, enumerated: the exact bootstrap distribution.
    values = np.array([1.0, 2.5, 4.1, 7.3, 11.9])
    grid = np.array(np.meshgrid(*[values] * 5)).reshape(5, -1).T
    exact = np.quantile(grid.mean(axis=1), [0.025, 0.975], method="inverted_cdf")
    lo, hi = bootstrap_ci(values, np.mean, n_resamples=200_000, seed=4)
    assert (lo, hi) == pytest.approx(tuple(exact), abs=0.1)  # the sd of the mean is ~1.6


def test_resample_weights_are_counts_of_the_drawn_indices() -> None:
    w = resample_weights(50, 400, seed=5)
    indices = np.random.default_rng(5).integers(0, 50, size=(400, 50))
    assert np.array_equal(w, np.stack([np.bincount(row, minlength=50) for row in indices]))
    assert (w.sum(axis=1) == 50).all()


def test_paired_drop_matches_paired_normal_theory() -> None:
    rng = np.random.default_rng(12)
    ref = rng.random(3000) < 0.90
    cand = ref.copy()
    flip = rng.random(3000) < 0.03
    cand[flip] = ~cand[flip]
    est = paired_bootstrap_drop(ref, cand, accuracy_points, n_resamples=3000, seed=6)
    d = 100.0 * (ref.astype(float) - cand.astype(float))
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    assert est.drop == pytest.approx(d.mean(), abs=1e-9)
    assert (est.ci95[1] - est.ci95[0]) / 2 == pytest.approx(half, rel=0.1)
    # Pairing matters: the unpaired spread of two 90% accuracies is much wider.
    unpaired_half = 1.96 * 100 * np.sqrt(2 * 0.9 * 0.1 / d.size)
    assert (est.ci95[1] - est.ci95[0]) / 2 < 0.5 * unpaired_half
    assert DropEstimate.from_dict(json.loads(json.dumps(est.to_dict()))) == est


def test_paired_bootstrap_scores_the_reference_once_for_many_candidates() -> None:
    """Against one reference, every candidate's drop CI equals the bootstrap written out by hand with the same
    draws, and the reference is re-scored once per resample in all, not once per resample per candidate."""
    rng = np.random.default_rng(21)
    ref = rng.random(800) < 0.9
    candidates = []
    for flips in (5, 20, 60):
        cand = ref.copy()
        idx = rng.choice(ref.size, flips, replace=False)
        cand[idx] = ~cand[idx]
        candidates.append(cand)
    reference_calls = 0

    def counted(items: np.ndarray, weights: np.ndarray | None) -> float:
        nonlocal reference_calls
        reference_calls += items is ref
        return accuracy_points(items, weights)

    bootstrap = PairedBootstrap(ref, counted, n_resamples=300, seed=8)
    weights = resample_weights(ref.size, 300, seed=8)
    for cand in candidates:
        est = bootstrap.drop(cand)
        brute = np.array([100 * (w @ ref - w @ cand) / w.sum() for w in weights])
        assert est.drop == pytest.approx(100 * (ref.mean() - cand.mean()), abs=1e-12)
        assert est.ci95 == pytest.approx(tuple(np.quantile(brute, [0.025, 0.975])), abs=1e-9)
        assert est == paired_bootstrap_drop(ref, cand, accuracy_points, n_resamples=300, seed=8)
    assert reference_calls == 300 + 1
    with pytest.raises(ValueError, match="same items"):
        bootstrap.drop(ref[:-1])


def test_within_noise() -> None:
    assert within_noise((-0.2, 0.5)) and within_noise([0.0, 1.0])
    assert not within_noise((0.1, 0.5)) and not within_noise((-0.5, -0.01))


# --------------------------------------------------------------------------- MNIST: per-image correctness
def test_mnist_paired_drop_against_brute_force_loop(mnist_dir: Path, tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
    from sensisearch.evaluation.classification import ClassificationEvaluator
    from sensisearch.evaluation.datasets import Preprocess, load_images
    from sensisearch.model.tensor import TensorSpec

    data = load_images(mnist_dir, TensorSpec("input", (None, 1, 28, 28), np.dtype(np.float32)), "--eval-data")
    evaluator = ClassificationEvaluator(data, Preprocess((0.5,), (0.5,)), "input", 512)
    int8_path = tmp_path / "mnist_int8.onnx"
    # From a copy: ONNX Runtime's quantizer writes a shape-inferred model beside its input, and the
    # shared data folder is read-only for everyone but root.
    fp32_copy = tmp_path / "mnist_cnn.onnx"
    shutil.copyfile(mnist_dir / "mnist_cnn.onnx", fp32_copy)
    # uint8 weights: ONNX Runtime 1.20 (the declared floor) has no CPU ConvInteger kernel for int8
    # weights (1.32 has); the quantized model only has to differ from FP32 here.
    quantize_dynamic(str(fp32_copy), str(int8_path), weight_type=QuantType.QUInt8)
    backend = OnnxRuntimeBackend()
    results = {}
    for name, path in (("fp32", mnist_dir / "mnist_cnn.onnx"), ("int8", int8_path)):
        with backend.load(backend.build(path, tmp_path / name).artifact) as runner:
            results[name] = evaluator.evaluate(runner)
    ref, cand = results["fp32"].per_image, results["int8"].per_image
    assert ref.dtype == bool and ref.shape == (6667,)
    assert int((~ref).sum()) == 66  # shared/data README: 66 errors
    assert accuracy_points(cand) == pytest.approx(results["int8"].metrics["top1"], abs=1e-9)

    est = paired_bootstrap_drop(ref, cand, accuracy_points, n_resamples=500, seed=7)
    # Brute force: the same draws as item indices, scored by plain means in a loop.
    indices = np.random.default_rng(7).integers(0, 6667, size=(500, 6667))
    drops = [100.0 * (ref[idx].mean() - cand[idx].mean()) for idx in indices]
    assert est.drop == pytest.approx(100.0 * (ref.mean() - cand.mean()), abs=1e-12)
    assert est.ci95 == pytest.approx(tuple(np.quantile(drops, [0.025, 0.975])), abs=1e-9)
    assert est.within_noise == (est.ci95[0] <= 0 <= est.ci95[1])


# --------------------------------------------------------------------------- COCO: exact re-accumulation
@pytest.fixture(scope="module")
def yolo_scored(coco_evaluator, yolo_fp32_predictions):  # noqa: ANN001, ANN201
    return yolo_fp32_predictions, coco_evaluator.score(yolo_fp32_predictions)


def _coco_evaluated(gt_data: dict, results: list[dict]):  # noqa: ANN202
    """pycocotools' COCOeval with its default bbox parameters, after evaluate()."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_data
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
    return ev


def _coco_stats(gt_data: dict, results: list[dict]) -> np.ndarray:
    """pycocotools with its default bbox parameters: accumulate() + summarize() stats."""
    ev = _coco_evaluated(gt_data, results)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _results(predictions) -> list[dict]:  # noqa: ANN001
    from sensisearch.evaluation.detection import coco80_to_coco91, coco_results

    return coco_results(predictions, coco80_to_coco91())


def test_yolov5n_per_image_matches_reaccumulate_exactly(yolo_scored, coco_dev: Path) -> None:  # noqa: ANN001
    predictions, result = yolo_scored
    matches = result.per_image
    assert isinstance(matches, DetectionMatches) and len(matches) == 170
    data = json.loads((coco_dev / "instances.json").read_text())
    stats = _coco_stats(data, _results(predictions))
    map5095, map50 = matches.accumulate()
    assert abs(map5095 - stats[0]) <= 1e-12 and abs(map50 - stats[1]) <= 1e-12
    assert round(map5095, 4) == 0.3563 and round(map50, 4) == 0.5560  # shared/data README
    assert result.metrics["mAP50-95"] == pytest.approx(100 * map5095, abs=1e-12)
    stored = DetectionMatches.from_bytes(matches.to_bytes())
    assert stored.accumulate() == (map5095, map50)
    assert len(matches.to_bytes()) < 300_000
    # Per-class instances: non-crowd boxes, counted independently from the json.
    counts: dict[int, int] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert result.per_class_instances == {names[c]: n for c, n in counts.items()}
    assert set(result.per_class_instances) == set(result.per_class)


def test_weighted_reaccumulate_equals_cocoeval_on_duplicated_images(yolo_scored, coco_dev: Path) -> None:  # noqa: ANN001
    """A bootstrap resample (images drawn 0..k times) == COCOeval on the list with those copies."""
    predictions, result = yolo_scored
    matches = result.per_image
    weights = resample_weights(len(matches), 1, seed=8)[0]
    assert weights.max() >= 3 and (weights == 0).any()
    data = json.loads((coco_dev / "instances.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for r in _results(predictions):
        by_image.setdefault(r["image_id"], []).append(r)
    anns_by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    images, annotations, results = [], [], []
    for image_id, w in zip(matches.image_ids.tolist(), weights.tolist()):
        image = next(im for im in data["images"] if im["id"] == image_id)
        for copy in range(w):
            new_id = image_id * 100 + copy  # copies sort next to each other, in image order
            images.append({**image, "id": new_id})
            for ann in anns_by_image.get(image_id, []):
                annotations.append({**ann, "image_id": new_id, "id": len(annotations) + 1})
            results.extend({**r, "image_id": new_id} for r in by_image.get(image_id, []))
    duplicated = {**data, "images": images, "annotations": annotations}
    stats = _coco_stats(duplicated, results)
    map5095, map50 = matches.accumulate(weights)
    assert abs(map5095 - stats[0]) <= 1e-12 and abs(map50 - stats[1]) <= 1e-12
    assert map50_95_points(matches, weights) == pytest.approx(100 * stats[0], abs=1e-10)
    # A small multiset with every weight 0..3 on a few images, too.
    small = np.zeros(len(matches), dtype=np.int64)
    small[:8] = [1, 2, 0, 3, 1, 0, 2, 1]
    images, annotations, results = [], [], []
    for image_id, w in zip(matches.image_ids.tolist(), small.tolist()):
        image = next(im for im in data["images"] if im["id"] == image_id)
        for copy in range(w):
            new_id = image_id * 100 + copy
            images.append({**image, "id": new_id})
            for ann in anns_by_image.get(image_id, []):
                annotations.append({**ann, "image_id": new_id, "id": len(annotations) + 1})
            results.extend({**r, "image_id": new_id} for r in by_image.get(image_id, []))
    stats = _coco_stats({**data, "images": images, "annotations": annotations}, results)
    assert np.allclose(matches.accumulate(small), stats[:2], rtol=0, atol=1e-12)


def test_tied_scores_within_an_image_interleave_its_copies_as_cocoeval_does() -> None:
    """Two detections of one image and class with one score (a true and a false positive): drawn twice, COCOeval
    ranks the copies T F T F, not T T F F, and the recall thresholds then land on different precisions. The
    weighted re-accumulation must equal COCOeval on the duplicated image list, and the unweighted one COCOeval."""
    def box(x: float) -> list[float]:
        return [x, 10.0, 40.0, 40.0]

    def dataset(copies: dict[int, int]) -> tuple[dict, list[dict]]:
        images, annotations, results = [], [], []
        gts = {1: [box(0), box(100)], 2: [box(0)]}
        dets = {1: [(box(0), 0.9), (box(300), 0.9), (box(100), 0.8)], 2: [(box(0), 0.9), (box(200), 0.7)]}
        for image_id in (1, 2):
            for copy in range(copies[image_id]):
                new_id = image_id * 100 + copy  # copies sort next to each other, in image order
                images.append({"id": new_id, "width": 640, "height": 480})
                for b in gts[image_id]:
                    annotations.append({"id": len(annotations) + 1, "image_id": new_id, "category_id": 1, "bbox": b,
                                        "area": b[2] * b[3], "iscrowd": 0})
                results += [{"image_id": new_id, "category_id": 1, "bbox": b, "score": score} for b, score in dets[image_id]]
        return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}, results

    matches = DetectionMatches.from_cocoeval(_coco_evaluated(*dataset({1: 1, 2: 1})))
    assert matches.num_detections == 5
    for weights in ({1: 1, 2: 1}, {1: 2, 2: 1}, {1: 3, 2: 2}, {1: 0, 2: 2}, {1: 2, 2: 0}):
        stats = _coco_stats(*dataset(weights))
        got = matches.accumulate(np.array([weights[1], weights[2]]))
        assert np.allclose(got, stats[:2], rtol=0, atol=1e-12), (weights, got, stats[:2])
    # The case that tells the orders apart: T F T F gives 0.714 at recall 0.4, T T F F would give 1.0.
    precision = matches.precision(np.array([2, 1]))
    assert precision[0, 40, 0] == pytest.approx(5 / 7)


def test_detection_paired_drop_of_a_model_against_itself_is_zero(yolo_scored) -> None:  # noqa: ANN001
    _, result = yolo_scored
    est = paired_bootstrap_drop(result.per_image, result.per_image, map50_95_points, n_resamples=20, seed=9)
    assert est.drop == 0.0 and est.ci95 == (0.0, 0.0) and est.within_noise


def test_spearman_rho_equals_scipy_with_and_without_ties() -> None:
    from scipy.stats import rankdata, spearmanr

    from sensisearch.measure import average_ranks, spearman_rho

    rng = np.random.default_rng(3)
    for n in (3, 5, 12, 40):
        a = rng.normal(size=n)
        b = a + rng.normal(scale=0.7, size=n)
        tied_a, tied_b = np.round(a, 0), np.round(b * 2, 0)  # many ties
        for x, y in ((a, b), (tied_a, tied_b), (a, tied_b)):
            assert np.array_equal(average_ranks(x), rankdata(x, method="average"))
            expected = spearmanr(x, y).statistic
            got = spearman_rho(list(x), list(y))
            if np.isnan(expected):
                assert got is None
            else:
                assert got == pytest.approx(float(expected), abs=1e-12)
    assert spearman_rho([1.0, 2.0], [2.0, 1.0]) is None  # fewer than 3 pairs
    assert spearman_rho([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # no spread
