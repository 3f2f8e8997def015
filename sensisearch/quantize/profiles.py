"""Per-backend Q/DQ placement profiles.

The trial configuration says *which* layers are INT8; a profile says *how* the
Q/DQ nodes must be placed so that a given backend really runs integer kernels.
TensorRT wants symmetric INT8 Q/DQ on the inputs of weighted layers (plus the
skip input of a residual Add); ONNX Runtime's CPU provider only fuses Q/DQ into
integer kernels (QLinearConv, QGemm, ...) when the layer's output is quantized
too and the bias is an int32 DequantizeLinear.

Whatever the profile, sensisearch never puts Q/DQ on a graph output or on
post-processing arithmetic: activation Q/DQ only ever goes on (a) the activation
input of an INT8 layer, (b) the skip input of a residual ``Add`` fed by an INT8
layer, (c) with ``quantize_layer_outputs``, the output of an INT8 layer (or of
its activation) when every consumer, followed through ``output_passthrough_ops``,
ends in INT8 layers or quantized residual Adds, (d) with ``quantize_regions``,
the inputs and outputs of the ops of an INT8 region: ops with an input from an
INT8 layer (or region op) whose outputs feed only INT8 layers and region ops.
(e) with ``float_consumers_read_quantized`` (ONNX Runtime), the output of every INT8
layer (after its activation) that leads to some layer, for all its readers: FP32/FP16
layers and other float ops then read the dequantized INT8 output.
Post-processing that ends in a graph output (YOLOv5's Detect decode and the
output of its convs) never qualifies; without (e), FP32 layers always read float tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from sensisearch.op_types import PASSTHROUGH_OP_TYPES, REGION_OP_TYPES


@dataclass(frozen=True)
class QuantizationProfile:
    name: str
    unsigned_nonnegative_activations: bool = False
    """Quantize activations whose calibrated minimum is >= 0 (post-ReLU) as uint8
    with zero point 0 (scale amax/255), doubling their resolution; others stay
    symmetric int8 (scale amax/127). TensorRT requires int8, so keep False there."""
    uint8_signed_activations: bool = False
    """Quantize activations that can be negative as uint8 with zero point 128 (scale
    amax/127, still symmetric around 0) instead of int8. ORT's CPU provider on x86
    only fuses QDQ Conv/MatMul into QLinearConv/QLinearMatMul with uint8 activations
    (int8 activations are only fused on ARM); TensorRT rejects non-zero zero points."""
    asymmetric_signed_activations: bool = False
    """With ``uint8_signed_activations``: quantize a signed tensor whose range has a
    calibrated minimum (:attr:`TensorRange.min`) over ``[lower, amax]`` instead of
    ``[-amax, amax]`` (uint8, scale (amax - lower)/255, zero point round(-lower/scale),
    0 exact). YOLOv5's SiLU outputs (min ~ -0.28, max up to tens) then use all 256
    codes instead of ~half. Ranges without ``min`` keep zero point 128."""
    per_channel_weights: bool = True
    """Per-output-channel weight scales on the layer's output-channel axis (see
    :attr:`~sensisearch.model.QuantizableLayer.weight_axis`); else per-tensor."""
    quantize_layer_outputs: bool = False
    """Also put Q/DQ on an INT8 layer's output when every consumer of that output is
    an INT8 layer or a quantized Add (followed through ``output_passthrough_ops``)."""
    output_qdq_after_activations: tuple[str, ...] = ("Relu", "Clip")
    """Activations the output Q/DQ is placed *after* (ORT removes a Relu/Clip in
    front of a Q whose zero point is the type minimum, i.e. uint8 zp 0)."""
    output_qdq_before_other_activations: bool = False
    """For any other activation directly after the layer (SiLU, LeakyRelu, ...), put
    the output Q/DQ on the raw layer output, in front of the activation, provided
    the activation's output only feeds quantized consumers."""
    output_passthrough_ops: tuple[str, ...] = PASSTHROUGH_OP_TYPES
    """Ops that do not stop a layer output from counting as 'only feeds INT8'."""
    quantize_residual_add: bool = True
    """Put Q/DQ on the other (skip) input of an Add fed by an INT8 layer so the Add
    can fuse into the layer's epilogue (TensorRT explicit-quantization guide)."""
    residual_add_through_activation: bool = False
    """Also treat ``Add(act(layer(x)), skip)`` (e.g. YOLOv5's SiLU bottleneck) as a
    residual Add of that layer; the guide's pattern is ``Add(layer(x), skip)``."""
    quantize_bias: bool = False
    """Store the bias of INT8 Conv/Gemm as int32 with DequantizeLinear (scale =
    activation scale x weight scale); ORT's QDQ fusion requires it, TensorRT takes
    a float bias."""
    reduce_range_weights: bool = False
    """Use 7-bit weights [-63, 63] (CPUs without VNNI saturate u8*s8 products)."""
    quantize_regions: bool = False
    """Extend Q/DQ to the INT8 *region*: the elementwise and data-movement ops
    (``region_ops``) between INT8 layers, see :func:`sensisearch.quantize.region.int8_region`.
    Every input and output of a region op gets Q/DQ, so a backend can run the whole
    region in integer kernels (ORT: QLinearAdd/Mul/Sigmoid/Concat/GlobalAveragePool,
    8-bit MaxPool/Resize). Replaces the residual-Add / layer-output rules above
    (``quantize_residual_add`` and ``quantize_layer_outputs`` are ignored);
    ``output_qdq_after_activations`` names the region activations whose Q/DQ goes
    only after them, ``output_qdq_before_other_activations`` still covers activations
    that are not region ops."""
    region_ops: tuple[str, ...] = tuple(sorted(REGION_OP_TYPES))
    """Op types that may join an INT8 region (a subset of ``REGION_OP_TYPES``)."""
    float_consumers_read_quantized: bool = False
    """"int8 in, int8 out" INT8 layers: an INT8 layer's output (after its activation
    epilogue: with ``quantize_regions`` an epilogue of region ops, else one of
    ``output_qdq_after_activations``) always gets Q/DQ when it leads to some layer,
    and every reader that is not post-processing reads the dequantized value, FP32
    and FP16 layers (Cast after the DQ) and other float ops included. ONNX Runtime
    then fuses every such INT8 layer even in mixed configurations (its QDQ fusion
    needs the layer output to go into a QuantizeLinear); it is also what a fused
    QLinearConv computes anyway. Outputs that are graph outputs or only lead to graph
    outputs (YOLOv5's Detect convs and decode) stay float. Off: FP32/FP16 layers
    always read float tensors and an INT8 output is only quantized when all its
    readers are quantized."""
    min_opset: int = 13
    """Per-channel Q/DQ (``axis``) needs opset >= 13; models are upgraded to this
    when a trial has INT8 layers."""


TENSORRT = QuantizationProfile(name="tensorrt")

ONNXRUNTIME_CPU = QuantizationProfile(
    name="onnxruntime-cpu",
    unsigned_nonnegative_activations=True,
    uint8_signed_activations=True,
    asymmetric_signed_activations=True,
    quantize_layer_outputs=True,
    output_qdq_before_other_activations=True,
    # Residual Q/DQ makes the Add count as quantized, so the convs feeding it get
    # output Q/DQ and fuse too (digits ResNet: 10/10 integer kernels instead of 4).
    quantize_residual_add=True,
    quantize_bias=True,
    # Q/DQ on the ops between INT8 convs too (SiLU, residual Add, Concat, MaxPool,
    # Resize, GAP): ORT then runs the whole region in NHWC integer kernels. YOLOv5n:
    # 57/60 integer convs (the 3 Detect convs keep a float output) instead of 44/60.
    quantize_regions=True,
    # Mixed configs: an INT8 conv whose output (or SiLU) also feeds an FP32 conv only
    # fuses if that output is quantized anyway; FP32 layers then read its DQ output.
    float_consumers_read_quantized=True,
)

PROFILES = {p.name: p for p in (TENSORRT, ONNXRUNTIME_CPU)}
