"""Which precision each quantizable layer really ran in, from the engine inspector's JSON.

``engine.create_engine_inspector().get_engine_information(LayerInformationFormat.JSON)``
(plans built with DETAILED profiling verbosity) returns ``{"Layers": [...], "Bindings": [...]}``;
each engine layer has

* ``Name``: the fused ONNX node names joined with ``" + "`` (pointwise fusions
  appear as ``PWN(a, b)``), or a generated name (``__myl_...``) for Myelin/kgen
  layers, whose ONNX nodes are listed in ``Metadata`` as ``[ONNX Layer: name]``
  entries separated by ``\\x1e`` (some versions ``\\x1f``);
* ``LayerType``: ``CaskConvolution``, ``CaskGemm``, ``Reformat``, ``kgen``, ``Myelin``, ...;
* ``Inputs`` / ``Outputs``: ``Name``, ``Dimensions``, ``Format/Datatype`` such as
  ``"Thirty-two wide channel vectorized row major Int8 format"``,
  ``"Channel major FP16 format where channel % 8 == 0"``, ``"Row major linear FP32"``
  (newer versions write ``Int8`` / ``Half`` / ``Float``);
* ``Weights``: ``{"Type": "Int8" | "Half" | "Float", "Count": n}`` for layers with weights;
* ``TacticName``: INT8 kernels contain ``i8i8``/``i8f32``/``imma``, FP16 ``f16f16``/``h884``/``hmma``.

A quantizable layer's precision is read from, in order: its weights' type, the
tactic name, the data type of its first input. ``Reformat`` layers (precision or
layout conversions between regions) are counted but not attributed to layers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

PRECISIONS = ("int8", "fp16", "fp32")
_METADATA_SPLIT = re.compile(r"[\x1e\x1f]")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
_PWN = re.compile(r"^PWN\((.*)\)$")

# Tactic-name fragments, checked in this order.
_TACTIC_PATTERNS = (
    ("int8", re.compile(r"i8i8|i8f32|i8f16|imma|int8|_i8_", re.IGNORECASE)),
    ("fp16", re.compile(r"f16f16|h884|h1688|h16816|hmma|fp16|half", re.IGNORECASE)),
    ("fp32", re.compile(r"f32f32|tf32|sgemm|scudnn|fp32", re.IGNORECASE)),
)


def datatype_precision(text: Any) -> str | None:
    """``int8``/``fp16``/``fp32`` from a ``Format/Datatype`` or ``Weights.Type`` string, else None."""
    t = str(text or "").lower()
    if not t or "n/a" in t:
        return None
    if "bf16" in t or "bfloat" in t:
        return "bf16"
    if "int8" in t:
        return "int8"
    if "fp16" in t or "half" in t or "float16" in t:
        return "fp16"
    if "fp32" in t or "float" in t:
        return "fp32"
    return None


def tactic_precision(name: Any) -> str | None:
    text = str(name or "")
    for precision, pattern in _TACTIC_PATTERNS:
        if pattern.search(text):
            return precision
    return None


def _split_top(text: str, sep: str) -> list[str]:
    """Split ``text`` on ``sep`` outside parentheses (``PWN(PWN(a, b), c)`` nests)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return parts


def onnx_names(layer: Mapping[str, Any]) -> list[str]:
    """ONNX node names an engine layer covers: from ``Metadata`` and the fused ``Name``."""
    names: list[str] = []
    for entry in _METADATA_SPLIT.split(str(layer.get("Metadata") or "")):
        names += [m.strip() for m in _ONNX_LAYER.findall(entry)]

    def split(text: str) -> None:
        for part in _split_top(text, " + "):
            part = part.strip()
            m = _PWN.match(part)
            if m:
                for inner in _split_top(m.group(1), ", "):
                    split(inner)
            elif part:
                names.append(part)

    name = layer.get("Name")
    if isinstance(name, str) and not name.startswith("Reformatting CopyNode"):
        split(name)
    return list(dict.fromkeys(names))


def _is_reformat(layer: Mapping[str, Any]) -> bool:
    return layer.get("LayerType") == "Reformat" or str(layer.get("Name", "")).startswith("Reformatting CopyNode")


