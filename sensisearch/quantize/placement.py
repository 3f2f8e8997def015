"""Where Q/DQ goes for one trial configuration and profile (no graph is modified here).

:func:`plan_placement` decides it once per trial; the range lookup reads
:attr:`Placement.threshold_tensors` and the emitter writes exactly that placement.
:func:`statistics_tensors` is the union over every configuration and profile: the
tensors calibration must cover.

Consumers are referenced by ``(node name, input index)`` so a placement computed
on the analysed model still applies after the opset upgrade (which keeps node
names and adds only ``Constant`` nodes).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from sensisearch.errors import SensisearchError
from sensisearch.model.analysis import ModelInfo, QuantizableLayer
from sensisearch.op_types import REGION_OP_TYPES, SHAPE_READER_OP_TYPES, is_standard
from sensisearch.quantize.config import Precision, TrialConfig
from sensisearch.quantize.graph import (
    GraphIndex,
    activation_epilogue,
    feeds_layers,
    quantized_output_readers,
    residual_adds,
)
from sensisearch.quantize.profiles import QuantizationProfile
from sensisearch.quantize.region import int8_region


@dataclass(frozen=True)
class ActivationQdq:
    """One shared Q/DQ pair on ``tensor``; ``consumers`` read the dequantized value."""

    tensor: str
    consumers: tuple[tuple[str, int], ...]
    """``(node name, input index)`` of every input rewired to the DQ output."""
    reasons: tuple[str, ...]
    """Why: ``"layer_input"``, ``"residual_skip"``, ``"layer_output"``, ``"region"``
    (read by an op of the INT8 region) and/or ``"float_reader"`` (an INT8 layer's
    output read by an FP32/FP16 layer or another float op, which reads the
    dequantized value; ``QuantizationProfile.float_consumers_read_quantized``)."""
    params_from: str | None = None
    """Reuse the scale and zero point of this tensor's Q/DQ instead of a threshold of
    its own (output of a value-preserving region op such as MaxPool or Resize)."""


@dataclass(frozen=True)
class Placement:
    """Every Q/DQ pair and FP16 layer of one trial configuration under one profile."""

    int8_layers: tuple[QuantizableLayer, ...]
    fp16_layers: tuple[QuantizableLayer, ...]
    activations: tuple[ActivationQdq, ...]
    """In graph order of the tensors."""
    profile: QuantizationProfile
    """The profile it was planned for; the emitter refuses another one."""
    region_outputs: frozenset[str] = frozenset()
    """Outputs of the INT8 region's nodes (``profile.quantize_regions``): tensors the backend produces in
    8-bit, so their Q/DQ is fused, not a precision boundary (the latency table's boundary rule)."""

    @property
    def tensors(self) -> list[str]:
        """Every tensor that gets a Q/DQ pair."""
        return [a.tensor for a in self.activations]

    @property
    def threshold_tensors(self) -> list[str]:
        """The tensors whose Q/DQ needs a calibrated threshold (``params_from`` is None)."""
        return [a.tensor for a in self.activations if a.params_from is None]


def _check_config(info: ModelInfo, config: TrialConfig) -> None:
    known = {layer.name for layer in info.layers}
    unknown = [name for name in config.precisions if name not in known]
    if unknown:
        raise SensisearchError(
            f"{info.path}: the trial configuration names {len(unknown)} layer(s) the model does not have "
            f"(first: {unknown[0]!r}); use layer names from the model analysis"
        )


def plan_placement(
    info: ModelInfo,
    model: onnx.ModelProto,
    config: TrialConfig,
    profile: QuantizationProfile,
    index: GraphIndex | None = None,
) -> Placement:
    """Decide every Q/DQ pair and FP16 layer for ``config`` under ``profile``."""
    _check_config(info, config)
    index = index or GraphIndex(model)
    names = [n.name for n in index.nodes]
    int8 = [l for l in info.layers if config.precisions.get(l.name, Precision.FP32) is Precision.INT8]
    fp16 = [l for l in info.layers if config.precisions.get(l.name, Precision.FP32) is Precision.FP16]
    for layer in int8 + fp16:
        node = index.nodes[layer.index] if layer.index < len(index.nodes) else None
        if node is None or node.name != layer.name:
            raise ValueError(
                f"layer {layer.name!r} is not node {layer.index} of the model; pass the model returned by analyze_model"
            )
    int8_names = {l.name for l in int8}

    consumers: dict[str, dict[tuple[int, int], None]] = {}
    reasons: dict[str, dict[str, None]] = {}

    def want(tensor: str, cons: list[tuple[int, int]], reason: str) -> None:
        consumers.setdefault(tensor, {}).update(dict.fromkeys(cons))
        reasons.setdefault(tensor, {})[reason] = None

    params_from: dict[str, str] = {}
    region_outputs: frozenset[str] = frozenset()
    if profile.quantize_regions:
        region_outputs = _plan_region(info, index, int8, profile, want, params_from)
    else:
        _plan_layers(info, index, int8, int8_names, profile, want)

    order = _graph_order(model, index)
    activations = tuple(
        ActivationQdq(
            tensor=t,
            consumers=tuple((names[ni], ii) for ni, ii in sorted(consumers[t])),
            reasons=tuple(reasons[t]),
            params_from=params_from.get(t),
        )
        for t in sorted(consumers, key=lambda t: order.get(t, -1))
    )
    return Placement(
        int8_layers=tuple(int8), fp16_layers=tuple(fp16), activations=activations, profile=profile, region_outputs=region_outputs
    )


def _plan_region(info, index, int8, profile, want, params_from) -> frozenset[str]:
    """Q/DQ for INT8 layers and the INT8 region around them (``profile.quantize_regions``); returns the region's outputs."""
    region = int8_region(
        index,
        info.layers,
        [l.name for l in int8],
        profile.region_ops,
        profile.output_qdq_after_activations,
        quantize_int8_outputs=profile.float_consumers_read_quantized,
    )
    int8_inputs = {(l.index, 0) for l in int8}
    int8_outputs = {l.output for l in int8}

    def reason(c: tuple[int, int]) -> str:
        if c in int8_inputs:
            return "layer_input"
        node = index.nodes[c[0]]
        if c[0] in region.nodes or node.op_type in SHAPE_READER_OP_TYPES:
            return "region"
        return "float_reader"

    for tensor, cons in region.q_consumers.items():
        if tensor in region.folded:
            continue
        for c in cons:
            want(tensor, [c], reason(c))
        if tensor in int8_outputs and set(index.consumer_nodes(tensor)) <= set(cons):
            want(tensor, [], "layer_output")
        if tensor in region.shared_params:
            params_from[tensor] = region.shared_params[tensor]
    if profile.output_qdq_before_other_activations:
        # An activation the region cannot take (e.g. HardSwish) between an INT8 layer
        # and quantized consumers: Q/DQ on the raw layer output so the layer still
        # produces 8-bit data; the activation runs in float on the dequantized values.
        for layer in int8:
            ep = activation_epilogue(index, layer.output)
            if ep is None or ep.kind in profile.output_qdq_after_activations or any(n in region.nodes for n in ep.nodes):
                continue
            if layer.output in region.q_consumers:
                continue
            out_cons = set(index.consumer_nodes(ep.output))
            if ep.output in index.graph_outputs or not out_cons or not out_cons <= set(region.q_consumers.get(ep.output, ())):
                continue
            want(layer.output, list(index.consumer_nodes(layer.output)), "layer_output")
    return frozenset(out for ni in region.nodes for out in index.nodes[ni].output if out)


def _plan_layers(info, index, int8, int8_names, profile, want) -> None:
    """Q/DQ on INT8 layer inputs, residual skips and (optionally) layer outputs."""
    int8_inputs = {(l.index, 0) for l in int8}
    for layer in int8:
        want(layer.activation_input, [(layer.index, 0)], "layer_input")

    quantized_adds: set[int] = set()
    if profile.quantize_residual_add:
        for res in residual_adds(index, info.layers):
            if res.node in quantized_adds or res.fed_by not in int8_names:
                continue
            if res.through_activation and not profile.residual_add_through_activation:
                continue
            quantized_adds.add(res.node)
            want(res.skip_input, [(res.node, res.skip_input_index)], "residual_skip")

    if profile.float_consumers_read_quantized:
        _plan_layer_outputs_everywhere(info, index, int8, profile, want)
    elif profile.quantize_layer_outputs:
        passthrough = set(profile.output_passthrough_ops)
        memo: dict[str, bool] = {}

        def feeds_only_int8(tensor: str) -> bool:
            if tensor in memo:
                return memo[tensor]
            memo[tensor] = False  # guards against cycles
            cons = index.consumer_nodes(tensor)
            ok = tensor not in index.graph_outputs and bool(cons)
            for ni, ii in cons:
                if not ok:
                    break
                node = index.nodes[ni]
                if (ni, ii) in int8_inputs or (ni in quantized_adds and ii >= 0):
                    continue
                if ii >= 0 and node.op_type in passthrough and is_standard(node):
                    outs = [o for o in node.output if o]
                    ok = bool(outs) and all(feeds_only_int8(o) for o in outs)
                    continue
                ok = False
            memo[tensor] = ok
            return ok

        for layer in int8:
            ep = activation_epilogue(index, layer.output)
            if ep is None:
                target = layer.output
                if not feeds_only_int8(target):
                    continue
            elif ep.kind in profile.output_qdq_after_activations:
                target = ep.output
                if not feeds_only_int8(target):
                    continue
            elif profile.output_qdq_before_other_activations:
                target = layer.output
                if not feeds_only_int8(ep.output):
                    continue
            else:
                continue
            want(target, list(index.consumer_nodes(target)), "layer_output")


def _plan_layer_outputs_everywhere(info, index, int8, profile, want) -> None:
    """``float_consumers_read_quantized`` without regions: every INT8 layer output that
    leads to some layer gets Q/DQ for all its readers except post-processing ones."""
    to_layers = feeds_layers(index, info.layers)
    layer_inputs = {(l.index, 0) for l in info.layers}
    for layer in int8:
        ep = activation_epilogue(index, layer.output)
        if ep is not None and ep.kind in profile.output_qdq_after_activations:
            target = ep.output
        else:
            target = layer.output
        if target in index.graph_outputs or target not in to_layers:
            continue
        readers = quantized_output_readers(index, target, layer_inputs, to_layers)
        if readers:
            want(target, readers, "layer_output")


def statistics_tensors(model: onnx.ModelProto, info: ModelInfo, index: GraphIndex | None = None) -> list[str]:
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
    :attr:`Placement.threshold_tensors` (a subset) is needed.
    """
    index = index or GraphIndex(model)
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
    order = _graph_order(model, index)
    unknown = len(order) + len(index.nodes) + 1  # after everything (never happens: all are inputs or node outputs)
    return sorted(dict.fromkeys(wanted), key=lambda n: order.get(n, unknown))


def _graph_order(model: onnx.ModelProto, index: GraphIndex) -> dict[str, int]:
    """Position of every graph input and node output: inputs first, then graph order."""
    order = {name: i for i, name in enumerate(i.name for i in model.graph.input)}
    base = len(order)
    for ni, node in enumerate(index.nodes):
        for out in node.output:
            order.setdefault(out, base + ni + 1)
    return order
