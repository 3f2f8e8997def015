"""Precision groups: layers that must share a precision so the backend fuses them without a reformat.

Conv(+BN folded)+activation is already one layer. Beyond that, two layers whose
outputs meet at a residual ``Add`` or a ``Concat`` (:data:`FUSION_JOIN_OP_TYPES`),
possibly through their activations and value-preserving ops (MaxPool, Resize,
... of the profile's region ops), go together: TensorRT fuses the Add into the
conv that produces one input and reads the skip input in the same precision, and
removes a Concat only when all its inputs are written in one precision (its Q
moves into every producer); mixing precisions there inserts a reformat layer
that costs more than the INT8 layer gains. ONNX Runtime's CPU profile
(``quantize_regions``) runs the same Add/Concat/MaxPool/Resize region in integer
kernels only when every input is quantized, so the same rule holds there.

Whether a join op groups its producers follows the profile: an ``Add`` when the
profile quantizes residual Adds or regions, a ``Concat`` when ``Concat`` is
among its region ops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from sensisearch.op_types import FUSION_JOIN_OP_TYPES, VALUE_PRESERVING_OP_TYPES, is_standard
from sensisearch.quantize.graph import GraphIndex, activation_epilogue

if TYPE_CHECKING:
    from sensisearch.model.analysis import QuantizableLayer
    from sensisearch.quantize.profiles import QuantizationProfile


def join_op_types(profile: QuantizationProfile) -> frozenset[str]:
    """The join ops whose producers share a precision under ``profile``."""
    joins = set()
    if profile.quantize_residual_add or profile.quantize_regions:
        joins.add("Add")
    if "Concat" in profile.region_ops:
        joins.add("Concat")
    return frozenset(joins) & FUSION_JOIN_OP_TYPES


def fusion_groups(
    index: GraphIndex, layers: Sequence[QuantizableLayer], profile: QuantizationProfile
) -> tuple[tuple[str, ...], ...]:
    """Partition of ``layers`` into precision groups (each in graph order; groups ordered by their first layer).

    Every layer is in exactly one group; a layer no join op connects is a group of one.
    """
    joins = join_op_types(profile)
    passthrough = VALUE_PRESERVING_OP_TYPES & frozenset(profile.region_ops)
    by_output: dict[str, int] = {}
    for i, layer in enumerate(layers):
        by_output[layer.output] = i
        epilogue = activation_epilogue(index, layer.output)
        if epilogue is not None:
            by_output[epilogue.output] = i
    parent = list(range(len(layers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(members: Sequence[int]) -> None:
        roots = sorted({find(m) for m in members})
        for r in roots[1:]:
            parent[r] = roots[0]

    def producers(tensor: str, seen: set[str]) -> set[int]:
        """Layers whose output reaches ``tensor`` through activations, value-preserving ops and join ops only."""
        if tensor in seen:
            return set()
        seen.add(tensor)
        if tensor in by_output:
            return {by_output[tensor]}
        ni = index.producer.get(tensor)
        if ni is None:
            return set()
        node = index.nodes[ni]
        if not is_standard(node):
            return set()
        if node.op_type in passthrough and node.input:
            return producers(node.input[0], seen)
        if node.op_type in joins:
            found: set[int] = set()
            for name in node.input:
                if name and not index.is_constant(name):
                    found |= producers(name, seen)
            return found
        return set()

    for node in index.nodes:
        if node.op_type in joins and is_standard(node) and node.output and node.output[0]:
            members = producers(node.output[0], set())  # the join's own output: the join branch above
            if len(members) > 1:
                union(sorted(members))

    grouped: dict[int, list[str]] = {}
    for i, layer in enumerate(layers):  # in graph order, so each group's first member decides its place
        grouped.setdefault(find(i), []).append(layer.name)
    return tuple(tuple(g) for g in grouped.values())
