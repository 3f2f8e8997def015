"""Load an FP32 ONNX model and find the layers whose precision sensisearch searches.

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
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import external_data_helper, helper

from sensisearch.errors import SensisearchError
from sensisearch.model.tensor import TensorSpec

LAYER_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Single-input element-wise activations that may directly follow a layer.
ACTIVATION_OP_TYPES = frozenset(
    {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu", "Tanh", "Sigmoid", "Softplus", "Gelu"}
)


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
        if op.domain in ("", "ai.onnx"):
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
        if node.op_type not in LAYER_OP_TYPES or node.domain not in ("", "ai.onnx"):
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


# --------------------------------------------------------------------------- graph topology


class GraphIndex:
    """Producers and consumers of the main graph's tensors."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {i.name for i in graph.initializer}
        self.graph_outputs = {o.name for o in graph.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        for ni, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = ni
            for ii, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((ni, ii))
            # Tensors read by subgraphs (If/Loop bodies) count as consumed by the node.
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    for name in _subgraph_free_inputs(attr.g):
                        self.consumers.setdefault(name, []).append((ni, -1))
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        for name in _subgraph_free_inputs(g):
                            self.consumers.setdefault(name, []).append((ni, -1))

    def is_constant(self, name: str) -> bool:
        if name in self.initializers:
            return True
        p = self.producer.get(name)
        return p is not None and self.nodes[p].op_type == "Constant"

    def consumer_nodes(self, name: str) -> list[tuple[int, int]]:
        return self.consumers.get(name, [])


def _subgraph_free_inputs(graph: onnx.GraphProto) -> Iterator[str]:
    for node in graph.node:
        yield from (n for n in node.input if n)


@dataclass(frozen=True)
class Epilogue:
    """An element-wise activation directly after a layer's output."""

    kind: str
    """The activation's op type, or ``"SiLU"`` for the Sigmoid+Mul pair."""
    nodes: tuple[int, ...]
    output: str


def activation_epilogue(index: GraphIndex, tensor: str) -> Epilogue | None:
    """The activation applied to ``tensor`` if that is all ``tensor`` feeds.

    Recognises a single element-wise activation node and SiLU written as
    ``Mul(x, Sigmoid(x))`` (YOLOv5). ``None`` if ``tensor`` is a graph output or
    has other consumers.
    """
    if tensor in index.graph_outputs:
        return None
    cons = index.consumer_nodes(tensor)
    if len(cons) == 1:
        ni, ii = cons[0]
        node = index.nodes[ni]
        if ii == 0 and node.op_type in ACTIVATION_OP_TYPES and node.domain in ("", "ai.onnx") and node.output:
            return Epilogue(kind=node.op_type, nodes=(ni,), output=node.output[0])
        return None
    if len(cons) == 2:
        (a, _), (b, _) = cons
        na, nb = index.nodes[a], index.nodes[b]
        if na.op_type == "Mul" and nb.op_type == "Sigmoid":
            a, b, na, nb = b, a, nb, na
        if na.op_type == "Sigmoid" and nb.op_type == "Mul" and len(nb.input) == 2:
            sig_out = na.output[0]
            if (
                sorted(nb.input) == sorted([tensor, sig_out])
                and index.consumer_nodes(sig_out) == [(b, list(nb.input).index(sig_out))]
                and sig_out not in index.graph_outputs
            ):
                return Epilogue(kind="SiLU", nodes=(a, b), output=nb.output[0])
    return None


@dataclass(frozen=True)
class ResidualAdd:
    """An ``Add`` of two activations, one of which a layer produced."""

    node: int
    fed_by: str
    """Name of the layer whose output (possibly after its activation) is one input."""
    through_activation: bool
    skip_input_index: int
    skip_input: str


def residual_adds(index: GraphIndex, layers: Iterable[QuantizableLayer]) -> list[ResidualAdd]:
    """Every (Add, feeding layer) pair; the *skip* input is the Add's other input.

    When both inputs come from layers, the skip input is the one whose producing
    layer comes earlier in the graph (the later layer fuses the Add).
    """
    direct: dict[str, QuantizableLayer] = {}
    via_act: dict[str, QuantizableLayer] = {}
    for layer in layers:
        direct[layer.output] = layer
        ep = activation_epilogue(index, layer.output)
        if ep is not None:
            via_act[ep.output] = layer
    found: list[ResidualAdd] = []
    for ni, node in enumerate(index.nodes):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        a, b = node.input
        if not a or not b or a == b or index.is_constant(a) or index.is_constant(b):
            continue
        feeders: list[tuple[int, QuantizableLayer, bool]] = []
        for i, name in enumerate((a, b)):
            if name in direct:
                feeders.append((i, direct[name], False))
            elif name in via_act:
                feeders.append((i, via_act[name], True))
        if not feeders:
            continue
        # Later layer first: the Add fuses into the last producer; the other input is the skip.
        feeders.sort(key=lambda f: -f[1].index)
        for i, layer, through in feeders:
            skip_i = 1 - i
            found.append(
                ResidualAdd(
                    node=ni,
                    fed_by=layer.name,
                    through_activation=through,
                    skip_input_index=skip_i,
                    skip_input=node.input[skip_i],
                )
            )
    return found


# --------------------------------------------------------------------------- INT8 regions

# Ops that may join an INT8 region (backends that fuse them into integer kernels, e.g.
# ONNX Runtime's QLinearAdd/QLinearMul/QLinearSigmoid/QLinearConcat/QLinearGlobalAveragePool,
# or run them directly on 8-bit data: MaxPool, Resize, Reshape, ...).
REGION_OP_TYPES = frozenset(
    {
        "Add",
        "Mul",
        "Sigmoid",
        "LeakyRelu",
        "Relu",
        "Clip",
        "Concat",
        "GlobalAveragePool",
        "AveragePool",
        "MaxPool",
        "GlobalMaxPool",
        "Resize",
        "Slice",
        "Split",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Identity",
    }
)
# Region ops whose every input is an activation (all others: input 0 only; the
# remaining inputs are shapes, scales, axes, ... and are never quantized).
_ALL_DATA_INPUT_OPS = frozenset({"Add", "Mul", "Concat"})
# Region ops whose output values are a subset of (or copied from) their data input's
# values: the output can reuse the input's quantization parameters exactly, and
# ONNX Runtime only drops their Q/DQ (running them on 8-bit data) when it does.
VALUE_PRESERVING_OP_TYPES = frozenset(
    {"MaxPool", "GlobalMaxPool", "Resize", "Slice", "Split", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
)


# Ops that read only the shape of their input: they may read the dequantized tensor
# (same shape) so that they do not keep the producer from emitting 8-bit data.
SHAPE_READER_OP_TYPES = frozenset({"Shape", "Size"})


def data_input_indices(node: onnx.NodeProto) -> tuple[int, ...]:
    """Input positions of ``node`` that carry activations when it is a region op."""
    if node.op_type in _ALL_DATA_INPUT_OPS:
        return tuple(range(len(node.input)))
    return (0,) if node.input else ()


@dataclass(frozen=True)
class Int8Region:
    """The elementwise/data-movement ops that run quantized between INT8 layers."""

    nodes: frozenset[int]
    """Node indices of the region ops."""
    q_consumers: dict[str, tuple[tuple[int, int], ...]]
    """Per tensor: every ``(node, input)`` that reads it quantized (an INT8 layer's
    activation input or a data input of a region op; plus ``Shape``/``Size`` readers
    of such a tensor, which see the same shape), in graph order. A tensor with
    at least one entry gets a Q/DQ pair shared by exactly these consumers, unless it
    is in :attr:`folded`."""
    folded: frozenset[str]
    """Tensors whose only consumer is a region Relu/Clip listed in ``fold_activations``:
    no Q/DQ between the producer and the activation (the Q goes after it)."""
    shared_params: dict[str, str]
    """Output of a value-preserving region op -> the tensor whose quantization
    parameters it reuses (followed back through chains of such ops)."""
    layer_outputs: frozenset[str] = frozenset()
    """With ``quantize_int8_outputs``: the INT8 layer outputs (after their epilogue)
    quantized for every reader that is not post-processing, float readers included
    (their :attr:`q_consumers` list those readers too). Empty otherwise."""


def feeds_layers(index: GraphIndex, layers: Iterable[QuantizableLayer]) -> set[str]:
    """Tensors from which the activation input of some layer (any precision) is reachable.

    Followed backwards through the non-constant inputs of every node, but not
    through ``Shape``/``Size`` (shape-only reads). A tensor outside this set only
    leads to graph outputs: it is post-processing (YOLOv5's Detect decode and the
    outputs of the Detect convs).
    """
    seen: set[str] = set()
    stack = [layer.activation_input for layer in layers]
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        p = index.producer.get(t)
        if p is None:
            continue
        node = index.nodes[p]
        if node.op_type in SHAPE_READER_OP_TYPES and node.domain in ("", "ai.onnx"):
            continue
        stack.extend(i for i in node.input if i and not index.is_constant(i))
    return seen


def quantized_output_readers(
    index: GraphIndex, tensor: str, layer_inputs: set[tuple[int, int]], to_layers: set[str]
) -> list[tuple[int, int]]:
    """Readers of an INT8 layer's output that read its quantized value.

    Layers, shape readers and ops that lead on to a layer; readers that only
    lead to graph outputs (post-processing such as YOLO's decode) keep the float.
    """
    return [
        (ci, ii)
        for ci, ii in index.consumer_nodes(tensor)
        if ii >= 0
        and (
            (ci, ii) in layer_inputs
            or index.nodes[ci].op_type in SHAPE_READER_OP_TYPES
            or any(o in to_layers for o in index.nodes[ci].output)
        )
    ]


def int8_region(
    index: GraphIndex,
    layers: Iterable[QuantizableLayer],
    int8_names: Iterable[str],
    region_ops: Iterable[str] = REGION_OP_TYPES,
    fold_activations: Iterable[str] = ("Relu", "Clip"),
    quantize_int8_outputs: bool = False,
) -> Int8Region:
    """The largest set of region ops (``region_ops``) such that each one

    * has at least one activation input produced by an INT8 layer or another region op,
    * has no constant activation input (it would need a quantized initializer),
    * and every output feeds only INT8 layers (activation input) and region ops
      (data inputs): no graph output, no float consumer.

    With ``quantize_int8_outputs`` ("int8 in, int8 out" layers), every INT8 layer's
    output is quantized whenever it leads to some layer (:func:`feeds_layers`), for
    *all* its readers except post-processing ones, float readers (FP32/FP16 layers,
    ops outside the region) included: the layer's activation epilogue (SiLU, Relu,
    ... if all its nodes are region ops) always joins the region and its output is
    the quantized tensor; without such an epilogue the raw layer output is. An output
    that is a graph output or only leads to graph outputs stays float. These are
    :attr:`Int8Region.layer_outputs`; the other region ops follow the rules above.

    A greatest fixpoint, so it is monotone: more INT8 layers never shrink the
    region, and the all-INT8 region contains every other configuration's region
    (for the same ``quantize_int8_outputs``).
    Layers outside ``int8_names`` and their activations are never part of it.
    """
    region_ops = frozenset(region_ops)
    fold = frozenset(fold_activations)
    int8 = set(int8_names)
    layer_list = [l for l in layers if l.name in int8]
    int8_inputs = {(l.index, 0) for l in layer_list}
    int8_outputs = {l.output for l in layer_list}
    data_idx: dict[int, tuple[int, ...]] = {}
    candidates: set[int] = set()
    for ni, node in enumerate(index.nodes):
        if node.op_type not in region_ops or node.domain not in ("", "ai.onnx"):
            continue
        idx = data_input_indices(node)
        outs = [o for o in node.output if o]
        if not idx or not outs or any(not node.input[i] or index.is_constant(node.input[i]) for i in idx):
            continue
        data_idx[ni] = idx
        candidates.add(ni)

    shape_readers = {
        ni for ni, node in enumerate(index.nodes) if node.op_type in SHAPE_READER_OP_TYPES and node.domain in ("", "ai.onnx")
    }

    def is_q_consumer(ci: int, ii: int, region: set[int]) -> bool:
        return (ci, ii) in int8_inputs or (ci in region and ii in data_idx[ci]) or (ci in shape_readers and ii == 0)

    def produced_quantized(t: str, region: set[int]) -> bool:
        return t in int8_outputs or index.producer.get(t, -1) in region

    forced_nodes: set[int] = set()
    forced_outputs: dict[str, list[tuple[int, int]]] = {}
    if quantize_int8_outputs:
        layer_list_all = list(layers)
        to_layers = feeds_layers(index, layer_list_all)
        layer_inputs = {(l.index, 0) for l in layer_list_all}
        for layer in layer_list:
            ep = activation_epilogue(index, layer.output)
            if ep is not None and all(n in candidates for n in ep.nodes):
                target, nodes = ep.output, ep.nodes
            else:
                target, nodes = layer.output, ()
            if target in index.graph_outputs or target not in to_layers:
                continue
            readers = quantized_output_readers(index, target, layer_inputs, to_layers)
            if readers:
                forced_nodes.update(nodes)
                forced_outputs[target] = readers

    region = set(candidates)
    changed = True
    while changed:
        changed = False
        for ni in sorted(region - forced_nodes):
            node = index.nodes[ni]
            ok = any(produced_quantized(node.input[i], region) for i in data_idx[ni])
            for out in node.output:
                if not ok:
                    break
                if not out:
                    continue
                cons = index.consumer_nodes(out)
                ok = out not in index.graph_outputs and bool(cons) and all(is_q_consumer(c, i, region) for c, i in cons)
            if not ok:
                region.discard(ni)
                changed = True

    q_consumers: dict[str, list[tuple[int, int]]] = {}
    for ci, ii in sorted(int8_inputs):
        q_consumers.setdefault(index.nodes[ci].input[ii], []).append((ci, ii))
    for ni in sorted(region):
        for ii in data_idx[ni]:
            q_consumers.setdefault(index.nodes[ni].input[ii], []).append((ni, ii))
    for t, cons in forced_outputs.items():
        q_consumers.setdefault(t, []).extend(cons)
    for t, cons in q_consumers.items():
        cons.extend(c for c in index.consumer_nodes(t) if c[0] in shape_readers and c[1] == 0)
    folded: set[str] = set()
    for t, cons in q_consumers.items():
        if len(cons) == 1 and index.consumer_nodes(t) == cons and t not in index.graph_outputs:
            ci, _ = cons[0]
            if ci in region and index.nodes[ci].op_type in fold and produced_quantized(t, region):
                folded.add(t)
    shared: dict[str, str] = {}
    for ni in sorted(region):  # graph order: a chain's source is resolved first
        node = index.nodes[ni]
        if node.op_type in VALUE_PRESERVING_OP_TYPES:
            src = node.input[0]
            src = shared.get(src, src)
            for out in node.output:
                if out:
                    shared[out] = src
    return Int8Region(
        nodes=frozenset(region),
        q_consumers={t: tuple(sorted(set(c))) for t, c in q_consumers.items()},
        folded=frozenset(folded),
        shared_params=shared,
        layer_outputs=frozenset(forced_outputs),
    )


def statistics_tensors(model: onnx.ModelProto, info: ModelInfo) -> list[str]:
    """Every activation tensor any profile's emitter may ask a threshold for.

    The union, over all layers, of: the activation input, the raw output, the
    output of a directly following activation (Relu, Clip, SiLU, ...), and the
    skip input of an ``Add`` fed by the layer; plus every activation input of the
    ops of the all-INT8 :func:`int8_region` (which contains the region of every
    configuration and every profile's subset of :data:`REGION_OP_TYPES`): e.g.
    YOLOv5's Sigmoid outputs, residual Add and Concat outputs. Graph outputs are
    excluded (sensisearch never quantizes them), and so is everything the region
    never reaches, such as YOLOv5's Detect decode. Sorted by first appearance in graph order.
    Calibration collects statistics for these once; per trial only
    :func:`sensisearch.quantize.emit.tensors_to_quantize` (a subset) is needed.
    """
    index = GraphIndex(model)
    wanted: list[str] = []

    def add(name: str) -> None:
        if name and name not in index.graph_outputs and not index.is_constant(name):
            wanted.append(name)

    for layer in info.layers:
        add(layer.activation_input)
        add(layer.output)
        ep = activation_epilogue(index, layer.output)
        if ep is not None:
            add(ep.output)
    for res in residual_adds(index, info.layers):
        add(res.skip_input)
    for int8_outputs in (False, True):  # every profile's region rule
        region = int8_region(
            index, info.layers, [l.name for l in info.layers], REGION_OP_TYPES, fold_activations=(),
            quantize_int8_outputs=int8_outputs,
        )
        for tensor in region.q_consumers:
            add(tensor)
    order = {name: i for i, name in enumerate(i.name for i in model.graph.input)}
    base = len(order)
    for ni, node in enumerate(index.nodes):
        for out in node.output:
            order.setdefault(out, base + ni)
    return sorted(dict.fromkeys(wanted), key=lambda n: order.get(n, len(order) + base))


def layers_by_name(info: ModelInfo) -> Mapping[str, QuantizableLayer]:
    return {layer.name: layer for layer in info.layers}
