"""Bias correction (sensisearch.calibration.bias): the numeric core against independent
numpy references, the bias rewriting on small emitted models, and the effect on the
digits example's all-INT8 deployables measured with ONNX Runtime."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sensisearch.backends.onnxruntime import count_kernels
from sensisearch.calibration import ThresholdTable, collect_statistics
from sensisearch.calibration.bias import (
    FakeQuant,
    QuantizedLayer,
    apply_bias_shifts,
    bias_shifts,
    fake_quantize,
    layer_bias_shift,
    quantized_layers,
)
from sensisearch.model import analyze_model
from sensisearch.quantize import (
    ONNXRUNTIME_CPU,
    TENSORRT,
    Precision,
    TensorRange,
    TrialConfig,
    emit_deployable_onnx,
    plan_placement,
    statistics_tensors,
)
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "sensisearch" / "examples" / "digits"


# --------------------------------------------------------------------------- helpers
def _session(model: onnx.ModelProto, outputs: list[str] = (), level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
             optimized_path: str | None = None) -> ort.InferenceSession:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in outputs if t not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _outputs(model: onnx.ModelProto, names: list[str], feeds: dict) -> dict[str, np.ndarray]:
    return dict(zip(names, _session(model, names).run(names, feeds)))


def _channel_mean(y: np.ndarray, axis: int = 1) -> np.ndarray:
    axis = axis % y.ndim
    return y.mean(axis=tuple(i for i in range(y.ndim) if i != axis), dtype=np.float64)


def _conv_numpy(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Direct NCHW convolution (groups 1, no dilation) in float64: the independent reference."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", win, w.astype(np.float64))


def _per_channel_weight(w: np.ndarray, axis: int, levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 as the emitter writes it: (scales, dequantized weight)."""
    amax = np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1).max(axis=1)
    scale = (amax / levels).astype(np.float32)
    return scale, fake_quantize(w, scale, np.zeros(scale.shape, np.int8), -levels, levels, axis)


# --------------------------------------------------------------------------- numeric core
@pytest.mark.parametrize("zp_dtype,zp,per_channel", [(np.int8, 0, False), (np.uint8, 37, False), (np.int8, 0, True)])
def test_fake_quantize_matches_onnxruntime_qdq(zp_dtype, zp, per_channel) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 5, 5)) * 3).astype(np.float32)
    x[0, 0, 0, :3] = [0.25, -0.75, 1.25]  # exact halves: round half to even
    scale = np.array([0.5, 0.1, 0.05], np.float32) if per_channel else np.array(0.5, np.float32)
    zero = np.full(scale.shape, zp, zp_dtype)
    attrs = {"axis": 1} if per_channel else {}
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    expected = _session(model).run(None, {"x": x})[0]
    lo, hi = (-128, 127) if zp_dtype is np.int8 else (0, 255)
    got = FakeQuant(scale, zero, lo, hi, 1 if per_channel else None)(x)
    np.testing.assert_array_equal(got, expected)


