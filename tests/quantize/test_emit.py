"""Tests for Q/DQ placement and the deployable-ONNX emitter (sensisearch.quantize).

Thresholds come straight from the FP32 activations (ORT with intermediate
outputs, min-max over the very inputs that are compared), not from the
calibration package.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import REPO, require_shared

from sensisearch.backends.onnxruntime import count_kernels
from sensisearch.model import ModelInfo, analyze_model
from sensisearch.onnx_compat import make_model
from sensisearch.op_types import REGION_OP_TYPES
from sensisearch.quantize import (
    ONNXRUNTIME_CPU,
    TENSORRT,
    GraphIndex,
    Precision,
    QuantizationProfile,
    TensorRange,
    TrialConfig,
    activation_epilogue,
    emit_deployable_onnx,
    plan_placement,
    save_model,
    statistics_tensors,
    upgrade_opset,
)

PROFILES = [TENSORRT, ONNXRUNTIME_CPU]
PROFILE_IDS = [p.name for p in PROFILES]


# --------------------------------------------------------------------------- helpers


def _shared(rel: str) -> Path:
    return require_shared(*rel.split("/"))


def _session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, optimized_path: str | None = None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _emit(model, info, config, ranges, profile) -> onnx.ModelProto:
    """Plan the placement once and emit it, as the trial pipeline does."""
    return emit_deployable_onnx(model, info, plan_placement(info, model, config, profile), ranges, profile)


def _thresholds_needed(info, model, config, profile) -> list[str]:
    return plan_placement(info, model, config, profile).threshold_tensors


def _integer_kernels(optimized: onnx.ModelProto) -> int:
    """Integer kernels in an ORT-optimized graph, counted as the ORT backend counts them."""
    return count_kernels(optimized)["int8"]


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return _session(model).run(None, feeds)


def _intermediates(model: onnx.ModelProto, tensors: list[str], feeds: dict) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in have)
    sess = _session(probe)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _minmax_ranges(model: onnx.ModelProto, info: ModelInfo, feeds_list: list[dict]) -> dict[str, TensorRange]:
    tensors = statistics_tensors(model, info)
    amax = {t: 0.0 for t in tensors}
    amin = {t: np.inf for t in tensors}
    for feeds in feeds_list:
        values = _intermediates(model, tensors, feeds)
        for t in tensors:
            amax[t] = max(amax[t], float(np.abs(values[t]).max()))
            amin[t] = min(amin[t], float(values[t].min()))
    # min clipped to [-amax, 0] as the study does (sensisearch.calibration.ranges)
    return {t: TensorRange(amax[t], amin[t] >= 0, min=min(0.0, max(amin[t], -amax[t]))) for t in tensors}


def _optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        _session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, path)
        return onnx.load(path)


def _check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _resnet(path: Path, seed: int = 0) -> Path:
    """Small ResNet: stem Conv+Relu, 2 residual blocks, GAP, Flatten, Gemm(transB=1)+Relu, MatMul [K,N].

    Some nodes are left unnamed to exercise naming on load.
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def conv_w(name: str, cout: int, cin: int) -> list[str]:
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, name + ".w"))
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, name + ".b"))
        return [name + ".w", name + ".b"]

    c = 8
    nodes = [
        helper.make_node("Conv", ["x", *conv_w("stem", c, 3)], ["stem_out"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem_out"], ["h0"]),  # unnamed
    ]
    h = "h0"
    for b in (1, 2):
        nodes += [
            helper.make_node("Conv", [h, *conv_w(f"b{b}a", c, c)], [f"b{b}a_out"], name=f"b{b}a", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"b{b}a_out"], [f"b{b}a_relu"], name=f"b{b}a_relu"),
            helper.make_node("Conv", [f"b{b}a_relu", *conv_w(f"b{b}b", c, c)], [f"b{b}b_out"], name=f"b{b}b", pads=[1, 1, 1, 1]),
            helper.make_node("Add", [f"b{b}b_out", h], [f"b{b}_sum"], name=f"b{b}_add"),
            helper.make_node("Relu", [f"b{b}_sum"], [f"h{b}"], name=f"b{b}_relu"),
        ]
        h = f"h{b}"
    inits.append(numpy_helper.from_array(rng.standard_normal((16, c)).astype(np.float32) * 0.5, "fc.w"))
    inits.append(numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "fc.b"))
    inits.append(numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32) * 0.3, "head.w"))
    nodes += [
        helper.make_node("GlobalAveragePool", [h], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"]),  # unnamed
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["fc_out"], name="fc", transB=1),
        helper.make_node("Relu", ["fc_out"], ["fc_relu"], name="fc_relu"),
        helper.make_node("MatMul", ["fc_relu", "head.w"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "resnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = make_model(graph, opset=13)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    path = _resnet(tmp_path_factory.mktemp("resnet") / "resnet.onnx")
    info, model = analyze_model(path)
    feeds = {"x": np.random.default_rng(1).standard_normal((32, 3, 16, 16)).astype(np.float32)}
    return info, model, feeds, _minmax_ranges(model, info, [feeds])


@pytest.fixture(scope="module")
def mnist():
    info, model = analyze_model(_shared("mnist/mnist_cnn.onnx"))
    with gzip.open(_shared("mnist/t10k-dev-images-idx3-ubyte.gz")) as fh:
        raw = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:256]
    feeds = {"input": ((raw / 255.0 - 0.5) / 0.5).astype(np.float32)}
    return info, model, feeds, _minmax_ranges(model, info, [feeds])


def _letterbox(path: Path) -> np.ndarray:
    from sensisearch.evaluation.letterbox import load_letterboxed

    chw, _ = load_letterboxed(path, (640, 640))
    return chw[None].astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def yolo():
    info, model = analyze_model(_shared("yolov5n.onnx"))
    images = sorted(_shared("coco-dev/images").glob("*.jpg"))[:2]
    feeds_list = [{"images": _letterbox(p)} for p in images]
    return info, model, feeds_list, _minmax_ranges(model, info, feeds_list)


def _configs(info: ModelInfo) -> dict[str, TrialConfig]:
    names = info.layer_names
    cycle = [Precision.INT8, Precision.FP16, Precision.FP32]
    return {
        "fp32": TrialConfig.uniform(names, Precision.FP32),
        "int8": TrialConfig.uniform(names, Precision.INT8),
        "fp16": TrialConfig.uniform(names, Precision.FP16),
        "mixed": TrialConfig({n: cycle[i % 3] for i, n in enumerate(names)}),
        "mixed2": TrialConfig({n: cycle[(i + 1) % 3] for i, n in enumerate(names)}),
    }


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _assert_precisions(emitted: onnx.ModelProto, info: ModelInfo, config: TrialConfig, profile: QuantizationProfile) -> None:
    """Exactly the chosen layers carry Q/DQ (INT8) or Cast/fp16 weights (FP16)."""
    prod = _producers(emitted)
    inits = {i.name: i for i in emitted.graph.initializer}
    nodes = {n.name: n for n in emitted.graph.node}
    fp16_outputs = set()
    for layer in info.layers:
        node = nodes[layer.name]
        assert node.op_type == layer.op_type
        p = config.precisions.get(layer.name, Precision.FP32)
        x_prod = prod.get(node.input[0])
        w_prod = prod.get(node.input[1])
        if p is Precision.INT8:
            assert x_prod is not None and x_prod.op_type == "DequantizeLinear", layer.name
            assert w_prod is not None and w_prod.op_type == "DequantizeLinear", layer.name
            assert inits[w_prod.input[0]].data_type == TensorProto.INT8
            w = numpy_helper.to_array(inits[w_prod.input[0]])
            assert w.min() >= -127 and w.max() <= 127
            assert np.all(numpy_helper.to_array(inits[w_prod.input[1]]) > 0)
            assert not numpy_helper.to_array(inits[w_prod.input[2]]).any()
            if numpy_helper.to_array(inits[w_prod.input[1]]).size > 1:
                assert helper.get_attribute_value(w_prod.attribute[0]) == layer.weight_axis
            assert node.output[0] == layer.output
        elif p is Precision.FP16:
            assert (x_prod is not None and x_prod.op_type == "Cast" and x_prod.attribute[0].i == TensorProto.FLOAT16) or (
                node.input[0] in fp16_outputs
            ), layer.name
            assert inits[node.input[1]].data_type == TensorProto.FLOAT16
            if layer.bias:
                assert inits[node.input[2]].data_type == TensorProto.FLOAT16
            fp16_outputs.add(node.output[0])
            assert node.output[0] != layer.output
        else:  # FP32: the node is exactly the original one
            expected = [layer.activation_input, layer.weight] + ([layer.bias] if layer.bias else [])
            got = list(node.input)[: len(expected)]
            if profile.float_consumers_read_quantized and x_prod is not None and x_prod.op_type == "DequantizeLinear":
                # reads an INT8 layer's output through its DQ ("int8 in, int8 out")
                assert prod[x_prod.input[0]].op_type == "QuantizeLinear"
                assert prod[x_prod.input[0]].input[0] == layer.activation_input, layer.name
                got[0] = layer.activation_input
            assert got == expected and node.output[0] == layer.output, layer.name
            assert inits[layer.weight].data_type == TensorProto.FLOAT
    # no Q/DQ or Cast except those belonging to chosen layers
    n_cast16 = sum(1 for n in emitted.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16)
    assert n_cast16 <= len(config.layers_with(Precision.FP16))
    n_dq = sum(1 for n in emitted.graph.node if n.op_type == "DequantizeLinear")
    int8 = [l for l in info.layers if config.precisions.get(l.name) is Precision.INT8]
    n_bias = sum(1 for l in int8 if profile.quantize_bias and l.bias and l.op_type in ("Conv", "Gemm"))
    # activation DQs: one per Q, except a Q read only by FP32 Conv/Gemm, whose DQ is the per-channel
    # one; a Q read by both gets both (ORT quantizes the float weight behind a per-tensor DQ)
    q_outs = {n.output[0] for n in emitted.graph.node if n.op_type == "QuantizeLinear"}
    act_dqs = [n for n in emitted.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_outs]
    per_channel = [n for n in act_dqs if numpy_helper.to_array(inits[n.input[1]]).size > 1]
    assert not per_channel or profile.float_consumers_read_quantized
    dq_per_q = collections.Counter(n.input[0] for n in act_dqs)
    assert set(dq_per_q) == q_outs and max(dq_per_q.values(), default=1) <= 2
    assert n_dq == len(act_dqs) + len(int8) + n_bias  # activation DQs + one weight DQ per layer (+ int32 bias)


def _assert_no_qdq_on_outputs(emitted: onnx.ModelProto) -> None:
    prod = _producers(emitted)
    for out in emitted.graph.output:
        assert prod[out.name].op_type not in ("QuantizeLinear", "DequantizeLinear")
    q_inputs = {n.input[0] for n in emitted.graph.node if n.op_type == "QuantizeLinear"}
    assert not q_inputs & {o.name for o in emitted.graph.output}


# --------------------------------------------------------------------------- tests: structure and validity


@pytest.mark.parametrize("profile", PROFILES, ids=PROFILE_IDS)
@pytest.mark.parametrize("which", ["resnet", "mnist", "yolo"])
def test_checker_and_layer_marking(which, profile, request) -> None:
    info, model, _, ranges = request.getfixturevalue(which)
    original = model.SerializeToString()
    for name, config in _configs(info).items():
        emitted = _emit(model, info, config, ranges, profile)
        _check(emitted)
        _assert_precisions(emitted, info, config, profile)
        _assert_no_qdq_on_outputs(emitted)
        wanted = _thresholds_needed(info, model, config, profile)
        assert set(wanted) <= set(statistics_tensors(model, info))
        placement = plan_placement(info, model, config, profile)
        assert wanted == placement.threshold_tensors
        q_in = sorted(n.input[0] for n in emitted.graph.node if n.op_type == "QuantizeLinear")
        assert q_in == sorted(placement.tensors), name  # one shared pair per tensor, nothing else
        # tensors without a threshold of their own reuse the Q/DQ parameters of one that has
        q_nodes = {n.input[0]: n for n in emitted.graph.node if n.op_type == "QuantizeLinear"}
        for act in placement.activations:
            if act.params_from is not None:
                assert act.params_from in wanted and act.tensor not in wanted
                assert q_nodes[act.tensor].input[1:] == q_nodes[act.params_from].input[1:]
        # thresholds for exactly tensors_to_quantize suffice (KeyError otherwise)
        _emit(model, info, config, {t: ranges[t] for t in wanted}, profile)
        names = [n.name for n in emitted.graph.node]
        assert all(names) and len(set(names)) == len(names)
        opset = next(o.version for o in emitted.opset_import if o.domain in ("", "ai.onnx"))
        assert opset == (max(info.opset, 13) if config.uses_int8 else info.opset), name
        # deterministic: emitting again gives the same bytes
        again = _emit(model, info, config, ranges, profile)
        assert again.SerializeToString() == emitted.SerializeToString()
    assert model.SerializeToString() == original  # caller's model untouched


@pytest.mark.parametrize("which", ["resnet", "mnist", "yolo"])
def test_all_fp32_is_bit_identical(which, request) -> None:
    info, model, feeds, ranges = request.getfixturevalue(which)
    feeds = feeds[0] if isinstance(feeds, list) else feeds
    for profile in PROFILES:
        emitted = _emit(model, info, TrialConfig.uniform(info.layer_names, Precision.FP32), ranges, profile)
        assert emitted.SerializeToString() == model.SerializeToString()
        for a, b in zip(_run(emitted, feeds), _run(model, feeds)):
            assert np.array_equal(a, b)
    # layers missing from the config are FP32 too
    emitted = _emit(model, info, TrialConfig({}), {}, TENSORRT)
    assert emitted.SerializeToString() == model.SerializeToString()


def test_resnet_tensorrt_placement(resnet) -> None:
    info, model, _, ranges = resnet
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    # layer inputs + skip inputs of both residual Adds (h0 is shared by b1a and b1_add, h1 by b2a and b2_add)
    assert _thresholds_needed(info, model, config, TENSORRT) == ["x", "h0", "b1a_relu", "h1", "b2a_relu", "flat", "fc_relu"]
    emitted = _emit(model, info, config, ranges, TENSORRT)
    nodes = {n.name: n for n in emitted.graph.node}
    assert nodes["b1_add"].input[1] == "h0_dequantized" and nodes["b1a"].input[0] == "h0_dequantized"
    assert nodes["b1_add"].input[0] == "b1b_out"  # the conv side stays as is (TRT fuses the Add)
    assert nodes["h0_QuantizeLinear"].input == ["h0", "h0_scale", "h0_zero_point"]
    zp = {i.name: numpy_helper.to_array(i) for i in emitted.graph.initializer if i.name.endswith("_zero_point")}
    assert all(z.dtype == np.int8 and not z.any() for z in zp.values())  # symmetric int8 only
    # weights: Conv axis 0, Gemm(transB=1) axis 0, MatMul [K,N] axis 1; bias stays float for TensorRT
    for layer, axis, channels in (("b1a", 0, 8), ("fc", 0, 16), ("head", 1, 10)):
        dq = nodes[f"{info.layer(layer).weight}_DequantizeLinear"]
        assert helper.get_attribute_value(dq.attribute[0]) == axis
        assert numpy_helper.to_array(next(i for i in emitted.graph.initializer if i.name == dq.input[1])).shape == (channels,)
    assert nodes["fc"].input[2] == "fc.b"
    # only a residual Add fed by an INT8 conv gets a skip Q/DQ
    only_b1a = TrialConfig({"b1a": Precision.INT8})
    assert _thresholds_needed(info, model, only_b1a, TENSORRT) == ["h0"]
    only_b1b = TrialConfig({"b1b": Precision.INT8})
    assert _thresholds_needed(info, model, only_b1b, TENSORRT) == ["h0", "b1a_relu"]


def test_resnet_int8_accuracy(resnet) -> None:
    """All-INT8 vs FP32 on the 32 inputs the thresholds were taken from.

    Min-max thresholds over these very inputs mean no clipping, so every
    activation carries only rounding error <= scale/2 = amax/254 per element, and
    per-channel weights <= 1/254 of each channel's max. Over 7 quantized layers
    that stays at the ~1% level; 5% relative L2 and >= 90% top-1 agreement leave
    margin while still catching a wrong axis or scale (those give O(1) errors).
    """
    info, model, feeds, ranges = resnet
    ref = _run(model, feeds)[0]
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    for profile in PROFILES:
        out = _run(_emit(model, info, config, ranges, profile), feeds)[0]
        assert _rel_l2(out, ref) < 0.05, profile.name
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    fp16 = _run(_emit(model, info, TrialConfig.uniform(info.layer_names, Precision.FP16), ranges, TENSORRT), feeds)[0]
    assert _rel_l2(fp16, ref) < 5e-3  # fp16 has an 11-bit mantissa


def test_wrong_axis_would_be_caught(resnet) -> None:
    """Sanity check of the accuracy bound: a deliberately broken scale must fail it."""
    info, model, feeds, ranges = resnet
    ref = _run(model, feeds)[0]
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    emitted = _emit(model, info, config, ranges, TENSORRT)
    for init in emitted.graph.initializer:
        if init.name == "b1a.w_scale":  # per-channel scales applied to the wrong channels
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[::-1].copy(), init.name))
    assert _rel_l2(_run(emitted, feeds)[0], ref) > 0.05


