"""Which ONNX layer (or Q/DQ tensor) a backend's profiled kernel belongs to, by name.

Backends rename nodes when they fuse them: ONNX Runtime keeps the layer's node
name for ``FusedConv`` / ``QLinearConv`` (``layer1/conv1/Conv_token_21``), names an
NCHWc conv after its (activation's) output tensor (``/layer1/relu1/Relu_output_0_nchwc``),
a SiLU after its ``Mul`` node (``/model.0/act/Mul/QuickGeluFusion/``), a weight's
DequantizeLinear after the weight (``model.1.conv.weight_DequantizeLinear``) and an
activation Q/DQ after its tensor (our emitter's ``<tensor>_QuantizeLinear``). TensorRT
names an engine layer after the ONNX nodes fused into it, joined by `` + `` (with
``PWN(a, b)`` for pointwise fusions). So every name is matched against the keys a
layer owns (its node, its activation epilogue's nodes, its weight, its output
tensors) and the activation tensors that may carry Q/DQ, longest key first.
Whatever matches nothing is "unmapped" and goes to the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from sensisearch.quantize.graph import GraphIndex, activation_epilogue
from sensisearch.quantize.placement import statistics_tensors

if TYPE_CHECKING:
    import onnx

    from sensisearch.model.analysis import ModelInfo

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_SEPARATORS = ("_", "/", ":")
_TRT_TOKEN_SPLIT = re.compile(r"\s\+\s|PWN\(|\)|,\s*")


@dataclass(frozen=True)
class Owner:
    """What a profiled kernel's time is charged to."""

    kind: str
    """``"layer"``, ``"qdq"`` (a Q/DQ pair on an activation tensor: a precision boundary) or ``"rest"``."""
    name: str = ""
    """The layer's node name, or the tensor's name; empty for the rest."""


REST = Owner("rest")


def _matches(name: str, key: str) -> bool:
    return name == key or (name.startswith(key) and name[len(key)] in _SEPARATORS)


class NameAttribution:
    """Maps profiled kernel names of one model to its layers and Q/DQ tensors."""

    def __init__(self, model: onnx.ModelProto, info: ModelInfo, index: GraphIndex | None = None) -> None:
        index = index or GraphIndex(model)
        self.layer_keys: dict[str, str] = {}
        for layer in info.layers:
            keys = [layer.name, layer.output, layer.weight]
            epilogue = activation_epilogue(index, layer.output)
            if epilogue is not None:
                keys += [index.nodes[i].name for i in epilogue.nodes]
                keys.append(epilogue.output)
            for key in keys:
                if key:
                    self.layer_keys.setdefault(key, layer.name)
        self.tensors = frozenset(statistics_tensors(model, info, index))
        # Longest first, so "/m/Mul_output_0" wins over "/m/Mul".
        self._layer_order = sorted(self.layer_keys, key=len, reverse=True)
        self._tensor_order = sorted(self.tensors, key=len, reverse=True)

    def _layer_of(self, name: str) -> str | None:
        for key in self._layer_order:
            if _matches(name, key):
                return self.layer_keys[key]
        return None

    def _qdq_tensor_of(self, name: str) -> str | None:
        for tensor in self._tensor_order:
            if name.startswith(tensor + "_QuantizeLinear") or name.startswith(tensor + "_DequantizeLinear"):
                return tensor
        return None

    def ort_node(self, node_name: str, op_type: str) -> Owner:
        """The owner of one ONNX Runtime profiled node (``args.op_name`` is ``op_type``)."""
        if op_type in QDQ_OPS:
            tensor = self._qdq_tensor_of(node_name)
            if tensor is not None:
                return Owner("qdq", tensor)
        layer = self._layer_of(node_name)
        return Owner("layer", layer) if layer is not None else REST

    def tensorrt_layer(self, engine_layer: str) -> Owner:
        """The owner of one TensorRT engine layer: the first fused ONNX node that is a layer's wins.

        ``Reformatting CopyNode for ...`` layers (inserted where precisions or formats
        change) and anything else unmatched go to the rest.
        """
        tokens = [t.strip() for t in _TRT_TOKEN_SPLIT.split(engine_layer) if t and t.strip()]
        for token in tokens:
            if token in self.layer_keys:
                return Owner("layer", self.layer_keys[token])
        for token in tokens:
            tensor = self._qdq_tensor_of(token)
            if tensor is not None:
                return Owner("qdq", tensor)
        return REST


@dataclass
class AttributedKernels:
    """One configuration's profiled kernels, charged to owners: time (ms) and number of kernels per owner."""

    layer_ms: dict[str, float] = field(default_factory=dict)
    qdq_ms: dict[str, float] = field(default_factory=dict)
    rest_ms: float = 0.0
    layer_kernels: dict[str, int] = field(default_factory=dict)
    qdq_kernels: dict[str, int] = field(default_factory=dict)
    rest_kernels: int = 0

    @property
    def total_ms(self) -> float:
        return float(sum(self.layer_ms.values()) + sum(self.qdq_ms.values()) + self.rest_ms)

    @property
    def kernels(self) -> int:
        return sum(self.layer_kernels.values()) + sum(self.qdq_kernels.values()) + self.rest_kernels


def charge(kernels: Iterable[tuple[Owner, float]]) -> AttributedKernels:
    """Sum ``(owner, ms)`` per profiled kernel into an :class:`AttributedKernels`."""
    out = AttributedKernels()
    for owner, ms in kernels:
        if owner.kind == "layer":
            out.layer_ms[owner.name] = out.layer_ms.get(owner.name, 0.0) + ms
            out.layer_kernels[owner.name] = out.layer_kernels.get(owner.name, 0) + 1
        elif owner.kind == "qdq":
            out.qdq_ms[owner.name] = out.qdq_ms.get(owner.name, 0.0) + ms
            out.qdq_kernels[owner.name] = out.qdq_kernels.get(owner.name, 0) + 1
        else:
            out.rest_ms += ms
            out.rest_kernels += 1
    return out