def _corrected_means_conv(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FP32 mean, deployed mean before and after correction of a random strided conv, all computed in numpy."""
    rng = np.random.default_rng(seed)
    # Inputs with a non-zero mean and a long tail, and an activation threshold that clips it (as
    # percentile / MSE calibration would): the quantized output mean then moves clearly.
    x = rng.gamma(1.5, 0.5, size=(12, 3, 9, 9)).astype(np.float32)
    w = (rng.standard_normal((5, 3, 3, 3)) * 0.3).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    _, w_deq = _per_channel_weight(w, 0)
    amax = float(np.quantile(x, 0.98))
    xq = FakeQuant(np.array(amax / 127, np.float32), np.array(0, np.int8), -128, 127)
    layer = QuantizedLayer(
        name="conv", op_type="Conv", weight=w, deployed_weight=w_deq, input_quant=xq, channel_axis=1,
        attributes={"strides": [2, 2], "pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}, bias=bias, deployed_bias=bias,
    )
    shift = layer_bias_shift(layer, [x[:5], x[5:]])  # two batches: the mean is over all samples
    fp32 = _channel_mean(_conv_numpy(x, w, 2, 1)) + bias
    deployed = _channel_mean(_conv_numpy(xq(x), w_deq, 2, 1)) + bias
    return fp32, deployed, deployed + shift


@pytest.mark.parametrize("seed", [0, 1])
def test_conv_shift_restores_fp32_channel_mean(seed) -> None:
    fp32, before, after = _corrected_means_conv(seed)
    tol = 1e-4 * max(1.0, float(np.abs(fp32).max()))
    assert np.abs(before - fp32).max() > 20 * tol, "quantization should shift the mean (else the test proves nothing)"
    np.testing.assert_allclose(after, fp32, atol=tol, rtol=0)


def test_gemm_shift_restores_fp32_channel_mean_and_int32_bias_rounding() -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 20)) + 0.7).astype(np.float32)
    w = rng.standard_normal((8, 20)).astype(np.float32)  # transB=1: [N, K]
    bias = rng.standard_normal(8).astype(np.float32)
    # 7-bit weights (reduce_range) to make the weight rounding visible; an int32 bias with a coarse scale.
    w_scale, w_deq = _per_channel_weight(w, 0, levels=63)
    s_x = np.float32(np.abs(x).max() / 127)
    xq = FakeQuant(np.array(s_x, np.float32), np.array(0, np.int8), -128, 127)
    b_scale = (s_x * w_scale).astype(np.float32)
    b_deq = (np.rint(bias / b_scale) * b_scale).astype(np.float32)
    layer = QuantizedLayer(
        name="fc", op_type="Gemm", weight=w, deployed_weight=w_deq, input_quant=xq, channel_axis=1,
        attributes={"transB": 1}, bias=bias, deployed_bias=b_deq,
    )
    shift = layer_bias_shift(layer, [x])
    fp32 = (x.astype(np.float64) @ w.T.astype(np.float64)).mean(axis=0) + bias
    deployed = (xq(x).astype(np.float64) @ w_deq.T.astype(np.float64)).mean(axis=0) + b_deq
    assert np.abs(deployed - fp32).max() > 1e-3
    np.testing.assert_allclose(deployed + shift, fp32, atol=2e-5, rtol=0)


# --------------------------------------------------------------------------- rewriting the deployable
def _tiny_model(path: Path) -> Path:
    """Conv without bias -> Relu -> Flatten -> MatMul + Add -> Relu -> Gemm without C (beta 2)."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "w_conv"),
        numpy_helper.from_array(rng.standard_normal((256, 16)).astype(np.float32) * 0.1, "w_mm"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b_mm"),
        numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32) * 0.3, "w_fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_conv"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["r1"], name="relu1"),
        helper.make_node("Flatten", ["r1"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w_mm"], ["mm_out"], name="mm"),
        helper.make_node("Add", ["mm_out", "b_mm"], ["mm_bias"], name="mm_add"),
        helper.make_node("Relu", ["mm_bias"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w_fc"], ["y"], name="fc", transB=1, beta=2.0),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return path


def _minmax_ranges(model, info, x) -> dict[str, TensorRange]:
    tensors = statistics_tensors(model, info)
    values = _outputs(model, [t for t in tensors if t != "x"], {"x": x})
    values["x"] = x
    return {t: TensorRange(float(np.abs(v).max()), bool(v.min() >= 0), min(0.0, float(v.min()))) for t, v in values.items()}


@pytest.mark.parametrize("profile", [TENSORRT, ONNXRUNTIME_CPU], ids=lambda p: p.name)
def test_apply_moves_each_layer_output_mean_by_its_shift(tmp_path, profile) -> None:
    info, model = analyze_model(_tiny_model(tmp_path / "tiny.onnx"))
    x = np.random.default_rng(4).standard_normal((6, 3, 8, 8)).astype(np.float32)
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    deployable = emit_deployable_onnx(model, info, plan_placement(info, model, config, profile), _minmax_ranges(model, info, x), profile)
    assert set(quantized_layers(deployable, model, info.layers)) == {"conv", "mm", "fc"}
    measured = {"conv": ("conv_out", 1), "mm": ("mm_bias", -1), "fc": ("y", 1)}  # the MatMul's bias is its Add
    rng = np.random.default_rng(5)
    for name, (tensor, axis) in measured.items():
        n = {"conv": 4, "mm": 16, "fc": 10}[name]
        shift = rng.uniform(-0.5, 0.5, n).astype(np.float32)
        corrected = apply_bias_shifts(deployable, {name: shift}, profile)
        onnx.checker.check_model(corrected, full_check=True)
        before = _outputs(deployable, [tensor], {"x": x})[tensor]
        after = _outputs(corrected, [tensor], {"x": x})[tensor]
        moved = _channel_mean(after - before, axis)
        # int32 biases move in steps of their scale (activation scale x weight scale)
        np.testing.assert_allclose(moved, shift, atol=1e-3 if profile.quantize_bias else 1e-5, rtol=0)
        assert deployable.SerializeToString() != corrected.SerializeToString()
    if profile.quantize_bias:  # the conv had no bias: it gets an int32 one through DequantizeLinear, as the emitter writes
        corrected = apply_bias_shifts(deployable, {"conv": np.ones(4, np.float32)}, profile)
        producers = {o: n for n in corrected.graph.node for o in n.output}
        conv = next(n for n in corrected.graph.node if n.name == "conv")
        assert producers[conv.input[2]].op_type == "DequantizeLinear"


# --------------------------------------------------------------------------- the digits example, end to end
def _digits(split: str, n: int) -> np.ndarray:
    images = np.load(DIGITS / f"{split}.npz")["images"][:n]
    return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None]


@pytest.fixture(scope="module")
def digits():
    info, model = analyze_model(DIGITS / "digits_resnet.onnx")
    calib = _digits("calib", 256)
    tensors = statistics_tensors(model, info)
    stats = collect_statistics(info.path, tensors, ({"input": calib[i:i + 64]} for i in range(0, 256, 64)), [256])
    return info, model, calib, ThresholdTable(stats), tensors


def _ranges(table: ThresholdTable, tensors, algorithm) -> dict[str, TensorRange]:
    """TensorRanges as the study builds them from the statistics (sensisearch.study.calibrate)."""
    out = {}
    for t, amax in table.amaxes(CalibrationChoice(algorithm, 256), tensors).items():
        amax = max(amax, 1e-12)
        lowest = table.statistics(t, 256).min
        out[t] = TensorRange(amax, lowest >= 0.0, min(0.0, max(lowest, -amax)))
    return out


def _integer_kernels(model: onnx.ModelProto) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        _session(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized_path=path)
        return count_kernels(onnx.load(path))["int8"]


@pytest.mark.parametrize("profile,algorithm", [(TENSORRT, CalibrationAlgorithm.MSE), (ONNXRUNTIME_CPU, CalibrationAlgorithm.MINMAX)],
                         ids=["tensorrt-mse", "onnxruntime-minmax"])
def test_digits_all_int8_channel_mean_error_shrinks(digits, profile, algorithm) -> None:
    info, model, calib, table, tensors = digits
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    deployable = emit_deployable_onnx(model, info, plan_placement(info, model, config, profile), _ranges(table, tensors, algorithm), profile)
    shifts = bias_shifts(deployable, model, info.layers, ({"input": calib[i:i + 64]} for i in range(0, 256, 64)), max_samples=128)
    assert set(shifts) == set(info.layer_names)
    corrected = apply_bias_shifts(deployable, shifts, profile)
    onnx.checker.check_model(corrected, full_check=True)

    # Measured on held-out images, in the whole quantized network (upstream layers' errors included).
    x = _digits("eval", 600)
    outputs = [l.output for l in info.layers]
    fp32 = _outputs(model, outputs, {"input": x})
    errors = {}
    for label, m in (("before", deployable), ("after", corrected)):
        got = _outputs(m, outputs, {"input": x})
        errors[label] = np.array([np.sqrt(np.mean((_channel_mean(got[t]) - _channel_mean(fp32[t])) ** 2)) for t in outputs])
    print({l.name: (round(float(b), 5), round(float(a), 5)) for l, b, a in zip(info.layers, errors["before"], errors["after"])})
    assert (errors["after"] < errors["before"]).all()
    assert errors["after"].sum() < 0.5 * errors["before"].sum()
    if profile.quantize_bias:  # the int32 biases keep ONNX Runtime's integer-kernel fusion
        assert _integer_kernels(corrected) == _integer_kernels(deployable) > 0


def test_digits_shift_depends_only_on_the_layer_and_is_cached(digits) -> None:
    """A layer's shift is the same in an all-INT8 and a mixed deployable (TensorRT profile: each layer's
    input Q/DQ has its own threshold), so a cache filled by one trial serves the next without a pass."""
    info, model, calib, table, tensors = digits
    ranges = _ranges(table, tensors, CalibrationAlgorithm.MINMAX)

    def deployable(config: TrialConfig) -> onnx.ModelProto:
        return emit_deployable_onnx(model, info, plan_placement(info, model, config, TENSORRT), ranges, TENSORRT)

    def feeds():
        return ({"input": calib[i:i + 64]} for i in range(0, 128, 64))

    cache: dict[str, np.ndarray] = {}
    everything = bias_shifts(deployable(TrialConfig.uniform(info.layer_names, Precision.INT8)), model, info.layers, feeds(), cache=cache)
    assert len(cache) == len(info.layers)
    mixed = TrialConfig({n: Precision.INT8 if i % 2 else Precision.FP32 for i, n in enumerate(info.layer_names)})
    fresh = bias_shifts(deployable(mixed), model, info.layers, feeds())
    assert set(fresh) == set(mixed.layers_with(Precision.INT8))
    for name, shift in fresh.items():
        np.testing.assert_array_equal(shift, everything[name])
    cached = bias_shifts(deployable(mixed), model, info.layers, iter(()), cache=cache)  # no data: all from the cache
    assert {n: s.tobytes() for n, s in cached.items()} == {n: s.tobytes() for n, s in fresh.items()}
