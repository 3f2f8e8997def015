"""Bias correction of INT8 layers (NNCF's "fast bias correction", computed on data).

Quantizing a layer's weight and input activation changes the *mean* of its
output per output channel: rounding errors of a weight channel do not average
out over the channel's receptive field, and clipping an activation at a
calibrated threshold (percentile, MSE, entropy) removes mass from one tail. That
systematic shift travels through the rest of the network. Bias correction folds
it back: for every INT8 layer,

    shift[c] = mean(layer_fp32(x))[c] - mean(layer_quantized(x))[c]

over the calibration inputs ``x`` the FP32 model feeds that layer (the mean is
over every axis but the output-channel one), and the deployable's bias becomes
``bias + shift``. Each layer is corrected for its own quantization error only:
its inputs are the FP32 model's, not the quantized model's (what NNCF's fast
bias correction does too; its slower "bias correction" replays the quantized
model layer by layer).

Unlike NNCF's fast variant, which feeds the quantized layer the per-channel mean
of its input (one run, exact only for the weight part of a linear op), the
quantized mean here is the mean of the quantized layer's outputs on the sample
itself: input clipping and rounding are non-linear, so the mean of the input
does not give the mean of the output.

The quantized layer is read from the *emitted* deployable ONNX (its activation
Q/DQ scale and zero point, its int8 weight and weight scales, its int32 bias if
any), so the correction uses exactly the scales, rounding and saturation that
the deployable computes, whichever profile and calibration produced them.

Pieces:

* :func:`fake_quantize`: QuantizeLinear followed by DequantizeLinear in numpy.
* :class:`QuantizedLayer` and :func:`layer_bias_shift`: the numeric core for one
  layer on given input activations.
* :func:`quantized_layers`: the INT8 layers of a deployable, as QuantizedLayers.
* :func:`bias_shifts`: one FP32 pass over calibration batches -> shift per layer.
* :func:`apply_bias_shifts`: a copy of the deployable with the shifts folded into
  the biases (a bias is created for a layer without one).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sensisearch.errors import SensisearchError
from sensisearch.model.analysis import QuantizableLayer
from sensisearch.quantize.profiles import QuantizationProfile

logger = logging.getLogger(__name__)

__all__ = [
    "BIAS_CORRECTION_SAMPLES",
    "FakeQuant",
    "LayerOp",
    "QuantizedLayer",
    "apply_bias_shifts",
    "bias_shifts",
    "fake_quantize",
    "layer_bias_shift",
    "quantized_layers",
]

BIAS_CORRECTION_SAMPLES = 64
"""Default calibration samples: per-channel means of conv outputs average over many
pixels per sample, so a few dozen images pin them down (NNCF's default subset is 100)."""

_INT32_MAX = 2**31 - 1
_QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


# --------------------------------------------------------------------------- numeric core
def fake_quantize(
    x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, qmin: int, qmax: int, axis: int | None = None
) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x)) as ONNX defines them, in float32.

    ``q = saturate(round_half_to_even(x / scale) + zero_point)`` into
    ``[qmin, qmax]``, then ``(q - zero_point) * scale``. A 1-D ``scale`` (and
    ``zero_point``) applies along ``axis`` (per channel).
    """
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zero_point).astype(np.float32)
    if scale.ndim == 1:
        if axis is None:
            raise ValueError("a per-channel scale needs the channel axis")
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    q = np.clip(np.rint(x / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(np.float32)


@dataclass(frozen=True)
class FakeQuant:
    """One Q/DQ pair: scale, zero point and the integer range of its type."""

    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    axis: int | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)


class LayerOp:
    """The layer's op (without bias) as a one-node ONNX model run by ONNX Runtime.

    The real op rather than a numpy re-implementation: Conv's padding modes
    (``auto_pad``), dilations, groups, ConvTranspose's output padding and Gemm's
    transposes are then exactly the deployed ones, and the output is what the
    backend's float kernel computes. Weight and input are graph inputs, so one
    session serves the FP32 and the quantized weight.
    """

    def __init__(self, op_type: str, attributes: Mapping[str, Any], opset: int, threads: int = 1) -> None:
        import onnxruntime as ort

        attrs = {k: v for k, v in attributes.items() if not (op_type == "Gemm" and k == "beta")}  # no C: beta unused
        node = helper.make_node(op_type, ["X", "W"], ["Y"], **attrs)
        graph = helper.make_graph(
            [node], "layer",
            [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, None),
             helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset))])
        model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        self._session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return self._session.run(["Y"], {"X": np.ascontiguousarray(x, np.float32), "W": np.ascontiguousarray(w, np.float32)})[0]


@dataclass(frozen=True)
class QuantizedLayer:
    """One INT8 layer: its FP32 form and what the deployable computes instead.

    ``input_quant`` is the Q/DQ on the activation input (None: the input stays
    float); ``deployed_weight`` the dequantized int8 weight; ``bias`` and
    ``deployed_bias`` the FP32 bias and the bias as deployed (an int32 bias
    dequantized; None: no bias). ``channel_axis`` is the output-channel axis of
    the layer's output (1 for Conv/ConvTranspose/Gemm, last for MatMul).
    """

    name: str
    op_type: str
    weight: np.ndarray
    deployed_weight: np.ndarray
    input_quant: FakeQuant | None
    channel_axis: int
    attributes: Mapping[str, Any] = field(default_factory=dict)
    opset: int = 13
    bias: np.ndarray | None = None
    deployed_bias: np.ndarray | None = None

    def op(self, threads: int = 1) -> LayerOp:
        return LayerOp(self.op_type, self.attributes, self.opset, threads)

    def fingerprint(self) -> str:
        """Hex digest of everything the layer's shift depends on besides the data: name,
        op and attributes, FP32 and deployed weight and bias, and the input Q/DQ."""
        h = hashlib.sha256(f"{self.name}|{self.op_type}|{sorted(self.attributes.items())!r}|{self.channel_axis}".encode())
        arrays = [self.weight, self.deployed_weight, self.bias, self.deployed_bias]
        if self.input_quant is not None:
            q = self.input_quant
            arrays += [q.scale, q.zero_point, np.array([q.qmin, q.qmax, -1 if q.axis is None else q.axis])]
        for a in arrays:
            h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes() + str(np.asarray(a).dtype).encode())
        return h.hexdigest()


@dataclass
class _ShiftSum:
    """Running per-channel sum of (FP32 output - quantized output) and the values per channel."""

    total: np.ndarray | None = None
    count: int = 0

    def add(self, diff: np.ndarray, axis: int) -> None:
        axis = axis % diff.ndim
        other = tuple(i for i in range(diff.ndim) if i != axis)
        part = diff.sum(axis=other, dtype=np.float64)
        self.total = part if self.total is None else self.total + part
        self.count += diff.size // diff.shape[axis]

    def mean(self) -> np.ndarray | None:
        return None if self.total is None or self.count == 0 else self.total / self.count


def _output_difference(layer: QuantizedLayer, op: LayerOp, x: np.ndarray) -> np.ndarray:
    xq = layer.input_quant(x) if layer.input_quant is not None else x
    return op(x, layer.weight) - op(xq, layer.deployed_weight)


def _bias_difference(layer: QuantizedLayer, n: int) -> np.ndarray:
    """FP32 bias - deployed bias (the int32 bias's rounding), zero without bias."""
    if layer.bias is None:
        return np.zeros(n)
    deployed = layer.deployed_bias if layer.deployed_bias is not None else layer.bias
    return np.asarray(layer.bias, np.float64).reshape(-1) - np.asarray(deployed, np.float64).reshape(-1)


def layer_bias_shift(layer: QuantizedLayer, inputs: Iterable[np.ndarray], op: LayerOp | None = None) -> np.ndarray:
    """Per-output-channel ``mean(FP32 output) - mean(deployed output)`` of ``layer`` on ``inputs``.

    ``inputs`` are batches of the layer's FP32 input activation. The result is
    float32 of length out-channels; adding it to the deployed bias makes the
    deployed layer's per-channel output mean on ``inputs`` equal the FP32 one.
    """
    op = op or layer.op()
    acc = _ShiftSum()
    for x in inputs:
        acc.add(_output_difference(layer, op, x), layer.channel_axis)
    mean = acc.mean()
    if mean is None:
        raise SensisearchError(f"bias correction of {layer.name!r}: no input samples")
    return (mean + _bias_difference(layer, mean.size)).astype(np.float32)


# --------------------------------------------------------------------------- reading the deployable
def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output if o}


