"""Parse a deployable ONNX into a strongly typed TensorRT network and read its tensor types.

This is the CPU-side precision check (the engine inspector needs a GPU): in a
strongly typed network the precision of every layer is fixed by the tensor
types the ONNX carries, so before the build one can already see

* INT8 layers: activation input = ``DEQUANTIZE(QUANTIZE(x))`` (an INT8 tensor
  between them) and weight = ``DEQUANTIZE(int8 constant)``,
* FP16 layers: HALF input, HALF output (the ONNX's Cast + float16 weights),
* FP32 layers: FLOAT in and out, no Q/DQ on the activation,

and that HALF appears only inside FP16 layers' Cast regions and INT8 only
between a QUANTIZE and its DEQUANTIZE (or as int8 weight constants). It does not
show fusions or which kernel TensorRT picks; :mod:`.inspector` does that on a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import onnx

from sensisearch.backends.tensorrt.flavor import TensorRTFlavor
from sensisearch.errors import SensisearchError
from sensisearch.op_types import LAYER_OP_TYPES

_COMPUTE_TYPES = ("CONVOLUTION", "DECONVOLUTION", "MATRIX_MULTIPLY")
# Layers a constant weight may pass through on its way into a compute layer.
_WEIGHT_PATH_TYPES = ("DEQUANTIZE", "SHUFFLE", "CAST", "IDENTITY")


_LOGGERS: dict[str, Any] = {}
_MAX_MESSAGES = 1000


def capturing_logger(trt: Any) -> Any:
    """The process-wide TensorRT logger of module ``trt``.

    TensorRT keeps the first logger given to a builder/runtime for the whole
    process ("the current new logger is ignored"), so there is exactly one per
    module. It prints nothing and keeps the last warnings and errors; take
    ``mark = logger.mark()`` before an operation and ``logger.errors(mark)``
    after it to quote what went wrong in a one-line error.
    """
    logger = _LOGGERS.get(trt.__name__)
    if logger is not None:
        return logger
    severity = trt.ILogger.Severity
    keep = {severity.INTERNAL_ERROR: "ERROR", severity.ERROR: "ERROR", severity.WARNING: "WARNING"}

    class _CapturingLogger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[int, str, str]] = []
            self._count = 0

        def log(self, sev: Any, msg: str) -> None:
            level = keep.get(sev)
            if level is None:
                return
            self._count += 1
            self.messages.append((self._count, level, " ".join(str(msg).split())))
            if len(self.messages) > _MAX_MESSAGES:
                del self.messages[: len(self.messages) - _MAX_MESSAGES]

        def mark(self) -> int:
            return self._count

        def errors(self, since: int = 0) -> list[str]:
            return [m for k, level, m in self.messages if level == "ERROR" and k > since]

        def warnings(self, since: int = 0) -> list[str]:
            return [m for k, level, m in self.messages if level == "WARNING" and k > since]

        def last_error(self, since: int = 0) -> str | None:
            errs = self.errors(since)
            return errs[-1] if errs else None

    logger = _LOGGERS[trt.__name__] = _CapturingLogger()
    return logger


@dataclass
class ParsedNetwork:
    """A parsed network, with the builder and parser that own it (keep them alive together)."""

    flavor: TensorRTFlavor
    builder: Any
    network: Any
    parser: Any
    logger: Any
    onnx_path: Path

    def inputs(self) -> list[tuple[str, tuple[int, ...]]]:
        """Network inputs as ``(name, shape)`` with -1 for dynamic dimensions."""
        out = []
        for i in range(self.network.num_inputs):
            t = self.network.get_input(i)
            out.append((t.name, tuple(int(d) for d in t.shape)))
        return out

    def outputs(self) -> list[tuple[str, tuple[int, ...]]]:
        out = []
        for i in range(self.network.num_outputs):
            t = self.network.get_output(i)
            out.append((t.name, tuple(int(d) for d in t.shape)))
        return out


def create_network(flavor: TensorRTFlavor, builder: Any) -> Any:
    """A strongly typed network on every flavor (the only typing sensisearch uses)."""
    trt = flavor.module
    flags = 0
    if flavor.features.strongly_typed_flag:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    if flavor.features.strongly_typed_flag and not network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED):
        raise SensisearchError(f"{flavor.module_name} {flavor.version} did not create a strongly typed network; upgrade TensorRT")
    return network


def parse_error_message(onnx_path: Path, parser: Any, logger: Any = None, since: int = 0) -> str:
    """One line naming the failing ONNX node, its operator and the parser's message."""
    n = int(parser.num_errors)
    if n == 0:
        why = logger.last_error(since) if logger is not None else None
        return f"{onnx_path}: TensorRT could not parse the ONNX ({why or 'no error reported'}); check it with onnx.checker"
    err = parser.get_error(0)
    node_name = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    desc = " ".join(str(err.desc()).split())
    where = f"node '{node_name}'" if node_name else f"node #{err.node()}"
    if op:
        where += f" ({op})"
    more = f" (+{n - 1} more errors)" if n > 1 else ""
    return f"{onnx_path}: TensorRT cannot parse {where}: {desc}{more}"