def test_mnist_int8_accuracy(mnist) -> None:
    """256 real MNIST dev images, thresholds min-max over the same images (no clipping):
    relative L2 of the logits < 3% and top-1 agreement with FP32 >= 98%."""
    info, model, feeds, ranges = mnist
    ref = _run(model, feeds)[0]
    for profile in PROFILES:
        emitted = _emit(model, info, TrialConfig.uniform(info.layer_names, Precision.INT8), ranges, profile)
        out = _run(emitted, feeds)[0]
        assert _rel_l2(out, ref) < 0.03, profile.name
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.98, profile.name
    # mnist is opset 11: the INT8 model was upgraded to 13 (per-channel axis) and still matches FP32 when all FP32
    upgraded = upgrade_opset(model, 13)
    assert next(o.version for o in upgraded.opset_import if o.domain == "") == 13
    assert np.array_equal(_run(upgraded, feeds)[0], ref)


def test_mixed_accuracy_and_fp16_chain(resnet) -> None:
    """Consecutive FP16 layers pass fp16 tensors directly; mixed configs stay accurate."""
    info, model, feeds, ranges = resnet
    ref = _run(model, feeds)[0]
    config = TrialConfig({"fc": Precision.FP16, "head": Precision.FP16, "stem": Precision.INT8, "b1a": Precision.FP16})
    emitted = _emit(model, info, config, ranges, TENSORRT)
    _check(emitted)
    nodes = {n.name: n for n in emitted.graph.node}
    # a float Relu sits between fc and head: fc's output is cast back, head's input cast again
    assert nodes["head"].input[0] == "fc_relu_fp16" and nodes["fc_relu_CastToFloat16"].input == ["fc_relu"]
    assert "fc_CastToFloat" in nodes and "head_CastToFloat" in nodes  # head's output is the graph output
    assert _rel_l2(_run(emitted, feeds)[0], ref) < 0.05
    # a direct FP16 -> FP16 edge: no Cast back and forth
    chain = TrialConfig({"b1a": Precision.FP16})
    emitted = _emit(model, info, chain, ranges, TENSORRT)
    assert sum(n.op_type == "Cast" for n in emitted.graph.node) == 2


