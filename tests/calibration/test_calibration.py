"""Calibration package tests against independent references.

References used: numpy.percentile, onnxruntime.quantization.calibrate (MinMax
calibrator and HistogramCollector), a loop-based TensorRT entropy reference
written here (scipy.stats.entropy), brute-force MSE on raw samples, and direct
onnxruntime runs of a tiny Conv->Relu->Conv model.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import entropy as scipy_entropy

from sensisearch.calibration import (
    StatisticsCache,
    TensorStatistics,
    ThresholdTable,
    collect_statistics,
    compute_amax,
    deterministic_order,
    entropy_amax,
    entropy_divergences,
    minmax_amax,
    mse_amax,
    mse_errors,
    percentile_amax,
    update_statistics,
)
from sensisearch.errors import SensisearchError
from sensisearch.onnx_compat import make_model
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice

F32 = np.float32


def _stats_of(*batches: np.ndarray, nbins: int = 2048) -> TensorStatistics:
    stats = None
    for b in batches:
        stats = update_statistics(stats, b, nbins)
    assert stats is not None
    return stats


def _bincount_at(x: np.ndarray, width: float, nbins: int) -> np.ndarray:
    """Histogram of all data at once at a given width (the definition: floor(|x|/w) in float32)."""
    a = np.abs(np.asarray(x, dtype=F32).ravel())
    idx = np.floor(a / F32(width)).astype(np.int64)
    assert idx.max() < nbins
    return np.bincount(idx, minlength=nbins)


# --------------------------------------------------------------------------- histogram


def test_histogram_growth_equals_binning_at_final_width():
    rng = np.random.default_rng(0)
    nbins = 2048
    batches = [
        np.zeros((2, 16), F32),  # all-zero first batch: width not fixed yet
        (rng.standard_normal((4, 1000)) * 0.1).astype(F32),  # fixes the width
        rng.standard_normal((4, 1000)).astype(F32),  # ~4-5 doublings
        (rng.standard_normal((4, 1000)) * 37.0).astype(F32),  # more doublings
        (rng.standard_normal((4, 1000)) * 0.01).astype(F32),  # inside the range
    ]
    first_width = _stats_of(*batches[:2]).bin_width
    stats = _stats_of(*batches, nbins=nbins)
    everything = np.concatenate([b.ravel() for b in batches])

    assert stats.bin_width >= 64 * first_width  # growth really happened (>= 6 doublings)
    assert stats.bin_width / first_width == 2 ** round(math.log2(stats.bin_width / first_width))
    np.testing.assert_array_equal(stats.counts, _bincount_at(everything, stats.bin_width, nbins))
    assert stats.total == everything.size
    assert stats.min == float(everything.min()) and stats.max == float(everything.max())
    assert stats.amax == float(np.abs(everything).max())
    # The range is tight after growth: max|x| lies in the upper half of the bins.
    top = int(np.flatnonzero(stats.counts)[-1])
    assert nbins // 2 - 1 <= top < nbins
    # Independent sanity check with float64 np.histogram edges: only values within
    # float32 rounding of a bin edge may land differently.
    ref, _ = np.histogram(np.abs(everything.astype(np.float64)), bins=nbins, range=(0.0, nbins * stats.bin_width))
    assert np.abs(ref - stats.counts).sum() <= 4


def test_first_batch_max_lands_in_last_bin_and_statistics_are_immutable():
    x = np.array([0.0, 1.0, -3.0, 7.3], F32)
    s1 = update_statistics(None, x, nbins=16)
    assert s1.counts[-1] == 1 and s1.counts.sum() == 4
    assert s1.bin_width >= 7.3 / 16 * (1 - 1e-6)
    with pytest.raises(ValueError):
        s1.counts[0] = 5  # read-only
    s2 = update_statistics(s1, np.array([100.0], F32))
    assert s1.counts.sum() == 4 and s2.counts.sum() == 5  # s1 unchanged: a new object
    assert s2.bin_width == s1.bin_width * 16  # 4 doublings, exact


def test_all_zero_and_nonfinite_values():
    zeros = update_statistics(None, np.zeros(100, F32), nbins=64)
    assert zeros.bin_width == 0 and zeros.counts[0] == 100 and zeros.amax == 0.0
    for fn in (lambda s: entropy_amax(s.counts, s.bin_width), lambda s: mse_amax(s.counts, s.bin_width)):
        assert fn(zeros) == 0.0
    assert percentile_amax(zeros.counts, zeros.bin_width, 99.9) == 0.0

    # NaN / inf are ignored consistently (min, max, counts) and counted.
    clean = np.array([0.5, -2.0, 1.0, 0.25], F32)
    dirty = np.array([0.5, np.nan, -2.0, np.inf, 1.0, -np.inf, 0.25], F32)
    a = update_statistics(None, clean, nbins=64)
    b = update_statistics(None, dirty, nbins=64)
    assert b.nonfinite == 3 and a.nonfinite == 0
    assert (a.min, a.max, a.bin_width) == (b.min, b.max, b.bin_width)
    np.testing.assert_array_equal(a.counts, b.counts)
    empty = update_statistics(None, np.array([np.nan], F32), nbins=64)
    assert empty.total == 0 and empty.amax == 0.0 and empty.nonfinite == 1


# --------------------------------------------------------------------------- percentile / minmax


@pytest.mark.parametrize("percentile", [50.0, 99.0, 99.9, 99.99])
def test_percentile_matches_numpy(percentile):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(150_000), rng.laplace(scale=3.0, size=50_000)]).astype(F32)
    s = update_statistics(None, x)
    amax = percentile_amax(s.counts, s.bin_width, percentile)
    a = np.abs(x).astype(np.float64)
    # 'inverted_cdf' = smallest value with CDF >= p, the same definition as the
    # histogram method, so it lies inside the chosen bin whose UPPER edge we return.
    exact = float(np.percentile(a, percentile, method="inverted_cdf"))
    assert exact <= amax <= exact + s.bin_width * (1 + 1e-6)
    # numpy's default (linear interpolation) lies between the two neighbouring order
    # statistics, which are far apart in a sparse tail: allow that gap on top.
    srt = np.sort(a)
    k = math.ceil(percentile / 100 * a.size) - 1  # 0-based index of the inverted-CDF value
    gap = srt[k] - srt[max(k - 1, 0)]
    linear = float(np.percentile(a, percentile))
    assert linear <= amax <= linear + s.bin_width * (1 + 1e-6) + gap


def test_percentile_rejects_bad_values():
    with pytest.raises(SensisearchError):
        percentile_amax(np.ones(8, np.int64), 1.0, 0.0)
    with pytest.raises(SensisearchError):
        percentile_amax(np.ones(8, np.int64), 1.0, 100.5)


def test_percentile_matches_onnxruntime_histogram_collector():
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(2)
    batches = [(rng.standard_normal(20_000) * s).astype(F32) for s in (1.0, 1.5, 0.7, 3.0)]
    collector = HistogramCollector(
        method="percentile", symmetric=True, num_bins=2048, num_quantized_bins=128, percentile=99.99, scenario="same"
    )
    for b in batches:
        collector.collect({"t": b})
    ort_lo, ort_hi = (float(v) for v in collector.compute_collection_result()["t"][:2])
    ort_edges = collector.get_histogram_dict()["t"][1]
    ort_width = float(ort_edges[1] - ort_edges[0])

    s = _stats_of(*batches)
    ours = compute_amax(s, CalibrationChoice(CalibrationAlgorithm.PERCENTILE, percentile=99.99))
    # Same definition (first bin where the |x| CDF reaches p), but: ORT returns the
    # bin's LOWER edge, we the UPPER edge; ORT's bins start at min|x| and grow by
    # appending bins of the first width, ours start at 0 and double. Both bins
    # contain the same order statistic, so they differ by at most one bin of each.
    assert ort_lo == -ort_hi
    assert abs(ours - ort_hi) <= s.bin_width + ort_width
    assert ours != pytest.approx(s.amax)  # the percentile really clipped something


def _conv_model(path: Path, batch: int | str = "N", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(F32), "W1")
    b1 = numpy_helper.from_array(rng.standard_normal(4).astype(F32), "B1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 3, 3)).astype(F32), "W2")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "W2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
            # A tensor whose axis 0 is NOT the batch (channels first): [4, N, 8, 8].
            helper.make_node("Transpose", ["c1"], ["t"], perm=[1, 0, 2, 3], name="transpose"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 8, 8])],
        [w1, b1, w2],
    )
    model = make_model(graph, opset=17, ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _reference_outputs(model_path: Path, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Run ORT on a model with ``names`` declared as graph outputs directly."""
    model = onnx.load(str(model_path))
    for n in names:
        if n not in {o.name for o in model.graph.output}:
            model.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    # No graph optimisation: the plain kernels of each node. (ORT_ENABLE_ALL would
    # switch Conv to the NCHWc layout kernels, which differ by ~1 ulp.)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, {"x": x})))