def parse_onnx(onnx_path: str | Path, flavor: TensorRTFlavor) -> ParsedNetwork:
    """Parse ``onnx_path`` (file form, so external data works) into a strongly typed network."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise SensisearchError(f"{onnx_path}: ONNX file not found")
    trt = flavor.module
    logger = capturing_logger(trt)
    mark = logger.mark()
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # full TensorRT without a usable GPU
        builder, why = None, " ".join(str(exc).split())
    else:
        why = logger.last_error(mark)
    if builder is None:
        raise SensisearchError(
            f"{flavor.module_name} {flavor.version} could not create a builder ({why or 'no error message'}); "
            "TensorRT 10/11 builds need a GPU (sensisearch doctor), TensorRT-RTX builds on the CPU"
        )
    network = create_network(flavor, builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise SensisearchError(parse_error_message(onnx_path, parser, logger, mark))
    return ParsedNetwork(flavor, builder, network, parser, logger, onnx_path)


# --------------------------------------------------------------------------- precision check


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    """TensorRT DataType name: FLOAT, HALF, INT8, INT64, BOOL, ..."""
    producer: str | None
    """Name of the producing layer (None for network inputs)."""
    producer_type: str | None


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    """TensorRT LayerType name (CONVOLUTION, QUANTIZE, CAST, ...)."""
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]


@dataclass
class NetworkPrecisions:
    """Tensor types of a parsed strongly typed network and the precision of each quantizable layer."""

    layers: dict[str, str]
    """Quantizable layer (ONNX node name) -> ``int8`` / ``fp16`` / ``fp32``, or a
    description of an inconsistent typing (e.g. ``inconsistent: HALF input, FLOAT output``)."""
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    network_layers: list[LayerInfo] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {"int8": 0, "fp16": 0, "fp32": 0}
        for p in self.layers.values():
            key = p if p in out else "other"
            out[key] = out.get(key, 0) + 1
        return out

    def tensors_of(self, dtype: str) -> list[TensorInfo]:
        return [t for t in self.tensors.values() if t.dtype == dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": dict(self.layers), "counts": self.counts()}


def _dtype_name(dtype: Any) -> str:
    return getattr(dtype, "name", str(dtype).split(".")[-1])


def onnx_layer_nodes(onnx_path: str | Path) -> dict[str, str]:
    """ONNX node name -> op type for every Conv/ConvTranspose/Gemm/MatMul of the main graph."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return {n.name: n.op_type for n in model.graph.node if n.op_type in LAYER_OP_TYPES and n.name}


def network_precisions(parsed: ParsedNetwork, layer_names: Iterable[str] | None = None) -> NetworkPrecisions:
    """Classify every quantizable layer of ``parsed`` by the tensor types around it.

    ``layer_names``: the quantizable layers (ONNX node names, e.g. ``ModelInfo.layer_names``);
    default: every Conv/ConvTranspose/Gemm/MatMul node of the ONNX whose weight is
    a constant in the network.
    """
    net = parsed.network
    layers: list[LayerInfo] = []
    tensors: dict[str, TensorInfo] = {}
    by_name: dict[str, LayerInfo] = {}
    for i in range(net.num_inputs):
        t = net.get_input(i)
        tensors[t.name] = TensorInfo(t.name, _dtype_name(t.dtype), None, None)
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        ltype = _dtype_name(layer.type)
        ins = []
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            ins.append(None if t is None else t.name)
        outs = []
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            outs.append(t.name)
            tensors[t.name] = TensorInfo(t.name, _dtype_name(t.dtype), layer.name, ltype)
        info = LayerInfo(layer.name, ltype, tuple(ins), tuple(outs))
        layers.append(info)
        by_name.setdefault(layer.name, info)
    producer_layer = {o: l for l in layers for o in l.outputs}

    def weight_is_constant(tensor: str | None, depth: int = 0) -> bool:
        if tensor is None or depth > 4:
            return False
        p = producer_layer.get(tensor)
        if p is None:
            return False
        if p.type == "CONSTANT":
            return True
        return p.type in _WEIGHT_PATH_TYPES and weight_is_constant(p.inputs[0] if p.inputs else None, depth + 1)

    if layer_names is None:
        candidates = list(onnx_layer_nodes(parsed.onnx_path))
    else:
        candidates = list(layer_names)
    result: dict[str, str] = {}
    for name in candidates:
        layer = by_name.get(name)
        if layer is None or layer.type not in _COMPUTE_TYPES:
            if layer_names is not None:
                result[name] = "missing: no compute layer of this name in the network"
            continue
        if layer_names is None and len(layer.inputs) > 1 and not weight_is_constant(layer.inputs[1]):
            continue  # MatMul of two activations: not a quantizable layer
        result[name] = _classify(layer, tensors, producer_layer)
    return NetworkPrecisions(layers=result, tensors=tensors, network_layers=layers)