def test_shared_weight_initializer_not_mutated(tmp_path) -> None:
    """Two layers sharing one weight: FP16 + FP32 and INT8 + FP32 keep the float32 original."""
    path = _resnet(tmp_path / "r.onnx")
    model = onnx.load(path)
    for node in model.graph.node:
        if node.name == "b2a":
            node.input[1], node.input[2] = "b1a.w", "b1a.b"
    onnx.save(model, path)
    info, model = analyze_model(path)
    feeds = {"x": np.random.default_rng(3).standard_normal((4, 3, 16, 16)).astype(np.float32)}
    ranges = _minmax_ranges(model, info, [feeds])
    for p in (Precision.FP16, Precision.INT8):
        emitted = _emit(model, info, TrialConfig({"b1a": p}), ranges, TENSORRT)
        _check(emitted)
        nodes = {n.name: n for n in emitted.graph.node}
        assert nodes["b2a"].input[1] == "b1a.w"
        w = next(i for i in emitted.graph.initializer if i.name == "b1a.w")
        assert w.data_type == TensorProto.FLOAT
        assert np.array_equal(numpy_helper.to_array(w), numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b1a.w")))


def test_missing_threshold_and_unknown_layer(resnet) -> None:
    from sensisearch.errors import SensisearchError

    info, model, _, ranges = resnet
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    partial = {k: v for k, v in ranges.items() if k != "h0"}
    with pytest.raises(KeyError, match="h0"):
        _emit(model, info, config, partial, TENSORRT)
    with pytest.raises(SensisearchError, match="nope"):
        _emit(model, info, TrialConfig({"nope": Precision.INT8}), ranges, TENSORRT)
    with pytest.raises(ValueError):
        TensorRange(float("nan"))


def test_zero_threshold_and_zero_weight_channel(resnet) -> None:
    info, model, feeds, ranges = resnet
    zeroed = dict(ranges)
    zeroed["b1a_relu"] = TensorRange(0.0, True)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.name == "b1b.w":
            w = numpy_helper.to_array(init).copy()
            w[3] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    for profile in PROFILES:
        emitted = _emit(m, info, TrialConfig.uniform(info.layer_names, Precision.INT8), zeroed, profile)
        _check(emitted)
        scales = [numpy_helper.to_array(i) for i in emitted.graph.initializer if i.name.endswith("scale")]
        assert all(np.all(s > 0) and np.all(np.isfinite(s)) for s in scales)
        assert np.all(np.isfinite(_run(emitted, feeds)[0]))


# --------------------------------------------------------------------------- ONNX Runtime profile


def test_resnet_onnxruntime_placement(resnet) -> None:
    info, model, _, ranges = resnet
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    acts = {a.tensor: a for a in plan_placement(info, model, config, ONNXRUNTIME_CPU).activations}
    # The INT8 region: every input/output of the Relus, residual Adds, GAP and Flatten between
    # the INT8 layers. Relu inputs (stem_out, b*a_out, b*_sum, fc_out) are folded: the Q goes
    # after the Relu (ORT drops a Relu in front of a uint8 zp-0 Q). head's output is the graph output.
    assert list(acts) == ["x", "h0", "b1a_relu", "b1b_out", "h1", "b2a_relu", "b2b_out", "h2", "gap", "flat", "fc_relu"]
    assert acts["h0"].reasons == ("layer_input", "region")
    assert acts["h0"].consumers == (("b1a", 0), ("b1_add", 1))  # graph order
    assert acts["b1b_out"].reasons == ("region", "layer_output")
    assert acts["h2"].consumers == (("gap", 0),) and acts["h2"].reasons == ("region",)
    # Flatten only moves values: its output reuses GAP's scale/zero point (ORT drops that Q/DQ pair)
    assert acts["flat"].params_from == "gap" and acts["gap"].params_from is None
    assert "flat" not in _thresholds_needed(info, model, config, ONNXRUNTIME_CPU)
    emitted = _emit(model, info, config, ranges, ONNXRUNTIME_CPU)
    nodes = {n.name: n for n in emitted.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in emitted.graph.initializer}
    assert list(nodes["b1_add"].input) == ["b1b_out_dequantized", "h0_dequantized"]
    assert nodes["b1_relu"].input[0] == "b1_sum"  # no Q/DQ between the Add and its Relu
    assert nodes["gap"].input[0] == "h2_dequantized"
    assert list(nodes["flat_QuantizeLinear"].input[1:]) == ["gap_scale", "gap_zero_point"]
    assert inits["b1a_relu_zero_point"].dtype == np.uint8 and inits["b1a_relu_zero_point"] == 0  # post-Relu: uint8
    # signed input with a calibrated min: asymmetric uint8 over [min, amax], 0 exact
    lo, hi = ranges["x"].lower, ranges["x"].amax
    assert inits["x_zero_point"].dtype == np.uint8
    np.testing.assert_allclose(inits["x_scale"], (hi - lo) / 255, rtol=1e-6)
    assert inits["x_zero_point"] == round(-lo / float(inits["x_scale"]))
    # without a calibrated min (ranges recorded before TensorRange.min): uint8 zp 128, symmetric
    legacy = {t: TensorRange(r.amax, r.nonnegative) for t, r in ranges.items()}
    legacy_inits = {i.name: numpy_helper.to_array(i) for i in _emit(model, info, config, legacy, ONNXRUNTIME_CPU).graph.initializer}
    assert legacy_inits["x_zero_point"].dtype == np.uint8 and legacy_inits["x_zero_point"] == 128
    assert inits["b1a_bias_int32"].dtype == np.int32
    np.testing.assert_allclose(inits["b1a_bias_scale"], inits["h0_scale"] * inits["b1a.w_scale"], rtol=1e-6)
    # without regions (quantize_regions=False) and without residual Q/DQ the Adds are float, so only outputs that feed INT8 layers directly qualify
    no_res = QuantizationProfile(name="ort-nores", quantize_layer_outputs=True, quantize_residual_add=False)
    acts = {a.tensor: a.reasons for a in plan_placement(info, model, config, no_res).activations}
    assert list(acts) == ["x", "h0", "b1a_relu", "h1", "b2a_relu", "flat", "fc_relu"]
    assert acts["h0"] == ("layer_input",) and acts["b1a_relu"] == ("layer_input", "layer_output")
    # TensorRT never quantizes layer outputs
    trt = {a.tensor: a.reasons for a in plan_placement(info, model, config, TENSORRT).activations}
    assert not any("layer_output" in r for r in trt.values())


def test_count_kernels_unit() -> None:
    """The ORT backend's kernel census: integer kernels, float ops with float16 weights, float ops."""
    nodes = [
        helper.make_node("QLinearConv", ["a"], ["b"], name="c1"),
        helper.make_node("QuantizeLinear", ["b"], ["c"], name="q"),
        helper.make_node("QGemm", ["c"], ["d"], name="g", domain="com.microsoft"),
        helper.make_node("MatMulInteger", ["d"], ["e"], name="m"),
        helper.make_node("Conv", ["e", "w32"], ["f"], name="c2"),
        helper.make_node("FusedConv", ["f", "w16"], ["g"], name="c3", domain="com.microsoft"),
    ]
    inits = [
        numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), "w32"),
        numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float16), "w16"),
    ]
    graph = helper.make_graph(nodes, "g", [], [], initializer=inits)
    assert count_kernels(make_model(graph)) == {"int8": 3, "fp16": 1, "fp32": 1}


