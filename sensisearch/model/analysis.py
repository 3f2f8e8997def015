"""Load an FP32 ONNX model and find the layers whose precision sensisearch searches.

Where Q/DQ goes around those layers is :mod:`sensisearch.quantize`'s business
(graph indexing, INT8 regions, placement).

A *quantizable layer* is a ``Conv``, ``ConvTranspose``, ``Gemm`` or ``MatMul`` node
of the main graph whose weight is a constant float32 initializer (a ``Gemm`` or
``MatMul`` of two activations is not a layer), and whose bias, if any, is an
initializer too.

Node names: :func:`load_onnx` gives every node without a name (and every node
whose name repeats an earlier one) the stable name ``<op_type>_<index>`` (index
in graph order, suffixed further if that is taken too). The deployable ONNX
written per trial keeps these names, and TensorRT names its layers after ONNX
nodes, so trial configurations, engine layer names and reports all agree.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper

from sensisearch.errors import SensisearchError
from sensisearch.model.tensor import TensorSpec
from sensisearch.onnx_compat import check_loadable_ir
from sensisearch.op_types import DEFAULT_DOMAINS, LAYER_OP_TYPES, is_standard



@dataclass(frozen=True)
class QuantizableLayer:
    """One layer whose precision the search chooses."""

    name: str
    """ONNX node name (assigned on load if the file had none); TensorRT layer name."""
    op_type: str
    index: int
    """Position of the node in graph order."""
    activation_input: str
    weight: str
    """Name of the float32 weight initializer."""
    bias: str | None
    output: str
    weight_axis: int
    """Output-channel axis of the weight, used for per-channel scales: 0 for Conv,
    1 for ConvTranspose, 0 for Gemm transB=1, 1 for Gemm transB=0, last for MatMul."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    """SHA-256 of the model file's bytes."""
    opset: int
    """Version of the default ONNX domain."""
    inputs: list[TensorSpec]
    """Real graph inputs (initializers listed as inputs are excluded)."""
    outputs: list[TensorSpec]
    layers: list[QuantizableLayer]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def layer(self, name: str) -> QuantizableLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


# --------------------------------------------------------------------------- loading


def assign_node_names(model: onnx.ModelProto) -> int:
    """Name unnamed or duplicate-named main-graph nodes ``<op_type>_<index>`` in place.

    Deterministic: depends only on the graph. Returns how many nodes were renamed.
    """
    nodes = model.graph.node
    taken = {n.name for n in nodes if n.name}
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(nodes):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.name}_{index}" if node.name else f"{node.op_type}_{index}"
        name, k = base, 1
        while name in taken or name in seen:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        taken.add(name)
        seen.add(name)
        renamed += 1
    return renamed


def _load_bytes(path: Path) -> tuple[bytes, onnx.ModelProto]:
    if not path.exists():
        raise SensisearchError(f"{path}: model file not found; pass the path of an existing .onnx file")
    if not path.is_file():
        raise SensisearchError(f"{path}: is not a file; pass the path of an .onnx model file")
    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise SensisearchError(f"{path}: not an ONNX model ({type(exc).__name__}); export the model to ONNX first") from exc
    # Protobuf happily parses many non-ONNX byte strings into a nearly empty message.
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.graph.node) == 0 or not model.opset_import:
        raise SensisearchError(f"{path}: not an ONNX model (no graph, IR version or opset); export the model to ONNX first")
    check_loadable_ir(model, str(path))
    try:
        if any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in external_data_helper._get_all_tensors(model)
        ):
            external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise SensisearchError(
            f"{path}: cannot load the model's external data ({exc}); keep the data files next to the model"
        ) from exc
    return data, model


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX model (with external data) and assign stable node names."""
    _, model = _load_bytes(Path(path))
    assign_node_names(model)
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in DEFAULT_DOMAINS:
            return int(op.version)
    return 1


def _tensor_spec(value: onnx.ValueInfoProto, path: Path) -> TensorSpec:
    if not value.type.HasField("tensor_type"):
        raise SensisearchError(f"{path}: graph input/output {value.name!r} is not a tensor; only tensor I/O is supported")
    tt = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    except Exception as exc:
        raise SensisearchError(f"{path}: graph input/output {value.name!r} has an unsupported element type {tt.elem_type}") from exc
    shape: tuple[int | None, ...] = ()
    if tt.HasField("shape"):
        shape = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
    return TensorSpec(name=value.name, shape=shape, dtype=dtype)


def find_layers(model: onnx.ModelProto) -> list[QuantizableLayer]:
    """The quantizable layers of ``model`` in graph order (nodes must be named)."""
    inits = {i.name: i for i in model.graph.initializer}
    layers: list[QuantizableLayer] = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in LAYER_OP_TYPES or not is_standard(node):
            continue
        if len(node.input) < 2 or not node.output or not node.output[0]:
            continue
        x, w = node.input[0], node.input[1]
        if not x or x in inits or w not in inits:
            continue
        weight = inits[w]
        if weight.data_type != onnx.TensorProto.FLOAT:
            continue
        rank = len(weight.dims)
        bias: str | None = None
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            if bias not in inits or inits[bias].data_type != onnx.TensorProto.FLOAT:
                continue  # computed bias: cannot convert it to fp16/int32 statically
        if node.op_type == "Conv":
            if rank < 3:
                continue
            axis = 0
        elif node.op_type == "ConvTranspose":
            if rank < 3:
                continue
            axis = 1
        elif node.op_type == "Gemm":
            if rank != 2:
                continue
            trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        else:  # MatMul x @ W, W [..., K, N]: output channels are the last axis
            if rank < 2:
                continue
            axis = rank - 1
        layers.append(
            QuantizableLayer(
                name=node.name,
                op_type=node.op_type,
                index=index,
                activation_input=x,
                weight=w,
                bias=bias,
                output=node.output[0],
                weight_axis=axis,
            )
        )
    return layers


def analyze_model(path: str | Path) -> tuple[ModelInfo, onnx.ModelProto]:
    """Load ``path``, name its nodes and describe it. Returns ``(info, model)``.

    Use the returned model (not a fresh ``onnx.load``) for calibration and
    emission: its node names are the layer names of ``info``.
    """
    path = Path(path)
    data, model = _load_bytes(path)
    assign_node_names(model)
    layers = find_layers(model)
    if not layers:
        raise SensisearchError(
            f"{path}: no quantizable layer (Conv, ConvTranspose, Gemm or MatMul with constant float32 weights); "
            "sensisearch has nothing to search in this model"
        )
    init_names = {i.name for i in model.graph.initializer}
    info = ModelInfo(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        opset=default_opset(model),
        inputs=[_tensor_spec(v, path) for v in model.graph.input if v.name not in init_names],
        outputs=[_tensor_spec(v, path) for v in model.graph.output],
        layers=layers,
        metadata={p.key: p.value for p in model.metadata_props},
    )
    return info, model