def _is_qdq_int8(tensor: str | None, tensors: Mapping[str, TensorInfo], producer: Mapping[str, LayerInfo], activation: bool) -> bool:
    """``tensor`` = DEQUANTIZE(INT8 x) with x from a QUANTIZE (activation) or a constant (weight)."""
    if tensor is None:
        return False
    dq = producer.get(tensor)
    if dq is None or dq.type != "DEQUANTIZE" or not dq.inputs or dq.inputs[0] is None:
        return False
    q_out = tensors.get(dq.inputs[0])
    if q_out is None or q_out.dtype != "INT8":
        return False
    if activation:
        return q_out.producer_type == "QUANTIZE"
    return q_out.producer_type in ("CONSTANT", "QUANTIZE")


def _classify(layer: LayerInfo, tensors: Mapping[str, TensorInfo], producer: Mapping[str, LayerInfo]) -> str:
    act = layer.inputs[0] if layer.inputs else None
    weight = layer.inputs[1] if len(layer.inputs) > 1 else None
    act_t = tensors.get(act) if act else None
    out_t = tensors.get(layer.outputs[0]) if layer.outputs else None
    in_dtype = act_t.dtype if act_t else "?"
    out_dtype = out_t.dtype if out_t else "?"
    act_q = _is_qdq_int8(act, tensors, producer, activation=True)
    w_q = _is_qdq_int8(weight, tensors, producer, activation=False)
    if act_q and w_q:
        return "int8"
    if act_q or w_q:
        return f"inconsistent: {'activation' if act_q else 'weight'} quantized, {'weight' if act_q else 'activation'} not"
    if in_dtype == "HALF" and out_dtype == "HALF":
        return "fp16"
    if in_dtype == "FLOAT" and out_dtype == "FLOAT":
        return "fp32"
    return f"inconsistent: {in_dtype} input, {out_dtype} output"


def precision_problems(precisions: NetworkPrecisions, requested: Mapping[str, Any]) -> list[str]:
    """Where the network's typing disagrees with the requested precision per layer.

    Checks (1) every requested layer has the requested precision, (2) HALF tensors
    exist only inside FP16 layers' Cast regions (Cast-to-half outputs, FP16 layer
    outputs, half constants feeding them) or around INT8 layers whose Q/DQ scales
    are float16 (INT8 inside an FP16 region), (3) INT8 tensors exist only between a
    QUANTIZE and a DEQUANTIZE or as int8 constants feeding a DEQUANTIZE. Returns
    human-readable problems (empty = the configuration is exactly what will be built).
    """
    problems = []
    want = {name: getattr(p, "value", str(p)) for name, p in requested.items()}
    for name, p in want.items():
        got = precisions.layers.get(name, "missing")
        if got != p:
            problems.append(f"{name}: asked {p}, network has {got}")
    fp16_layers = {n for n, p in want.items() if p == "fp16"}
    consumers: dict[str, list[LayerInfo]] = {}
    for layer in precisions.network_layers:
        for t in layer.inputs:
            if t is not None:
                consumers.setdefault(t, []).append(layer)
    int8_layers = {n for n, p in want.items() if p == "int8"}
    region = _half_region(precisions.network_layers, fp16_layers, int8_layers, consumers)
    for t in precisions.tensors_of("HALF"):
        users = consumers.get(t.name, [])
        if t.producer in region or (users and all(u.name in region for u in users)):
            continue
        problems.append(f"HALF tensor {t.name!r} (from {t.producer_type} {t.producer!r}) outside an FP16 layer")
    for t in precisions.tensors_of("INT8"):
        users = consumers.get(t.name, [])
        if t.producer_type in ("QUANTIZE", "CONSTANT") and users and all(u.type == "DEQUANTIZE" for u in users):
            continue
        problems.append(f"INT8 tensor {t.name!r} (from {t.producer_type} {t.producer!r}) not between Q and DQ")
    return problems


def _half_region(
    layers: list[LayerInfo], fp16_layers: set[str], int8_layers: set[str], consumers: Mapping[str, list[LayerInfo]]
) -> set[str]:
    """Network layers where HALF tensors belong: the requested FP16 layers and INT8 layers
    (INT8 inside an FP16 region, with float16 Q/DQ scales at opset >= 19), the helper
    layers the ONNX parser names ``<node>_<k>`` (e.g. a Gemm's bias add), and the casts,
    constants, shuffles and Q/DQ layers that only feed them (Cast-to-half, half weights,
    half scales)."""
    seeds = fp16_layers | int8_layers
    helper = re.compile("^(" + "|".join(re.escape(n) for n in sorted(seeds, key=len, reverse=True)) + r")_\d+$") if seeds else None
    region = {l.name for l in layers if l.name in seeds or (helper is not None and helper.match(l.name))}
    feeders = [l for l in layers if l.type in ("CAST", "CONSTANT", "SHUFFLE", "IDENTITY", "QUANTIZE", "DEQUANTIZE")]
    changed = True
    while changed:
        changed = False
        for l in feeders:
            if l.name in region:
                continue
            users = [u for o in l.outputs for u in consumers.get(o, [])]
            if users and all(u.name in region for u in users):
                region.add(l.name)
                changed = True
    return region