def test_onnxruntime_integer_kernels(resnet, mnist) -> None:
    """ORT fuses the ORT-profile model into integer kernels; the TensorRT-profile model
    (no output Q/DQ, float bias) stays Q/DQ + float ops in ORT, as expected."""
    counts = {}
    for which, data in (("resnet", resnet), ("mnist", mnist)):
        info, model, feeds, ranges = data
        config = TrialConfig.uniform(info.layer_names, Precision.INT8)
        for profile in PROFILES:
            counts[which, profile.name] = _integer_kernels(_optimized(_emit(model, info, config, ranges, profile)))
        assert _integer_kernels(_optimized(model)) == 0
    assert counts["mnist", "onnxruntime-cpu"] == 4  # both convs (QLinearConv) and both Gemms (QGemm)
    assert counts["resnet", "onnxruntime-cpu"] == 7  # all 5 convs, the Gemm and the MatMul
    assert counts["resnet", "onnxruntime-cpu"] > counts["resnet", "tensorrt"]
    print("integer kernels:", counts)


# --------------------------------------------------------------------------- YOLOv5n


def test_yolo_int8_tensorrt(yolo) -> None:
    info, model, feeds_list, ranges = yolo
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    emitted = _emit(model, info, config, ranges, TENSORRT)
    assert next(o.version for o in emitted.opset_import if o.domain == "") >= 13
    _check(emitted)
    _assert_no_qdq_on_outputs(emitted)
    # the Detect decode (everything in /model.24/ except its three convs) reads no DQ output and feeds no Q
    prod = _producers(emitted)
    for node in emitted.graph.node:
        if node.name.startswith("/model.24/") and node.op_type != "Conv":
            assert all(prod[i].op_type != "DequantizeLinear" for i in node.input if i in prod), node.name
    decode_outputs = {o for n in emitted.graph.node if n.name.startswith("/model.24/") for o in n.output}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in decode_outputs for n in emitted.graph.node)
    meta = {p.key: p.value for p in emitted.metadata_props}
    assert meta["stride"] == "32"
    # the opset upgrade alone is numerically exact
    upgraded = upgrade_opset(model, 13)
    for feeds in feeds_list:
        assert np.array_equal(_run(upgraded, feeds)[0], _run(model, feeds)[0])


