"""The INT8 region: elementwise and data-movement ops that run quantized between INT8 layers.

Backends that fuse more than the weighted layers (ONNX Runtime's QLinearAdd,
QLinearConcat, 8-bit MaxPool/Resize, ...) only do so when every input and output
of such an op carries Q/DQ. :func:`int8_region` finds the largest set of ops for
which that is possible without quantizing a graph output or a float consumer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from sensisearch.model.analysis import QuantizableLayer
from sensisearch.op_types import REGION_OP_TYPES, SHAPE_READER_OP_TYPES, VALUE_PRESERVING_OP_TYPES, is_standard
from sensisearch.quantize.graph import (
    GraphIndex,
    activation_epilogue,
    data_input_indices,
    feeds_layers,
    quantized_output_readers,
)


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
        if node.op_type not in region_ops or not is_standard(node):
            continue
        idx = data_input_indices(node)
        outs = [o for o in node.output if o]
        if not idx or not outs or any(not node.input[i] or index.is_constant(node.input[i]) for i in idx):
            continue
        data_idx[ni] = idx
        candidates.add(ni)

    shape_readers = {
        ni for ni, node in enumerate(index.nodes) if node.op_type in SHAPE_READER_OP_TYPES and is_standard(node)
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