@dataclass(frozen=True)
class LayerEvidence:
    engine_layer: str
    layer_type: str
    precision: str
    """``int8``/``fp16``/``fp32``/``bf16`` or ``unknown``."""
    source: str
    """``weights``, ``tactic``, ``input`` or ``none``."""
    tactic: str | None = None


def layer_precision(layer: Mapping[str, Any]) -> tuple[str, str]:
    """``(precision, source)`` of one engine layer."""
    weights = layer.get("Weights")
    if isinstance(weights, Mapping):
        p = datatype_precision(weights.get("Type"))
        if p:
            return p, "weights"
    p = tactic_precision(layer.get("TacticName"))
    if p:
        return p, "tactic"
    for tensor in layer.get("Inputs") or ():
        if isinstance(tensor, Mapping):
            p = datatype_precision(tensor.get("Format/Datatype"))
            if p:
                return p, "input"
    return "unknown", "none"


@dataclass
class InspectorSummary:
    """Per quantizable layer: the precision its engine layer ran in."""

    layers: dict[str, LayerEvidence] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    """Quantizable layers no engine layer names (fused beyond recognition or removed)."""
    reformats: int = 0
    engine_layers: int = 0
    detailed: bool = True
    """False when the plan was built without DETAILED verbosity (names only)."""

    def counts(self) -> dict[str, int]:
        out = {p: 0 for p in PRECISIONS}
        for ev in self.layers.values():
            key = ev.precision if ev.precision in out else "unknown"
            out[key] = out.get(key, 0) + 1
        if self.missing:
            out["unknown"] = out.get("unknown", 0) + len(self.missing)
        return out

    def precisions(self) -> dict[str, str]:
        out = {name: ev.precision for name, ev in self.layers.items()}
        out.update({name: "unknown" for name in self.missing})
        return out

    def mismatches(self, requested: Mapping[str, Any]) -> list[tuple[str, str, str]]:
        """``(layer, asked, ran)`` where the engine disagrees with the requested precision."""
        got = self.precisions()
        out = []
        for name, p in requested.items():
            asked = getattr(p, "value", str(p))
            ran = got.get(name, "unknown")
            if ran != asked:
                out.append((name, asked, ran))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts(),
            "layers": {n: {"precision": e.precision, "source": e.source, "engine_layer": e.engine_layer} for n, e in self.layers.items()},
            "missing": list(self.missing),
            "reformats": self.reformats,
            "engine_layers": self.engine_layers,
            "detailed": self.detailed,
        }


def parse_inspector_json(data: str | bytes | Mapping[str, Any], quantizable: Iterable[str]) -> InspectorSummary:
    """Summarize engine-inspector JSON for the given quantizable layers (ONNX node names).

    A layer covered by several engine layers (e.g. a Gemm split into a matrix
    multiply and a bias add) takes the one with the strongest evidence
    (weights, then tactic, then input type).
    """
    if isinstance(data, (str, bytes)):
        data = json.loads(data)
    layers = list((data or {}).get("Layers") or [])
    wanted = list(dict.fromkeys(quantizable))
    wanted_set = set(wanted)
    summary = InspectorSummary(engine_layers=len(layers))
    rank = {"weights": 3, "tactic": 2, "input": 1, "none": 0}
    for layer in layers:
        if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity
            summary.detailed = False
            layer = {"Name": layer}
        if _is_reformat(layer):
            summary.reformats += 1
            continue
        covered = [n for n in onnx_names(layer) if n in wanted_set]
        if not covered:
            continue
        precision, source = layer_precision(layer)
        ev = LayerEvidence(str(layer.get("Name", "")), str(layer.get("LayerType", "")), precision, source, layer.get("TacticName"))
        for name in covered:
            old = summary.layers.get(name)
            if old is None or rank[source] > rank[old.source]:
                summary.layers[name] = ev
    summary.missing = [n for n in wanted if n not in summary.layers]
    summary.layers = {n: summary.layers[n] for n in wanted if n in summary.layers}
    return summary
