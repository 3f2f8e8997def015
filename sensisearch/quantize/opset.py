"""Opset upgrade for INT8 trials (per-channel Q/DQ needs opset >= 13).

``onnx.version_converter`` keeps node names and adds unnamed ``Constant`` nodes
(e.g. Split/Unsqueeze attributes that became inputs in opset 13); those get the
usual ``<op_type>_<index>`` names. The conversion costs ~50 ms on YOLOv5n, so the
result is cached per model (keyed by the model file hash and a fingerprint of the
graph) and reused by every trial.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import onnx
from onnx import helper, version_converter

from sensisearch.errors import SensisearchError
from sensisearch.model.analysis import assign_node_names, default_opset

_CACHE: "OrderedDict[tuple[str, int, str], onnx.ModelProto]" = OrderedDict()
_CACHE_SIZE = 4
_LOCK = threading.Lock()


def graph_fingerprint(model: onnx.ModelProto) -> str:
    """Cheap hash of the graph structure (nodes, I/O and initializer names/shapes)."""
    h = hashlib.sha256()
    g = model.graph
    for n in g.node:
        h.update(f"{n.name}|{n.op_type}|{','.join(n.input)}|{','.join(n.output)}\n".encode())
    for i in g.initializer:
        h.update(f"{i.name}:{i.data_type}:{tuple(i.dims)}\n".encode())
    h.update(",".join(v.name for v in g.input).encode())
    h.update(",".join(v.name for v in g.output).encode())
    h.update(",".join(f"{o.domain}:{o.version}" for o in model.opset_import).encode())
    return h.hexdigest()


def upgrade_opset(model: onnx.ModelProto, target: int, source: str = "model") -> onnx.ModelProto:
    """A copy of ``model`` converted to default-domain opset ``target`` (never lower).

    Nodes keep their names; nodes the converter adds are named deterministically.
    Metadata props are carried over. The IR version is raised if the new opset needs it.
    """
    current = default_opset(model)
    if current >= target:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    try:
        out = version_converter.convert_version(model, target)
    except Exception as exc:
        raise SensisearchError(
            f"{source}: cannot upgrade the model from opset {current} to {target} for per-channel INT8 "
            f"({type(exc).__name__}: {exc}); re-export the model with opset >= {target}"
        ) from exc
    assign_node_names(out)
    if not out.metadata_props and model.metadata_props:
        out.metadata_props.extend(model.metadata_props)
    out.ir_version = max(out.ir_version, model.ir_version, helper.find_min_ir_version_for(list(out.opset_import)))
    before = {(n.name, n.op_type) for n in model.graph.node}
    after = {(n.name, n.op_type) for n in out.graph.node}
    if not before <= after:
        missing = sorted(before - after)[:3]
        raise SensisearchError(
            f"{source}: the opset {target} upgrade changed the graph's nodes (e.g. {missing}); "
            f"re-export the model with opset >= {target}"
        )
    return out


def upgraded(model: onnx.ModelProto, target: int, key: str, source: str = "model") -> onnx.ModelProto:
    """Cached :func:`upgrade_opset`; ``key`` identifies the model (e.g. its sha256).

    The returned model is shared: callers must not mutate it.
    """
    if default_opset(model) >= target:
        return model
    cache_key = (key, target, graph_fingerprint(model))
    with _LOCK:
        hit = _CACHE.get(cache_key)
        if hit is not None:
            _CACHE.move_to_end(cache_key)
            return hit
    result = upgrade_opset(model, target, source)
    with _LOCK:
        _CACHE[cache_key] = result
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result