@pytest.mark.parametrize("profile", PROFILES, ids=PROFILE_IDS)
def test_yolo_int8_close_to_fp32(yolo, profile) -> None:
    """Two real COCO images, min-max thresholds over the same two images.

    Min-max PTQ of YOLOv5n is known to be lossy (SiLU outputs, wide-range concat
    inputs), so the bound is loose and only on confident detections (FP32 score
    obj*cls > 0.25): same argmax class for >= 90%, objectness within 0.35, mean
    |box error| < 12 px on a 640 px input (observed ~2-8 px). A wrong axis/scale
    gives box errors in the hundreds of px.
    """
    info, model, feeds_list, ranges = yolo
    emitted = _emit(model, info, TrialConfig.uniform(info.layer_names, Precision.INT8), ranges, profile)
    for feeds in feeds_list:
        ref = _run(model, feeds)[0][0]
        out = _run(emitted, feeds)[0][0]
        assert out.shape == ref.shape and np.all(np.isfinite(out))
        sel = ref[:, 4] * ref[:, 5:].max(1) > 0.25
        assert sel.sum() >= 5
        assert (out[sel, 5:].argmax(1) == ref[sel, 5:].argmax(1)).mean() >= 0.9
        assert np.abs(out[sel, 4] - ref[sel, 4]).max() < 0.35
        assert np.abs(out[sel, :4] - ref[sel, :4]).mean() < 12.0


def test_yolo_emits_exactly_its_placement(yolo) -> None:
    """The emitter writes the placement it is handed and nothing else (it does not re-plan):
    one QuantizeLinear per planned activation tensor (weights and biases are integer
    initializers + DequantizeLinear, no Q), and every planned consumer reads a
    DequantizeLinear output. A placement planned for another profile is refused."""
    info, model, _, ranges = yolo
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    placements = {p.name: plan_placement(info, model, config, p) for p in PROFILES}
    for profile in PROFILES:
        placement = placements[profile.name]
        emitted = emit_deployable_onnx(model, info, placement, ranges, profile)
        quantized = [n.input[0] for n in emitted.graph.node if n.op_type == "QuantizeLinear"]
        assert sorted(quantized) == sorted(placement.tensors)
        producer = {o: n for n in emitted.graph.node for o in n.output}
        nodes = {n.name: n for n in emitted.graph.node}
        for act in placement.activations:
            for name, ii in act.consumers:
                reader = producer[nodes[name].input[ii]]
                assert reader.op_type == "DequantizeLinear" and producer[reader.input[0]].input[0] == act.tensor
    with pytest.raises(ValueError, match="planned for profile 'tensorrt'"):
        emit_deployable_onnx(model, info, placements[TENSORRT.name], ranges, ONNXRUNTIME_CPU)


def test_yolo_onnxruntime_integer_kernels(yolo) -> None:
    info, model, _, ranges = yolo
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    ort_count = _integer_kernels(_optimized(_emit(model, info, config, ranges, ONNXRUNTIME_CPU)))
    trt_count = _integer_kernels(_optimized(_emit(model, info, config, ranges, TENSORRT)))
    print("YOLOv5n integer kernels: onnxruntime-cpu", ort_count, "tensorrt", trt_count)
    assert ort_count == 57  # every conv but the 3 Detect convs, whose output feeds the float decode
    assert trt_count == 0


def _is_decode(node: onnx.NodeProto) -> bool:
    return node.name.startswith("/model.24/") and node.op_type != "Conv"


