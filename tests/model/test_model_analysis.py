"""Tests for model analysis (sensisearch.model) and the tensors Q/DQ may ever cover
(sensisearch.quantize: statistics_tensors, int8_region) on a synthetic model and the real shared models."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import require_shared

from sensisearch.errors import SensisearchError
from sensisearch.model import analyze_model, load_onnx
from sensisearch.onnx_compat import make_model
from sensisearch.quantize import GraphIndex, int8_region, statistics_tensors


def _shared(rel: str) -> Path:
    return require_shared(*rel.split("/"))


def _small_model(path: Path, named: bool = True) -> Path:
    """x[N,3,8,8] -> Conv -> Relu -> MatMul(const) ; a second MatMul of two activations."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "mw"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv" if named else "", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),  # unnamed on purpose
        helper.make_node("MatMul", ["r", "mw"], ["m"], name="mm" if named else ""),
        helper.make_node("MatMul", ["r", "r"], ["rr"], name="act_matmul"),  # two activations: not a layer
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, None), helper.make_tensor_value_info("rr", TensorProto.FLOAT, None)],
        inits,
    )
    model = make_model(graph, opset=13, ir_version=3)  # IR 3 lists initializers as graph inputs too
    model.graph.input.extend([helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in inits])
    helper.set_model_props(model, {"stride": "8"})
    onnx.save(model, path)
    return path


def test_small_model_layers_names_and_io(tmp_path: Path) -> None:
    path = _small_model(tmp_path / "m.onnx", named=False)
    info, model = analyze_model(path)
    assert [(l.name, l.op_type, l.index, l.weight_axis) for l in info.layers] == [
        ("Conv_0", "Conv", 0, 0),
        ("MatMul_2", "MatMul", 2, 1),
    ]
    conv, mm = info.layers
    assert (conv.activation_input, conv.weight, conv.bias, conv.output) == ("x", "w", "b", "c")
    assert (mm.activation_input, mm.weight, mm.bias, mm.output) == ("r", "mw", None, "m")
    assert [n.name for n in model.graph.node] == ["Conv_0", "Relu_1", "MatMul_2", "act_matmul"]
    # initializers listed as inputs (IR 3) are not model inputs
    assert [(s.name, s.shape, s.dtype) for s in info.inputs] == [("x", (None, 3, 8, 8), np.dtype(np.float32))]
    assert [s.name for s in info.outputs] == ["m", "rr"]
    assert info.opset == 13 and info.metadata == {"stride": "8"}
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # names are deterministic: loading again gives the same ones
    assert [n.name for n in load_onnx(path).graph.node] == [n.name for n in model.graph.node]


def test_duplicate_names_are_made_unique(tmp_path: Path) -> None:
    path = _small_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    model.graph.node[2].name = "conv"
    onnx.save(model, path)
    names = [n.name for n in load_onnx(path).graph.node]
    assert len(set(names)) == len(names) and names[0] == "conv" and names[2] == "conv_2"


def test_statistics_tensors_small(tmp_path: Path) -> None:
    info, model = analyze_model(_small_model(tmp_path / "m.onnx"))
    # conv input, conv raw output, post-Relu output, matmul input (= post-Relu); 'm' is a graph output
    assert statistics_tensors(model, info) == ["x", "c", "r"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SensisearchError, match="not found"):
        analyze_model(tmp_path / "nope.onnx")


def test_not_onnx(tmp_path: Path) -> None:
    for i, data in enumerate([b"this is not an onnx model\n" * 10, bytes(range(256)) * 4, b""]):
        path = tmp_path / f"bad{i}.onnx"
        path.write_bytes(data)
        with pytest.raises(SensisearchError, match="not an ONNX model") as exc:
            analyze_model(path)
        assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SensisearchError, match="not a file"):
        analyze_model(tmp_path)