def test_minmax_matches_onnxruntime_minmax_calibrator(tmp_path):
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    model_path = _conv_model(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(3)
    data = rng.standard_normal((12, 3, 8, 8)).astype(F32)
    batches = [{"x": data[i : i + 4]} for i in range(0, 12, 4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            return next(self._it, None)

    calibrator = create_calibrator(
        model_path,
        augmented_model_path=str(tmp_path / "augmented.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"symmetric": True},
    )
    calibrator.collect_data(Reader())
    ort_ranges = calibrator.compute_data()

    stats = collect_statistics(model_path, ["x", "c1", "r1", "y"], batches, checkpoints=[12])[12]
    for name in ("x", "c1", "r1", "y"):
        lo, hi = (float(np.asarray(v).ravel()[0]) for v in ort_ranges[name].range_value)
        # Same kernels on the same float32 data: ReduceMin/Max are exact, so the
        # only tolerance is ORT returning float32 (ours is float32 widened to float).
        assert minmax_amax(stats[name]) == pytest.approx(hi, rel=1e-7, abs=0), name
        assert lo == -hi


# --------------------------------------------------------------------------- entropy


def reference_entropy(counts, start_bin=128, levels=128, eps=1e-4):
    """Loop-based TensorRT entropy (Migacz GTC 2017) written from the pseudocode.

    Level mapping as pytorch-quantization (np.linspace + np.digitize); KL with
    scipy.stats.entropy (normalises P and Q). eps > 0: an EMPTY Q bin where P > 0
    gets eps samples (sensisearch's documented choice); eps == 0: pytorch-
    quantization behaviour (+inf). Returns (candidates, kl list).

    ORT's entropy variant differs and is NOT a reference here: it histograms
    SIGNED values over [-max|x|, max|x|], grows candidate windows symmetrically
    around the zero bin, folds outliers from both sides into the edge bins,
    merges bins by integer division (remainder into the last level), smooths
    both P and Q (MXNet smooth_distribution, eps 1e-4) and with ORT's default
    num_bins=128 == num_quantized_bins there is a single window: min-max.
    """
    bins = np.array(counts, dtype=np.float64)
    bins[0] = bins[1]  # suppress the zero spike like pytorch-quantization
    n = bins.size
    cands, kls = [], []
    for i in range(start_bin, n + 1):
        p = bins[:i].copy()
        p[i - 1] += bins[i:].sum()
        space = np.linspace(0, i, num=levels + 1)
        level_of = np.digitize(np.arange(i), space) - 1
        merged = np.zeros(levels)
        nonzero = np.zeros(levels)
        for j in range(i):
            if bins[j] != 0:
                merged[level_of[j]] += bins[j]
                nonzero[level_of[j]] += 1
        q = np.zeros(i)
        for j in range(i):
            if bins[j] != 0:
                q[j] = merged[level_of[j]] / nonzero[level_of[j]]
        if q.sum() == 0:
            kl = math.inf
        else:
            if eps > 0:
                q[(q == 0) & (p > 0)] = eps
            kl = float(scipy_entropy(p, q))
        cands.append(i)
        kls.append(kl)
    return np.array(cands), np.array(kls)


def _entropy_cases():
    rng = np.random.default_rng(4)
    normal = rng.standard_normal(100_000)
    relu = np.maximum(rng.standard_normal(100_000) * 2.0, 0.0)  # zero spike
    heavy = rng.standard_t(3, 100_000)  # sparse tail: many empty bins
    outlier = np.append(rng.standard_normal(50_000), 60.0)  # far outlier behind a gap
    return {"normal": normal, "relu": relu, "student_t3": heavy, "outlier": outlier}


@pytest.mark.parametrize("case", ["normal", "relu", "student_t3", "outlier"])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_entropy_matches_loop_reference(case, eps):
    x = _entropy_cases()[case].astype(F32)
    nbins = 512  # smaller histogram keeps the O(n^2) python reference fast
    s = update_statistics(None, x, nbins=nbins)
    ref_cand, ref_kl = reference_entropy(s.counts, eps=eps)
    cand, kl = entropy_divergences(s.counts, empty_bin_eps=eps)
    np.testing.assert_array_equal(cand, ref_cand)
    np.testing.assert_array_equal(np.isinf(kl), np.isinf(ref_kl))
    finite = np.isfinite(ref_kl)
    np.testing.assert_allclose(kl[finite], ref_kl[finite], rtol=1e-7, atol=1e-10)

    # Chosen candidate: last argmin of the reference (pytorch-quantization tie rule).
    best_ref = len(ref_kl) - 1 - int(np.argmin(ref_kl[::-1]))
    amax = entropy_amax(s.counts, s.bin_width, empty_bin_eps=eps)
    best = round(amax / s.bin_width - 0.5)
    assert amax == pytest.approx((best + 0.5) * s.bin_width)
    # Equal unless two candidates tie to within float rounding of the two methods.
    assert best == ref_cand[best_ref] or abs(ref_kl[best - ref_cand[0]] - ref_kl[best_ref]) < 1e-12


def test_entropy_full_size_histogram_against_reference():
    x = _entropy_cases()["relu"].astype(F32)
    s = update_statistics(None, x)  # 2048 bins, as used in production
    ref_cand, ref_kl = reference_entropy(s.counts)
    best_ref = ref_cand[len(ref_kl) - 1 - int(np.argmin(ref_kl[::-1]))]
    assert entropy_amax(s.counts, s.bin_width) == pytest.approx((best_ref + 0.5) * s.bin_width)


def test_entropy_ties_pick_the_largest_threshold():
    # Uniform mass in bins 0..9: every candidate reproduces P exactly (KL = 0), so
    # the tie rule decides. Like pytorch-quantization we take the LAST argmin,
    # i.e. no clipping; the loop reference must agree.
    counts = np.zeros(512, np.int64)
    counts[:10] = 100
    ref_cand, ref_kl = reference_entropy(counts)
    assert np.all(ref_kl < 1e-12)
    assert entropy_amax(counts, 0.5) == (512 + 0.5) * 0.5
    assert entropy_amax(counts, 0.5, observed_max=5.0) == 5.0


# --------------------------------------------------------------------------- mse


@pytest.mark.parametrize("dist", ["normal", "laplace", "student_t3"])
def test_mse_matches_brute_force_on_raw_samples(dist):
    rng = np.random.default_rng(5)
    x = {
        "normal": rng.standard_normal(20_000),
        "laplace": rng.laplace(size=20_000),
        "student_t3": rng.standard_t(3, 20_000),
    }[dist].astype(F32)
    s = update_statistics(None, x)
    amax = mse_amax(s.counts, s.bin_width)

    xs = x.astype(np.float64)

    def raw_mse(a: float) -> float:
        q = np.clip(np.round(xs * 127.0 / a), -127, 127) * a / 127.0
        return float(np.mean((q - xs) ** 2))

    grid = (np.arange(128, 2048) + 0.5) * s.bin_width
    errors = np.array([raw_mse(a) for a in grid])
    best = float(grid[int(np.argmin(errors))])
    assert abs(amax - best) <= 3 * s.bin_width, (amax, best, s.bin_width)
    assert raw_mse(amax) <= errors.min() * 1.001


def test_mse_errors_vectorised_equal_loop():
    rng = np.random.default_rng(6)
    s = update_statistics(None, rng.laplace(size=5000).astype(F32), nbins=256)
    cand, err = mse_errors(s.counts, s.bin_width, start_bin=128)
    centres = (np.arange(256) + 0.5) * s.bin_width
    for i in (0, 17, len(cand) - 1):
        a = cand[i]
        q = np.clip(np.round(centres * (127 / a)), -127, 127) / (127 / a)
        assert err[i] == pytest.approx(float((s.counts * (q - centres) ** 2).sum()), rel=1e-12)


# --------------------------------------------------------------------------- outliers


def test_outlier_thresholds_far_below_minmax():
    rng = np.random.default_rng(7)
    x = np.append(rng.standard_normal(100_000), 100.0).astype(F32)
    s = update_statistics(None, x)
    mm = compute_amax(s, CalibrationChoice(CalibrationAlgorithm.MINMAX))
    ent = compute_amax(s, CalibrationChoice(CalibrationAlgorithm.ENTROPY))
    pct = compute_amax(s, CalibrationChoice(CalibrationAlgorithm.PERCENTILE, percentile=99.99))
    assert mm == 100.0
    assert ent < 0.2 * mm and pct < 0.2 * mm
    # pytorch-quantization's unsmoothed KL (eps=0) cannot clip this outlier: every
    # clipping candidate folds it into an empty bin (+inf). Documented deviation.
    assert entropy_amax(s.counts, s.bin_width, empty_bin_eps=0.0, observed_max=s.amax) == mm

    # MSE trades one outlier's clipping error (100-a)^2/N against the rounding
    # noise (a/127)^2/12 of all samples: a* ~= 100 K/(K+N), K = 12*127^2. It keeps
    # a single outlier in 1e5 samples (a* ~ 66) and clips it with 2e6 samples.
    k = 12 * 127**2
    assert mse_amax(s.counts, s.bin_width) == pytest.approx(100 * k / (k + 100_000), rel=0.1)
    big = update_statistics(None, np.append(rng.standard_normal(2_000_000), 100.0).astype(F32))
    assert compute_amax(big, CalibrationChoice(CalibrationAlgorithm.MSE)) < 0.2 * big.amax


def test_threshold_table_memoises_and_resolves_samples():
    rng = np.random.default_rng(8)
    a = update_statistics(None, rng.standard_normal(5000).astype(F32))
    b = update_statistics(a, (rng.standard_normal(5000) * 3).astype(F32))
    table = ThresholdTable({128: {"t": a}, 256: {"t": b}})
    for algo in CalibrationAlgorithm:
        choice = CalibrationChoice(algo, samples=256, percentile=99.9)
        assert table.amax("t", 256, algo, 99.9) == compute_amax(b, choice)
        assert table.amaxes(choice) == {"t": compute_amax(b, choice)}
    assert table.amax("t", 128, "percentile", 99.0) != table.amax("t", 128, "percentile", 99.999)
    assert table.amax("t", 4096, "minmax") == b.amax  # data smaller than asked: largest count
    with pytest.raises(ValueError):
        table.amax("t", 200, "minmax")


def test_deterministic_order():
    a = deterministic_order(100, seed=3)
    np.testing.assert_array_equal(np.sort(a), np.arange(100))
    np.testing.assert_array_equal(a, deterministic_order(100, seed=3))
    assert not np.array_equal(a, deterministic_order(100, seed=4))


# --------------------------------------------------------------------------- collect_statistics + cache


def test_collect_statistics_checkpoints_equal_prefixes(tmp_path, caplog):
    model_path = _conv_model(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(9)
    data = rng.standard_normal((20, 3, 8, 8)).astype(F32)
    batches = [{"x": data[i : i + 4]} for i in range(0, 20, 4)]
    tensors = ["x", "c1", "r1", "y"]

    with caplog.at_level(logging.WARNING, logger="sensisearch.calibration"):
        result = collect_statistics(model_path, tensors, iter(batches), checkpoints=[3, 8, 14, 32])
    assert sorted(result) == [3, 8, 14, 20]  # 32 > data: final stats under 20
    assert "only 20 samples" in caplog.text

    for k in (3, 8, 14, 20):
        ref = _reference_outputs(model_path, ["c1", "r1", "y"], data[:k])
        ref["x"] = data[:k]
        for name in tensors:
            st = result[k][name]
            assert st.min == float(ref[name].min()) and st.max == float(ref[name].max()), (k, name)
            assert st.total == ref[name].size
        # Statistics computed separately from the prefix, batched the same way.
        prefix_batches = [{"x": data[i : min(i + 4, k)]} for i in range(0, k, 4)]
        if k == 3:
            prefix_batches = [{"x": data[:3]}]
        separate = collect_statistics(model_path, tensors, prefix_batches, checkpoints=[k])[k]
        for name in tensors:
            assert separate[name] == result[k][name], (k, name)


def test_collect_statistics_fixed_batch_one_model(tmp_path):
    model_path = _conv_model(tmp_path / "fixed.onnx", batch=1)
    rng = np.random.default_rng(10)
    data = rng.standard_normal((6, 3, 8, 8)).astype(F32)
    result = collect_statistics(model_path, ["r1"], [{"x": data[:3]}, {"x": data[3:]}], checkpoints=[2, 5])
    assert sorted(result) == [2, 5]
    for k in (2, 5):
        ref = np.concatenate([_reference_outputs(model_path, ["r1"], data[i : i + 1])["r1"] for i in range(k)])
        assert result[k]["r1"].max == float(ref.max()) and result[k]["r1"].total == ref.size


def test_collect_statistics_checkpoint_inside_batch_without_batch_axis(tmp_path):
    # Tensor "t" is [4, N, 8, 8]; with batches of 4 samples its axis 0 has the
    # batch's size but is the channel axis. The checkpoint at 3 must still give
    # exactly the first 3 samples (sensisearch splits the INPUTS, not the outputs).
    model_path = _conv_model(tmp_path / "tiny.onnx")
    data = np.random.default_rng(12).standard_normal((8, 3, 8, 8)).astype(F32)
    result = collect_statistics(model_path, ["t"], [{"x": data[:4]}, {"x": data[4:]}], checkpoints=[3, 8])
    for k in (3, 8):
        ref = _reference_outputs(model_path, ["t"], data[:k])["t"]
        assert (result[k]["t"].min, result[k]["t"].max, result[k]["t"].total) == (
            float(ref.min()), float(ref.max()), ref.size
        )
    assert result[3]["t"] == update_statistics(None, ref[:, :3])


def test_collect_statistics_fixed_batch_two_splits_outputs(tmp_path):
    # Fixed batch 2: a checkpoint at 3 falls inside a run and is cut on the outputs' axis 0.
    model_path = _conv_model(tmp_path / "fixed2.onnx", batch=2)
    data = np.random.default_rng(13).standard_normal((8, 3, 8, 8)).astype(F32)
    result = collect_statistics(model_path, ["r1"], [{"x": data[:4]}, {"x": data[4:]}], checkpoints=[3, 8])
    runs = np.concatenate([_reference_outputs(model_path, ["r1"], data[i : i + 2])["r1"] for i in range(0, 8, 2)])
    expected3 = update_statistics(update_statistics(None, runs[:2]), runs[2:3])
    assert result[3]["r1"] == expected3
    assert result[8]["r1"].total == runs.size and result[8]["r1"].max == float(runs.max())
    with pytest.raises(SensisearchError, match="fixed batch of 2"):
        collect_statistics(model_path, ["r1"], [{"x": data[:3]}], checkpoints=[3])


def test_collect_statistics_user_errors(tmp_path):
    model_path = _conv_model(tmp_path / "tiny.onnx")
    x = np.zeros((2, 3, 8, 8), F32)
    with pytest.raises(SensisearchError, match="not produced"):
        collect_statistics(model_path, ["nope"], [{"x": x}], checkpoints=[2])
    with pytest.raises(SensisearchError, match="initializer"):
        collect_statistics(model_path, ["W1"], [{"x": x}], checkpoints=[2])
    with pytest.raises(SensisearchError, match="ascending"):
        collect_statistics(model_path, ["c1"], [{"x": x}], checkpoints=[4, 2])
    with pytest.raises(SensisearchError, match="batch 0"):
        collect_statistics(model_path, ["c1"], [{"x": np.zeros((2, 5, 8, 8), F32)}], checkpoints=[2])
    with pytest.raises(SensisearchError, match="does not exist"):
        collect_statistics(tmp_path / "missing.onnx", ["c1"], [{"x": x}], checkpoints=[2])


def test_statistics_cache_round_trip_and_corruption(tmp_path, caplog):
    rng = np.random.default_rng(11)
    a = update_statistics(None, rng.standard_normal(1000).astype(F32))
    b = update_statistics(a, np.array([np.nan, 50.0], F32))
    stats = {128: {"t/0": a, "u": b}, 256: {"t/0": b, "u": b}}
    cache = StatisticsCache(tmp_path / "cache")
    key = StatisticsCache.key("sha", "fp", [128, 256], 2048)
    assert key != StatisticsCache.key("sha", "fp", [128, 512], 2048)
    assert key != StatisticsCache.key("sha", "fp2", [128, 256], 2048)
    assert cache.load(key) is None  # miss

    path = cache.save(key, stats)
    loaded = cache.load(key)
    assert loaded is not None and sorted(loaded) == [128, 256]
    for k in stats:
        assert list(loaded[k]) == list(stats[k])
        for name in stats[k]:
            assert loaded[k][name] == stats[k][name]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind

    other = StatisticsCache.key("sha", "fp", [128], 2048)
    (tmp_path / "cache" / f"stats-{other}.npz").write_bytes(path.read_bytes())
    assert cache.load(other) is None  # a file under the wrong key is not trusted

    raw = path.read_bytes()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sensisearch.calibration"):
        path.write_bytes(raw[: len(raw) // 2])  # partial file
        assert cache.load(key) is None
        flipped = bytearray(raw)
        flipped[len(raw) // 3] ^= 0xFF  # bit rot inside an array: zip CRC mismatch
        path.write_bytes(bytes(flipped))
        assert cache.load(key) is None
        path.write_bytes(b"not a zip")
        assert cache.load(key) is None
    assert caplog.text.count("ignoring unreadable calibration cache") == 3

    cache.save(key, stats)  # overwrites the corrupt file atomically
    assert cache.load(key) is not None


def test_calibration_ranges_fill_clipped_min_and_round_trip():
    """The study's TensorRange carries the calibrated minimum of the chosen sample count,
    clipped to [-amax, 0] (the algorithm's clipping applies to the negative side too);
    ranges_to_dict/ranges_from_dict keep it and still read dicts written without it."""
    from sensisearch.quantize.ranges import TensorRange
    from sensisearch.calibration.ranges import CalibrationRanges
    from sensisearch.quantize.ranges import ranges_from_dict, ranges_to_dict

    rng = np.random.default_rng(11)
    silu_like = rng.standard_normal(20000).astype(F32) * 3
    silu_like = silu_like / (1 + np.exp(-silu_like))  # min ~ -0.28
    outlier = np.append(rng.standard_normal(20000), [-50.0]).astype(F32)  # one far negative outlier
    relu = np.abs(rng.standard_normal(20000)).astype(F32)
    a = {"silu": update_statistics(None, silu_like[:100]), "out": update_statistics(None, outlier[:100]),
         "relu": update_statistics(None, relu[:100])}
    b = {"silu": update_statistics(None, silu_like), "out": update_statistics(None, outlier), "relu": update_statistics(None, relu)}
    ranges = CalibrationRanges({1: a, 2: b})
    mm = ranges.ranges(["silu", "out", "relu"], CalibrationChoice(CalibrationAlgorithm.MINMAX, samples=2))
    assert mm["silu"].min == pytest.approx(float(silu_like.min())) and -0.3 < mm["silu"].min < -0.2
    assert not mm["silu"].nonnegative and mm["silu"].lower == mm["silu"].min
    assert mm["out"].min == pytest.approx(-50.0) and mm["out"].amax == pytest.approx(50.0)
    assert mm["relu"].nonnegative and mm["relu"].min == 0.0
    first = ranges.ranges(["silu"], CalibrationChoice(CalibrationAlgorithm.MINMAX, samples=1))
    assert first["silu"].min == pytest.approx(float(silu_like[:100].min()))  # the chosen sample count's minimum
    pct = ranges.ranges(["out"], CalibrationChoice(CalibrationAlgorithm.PERCENTILE, samples=2, percentile=99.0))
    assert pct["out"].amax < 5.0 and pct["out"].min == -pct["out"].amax  # clipped like the positive side
    for r in (*mm.values(), *pct.values()):
        assert -r.amax <= r.min <= 0.0
    assert ranges_from_dict(ranges_to_dict(mm)) == mm
    old = {"t": {"amax": 2.0, "nonnegative": False}}  # a config.json written before TensorRange.min
    assert ranges_from_dict(old) == {"t": TensorRange(2.0, False)} and ranges_from_dict(old)["t"].min is None
    assert ranges_to_dict(ranges_from_dict(old)) == old


# --------------------------------------------------------------------------- entropy vs NVIDIA's published code


def pytorch_quantization_amax_entropy(calib_hist, calib_bin_edges, num_bits=8, unsigned=False, stride=1, start_bin=128):
    """NVIDIA pytorch-quantization ``calib/histogram.py::_compute_amax_entropy``, line by line.

    Source: github.com/NVIDIA/TensorRT, tools/pytorch-quantization/pytorch_quantization/
    calib/histogram.py (the open restatement of TensorRT's entropy calibration).
    Only the final ``torch.tensor(...)`` wrapping is dropped (no torch here), and
    ``bins`` is copied (their ``calib_hist[:]`` is a numpy VIEW, so their
    ``bins[0] = bins[1]`` edits the caller's histogram). Their no-op
    ``_normalize_distr`` is kept: ``scipy.stats.entropy`` normalises P and Q.
    """
    from collections import Counter

    def _normalize_distr(distr):
        summ = np.sum(distr)
        if summ != 0:
            distr = distr / summ  # noqa: F841 - as upstream: rebinds the local only

    bins = np.array(calib_hist[:])
    bins[0] = bins[1]
    total_data = np.sum(bins)
    divergences = []
    arguments = []
    nbins = 1 << (num_bits - 1 + int(unsigned))
    starting = start_bin
    stop = len(bins)
    new_density_counts = np.zeros(nbins, dtype=np.float64)
    for i in range(starting, stop + 1, stride):
        new_density_counts.fill(0)
        space = np.linspace(0, i, num=nbins + 1)
        digitized_space = np.digitize(range(i), space) - 1
        digitized_space[bins[:i] == 0] = -1
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density_counts[digitized] += bins[idx]
        counter = Counter(digitized_space)
        for key, val in counter.items():
            if key != -1:
                new_density_counts[key] = new_density_counts[key] / val
        new_density = np.zeros(i, dtype=np.float64)
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density[idx] = new_density_counts[digitized]
        total_counts_new = np.sum(new_density) + np.sum(bins[i:])
        _normalize_distr(new_density)
        reference_density = np.array(bins[: len(digitized_space)])
        reference_density[-1] += np.sum(bins[i:])
        total_counts_old = np.sum(reference_density)
        if round(total_counts_new) != total_data or round(total_counts_old) != total_data:
            raise RuntimeError("Count mismatch!")
        _normalize_distr(reference_density)
        ent = scipy_entropy(reference_density, new_density)
        divergences.append(ent)
        arguments.append(i)
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return calib_bin_edges[last_argmin * stride + starting]


def _edges(stats: TensorStatistics) -> np.ndarray:
    return np.arange(stats.nbins + 1, dtype=np.float64) * stats.bin_width


def _rebinned(stats: TensorStatistics, factor: int) -> TensorStatistics:
    """The same data binned at ``factor`` times the width (exact: sums of adjacent bins)."""
    counts = stats.counts.reshape(-1, factor).sum(axis=1)
    return TensorStatistics(stats.min, stats.max, counts, stats.bin_width * factor, stats.nonfinite)


@pytest.fixture(scope="module")
def yolo_statistics(yolo_model: Path, coco_dev: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TensorStatistics]:
    """Real YOLOv5n activation histograms (2 COCO images, the study's collector and calibration source)."""
    from sensisearch.quantize import statistics_tensors
    from sensisearch.study.config._settings import StudySettings
    from sensisearch.study.config._inputs import build_evaluation, resolve_inputs

    cache = tmp_path_factory.mktemp("yolo-calib-cache")
    resolved = resolve_inputs(StudySettings(
        model=yolo_model, eval_data=coco_dev / "images", annotations=coco_dev / "instances.json", calib_limit=2, cache_dir=cache,
    ))
    source = build_evaluation(resolved.settings, resolved.input_spec, resolved.model, cache).calibration
    assert source is not None and source.size == 2
    tensors = statistics_tensors(resolved.model, resolved.info)
    feeds = ({"images": b} for b in source.batches(range(source.size), 1))
    return collect_statistics(yolo_model, tensors, feeds, [2])[2]


def test_entropy_picks_pytorch_quantization_candidate_on_real_yolov5n_histograms(yolo_statistics):
    # TensorRT's published threshold is (i + 0.5) * w (GTC 2017 slide; TPU-MLIR
    # restatement), pytorch-quantization returns the edge i * w of the SAME
    # candidate i. Real SiLU/concat histograms of YOLOv5n, rebinned to 512 bins
    # (exact) to keep their O(bins^2) python loop short, plus one at full 2048.
    names = sorted(yolo_statistics)
    picked = [names[k] for k in np.linspace(0, len(names) - 1, 5).astype(int)]
    clipped = 0
    for name in picked:
        s = _rebinned(yolo_statistics[name], 4)
        theirs = pytorch_quantization_amax_entropy(s.counts, _edges(s))
        ours = entropy_amax(s.counts, s.bin_width)  # uncapped: compare the candidate itself
        assert ours == pytest.approx(theirs + 0.5 * s.bin_width, rel=1e-12), name
        clipped += theirs < 0.9 * s.amax
    assert clipped >= 3  # the check is not vacuous: real tensors do get clipped
    full = yolo_statistics["/model.0/act/Mul_output_0"]
    theirs = pytorch_quantization_amax_entropy(full.counts, _edges(full))
    assert entropy_amax(full.counts, full.bin_width) == pytest.approx(theirs + 0.5 * full.bin_width, rel=1e-12)


def test_entropy_known_optimum_and_pytorch_quantization_agree():
    # Bins 0..255 hold values constant within each PAIR (and differing between
    # pairs), nothing beyond. Candidate i = 256 merges exactly those pairs into the
    # 128 levels, so Q == P and KL = 0; every other candidate either folds mass
    # into its last bin or averages over unequal bins (KL > 0). Known optimum i = 256.
    rng = np.random.default_rng(11)
    pairs = rng.integers(100, 1000, size=128)
    counts = np.zeros(1024, np.int64)
    counts[:256] = np.repeat(pairs, 2)
    counts[0] = counts[1]  # already "zero-spike suppressed", so the edit changes nothing
    w = 0.01
    cand, kl = entropy_divergences(counts)
    assert kl[cand == 256][0] < 1e-12 and np.all(kl[cand != 256] > 1e-9)
    assert entropy_amax(counts, w) == pytest.approx(256.5 * w)
    edges = np.arange(1025) * w
    assert pytorch_quantization_amax_entropy(counts, edges) == pytest.approx(256 * w)


def test_onnxruntime_default_entropy_is_not_tensorrt_entropy():
    # Why ORT's entropy numbers are no reference for ours: with its defaults
    # (create_calibrator: num_bins=128, num_quantized_bins=128) its signed
    # histogram has a single candidate window, the full range, on data that
    # arrives in one batch; TensorRT's KL search clips the same outliers.
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(12)
    x = np.append(rng.standard_normal(200_000), [25.0, -9.0]).astype(F32)
    collector = HistogramCollector("entropy", True, 128, 128, None, None)
    collector.collect({"t": x})
    lo, hi = collector.compute_collection_result()["t"][:2]
    assert (float(lo), float(hi)) == (float(x.min()), float(x.max()))
    s = update_statistics(None, x)
    assert entropy_amax(s.counts, s.bin_width, observed_max=s.amax) < 0.3 * s.amax


# --------------------------------------------------------------------------- threshold spread


def test_threshold_spread_equals_single_algorithm_functions():
    from sensisearch.calibration import TensorThresholds, calibration_label, mixed_amax, threshold_spread

    rng = np.random.default_rng(13)
    outlier = _stats_of(np.append(rng.standard_normal(100_000), 80.0).astype(F32))
    uniform = _stats_of(rng.uniform(-3.0, 3.0, 100_000).astype(F32))
    zeros = _stats_of(np.zeros(100, F32))
    spread = threshold_spread({"outlier": outlier, "uniform": uniform, "zeros": zeros}, percentiles=(99.9, 99.99))
    assert [t.tensor for t in spread] == ["outlier", "uniform", "zeros"]
    assert all(isinstance(t, TensorThresholds) for t in spread)
    assert list(spread[0].amax) == ["minmax", "entropy", "percentile 99.9", "percentile 99.99", "mse", "mixed 99.99"]
    for t, s in zip(spread, (outlier, uniform, zeros)):
        expected = {
            "minmax": minmax_amax(s),
            "entropy": entropy_amax(s.counts, s.bin_width, observed_max=s.amax),
            "percentile 99.9": percentile_amax(s.counts, s.bin_width, 99.9, observed_max=s.amax),
            "percentile 99.99": percentile_amax(s.counts, s.bin_width, 99.99, observed_max=s.amax),
            "mse": mse_amax(s.counts, s.bin_width, observed_max=s.amax),
            "mixed 99.99": mixed_amax(s, 99.99),
        }
        assert dict(t.amax) == expected, t.tensor
        if s.amax > 0:
            assert dict(t.clipping) == {k: v / s.amax for k, v in expected.items()}
    # The outlier tensor needs clipping (its percentile amax is near N(0,1)'s
    # 99.99% quantile 3.9, i.e. ~5% of min-max 80); the uniform one does not.
    label, ratio = spread[0].strongest_clipping
    assert ratio < 0.1 and spread[0].clipping["percentile 99.99"] < 0.06
    assert spread[1].clipping["percentile 99.99"] > 0.99 and spread[1].minmax == pytest.approx(3.0, abs=1e-3)
    assert spread[2].minmax == 0.0 and set(spread[2].clipping.values()) == {1.0}
    assert calibration_label("percentile", 99.999) == "percentile 99.999"


def test_threshold_spread_selection_and_bad_input():
    from sensisearch.calibration import threshold_spread

    s = _stats_of(np.random.default_rng(14).standard_normal(10_000).astype(F32))
    only = threshold_spread({"t": s}, algorithms=["percentile"], percentiles=[99.0, 99.0, 99.5])
    assert list(only[0].amax) == ["minmax", "percentile 99", "percentile 99.5"]  # min-max always, duplicates once
    assert list(threshold_spread({"t": s}, algorithms=["mse"], percentiles=[])[0].amax) == ["minmax", "mse"]
    with pytest.raises(SensisearchError, match="unknown calibration algorithm"):
        threshold_spread({"t": s}, algorithms=["kl"])
    with pytest.raises(SensisearchError, match=r"percentile must be in \(0, 100\]"):
        threshold_spread({"t": s}, percentiles=[100.5])
    with pytest.raises(SensisearchError, match="at least one percentile"):
        threshold_spread({"t": s}, algorithms=["percentile"], percentiles=[])


def test_threshold_spread_on_real_yolov5n_statistics(yolo_statistics):
    # Every real tensor: the spread's thresholds are the trial's thresholds
    # (ThresholdTable, i.e. what a study would emit), and none exceeds min-max.
    from sensisearch.calibration import threshold_spread

    spread = threshold_spread(yolo_statistics, percentiles=(99.99,))
    table = ThresholdTable({2: yolo_statistics})
    assert len(spread) == len(yolo_statistics) > 50
    for t in spread:
        assert t.amax["entropy"] == table.amax(t.tensor, 2, "entropy")
        assert t.amax["percentile 99.99"] == table.amax(t.tensor, 2, "percentile", 99.99)
        assert all(0.0 < r <= 1.0 for r in t.clipping.values()), t.tensor
    assert sum(t.strongest_clipping[1] < 0.5 for t in spread) > 10  # YOLOv5n's SiLU tails get clipped


# --------------------------------------------------------------------------- mixed (issue 10)


def _error_loop(counts: np.ndarray, width: float, amax: float) -> float:
    """Independent reference: fake-quantize every occupied bin centre one by one (127 symmetric levels)."""
    step = amax / 127.0
    total = 0.0
    for j, c in enumerate(counts):
        if c:
            x = (j + 0.5) * width
            q = min(max(round(x / step), -127), 127) * step
            total += int(c) * (q - x) ** 2
    return total


def _mixed_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    # A bulk plus a rare far tail (3 in a million at 12 sigma), as in YOLOv5n's SiLU outputs:
    # min-max spends two thirds of the levels on the tail. A tail that is not rare
    # (Student-t, Laplace) is better kept: clipping it costs more than the resolution gains.
    heavy = rng.normal(0.0, 1.0, 1_000_000).astype(F32)
    heavy[:3] = 12.0
    return {
        "heavy": heavy,
        "uniform": rng.uniform(-3.0, 3.0, 200_000).astype(F32),
    }


@pytest.mark.parametrize("name,expect_clip", [("heavy", True), ("uniform", False)])
def test_mixed_picks_percentile_only_where_clipping_pays(name, expect_clip):
    from sensisearch.calibration import mixed_amax, needs_clipping, quantization_error
    from sensisearch.calibration.thresholds import CLIPPING_ERROR_RATIO

    stats = _stats_of(_mixed_cases()[name])
    minmax = stats.amax
    clipped = percentile_amax(stats.counts, stats.bin_width, 99.99, observed_max=minmax)
    err_clip = _error_loop(stats.counts, stats.bin_width, clipped)
    err_minmax = _error_loop(stats.counts, stats.bin_width, minmax)
    assert quantization_error(stats.counts, stats.bin_width, clipped) == pytest.approx(err_clip, rel=1e-9)
    direct = clipped < minmax and err_clip < CLIPPING_ERROR_RATIO * err_minmax
    assert direct is expect_clip
    assert needs_clipping(stats.counts, stats.bin_width, clipped, minmax) is direct
    assert mixed_amax(stats, 99.99) == (clipped if direct else minmax)
    if expect_clip:
        assert mixed_amax(stats, 99.99) < 0.5 * minmax


def test_mixed_in_threshold_table_is_per_tensor():
    table = ThresholdTable({100: {name: _stats_of(x) for name, x in _mixed_cases().items()}})
    choice = CalibrationChoice(CalibrationAlgorithm.MIXED, 100, 99.99)
    amax = table.amaxes(choice)
    assert amax["heavy"] == table.amax("heavy", 100, CalibrationAlgorithm.PERCENTILE, 99.99)
    assert amax["uniform"] == table.amax("uniform", 100, CalibrationAlgorithm.MINMAX)
    # The percentile is part of the memo key: another clip gives another heavy threshold.
    other = table.amax("heavy", 100, CalibrationAlgorithm.MIXED, 99.999)
    assert other == table.amax("heavy", 100, CalibrationAlgorithm.PERCENTILE, 99.999) != amax["heavy"]