def test_yolo_onnxruntime_region(yolo) -> None:
    """All-INT8 YOLOv5n, ORT profile: Q/DQ on every SiLU, residual Add, Concat, MaxPool and
    Resize between convs (ORT runs them as QLinear*/8-bit ops), none on the Detect decode."""
    info, model, _, ranges = yolo
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    placement = plan_placement(info, model, config, ONNXRUNTIME_CPU)
    emitted = _emit(model, info, config, ranges, ONNXRUNTIME_CPU)
    _check(emitted)
    _assert_no_qdq_on_outputs(emitted)
    prod = _producers(emitted)
    act_dq = {n.output[0] for n in emitted.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in prod}
    readers = collections.Counter(n.op_type for n in emitted.graph.node for i in n.input if i in act_dq)
    assert set(readers) == {"Conv", "Sigmoid", "Mul", "Add", "Concat", "MaxPool", "Resize", "Shape"}
    assert readers["Sigmoid"] == readers["Mul"] / 2 == 57 and readers["MaxPool"] == 3 and readers["Resize"] == 2
    # the decode reads no DQ output and feeds no Q; the Detect convs' outputs stay float
    for node in emitted.graph.node:
        if _is_decode(node):
            assert not any(i in act_dq for i in node.input), node.name
    decode_outputs = {o for n in emitted.graph.node if _is_decode(n) for o in n.output}
    heads = [l for l in info.layers if l.name.startswith("/model.24/")]
    assert len(heads) == 3
    q_inputs = {n.input[0] for n in emitted.graph.node if n.op_type == "QuantizeLinear"}
    assert not q_inputs & (decode_outputs | {h.output for h in heads})
    # MaxPool/Resize outputs reuse their input's Q/DQ parameters (ORT then drops the pair)
    acts = {a.tensor: a for a in placement.activations}
    shared = {t: a.params_from for t, a in acts.items() if a.params_from}
    assert shared == {
        "/model.9/m/MaxPool_output_0": "/model.9/cv1/act/Mul_output_0",
        "/model.9/m_1/MaxPool_output_0": "/model.9/cv1/act/Mul_output_0",
        "/model.9/m_2/MaxPool_output_0": "/model.9/cv1/act/Mul_output_0",
        "/model.11/Resize_output_0": "/model.10/act/Mul_output_0",
        "/model.15/Resize_output_0": "/model.14/act/Mul_output_0",
    }
    optimized = _optimized(emitted)
    ops = collections.Counter(n.op_type for n in optimized.graph.node)
    assert _integer_kernels(optimized) == 57
    assert ops["QLinearSigmoid"] == ops["QLinearMul"] == 57 and ops["QLinearAdd"] == 7
    assert ops["Sigmoid"] == 3  # the decode's
    assert ops["QuantizeLinear"] == 1  # the image; everything else runs on 8-bit data


def _outputs_8bit(layer, placement, index) -> bool:
    """Whether every reader of the layer's output (or of its Relu, which ORT then drops) is quantized."""
    acts = {a.tensor: a for a in placement.activations}
    tensor = layer.output
    ep = activation_epilogue(index, tensor)
    if tensor not in acts and ep is not None and ep.kind in ("Relu", "Clip"):
        tensor = ep.output
    names = [n.name for n in index.nodes]
    readers = {(names[ni], ii) for ni, ii in index.consumer_nodes(tensor)}
    return tensor in acts and readers <= set(acts[tensor].consumers)


def _yolo_mixed_configs(info: ModelInfo) -> list[TrialConfig]:
    configs = []
    for seed, p_fp32 in ((0, 0.1), (1, 0.3), (2, 0.5)):
        r = np.random.default_rng(seed)
        draw = r.random((len(info.layers), 2))
        configs.append(
            TrialConfig(
                {
                    n: Precision.FP32 if a < p_fp32 else (Precision.FP16 if b < 0.1 else Precision.INT8)
                    for n, (a, b) in zip(info.layer_names, draw)
                }
            )
        )
    return configs


