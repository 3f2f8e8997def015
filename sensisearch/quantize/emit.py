"""Write the deployable ONNX of one trial: Q/DQ for INT8 layers, Cast for FP16 layers.

Two steps per trial, with one placement:

1. :func:`~sensisearch.quantize.placement.plan_placement` decides every Q/DQ pair;
   its :attr:`~sensisearch.quantize.placement.Placement.threshold_tensors` are the
   activation tensors whose Q/DQ needs a threshold, so the caller derives thresholds
   only for those (always a subset of
   :func:`~sensisearch.quantize.placement.statistics_tensors`; Q/DQ tensors that
   reuse another tensor's parameters are not listed).
2. :func:`emit_deployable_onnx` writes that placement into a new model (the caller's
   model is never mutated) that TensorRT (strongly typed) and ONNX Runtime compile as-is.

What is emitted:

* INT8 layer: a QuantizeLinear/DequantizeLinear pair on its activation input
  (per-tensor; int8 with zero point 0 and scale amax/127; profile options: uint8
  with zero point 0 and scale amax/255 for non-negative tensors; for the others
  uint8 with zero point 128 and scale amax/127, or, with
  ``asymmetric_signed_activations`` and a calibrated ``TensorRange.min``, asymmetric
  uint8 over [max(min, -amax), amax]: scale (hi - lo)/255, zero point round(-lo/scale)),
  and its weight stored as an int8 initializer (clipped to [-127, 127], per
  output channel on the op's channel axis) followed by DequantizeLinear. All-zero
  weight channels get scale 1.0 (any positive scale represents them exactly).
  Profile extras: Q/DQ on the skip input of a residual Add, on layer outputs,
  int32 bias with DequantizeLinear, or (``quantize_regions``, ONNX Runtime) on
  every input and output of the elementwise/data-movement ops of the INT8 region
  between INT8 layers (SiLU, residual Add, Concat, MaxPool, Resize, GAP, ...).
  One Q/DQ pair per tensor (one QuantizeLinear, one DequantizeLinear) shared by
  all of its quantized consumers; other consumers keep reading the float tensor.
  Outputs of value-preserving region ops (MaxPool, Resize, Reshape, ...) reuse the
  scale/zero-point initializers of their input (``ActivationQdq.params_from``):
  exact for them, and what ORT needs to run them on 8-bit data; they need no
  threshold of their own.
* FP16 layer: ``Cast(to=FLOAT16)`` on its activation input (shared per tensor,
  skipped when the input is the fp16 output of another FP16 layer), weight and
  bias as new float16 initializers ``<name>_fp16`` (values clipped to +-65504;
  the float32 originals stay for any other user), the layer writes
  ``<output>_fp16`` and ``Cast(to=FLOAT)`` restores ``<output>`` for float
  consumers and graph outputs.
* FP32 layer: untouched.

INT8 layers never sit inside an FP16 region with this per-layer Cast scheme (the
tensors around every FP16 layer are float32), so float32 scales suffice and the
opset is only raised to ``profile.min_opset`` (13, for per-channel ``axis``) when
the trial has INT8 layers. An all-FP32/FP16 trial keeps the model's opset.

Never quantized: graph outputs and anything that is not an input of a quantizable
layer, a residual-Add skip input, (``quantize_layer_outputs``) an INT8 layer
output whose consumers are all quantized, or (``quantize_regions``) a tensor read
by an INT8-region op; a region op's outputs feed only INT8 layers and region ops,
so post-processing that ends in a graph output never joins. YOLOv5's Detect
decode (and the output of its three convs) stays float. FP32/FP16 layers and
their activations read float tensors, except with
``profile.float_consumers_read_quantized`` (ONNX Runtime): every INT8 layer's
output (after its activation) that leads to another layer is then quantized for
all its readers but post-processing, so FP32 layers and float ops read the
DequantizeLinear output and FP16 layers a ``Cast`` of it ("int8 in, int8 out").

Inserted names derive from the tensor or layer: ``<tensor>_QuantizeLinear``,
``<tensor>_DequantizeLinear``, ``<tensor>_scale``, ``<tensor>_zero_point``,
``<weight>_int8``, ``<weight>_DequantizeLinear``, ``<layer>_bias_int32``,
``<tensor>_CastToFloat16``, ``<layer>_CastToFloat``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sensisearch.fileio import write_bytes_atomic
from sensisearch.model.analysis import ModelInfo, QuantizableLayer
from sensisearch.op_types import ORT_WEIGHT_QUANTIZED_OP_TYPES
from sensisearch.quantize.graph import GraphIndex, subgraph_reads
from sensisearch.quantize.opset import upgraded
from sensisearch.quantize.placement import Placement
from sensisearch.quantize.profiles import QuantizationProfile
from sensisearch.quantize.ranges import TensorRange

__all__ = [
    "emit_deployable_onnx",
    "save_model",
]

_MIN_SCALE = 1e-10
"""Floor for activation scales (amax 0 = a tensor that is always zero)."""
_FP16_MAX = 65504.0
_INT32_MAX = 2**31 - 1


def asymmetric_uint8_params(lo: float, hi: float) -> tuple[float, int]:
    """float32 scale and uint8 zero point covering ``[lo, hi]`` (``lo <= 0 <= hi``).

    scale = (hi - lo)/255, zero point = round(-lo/scale) clamped to [0, 255]: 0 is
    represented exactly (by the zero point) and lo, hi within half a step
    (the codes 0 and 255 dequantize to -zp*scale and (255 - zp)*scale).
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = float(np.float32(max((hi - lo) / 255.0, _MIN_SCALE)))
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    return scale, zp


