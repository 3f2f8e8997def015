"""Producers, consumers and the layer-adjacent patterns of a model's main graph.

What Q/DQ placement needs to know about the graph: who produces and reads each
tensor (:class:`GraphIndex`), the activation right after a layer
(:func:`activation_epilogue`), residual ``Add``s fed by a layer
(:func:`residual_adds`), and which tensors lead to a layer at all
(:func:`feeds_layers`; everything else is post-processing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import onnx

from sensisearch.model.analysis import QuantizableLayer
from sensisearch.op_types import ACTIVATION_OP_TYPES, ALL_DATA_INPUT_OP_TYPES, SHAPE_READER_OP_TYPES, is_standard


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
            for name in subgraph_reads(node):
                self.consumers.setdefault(name, []).append((ni, -1))

    def is_constant(self, name: str) -> bool:
        if name in self.initializers:
            return True
        p = self.producer.get(name)
        return p is not None and self.nodes[p].op_type == "Constant"

    def consumer_nodes(self, name: str) -> list[tuple[int, int]]:
        return self.consumers.get(name, [])


def subgraph_reads(node: onnx.NodeProto) -> Iterator[str]:
    """Every tensor name read inside ``node``'s subgraphs (If/Loop/Scan bodies).

    Includes names produced inside the subgraph too: callers use it to keep the
    outer tensors a subgraph may capture (an over-approximation is harmless).
    """
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs: Iterable[onnx.GraphProto] = (attr.g,)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs = attr.graphs
        else:
            continue
        for graph in graphs:
            for inner in graph.node:
                yield from (n for n in inner.input if n)


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
        if ii == 0 and node.op_type in ACTIVATION_OP_TYPES and is_standard(node) and node.output:
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
        if node.op_type != "Add" or not is_standard(node) or len(node.input) != 2:
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


def data_input_indices(node: onnx.NodeProto) -> tuple[int, ...]:
    """Input positions of ``node`` that carry activations when it is a region op."""
    if node.op_type in ALL_DATA_INPUT_OP_TYPES:
        return tuple(range(len(node.input)))
    return (0,) if node.input else ()


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
        if node.op_type in SHAPE_READER_OP_TYPES and is_standard(node):
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