@pytest.mark.parametrize("which", ["resnet", "yolo"])
def test_onnxruntime_region_rule_mixed(which, request) -> None:
    """The region rule in mixed configurations ("int8 in, int8 out" INT8 layers).

    * The activations of FP32/FP16 layers never read a DQ output; FP32/FP16 layers only
      read one when it is an INT8 layer's output (FP32 Conv/Gemm: the per-channel DQ,
      so ORT keeps their float weights; FP16: a Cast of the DQ).
    * Anything else reading a dequantized activation is an INT8 layer, a region op, a
      Shape, or a float op reading an INT8 layer's output.
    * No Q/DQ on graph outputs or (YOLOv5) on the Detect decode.
    * ORT fuses exactly the INT8 layers whose output got Q/DQ (placement matches ORT's
      rules), which is every INT8 layer but the Detect convs (output: float decode),
      and no FP32/FP16 layer.
    """
    info, model, _, ranges = request.getfixturevalue(which)
    configs = list(_configs(info).values())[3:] if which == "resnet" else _yolo_mixed_configs(info)
    index = GraphIndex(model)
    for config in configs:
        placement = plan_placement(info, model, config, ONNXRUNTIME_CPU)
        emitted = _emit(model, info, config, ranges, ONNXRUNTIME_CPU)
        _check(emitted)
        _assert_no_qdq_on_outputs(emitted)
        prod = _producers(emitted)
        act_dq = {n.output[0] for n in emitted.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in prod}
        int8 = set(config.layers_with(Precision.INT8))
        float_acts = set()
        int8_outs: dict[str, str] = {}  # INT8 output (after its activation) -> layer
        for layer in info.layers:
            ep = activation_epilogue(index, layer.output)
            if layer.name not in int8:
                float_acts.update(index.nodes[i].name for i in (ep.nodes if ep else ()))
            else:
                int8_outs[layer.output] = layer.name
                if ep is not None:
                    int8_outs[ep.output] = layer.name
        float_layers = {l.name: l for l in info.layers if l.name not in int8}
        inits = {i.name: i for i in emitted.graph.initializer}
        n_float_readers = 0
        for node in emitted.graph.node:
            dq_in = [i for i in node.input if i in act_dq]
            if not dq_in:
                continue
            assert node.name not in float_acts, node.name
            assert which != "yolo" or not _is_decode(node), node.name
            q_src = {prod[prod[i].input[0]].input[0] for i in dq_in}
            if node.name in float_layers:
                assert dq_in == [node.input[0]] and q_src <= set(int8_outs), node.name
                per_channel = numpy_helper.to_array(inits[prod[node.input[0]].input[1]]).size > 1
                assert per_channel == (node.op_type in ("Conv", "Gemm") and node.input[1] in inits and inits[node.input[1]].data_type == TensorProto.FLOAT)
                n_float_readers += 1
            elif not (node.name in int8 or node.op_type in REGION_OP_TYPES | {"Shape"}):
                assert q_src <= set(int8_outs), node.name  # a float op reading INT8 outputs
        # independent count: every INT8 layer but the Detect convs (their output only feeds the decode)
        expected = sum(1 for name in int8 if not name.startswith("/model.24/"))
        assert expected == sum(
            layer.op_type == "MatMul" or _outputs_8bit(layer, placement, index) for layer in info.layers if layer.name in int8
        )
        kernels = collections.Counter(n.op_type for n in _optimized(emitted).graph.node)
        assert _integer_kernels(_optimized(emitted)) == expected, config
        fused_float = sum(kernels[t] for t in ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"))
        assert fused_float >= len(info.layers) - len(int8)  # no FP32/FP16 layer became integer
        if which == "yolo":
            assert n_float_readers > 0  # mixed configs do have FP32/FP16 layers reading INT8 outputs


def test_save_model_atomic(tmp_path, resnet) -> None:
    info, model, feeds, ranges = resnet
    emitted = _emit(model, info, TrialConfig.uniform(info.layer_names, Precision.INT8), ranges, TENSORRT)
    path = save_model(emitted, tmp_path / "sub" / "deployable.onnx")
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["deployable.onnx"]
    assert onnx.load(path).SerializeToString() == emitted.SerializeToString()


def test_custom_profile_per_tensor_reduce_range(resnet) -> None:
    info, model, feeds, ranges = resnet
    profile = QuantizationProfile(name="custom", per_channel_weights=False, reduce_range_weights=True)
    emitted = _emit(model, info, TrialConfig.uniform(info.layer_names, Precision.INT8), ranges, profile)
    _check(emitted)
    for init in emitted.graph.initializer:
        if init.name.endswith(".w_int8"):
            assert np.abs(numpy_helper.to_array(init)).max() <= 63
        if init.name.endswith(".w_scale"):
            assert numpy_helper.to_array(init).shape == ()
    assert _rel_l2(_run(emitted, feeds)[0], _run(model, feeds)[0]) < 0.1


def test_yolo_onnxruntime_mixed_int8_out(yolo) -> None:
    """ORT profile, YOLOv5n with 40% / 70% INT8 layers (the rest FP32): every INT8 conv but
    the 3 Detect convs runs as an integer kernel (before "int8 in, int8 out": 3/25 and
    15/39), FP32 convs read the INT8 outputs through a DQ and stay float, TensorRT's
    placement is unaffected, and the outputs stay close to FP32 (bounds of
    test_yolo_int8_close_to_fp32)."""
    info, model, feeds_list, ranges = yolo
    heads = {l.name for l in info.layers if l.name.startswith("/model.24/")}
    assert len(heads) == 3
    for seed, frac in ((0, 0.4), (1, 0.7)):
        draw = np.random.default_rng(seed).random(len(info.layers))
        config = TrialConfig({n: Precision.INT8 if x < frac else Precision.FP32 for n, x in zip(info.layer_names, draw)})
        int8 = set(config.layers_with(Precision.INT8))
        emitted = _emit(model, info, config, ranges, ONNXRUNTIME_CPU)
        optimized = _optimized(emitted)
        assert _integer_kernels(optimized) == len(int8 - heads), (seed, frac)
        assert sum(n.op_type == "Conv" for n in optimized.graph.node) == len(info.layers) - len(int8 - heads)
        # FP32 convs reading an INT8 conv's output read a DequantizeLinear output
        index = GraphIndex(model)
        int8_outs = set()
        for name in int8:
            ep = activation_epilogue(index, info.layer(name).output)
            int8_outs.add(ep.output if ep else info.layer(name).output)
        prod = _producers(emitted)
        nodes = {n.name: n for n in emitted.graph.node}
        fed = 0
        for layer in info.layers:
            if layer.name not in int8 and layer.activation_input in int8_outs:
                dq = prod[nodes[layer.name].input[0]]
                assert dq.op_type == "DequantizeLinear", layer.name
                fed += 1
        assert fed > 0
        # TensorRT: FP32 layers still read float tensors
        trt = _emit(model, info, config, ranges, TENSORRT)
        trt_prod = _producers(trt)
        for node in trt.graph.node:
            if node.name in set(info.layer_names) - int8:
                assert trt_prod.get(node.input[0]) is None or trt_prod[node.input[0]].op_type != "DequantizeLinear"
        for feeds in feeds_list:
            ref = _run(model, feeds)[0][0]
            out = _run(emitted, feeds)[0][0]
            sel = ref[:, 4] * ref[:, 5:].max(1) > 0.25
            assert (out[sel, 5:].argmax(1) == ref[sel, 5:].argmax(1)).mean() >= 0.9
            assert np.abs(out[sel, 4] - ref[sel, 4]).max() < 0.35
            assert np.abs(out[sel, :4] - ref[sel, :4]).mean() < 12.0


# --------------------------------------------------------------------------- asymmetric uint8 (TensorRange.min)


@pytest.mark.parametrize(
    "lo, hi",
    [(-0.2785, 37.3), (-1.0, 1.0), (-5.0, 0.3), (-0.0, 6.0), (-1e-7, 3.0), (-3.0, 0.0), (-0.2785, 0.2785), (-1e-12, 1e-12)],
)
def test_asymmetric_uint8_params_represent_lo_zero_hi(lo, hi) -> None:
    from sensisearch.quantize.emit import asymmetric_uint8_params

    scale, zp = asymmetric_uint8_params(lo, hi)
    assert scale > 0 and scale == float(np.float32(scale)) and 0 <= zp <= 255
    # ONNX QuantizeLinear / DequantizeLinear semantics (round half to even, saturate)
    def qdq(x: float) -> float:
        q = np.clip(np.rint(np.float32(x) / np.float32(scale)) + zp, 0, 255)
        return float((q - zp) * np.float32(scale))

    assert qdq(0.0) == 0.0  # zero is exact
    half = 0.5 * scale * (1 + 1e-5)
    if hi - lo > 2e-10:  # above the scale floor
        assert abs(qdq(lo) - lo) <= half and abs(qdq(hi) - hi) <= half
        np.testing.assert_allclose(scale, (hi - lo) / 255, rtol=1e-6)
    # the representable range covers [lo, hi] up to half a step on each side
    assert -zp * scale <= lo + half and (255 - zp) * scale >= hi - half


def test_tensor_range_lower() -> None:
    assert TensorRange(2.0).lower == -2.0  # no min: symmetric
    assert TensorRange(2.0, min=-0.3).lower == -0.3
    assert TensorRange(2.0, min=-7.0).lower == -2.0  # the algorithm's clipping applies to the negative side too
    assert TensorRange(2.0, True, min=0.5).lower == 0.0  # 0 always inside the range
    with pytest.raises(ValueError):
        TensorRange(1.0, min=float("-inf"))


@pytest.mark.parametrize("which", ["resnet", "yolo"])
def test_tensorrt_ignores_min(which, request) -> None:
    """TensorRT stays symmetric int8 (zero point 0): its deployable ONNX is bit-identical
    whether or not the ranges carry a calibrated minimum."""
    info, model, _, ranges = request.getfixturevalue(which)
    assert any(r.min is not None and r.min < 0 for r in ranges.values())
    without = {t: TensorRange(r.amax, r.nonnegative) for t, r in ranges.items()}
    for config in (TrialConfig.uniform(info.layer_names, Precision.INT8), _configs(info)["mixed"]):
        a = _emit(model, info, config, ranges, TENSORRT).SerializeToString()
        b = _emit(model, info, config, without, TENSORRT).SerializeToString()
        assert a == b


def test_yolo_onnxruntime_asymmetric_uint8(yolo) -> None:
    """All-INT8 YOLOv5n, ORT profile with calibrated minima: signed tensors (SiLU outputs,
    raw conv outputs) get asymmetric uint8, shared-parameter outputs (MaxPool/Resize) reuse
    their input's; ORT still fuses 57 integer convs and runs the region on 8-bit data."""
    info, model, feeds_list, ranges = yolo
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    emitted = _emit(model, info, config, ranges, ONNXRUNTIME_CPU)
    inits = {i.name: numpy_helper.to_array(i) for i in emitted.graph.initializer}
    zps = {}
    for act in plan_placement(info, model, config, ONNXRUNTIME_CPU).threshold_tensors:
        r = ranges[act]
        zp, scale = int(inits[f"{act}_zero_point"]), float(inits[f"{act}_scale"])
        assert inits[f"{act}_zero_point"].dtype == np.uint8
        if r.nonnegative:
            assert zp == 0
        else:
            assert zp == round(-r.lower / scale) and abs((255 - zp) * scale - r.amax) <= 0.5 * scale * 1.0001
        zps[act] = zp
    silu = [t for t in zps if t.endswith("/act/Mul_output_0")]
    assert len(silu) == 57 and all(0 < zps[t] < 128 for t in silu)  # SiLU min ~ -0.28: most codes positive
    q_params = {n.input[0]: tuple(n.input[1:]) for n in emitted.graph.node if n.op_type == "QuantizeLinear"}
    assert q_params["/model.11/Resize_output_0"] == q_params["/model.10/act/Mul_output_0"]
    optimized = _optimized(emitted)
    ops = collections.Counter(n.op_type for n in optimized.graph.node)
    assert _integer_kernels(optimized) == 57
    assert ops["QLinearSigmoid"] == ops["QLinearMul"] == 57 and ops["QLinearAdd"] == 7
    assert ops["QuantizeLinear"] == 1
    # SiLU outputs: step (amax - lower)/255 instead of amax/127 (zero point 128), about half
    for t in silu:
        assert float(inits[f"{t}_scale"]) <= (ranges[t].amax / 127) * (1 - ranges[t].lower / ranges[t].amax) * 127 / 255 * 1.0001
    assert np.median([float(inits[f"{t}_scale"]) / (ranges[t].amax / 127) for t in silu]) < 0.55


def test_digits_onnxruntime_asymmetric_integer_kernels() -> None:
    """The digits example, all-INT8 with the ORT profile: 10/10 integer kernels with
    calibrated minima, accuracy on the calibration images matches FP32 within 2%."""
    root = REPO / "sensisearch" / "examples" / "digits"
    info, model = analyze_model(root / "digits_resnet.onnx")
    data = np.load(root / "calib.npz")
    x = ((data["images"][:256, None] / 255.0 - 0.5) / 0.5).astype(np.float32)
    feeds = {model.graph.input[0].name: x}
    ranges = _minmax_ranges(model, info, [feeds])
    config = TrialConfig.uniform(info.layer_names, Precision.INT8)
    emitted = _emit(model, info, config, ranges, ONNXRUNTIME_CPU)
    _check(emitted)
    zps = [numpy_helper.to_array(i) for i in emitted.graph.initializer if i.name.endswith("_zero_point") and i.data_type == TensorProto.UINT8]
    assert any(int(z.flat[0]) not in (0, 128) for z in zps)  # the signed input is asymmetric
    assert _integer_kernels(_optimized(emitted)) == len(info.layers) == 10
    labels = data["labels"][:256]
    acc_fp32 = (_run(model, feeds)[0].argmax(1) == labels).mean()
    acc_int8 = (_run(emitted, feeds)[0].argmax(1) == labels).mean()
    assert acc_int8 >= acc_fp32 - 0.02


# --------------------------------------------------------------------------- one plan per trial


def test_trial_and_build_plan_placement_once(tmp_path: Path, monkeypatch) -> None:
    """A real trial of the digits example plans its Q/DQ placement exactly once (the range
    lookup and the emitter share it), and ``sensisearch build --config`` goes through the
    same pipeline: one plan, and the artifact the trial built."""
    import sensisearch.artifact as pipeline_module
    from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
    from sensisearch.export._build import build_from_config
    from sensisearch.quantize.ranges import ranges_to_dict
    from sensisearch.study.run import prepare
    from sensisearch.study.config._settings import StudySettings

    settings = StudySettings.from_flat(
        example="digits", backend="onnxruntime", out=tmp_path / "run", sample_counts=[128], latency_seconds=0.05,
        eval_limit=200, threads=1,
    )
    ctx = prepare(settings)
    calls: list[str] = []
    real_plan = pipeline_module.plan_placement

    def counting_plan(info, model, config, profile, index=None):
        # The study's A/A control (an all-FP32 copy built like a trial, once per worker) is planned too:
        # count the trial's own configurations only.
        if config.uses_int8 or config.layers_with(Precision.FP16):
            calls.append(profile.name)
        return real_plan(info, model, config, profile, index)

    monkeypatch.setattr(pipeline_module, "plan_placement", counting_plan)
    names = ctx.info.layer_names
    config = TrialConfig({n: Precision.INT8 if i % 3 else Precision.FP32 for i, n in enumerate(names)})
    int8 = len(config.layers_with(Precision.INT8))
    outcome = ctx.pipeline.run(config, tmp_path / "trial")
    assert calls == ["onnxruntime-cpu"]
    assert outcome.build.layer_precisions["int8"] == int8  # the planned INT8 layers really fused
    # The trial records every tensor's range (so any backend can rebuild it), a superset of what it placed.
    assert set(outcome.ranges) == set(statistics_tensors(ctx.model, ctx.info))
    assert set(outcome.ranges) >= set(real_plan(ctx.info, ctx.model, config, ONNXRUNTIME_CPU).threshold_tensors)

    record = {
        "model": {"path": str(ctx.info.path), "sha256": ctx.info.sha256},
        "config": config.to_dict(),
        "thresholds": ranges_to_dict(ctx.pipeline.ranges_for(config, every_tensor=True)),
    }
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(record))
    calls.clear()
    out, result = build_from_config(config_path, OnnxRuntimeBackend(threads=1), tmp_path / "rebuilt.ort.onnx")
    assert calls == ["onnxruntime-cpu"]
    assert dict(result.layer_precisions) == dict(outcome.build.layer_precisions)
    rebuilt, trial = onnx.load(str(out)), onnx.load(str(outcome.build.artifact))
    assert [(n.op_type, list(n.input)) for n in rebuilt.graph.node] == [(n.op_type, list(n.input)) for n in trial.graph.node]