class _Emitter:
    def __init__(
        self,
        base: onnx.ModelProto,
        placement: Placement,
        thresholds: Mapping[str, TensorRange],
        profile: QuantizationProfile,
        layers: tuple[QuantizableLayer, ...] = (),
    ) -> None:
        self.base = base
        self.placement = placement
        self.thresholds = thresholds
        self.profile = profile
        graph = base.graph
        self.node_index = {n.name: i for i, n in enumerate(graph.node)}
        self.inits = {i.name: i for i in graph.initializer}
        self.index = GraphIndex(base)
        self.taken: set[str] = set(self.node_index) | set(self.inits) | set(self.index.producer)
        self.taken |= {v.name for v in graph.input}
        self.start: list[onnx.NodeProto] = []
        self.before: dict[int, list[onnx.NodeProto]] = {}
        self.after: dict[int, list[onnx.NodeProto]] = {}
        self.in_rewire: dict[int, dict[int, str]] = {}
        self.out_rewire: dict[int, dict[int, str]] = {}
        self.new_inits: list[onnx.TensorProto] = []
        self.weight_q: dict[tuple[str, int, bytes], str] = {}
        self.fp16_init: dict[str, str] = {}
        self.fp16_tensor: dict[str, str] = {}
        self.act_scale: dict[str, float] = {}
        self.act_params: dict[str, tuple[str, str, float]] = {}
        fp16_names = {l.name for l in placement.fp16_layers}
        # FP16 layers that read an INT8 layer's dequantized output (profile
        # float_consumers_read_quantized): their input Cast reads the DQ output.
        self.fp16_reads_dq: set[str] = {
            act.tensor for act in placement.activations for name, ii in act.consumers if ii == 0 and name in fp16_names
        }
        self.fp16_names = fp16_names
        self.deferred_casts: list[tuple[str, str, str]] = []
        self.dq_output: dict[str, str] = {}
        quantized = fp16_names | {l.name for l in placement.int8_layers}
        self.float_layers = {l.name: l for l in layers if l.name not in quantized and l.op_type in ORT_WEIGHT_QUANTIZED_OP_TYPES}

    # ---------------------------------------------------------------- helpers
    def unique(self, name: str) -> str:
        out, k = name, 1
        while out in self.taken:
            k += 1
            out = f"{name}_{k}"
        self.taken.add(out)
        return out

    def add_init(self, name: str, array: np.ndarray) -> str:
        name = self.unique(name)
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def place_after_producer(self, tensor: str, node: onnx.NodeProto) -> None:
        p = self.index.producer.get(tensor)
        if p is None:
            self.start.append(node)
        else:
            self.after.setdefault(p, []).append(node)

    def node_idx(self, name: str) -> int:
        try:
            return self.node_index[name]
        except KeyError:
            raise RuntimeError(f"node {name!r} disappeared from the model (opset upgrade changed the graph?)") from None

    def rewire_input(self, ni: int, ii: int, expected: str, new: str) -> None:
        if self.base.graph.node[ni].input[ii] != expected:
            raise RuntimeError(
                f"input {ii} of node {self.base.graph.node[ni].name!r} is not {expected!r}; graph changed under placement"
            )
        self.in_rewire.setdefault(ni, {})[ii] = new

    # ---------------------------------------------------------------- fp16
    def fp16_initializer(self, name: str) -> str:
        if name not in self.fp16_init:
            arr = numpy_helper.to_array(self.inits[name])
            arr16 = np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16)
            self.fp16_init[name] = self.add_init(f"{name}_fp16", arr16)
        return self.fp16_init[name]

    def emit_fp16(self, layer: QuantizableLayer, fp16_layer_names: set[str]) -> None:
        ni = self.node_idx(layer.name)
        x = layer.activation_input
        if x not in self.fp16_tensor:
            x16 = self.unique(f"{x}_fp16")
            cast_name = self.unique(f"{x}_CastToFloat16")
            if x in self.fp16_reads_dq:  # Cast(DQ(Q(x))), created once the DQ exists
                self.deferred_casts.append((x, x16, cast_name))
            else:
                cast = helper.make_node("Cast", [x], [x16], name=cast_name, to=onnx.TensorProto.FLOAT16)
                self.place_after_producer(x, cast)
            self.fp16_tensor[x] = x16
        self.rewire_input(ni, 0, x, self.fp16_tensor[x])
        self.rewire_input(ni, 1, layer.weight, self.fp16_initializer(layer.weight))
        if layer.bias:
            self.rewire_input(ni, 2, layer.bias, self.fp16_initializer(layer.bias))
        out = layer.output
        out16 = self.unique(f"{out}_fp16")
        self.out_rewire.setdefault(ni, {})[0] = out16
        self.fp16_tensor[out] = out16
        float_users = [
            (ci, ii)
            for ci, ii in self.index.consumer_nodes(out)
            if not (ii == 0 and self.base.graph.node[ci].name in fp16_layer_names)
        ]
        if float_users or out in self.index.graph_outputs:
            back = helper.make_node("Cast", [out16], [out], name=self.unique(f"{layer.name}_CastToFloat"), to=onnx.TensorProto.FLOAT)
            self.after.setdefault(ni, []).append(back)

    # ---------------------------------------------------------------- int8
    def activation_qdq(self, tensor: str, consumers: tuple[tuple[str, int], ...], params_from: str | None = None) -> None:
        if params_from is not None:
            try:
                s_name, z_name, scale = self.act_params[params_from]
            except KeyError:
                raise RuntimeError(f"{tensor!r} reuses the Q/DQ parameters of {params_from!r}, which has none") from None
        else:
            s_name, z_name, scale = self.new_act_params(tensor)
        self.act_params[tensor] = (s_name, z_name, scale)
        self.act_scale[tensor] = scale
        q_out = self.unique(f"{tensor}_quantized")
        dq_out = self.unique(f"{tensor}_dequantized")
        q = helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [q_out], name=self.unique(f"{tensor}_QuantizeLinear"))
        dq = helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=self.unique(f"{tensor}_DequantizeLinear"))
        self.place_after_producer(tensor, q)
        if any(not (ii == 0 and name in self.float_layers) for name, ii in consumers):
            self.place_after_producer(tensor, dq)  # else only FP32 layers read it, through float_layer_dq
        self.dq_output[tensor] = dq_out
        float_dq: str | None = None
        for node_name, ii in consumers:
            if ii == 0 and node_name in self.fp16_names:
                continue  # reads Cast(dq_out) (emit_fp16 / build)
            if ii == 0 and node_name in self.float_layers:
                if float_dq is None:
                    float_dq = self.float_layer_dq(tensor, q_out, self.float_layers[node_name])
                self.rewire_input(self.node_idx(node_name), ii, tensor, float_dq)
                continue
            self.rewire_input(self.node_idx(node_name), ii, tensor, dq_out)

    def float_layer_dq(self, tensor: str, q_out: str, layer: QuantizableLayer) -> str:
        """A second DequantizeLinear of ``q_out`` for FP32 Conv/ConvTranspose/Gemm readers.

        Same values as the shared DQ, but with the scale and zero point repeated per
        input channel (``axis`` = the layer's input-channel axis): ONNX Runtime's
        WeightBiasQuantization quantizes the float weight (per-tensor int8) of any
        Conv/ConvTranspose/Gemm whose input comes from a DQ with a *scalar* scale,
        which would silently turn an FP32 layer into an INT8 one.
        """
        s_name, z_name, _ = self.act_params[tensor]
        scale = numpy_helper.to_array(self._init(s_name))
        zp = numpy_helper.to_array(self._init(z_name))
        w = numpy_helper.to_array(self.inits[layer.weight])
        node = self.base.graph.node[self.node_idx(layer.name)]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if layer.op_type == "Conv":
            channels, axis = w.shape[1] * int(attrs.get("group", 1)), 1
        elif layer.op_type == "ConvTranspose":
            channels, axis = w.shape[0], 1
        else:  # Gemm: A is [M, K] (or [K, M] with transA)
            channels = w.shape[1] if attrs.get("transB", 0) else w.shape[0]
            axis = 0 if attrs.get("transA", 0) else 1
        s_c = self.add_init(f"{tensor}_scale_per_channel", np.full(channels, scale, dtype=np.float32))
        z_c = self.add_init(f"{tensor}_zero_point_per_channel", np.full(channels, zp, dtype=zp.dtype))
        out = self.unique(f"{tensor}_dequantized_float")
        dq = helper.make_node(
            "DequantizeLinear", [q_out, s_c, z_c], [out], name=self.unique(f"{tensor}_DequantizeLinear_float"), axis=axis
        )
        self.place_after_producer(tensor, dq)
        return out

    def _init(self, name: str) -> onnx.TensorProto:
        for init in self.new_inits:
            if init.name == name:
                return init
        raise RuntimeError(f"initializer {name!r} not found")

    def new_act_params(self, tensor: str) -> tuple[str, str, float]:
        try:
            rng = self.thresholds[tensor]
        except KeyError:
            raise KeyError(
                f"no threshold for tensor {tensor!r}; compute thresholds for every tensor in Placement.threshold_tensors"
            ) from None
        amax = float(rng.amax)
        if not np.isfinite(amax) or amax < 0:
            raise ValueError(f"threshold for tensor {tensor!r} must be finite and >= 0, got {amax!r}")
        if self.profile.unsigned_nonnegative_activations and rng.nonnegative:
            scale, zp = max(amax / 255.0, _MIN_SCALE), np.array(0, dtype=np.uint8)
        elif self.profile.uint8_signed_activations and self.profile.asymmetric_signed_activations and rng.min is not None:
            scale, zp_value = asymmetric_uint8_params(rng.lower, amax)
            zp = np.array(zp_value, dtype=np.uint8)
        elif self.profile.uint8_signed_activations:
            scale, zp = max(amax / 127.0, _MIN_SCALE), np.array(128, dtype=np.uint8)
        else:
            scale, zp = max(amax / 127.0, _MIN_SCALE), np.array(0, dtype=np.int8)
        scale = float(np.float32(scale))
        s_name = self.add_init(f"{tensor}_scale", np.array(scale, dtype=np.float32))
        z_name = self.add_init(f"{tensor}_zero_point", zp)
        return s_name, z_name, scale

    def weight_scales(self, w: np.ndarray, axis: int) -> np.ndarray:
        levels = 63.0 if self.profile.reduce_range_weights else 127.0
        if self.profile.per_channel_weights:
            moved = np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1)
            amax = moved.max(axis=1) if moved.shape[1] else np.zeros(w.shape[axis], np.float32)
        else:
            amax = np.array(np.abs(w).max() if w.size else 0.0)
        scale = (amax / levels).astype(np.float32)
        return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)

    def quantized_weight(self, layer: QuantizableLayer, scale: np.ndarray) -> str:
        """int8 initializer + DequantizeLinear for ``layer``'s weight; returns the DQ output."""
        key = (layer.weight, layer.weight_axis, scale.tobytes())
        if key in self.weight_q:
            return self.weight_q[key]
        w = numpy_helper.to_array(self.inits[layer.weight])
        levels = 63 if self.profile.reduce_range_weights else 127
        per_channel = scale.ndim == 1
        bshape = [1] * w.ndim
        if per_channel:
            bshape[layer.weight_axis] = scale.size
        q = np.clip(np.rint(w / scale.reshape(bshape)), -levels, levels).astype(np.int8)
        q_name = self.add_init(f"{layer.weight}_int8", q)
        s_name = self.add_init(f"{layer.weight}_scale", scale)
        z_name = self.add_init(f"{layer.weight}_zero_point", np.zeros(scale.shape, dtype=np.int8))
        dq_out = self.unique(f"{layer.weight}_dequantized")
        attrs = {"axis": layer.weight_axis} if per_channel else {}
        dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out], name=self.unique(f"{layer.weight}_DequantizeLinear"), **attrs)
        self.before.setdefault(self.node_idx(layer.name), []).append(dq)
        self.weight_q[key] = dq_out
        return dq_out

    def emit_int8(self, layer: QuantizableLayer) -> None:
        ni = self.node_idx(layer.name)
        node = self.base.graph.node[ni]
        w = numpy_helper.to_array(self.inits[layer.weight])
        scale = self.weight_scales(w, layer.weight_axis)
        bias_arr = None
        if self.profile.quantize_bias and layer.bias and layer.op_type in ("Conv", "Gemm"):
            bias_arr = numpy_helper.to_array(self.inits[layer.bias]).astype(np.float32)
            n_out = w.shape[layer.weight_axis]
            beta = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "beta"), 1.0)
            if bias_arr.ndim != 1 or bias_arr.size != n_out or beta != 1.0:
                bias_arr = None
        if bias_arr is not None:
            s_x = self.act_scale[layer.activation_input]
            # Keep |bias / (s_x * s_w)| inside int32: raise tiny weight scales if needed.
            floor = (np.abs(bias_arr) / (s_x * (_INT32_MAX // 2))).astype(np.float32)
            scale = np.maximum(scale, floor if scale.ndim == 1 else floor.max(initial=0.0)).astype(np.float32)
        self.rewire_input(ni, 1, layer.weight, self.quantized_weight(layer, scale))
        if bias_arr is not None:
            b_scale = (np.float32(s_x) * (scale if scale.ndim == 1 else np.full(bias_arr.shape, scale, np.float32))).astype(np.float32)
            b_q = np.clip(np.rint(bias_arr / b_scale), -_INT32_MAX, _INT32_MAX).astype(np.int32)
            q_name = self.add_init(f"{layer.name}_bias_int32", b_q)
            s_name = self.add_init(f"{layer.name}_bias_scale", b_scale)
            z_name = self.add_init(f"{layer.name}_bias_zero_point", np.zeros(b_scale.shape, dtype=np.int32))
            dq_out = self.unique(f"{layer.name}_bias_dequantized")
            dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out], name=self.unique(f"{layer.name}_bias_DequantizeLinear"), axis=0)
            self.before.setdefault(ni, []).append(dq)
            self.rewire_input(ni, 2, layer.bias, dq_out)

    # ---------------------------------------------------------------- assembly
    def build(self) -> onnx.ModelProto:
        fp16_names = {l.name for l in self.placement.fp16_layers}
        for layer in self.placement.fp16_layers:  # first: Cast-back nodes must precede Q/DQ on the same tensor
            self.emit_fp16(layer, fp16_names)
        for act in self.placement.activations:
            self.activation_qdq(act.tensor, act.consumers, act.params_from)
        for x, x16, cast_name in self.deferred_casts:  # after the DQ of x
            cast = helper.make_node("Cast", [self.dq_output[x]], [x16], name=cast_name, to=onnx.TensorProto.FLOAT16)
            self.place_after_producer(x, cast)
        for layer in self.placement.int8_layers:
            self.emit_int8(layer)
        return self.assemble()

    def assemble(self) -> onnx.ModelProto:
        base = self.base
        out = onnx.ModelProto()
        _copy_fields(base, out, skip={"graph"})
        out.ir_version = max(out.ir_version, helper.find_min_ir_version_for(list(out.opset_import)))
        bg, g = base.graph, out.graph
        _copy_fields(bg, g, skip={"node", "initializer", "value_info"})
        for n in self.start:
            g.node.append(n)
        for ni, node in enumerate(bg.node):
            for extra in self.before.get(ni, ()):
                g.node.append(extra)
            new = g.node.add()
            new.CopyFrom(node)
            for ii, name in self.in_rewire.get(ni, {}).items():
                new.input[ii] = name
            for oi, name in self.out_rewire.get(ni, {}).items():
                new.output[oi] = name
            for extra in self.after.get(ni, ()):
                g.node.append(extra)
        used: set[str] = {o.name for o in bg.output}
        produced: set[str] = {i.name for i in bg.input}
        for node in g.node:
            used.update(node.input)
            used.update(subgraph_reads(node))
            produced.update(node.output)
        dropped = {i.name for i in bg.initializer if i.name not in used}
        g.initializer.extend(i for i in bg.initializer if i.name not in dropped)
        g.initializer.extend(self.new_inits)
        if dropped and any(v.name in dropped for v in g.input):  # IR < 4: initializers listed as inputs
            keep = [v for v in g.input if v.name not in dropped]
            g.ClearField("input")
            g.input.extend(keep)
        produced.update(i.name for i in g.initializer)
        g.value_info.extend(v for v in bg.value_info if v.name in produced)
        return out


def _copy_fields(src, dst, skip: set[str]) -> None:
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        target = getattr(dst, fd.name)
        if fd.is_repeated:
            target.extend(value)
        elif fd.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def emit_deployable_onnx(
    model: onnx.ModelProto,
    info: ModelInfo,
    placement: Placement,
    thresholds: Mapping[str, TensorRange],
    profile: QuantizationProfile,
) -> onnx.ModelProto:
    """The deployable ONNX of one trial (a new model; ``model`` is not modified).

    ``placement`` is :func:`~sensisearch.quantize.placement.plan_placement`'s answer for
    this ``model``, ``info`` and ``profile`` (planned once per trial by the caller, who
    also used it to look up ``thresholds``). ``model`` must be the model returned by
    ``analyze_model`` (its node names are the layer names). ``thresholds`` needs an
    entry for every tensor of :attr:`Placement.threshold_tensors` (extra entries are
    ignored). A placement without INT8 or FP16 layers returns an unmodified copy.
    """
    if placement.profile != profile:
        raise ValueError(
            f"the placement was planned for profile {placement.profile.name!r}, not {profile.name!r}; plan it again"
        )
    if not placement.int8_layers and not placement.fp16_layers:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    base = model
    if placement.int8_layers:
        base = upgraded(model, profile.min_opset, key=info.sha256, source=str(info.path))
    return _Emitter(base, placement, thresholds, profile, tuple(info.layers)).build()


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` atomically (temporary file in the same directory, then ``os.replace``)."""
    return write_bytes_atomic(path, model.SerializeToString())