def test_no_quantizable_layer(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("MatMul", ["y", "y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4])],
    )
    path = tmp_path / "noq.onnx"
    onnx.save(make_model(graph, opset=13), path)
    with pytest.raises(SensisearchError, match="no quantizable layer"):
        analyze_model(path)


def test_mnist_real() -> None:
    info, model = analyze_model(_shared("mnist/mnist_cnn.onnx"))
    assert info.sha256 == "886402242b4f1ef887dd212a3482844ba3b60e5cf2594114ee794c8b28e002c6"
    assert [(l.name, l.op_type, l.weight_axis, l.bias is not None) for l in info.layers] == [
        ("/conv1/Conv", "Conv", 0, True),
        ("/conv2/Conv", "Conv", 0, True),
        ("/fc1/Gemm", "Gemm", 0, True),  # transB=1: weight [N, K]
        ("/fc2/Gemm", "Gemm", 0, True),
    ]
    assert info.opset == 11 and [s.name for s in info.inputs] == ["input"]
    assert info.inputs[0].shape[1:] == (1, 28, 28)
    stats = statistics_tensors(model, info)
    assert "output" not in stats  # graph output
    assert stats[:3] == ["input", "/conv1/Conv_output_0", "/relu/Relu_output_0"]


def test_yolov5n_real() -> None:
    info, model = analyze_model(_shared("yolov5n.onnx"))
    assert len(info.layers) == 60 and {l.op_type for l in info.layers} == {"Conv"}
    assert info.opset == 12
    assert info.metadata["stride"] == "32" and "person" in info.metadata["names"]
    assert [(s.name, s.shape) for s in info.inputs] == [("images", (1, 3, 640, 640))]
    assert [(s.name, s.shape) for s in info.outputs] == [("output0", (1, 25200, 85))]
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    stats = statistics_tensors(model, info)
    assert "output0" not in stats and "images" in stats
    # the Detect decode (everything in /model.24/ but its three convs) produces no statistics tensor
    producer = {o: n for n in model.graph.node for o in n.output}
    decode = [t for t in stats if t in producer and producer[t].name.startswith("/model.24/") and producer[t].op_type != "Conv"]
    assert decode == []
    # the INT8-region tensors between convs: Sigmoid outputs, residual Adds, Concats, SPPF MaxPools
    for t in ("/model.0/act/Sigmoid_output_0", "/model.2/m/m.0/Add_output_0", "/model.9/Concat_output_0", "/model.9/m/MaxPool_output_0"):
        assert t in stats, t


def _region_model(path: Path) -> Path:
    """c1 -> SiLU -> {c2, MaxPool}; Add(c2 out, c3 out) -> c4 -> Sigmoid -> graph output y;
    a second branch c1-SiLU -> Concat(with c5 out) -> c6 -> Shape (shape only) + graph output z."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(name, x, cin=4, cout=4):
        inits.append(numpy_helper.from_array(rng.standard_normal((cout, cin, 1, 1)).astype(np.float32), name + ".w"))
        nodes.append(helper.make_node("Conv", [x, name + ".w"], [name + "_out"], name=name))
        return name + "_out"

    c1 = conv("c1", "x")
    nodes += [
        helper.make_node("Sigmoid", [c1], ["s1"], name="sig1"),
        helper.make_node("Mul", [c1, "s1"], ["a1"], name="mul1"),
        helper.make_node("MaxPool", ["a1"], ["p1"], name="pool", kernel_shape=[1, 1]),
    ]
    c2 = conv("c2", "a1")
    c3 = conv("c3", "p1")
    nodes.append(helper.make_node("Add", [c2, c3], ["sum"], name="add"))
    c4 = conv("c4", "sum")
    nodes.append(helper.make_node("Sigmoid", [c4], ["y"], name="head_sigmoid"))
    c5 = conv("c5", "x")
    nodes.append(helper.make_node("Concat", ["a1", c5], ["cat"], name="cat", axis=1))
    c6 = conv("c6", "cat", cin=8)
    nodes.append(helper.make_node("Shape", [c6], ["z"], name="shape"))
    graph = helper.make_graph(
        nodes, "region", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("z", TensorProto.INT64, None)],
        inits,
    )
    onnx.save(make_model(graph, opset=13), path)
    return path


def test_int8_region(tmp_path: Path) -> None:
    info, model = analyze_model(_region_model(tmp_path / "r.onnx"))
    index = GraphIndex(model)
    names = [n.name for n in index.nodes]
    everything = int8_region(index, info.layers, info.layer_names)
    assert {names[i] for i in everything.nodes} == {"sig1", "mul1", "pool", "add", "cat"}  # not head_sigmoid: graph output
    assert everything.shared_params == {"p1": "a1"}
    assert set(everything.q_consumers) == {"x", "c1_out", "s1", "a1", "p1", "c2_out", "c3_out", "sum", "cat", "c5_out"}
    # c5 is FP32: the Concat still joins (its other input comes from the region); c5's output is
    # rounded by the Concat's input Q/DQ, c5 itself and the tensors it reads stay float
    no_c5 = int8_region(index, info.layers, [n for n in info.layer_names if n != "c5"])
    assert {names[i] for i in no_c5.nodes} == {"sig1", "mul1", "pool", "add", "cat"}
    assert ("c5", 0) not in no_c5.q_consumers.get("x", ())
    # c6 FP32: the Concat feeds a float layer, so it leaves the region
    no_c6 = int8_region(index, info.layers, [n for n in info.layer_names if n != "c6"])
    assert "cat" not in {names[i] for i in no_c6.nodes}
    # c1 FP32: its SiLU is never quantized, nor anything fed only by it; a1 is still an INT8 input
    no_c1 = int8_region(index, info.layers, [n for n in info.layer_names if n != "c1"])
    assert {names[i] for i in no_c1.nodes} == {"add", "cat"}
    assert "c1_out" not in no_c1.q_consumers and "s1" not in no_c1.q_consumers
    assert [names[c] for c, _ in no_c1.q_consumers["a1"]] == ["c2", "cat"]
    # monotone: every configuration's region is inside the all-INT8 one, and so are its tensors
    stats = set(statistics_tensors(model, info))
    for drop in info.layer_names:
        region = int8_region(index, info.layers, [n for n in info.layer_names if n != drop])
        assert region.nodes <= everything.nodes and set(region.q_consumers) <= stats