def _const(inits: Mapping[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _dequantize_initializer(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> np.ndarray | None:
    """Values of ``DequantizeLinear(initializer, scale, zero point)``; None if not constant."""
    q = _const(inits, node.input[0])
    scale = _const(inits, node.input[1])
    zp = _const(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if q is None or scale is None:
        return None
    zp = np.zeros_like(scale) if zp is None else zp
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
    scale32 = scale.astype(np.float32)
    zpf = zp.astype(np.float32)
    if scale.ndim == 1 and q.ndim > 0:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = scale.size
        scale32, zpf = scale32.reshape(shape), zpf.reshape(shape)
    return ((q.astype(np.float32) - zpf) * scale32).astype(np.float32)


def _activation_quant(dq: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> FakeQuant | None:
    scale = _const(inits, dq.input[1])
    zp = _const(inits, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.array(0, np.uint8)
    if scale is None or zp is None or zp.dtype not in _QRANGE:
        return None
    qmin, qmax = _QRANGE[zp.dtype]
    axis = next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1)
    return FakeQuant(scale.astype(np.float32), zp, qmin, qmax, axis if scale.ndim == 1 else None)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def _channel_axis(op_type: str) -> int:
    return -1 if op_type == "MatMul" else 1


def quantized_layers(
    deployable: onnx.ModelProto, fp32_model: onnx.ModelProto, layers: Sequence[QuantizableLayer]
) -> dict[str, QuantizedLayer]:
    """The INT8 layers of ``deployable``: those of ``layers`` whose weight is a DequantizeLinear of a constant.

    ``fp32_model`` is the model the deployable was emitted from (its FP32 weights
    and biases; the deployable keeps only the int8 ones). FP32 and FP16 layers
    are left out.
    """
    dep_inits = {i.name: i for i in deployable.graph.initializer}
    fp_inits = {i.name: i for i in fp32_model.graph.initializer}
    producers = _producers(deployable)
    nodes = {n.name: n for n in deployable.graph.node}
    opset = _default_opset(deployable)
    out: dict[str, QuantizedLayer] = {}
    for layer in layers:
        node = nodes.get(layer.name)
        if node is None or len(node.input) < 2:
            continue
        wdq = producers.get(node.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear":
            continue
        deployed_w = _dequantize_initializer(wdq, dep_inits)
        weight = _const(fp_inits, layer.weight)
        if deployed_w is None or weight is None:
            continue
        xdq = producers.get(node.input[0])
        input_quant = _activation_quant(xdq, dep_inits) if xdq is not None and xdq.op_type == "DequantizeLinear" else None
        if input_quant is None:
            logger.debug("bias correction: %s has no activation Q/DQ; its input is taken as float", layer.name)
        bias = _const(fp_inits, layer.bias) if layer.bias else None
        deployed_bias = None
        if len(node.input) > 2 and node.input[2]:
            bdq = producers.get(node.input[2])
            if bdq is not None and bdq.op_type == "DequantizeLinear":
                deployed_bias = _dequantize_initializer(bdq, dep_inits)
            else:
                deployed_bias = _const(dep_inits, node.input[2])
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        out[layer.name] = QuantizedLayer(
            name=layer.name, op_type=node.op_type, weight=weight.astype(np.float32), deployed_weight=deployed_w,
            input_quant=input_quant, channel_axis=_channel_axis(node.op_type), attributes=attributes, opset=opset,
            bias=None if bias is None else bias.astype(np.float32),
            deployed_bias=None if deployed_bias is None else deployed_bias.astype(np.float32),
        )
    return out


# --------------------------------------------------------------------------- calibration pass
def _probe_session(fp32_model: onnx.ModelProto, tensors: Sequence[str], threads: int) -> Any:
    """ORT session of the FP32 model with ``tensors`` exposed as outputs (name-only ValueInfo suffices)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(fp32_model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in have)
    options = ort.SessionOptions()
    # Numerically neutral optimisations only, as the statistics pass (collect_statistics).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


def bias_shifts(
    deployable: onnx.ModelProto,
    fp32_model: onnx.ModelProto,
    layers: Sequence[QuantizableLayer],
    batches: Iterable[Mapping[str, np.ndarray]],
    max_samples: int = BIAS_CORRECTION_SAMPLES,
    threads: int = 0,
    cache: MutableMapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per-channel bias shift of every INT8 layer of ``deployable`` (see the module docstring).

    ``fp32_model`` and ``layers`` are what ``analyze_model`` returned and the
    deployable was emitted from; ``batches`` are calibration feeds ``{input name:
    array}`` (axis 0 = samples) in the study's calibration order, consumed until
    ``max_samples`` samples were seen (a batch is used whole). One FP32 pass
    exposes every INT8 layer's input; each batch is dropped once every layer has
    used it, so memory stays at one batch of activations.

    ``cache`` (optional, e.g. one dict per study and calibration data): shifts by
    :meth:`QuantizedLayer.fingerprint`. A layer's shift depends only on its own
    quantization (input Q/DQ, int8 weight, deployed bias), not on the precision of
    the other layers, so trials that share a calibration choice reuse it; the
    FP32 pass runs only for layers not in the cache (not at all if none).
    """
    qlayers = quantized_layers(deployable, fp32_model, layers)
    keys = {name: ql.fingerprint() for name, ql in qlayers.items()}
    shifts: dict[str, np.ndarray] = {}
    if cache is not None:
        shifts = {name: cache[key] for name, key in keys.items() if key in cache}
    todo = {name: ql for name, ql in qlayers.items() if name not in shifts}
    if not todo:
        return shifts
    by_name = {l.name: l for l in layers}
    graph_inputs = {i.name for i in fp32_model.graph.input}
    inputs_of = {name: by_name[name].activation_input for name in todo}
    fetch = sorted({t for t in inputs_of.values() if t not in graph_inputs})
    session = _probe_session(fp32_model, fetch, threads) if fetch else None
    ops = {name: ql.op(threads or 1) for name, ql in todo.items()}
    sums = {name: _ShiftSum() for name in todo}
    seen = 0
    started = time.perf_counter()
    for feed in batches:
        if seen >= max_samples:
            break
        values = dict(zip(fetch, session.run(fetch, dict(feed)))) if session is not None else {}
        values.update({k: np.asarray(v) for k, v in feed.items() if k in graph_inputs})
        for name, ql in todo.items():
            sums[name].add(_output_difference(ql, ops[name], values[inputs_of[name]]), ql.channel_axis)
        seen += int(np.shape(next(iter(feed.values())))[0])
    if seen == 0:
        raise SensisearchError("bias correction: no calibration samples were provided")
    for name, ql in todo.items():
        mean = sums[name].mean()
        shifts[name] = (mean + _bias_difference(ql, mean.size)).astype(np.float32)
        if cache is not None:
            cache[keys[name]] = shifts[name]
    logger.info("bias correction: shifts of %d INT8 layers over %d samples in %.1f s (%d from the cache)",
                len(todo), seen, time.perf_counter() - started, len(shifts) - len(todo))
    return shifts


# --------------------------------------------------------------------------- writing the shifts
class _Names:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.taken = {i.name for i in g.initializer} | {n.name for n in g.node} | {i.name for i in g.input}
        self.taken |= {o for n in g.node for o in n.output}

    def __call__(self, name: str) -> str:
        out, k = name, 1
        while out in self.taken:
            k += 1
            out = f"{name}_{k}"
        self.taken.add(out)
        return out


def _uses(model: onnx.ModelProto, name: str) -> int:
    return sum(1 for n in model.graph.node for i in n.input if i == name)


def _set_initializer(model: onnx.ModelProto, node: onnx.NodeProto, index: int, array: np.ndarray, names: _Names) -> None:
    """Give ``node.input[index]`` the constant ``array``: in place if only that input reads it, else a new initializer."""
    old = node.input[index]
    inits = {i.name: i for i in model.graph.initializer}
    if old in inits and _uses(model, old) == 1:
        inits[old].CopyFrom(numpy_helper.from_array(array, old))
        return
    new = names(f"{node.name}_bias_corrected")
    model.graph.initializer.append(numpy_helper.from_array(array, new))
    node.input[index] = new


def _dq_scale(node: onnx.NodeProto | None, inits: Mapping[str, onnx.TensorProto]) -> np.ndarray | None:
    if node is None or node.op_type != "DequantizeLinear":
        return None
    return _const(inits, node.input[1])


def apply_bias_shifts(
    deployable: onnx.ModelProto, shifts: Mapping[str, np.ndarray], profile: QuantizationProfile
) -> onnx.ModelProto:
    """A copy of ``deployable`` whose INT8 layers add ``shifts[layer]`` to their bias.

    * float bias: replaced by ``bias + shift`` (Gemm: ``C + shift / beta``);
    * int32 bias through DequantizeLinear (``profile.quantize_bias``): the int32
      values move by ``round(shift / bias scale)``, scale unchanged, so ONNX
      Runtime still fuses the layer into an integer kernel;
    * no bias (Conv, ConvTranspose, Gemm): one is added, int32 with scale
      activation scale x weight scale as the emitter would write it under
      ``profile.quantize_bias`` (Conv and Gemm), float otherwise;
    * MatMul: the constant of the ``Add`` reading its output (its bias; through an
      output Q/DQ pair) is moved;
      a MatMul without one is left as is (logged), since a new Add between the
      MatMul and its output Q/DQ would stop the integer-kernel fusion.
    """
    out = onnx.ModelProto()
    out.CopyFrom(deployable)
    names = _Names(out)
    nodes = {n.name: n for n in out.graph.node}
    producers = _producers(out)
    for layer_name, shift in shifts.items():
        node = nodes.get(layer_name)
        if node is None:
            raise SensisearchError(f"bias correction: layer {layer_name!r} is not a node of the deployable")
        shift = np.asarray(shift, np.float32).reshape(-1)
        inits = {i.name: i for i in out.graph.initializer}
        if node.op_type == "MatMul":
            _shift_matmul_add(out, node, shift, names, inits)
            continue
        beta = float(next((helper.get_attribute_value(a) for a in node.attribute if a.name == "beta"), 1.0))
        step = shift / np.float32(beta) if node.op_type == "Gemm" else shift
        bias_name = node.input[2] if len(node.input) > 2 else ""
        bdq = producers.get(bias_name) if bias_name else None
        if bdq is not None and bdq.op_type == "DequantizeLinear":
            q = _const(inits, bdq.input[0])
            scale = _const(inits, bdq.input[1]).astype(np.float64)
            new_q = np.clip(q.astype(np.int64) + np.rint(step / scale).astype(np.int64), -_INT32_MAX, _INT32_MAX)
            _set_initializer(out, bdq, 0, new_q.astype(np.int32), names)
        elif bias_name:
            if bias_name not in inits:
                logger.warning("bias correction: the bias of %s is not a constant; left as is", layer_name)
                continue
            bias = _const(inits, bias_name).astype(np.float32)
            _set_initializer(out, node, 2, (bias + step).astype(np.float32), names)
        else:
            _add_bias(out, node, step, profile, names, producers, inits)
    return out


def _add_bias(
    out: onnx.ModelProto, node: onnx.NodeProto, step: np.ndarray, profile: QuantizationProfile, names: _Names,
    producers: Mapping[str, onnx.NodeProto], inits: Mapping[str, onnx.TensorProto],
) -> None:
    """A new bias input for a Conv/ConvTranspose/Gemm that had none."""
    if len(node.input) < 2:
        raise SensisearchError(f"bias correction: {node.name!r} has no weight input")
    s_x = _dq_scale(producers.get(node.input[0]), inits)
    s_w = _dq_scale(producers.get(node.input[1]), inits)
    beta = float(next((helper.get_attribute_value(a) for a in node.attribute if a.name == "beta"), 1.0))
    emitter_int32 = profile.quantize_bias and node.op_type in ("Conv", "Gemm") and beta == 1.0  # the emitter's rule
    if emitter_int32 and s_x is not None and s_w is not None and s_x.ndim == 0:
        # As the emitter writes an int32 bias: scale = activation scale x weight scale per channel.
        b_scale = (np.float32(s_x) * np.broadcast_to(s_w.astype(np.float32), step.shape)).astype(np.float32)
        b_q = np.clip(np.rint(step / b_scale), -_INT32_MAX, _INT32_MAX).astype(np.int32)
        q_name = names(f"{node.name}_bias_int32")
        s_name = names(f"{node.name}_bias_scale")
        z_name = names(f"{node.name}_bias_zero_point")
        dq_out = names(f"{node.name}_bias_dequantized")
        out.graph.initializer.extend([
            numpy_helper.from_array(b_q, q_name),
            numpy_helper.from_array(b_scale, s_name),
            numpy_helper.from_array(np.zeros(b_scale.shape, np.int32), z_name),
        ])
        dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out],
                              name=names(f"{node.name}_bias_DequantizeLinear"), axis=0)
        position = list(out.graph.node).index(node)
        out.graph.node.insert(position, dq)
        bias_input = dq_out
    else:
        bias_input = names(f"{node.name}_bias_corrected")
        out.graph.initializer.append(numpy_helper.from_array(step.astype(np.float32), bias_input))
    if len(node.input) == 2:
        node.input.append(bias_input)
    else:
        node.input[2] = bias_input


def _shift_matmul_add(
    out: onnx.ModelProto, node: onnx.NodeProto, shift: np.ndarray, names: _Names, inits: Mapping[str, onnx.TensorProto]
) -> None:
    """Move the constant of the Add that reads the MatMul's output (through its output Q/DQ, if any)."""

    def readers_of(tensor: str) -> list[tuple[onnx.NodeProto, int]]:
        return [(n, i) for n in out.graph.node for i, name in enumerate(n.input) if name == tensor]

    readers = readers_of(node.output[0])
    for op in ("QuantizeLinear", "DequantizeLinear"):  # an output Q/DQ pair (ONNX Runtime profile) sits in between
        if len(readers) == 1 and readers[0][0].op_type == op and readers[0][1] == 0:
            readers = readers_of(readers[0][0].output[0])
    if len(readers) == 1 and readers[0][0].op_type == "Add":
        add, i = readers[0]
        other = add.input[1 - i]
        value = _const(inits, other)
        if value is not None and value.size == shift.size and value.ndim >= 1:
            _set_initializer(out, add, 1 - i, (value + shift.reshape(value.shape)).astype(np.float32), names)
            return
    logger.warning("bias correction: MatMul %s has no constant bias Add after it; not corrected", node.name)
