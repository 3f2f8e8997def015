"""Every ONNX op-type class sensisearch reasons about, in one place.

One home per kind of knowledge (as ModelOpt keeps its ``onnx/op_types.py``): what
counts as a quantizable layer (``model/``), which ops may join an INT8 region and how
they read their inputs (``quantize/``), and which op types ONNX Runtime's optimized
graph uses for integer and float kernels (``backends/onnxruntime.py``).

This module sits at the package root, not in ``quantize/``, because ``model/`` needs
:data:`LAYER_OP_TYPES` and ``quantize/`` builds on ``model/``: putting it inside
``quantize/`` would make ``model`` import ``quantize`` (an import circle).
"""

from __future__ import annotations

import onnx

DEFAULT_DOMAINS = ("", "ai.onnx")
"""Domains of the standard ONNX operators."""

# --------------------------------------------------------------------------- model

LAYER_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""Weighted ops whose precision the search chooses (with a constant float32 weight)."""

ACTIVATION_OP_TYPES = frozenset(
    {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu", "Tanh", "Sigmoid", "Softplus", "Gelu"}
)
"""Single-input element-wise activations that may directly follow a layer."""

# --------------------------------------------------------------------------- Q/DQ placement

REGION_OP_TYPES = frozenset(
    {
        "Add",
        "Mul",
        "Sigmoid",
        "LeakyRelu",
        "Relu",
        "Clip",
        "Concat",
        "GlobalAveragePool",
        "AveragePool",
        "MaxPool",
        "GlobalMaxPool",
        "Resize",
        "Slice",
        "Split",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Identity",
    }
)
"""Ops that may join an INT8 region: backends fuse them into integer kernels (ONNX
Runtime's QLinearAdd/QLinearMul/QLinearSigmoid/QLinearConcat/QLinearGlobalAveragePool)
or run them directly on 8-bit data (MaxPool, Resize, Reshape, ...)."""

ALL_DATA_INPUT_OP_TYPES = frozenset({"Add", "Mul", "Concat"})
"""Region ops whose every input is an activation (all others: input 0 only; the
remaining inputs are shapes, scales, axes, ... and are never quantized)."""

VALUE_PRESERVING_OP_TYPES = frozenset(
    {"MaxPool", "GlobalMaxPool", "Resize", "Slice", "Split", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
)
"""Region ops whose output values are a subset of (or copied from) their data input's
values: the output can reuse the input's quantization parameters exactly, and ONNX
Runtime only drops their Q/DQ (running them on 8-bit data) when it does."""

FUSION_JOIN_OP_TYPES = frozenset({"Add", "Concat"})
"""Ops whose inputs must come from layers of one precision to avoid a reformat: a
residual ``Add`` fuses into the conv that produces one input and reads the other
in the same precision; a ``Concat`` is eliminated only when all its inputs are
written in one precision (TensorRT moves a Q across it into every producer). The
layers feeding one of these form a precision group (``quantize/_groups.py``)."""

SHAPE_READER_OP_TYPES = frozenset({"Shape", "Size"})
"""Ops that read only the shape of their input: they may read the dequantized tensor
(same shape) so that they do not keep the producer from emitting 8-bit data."""

PASSTHROUGH_OP_TYPES = (
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Resize",
    "Slice",
    "Split",
    "Identity",
)
"""Data-movement / pooling ops through which a quantized tensor may flow when deciding
whether all consumers of a layer output are quantized (profiles without regions)."""

# --------------------------------------------------------------------------- ONNX Runtime

ORT_WEIGHT_QUANTIZED_OP_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm"})
"""Ops whose float weight ONNX Runtime quantizes when their input comes from a
per-tensor DequantizeLinear (its WeightBiasQuantization pass)."""

INTEGER_KERNEL_OPS = frozenset(
    {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
)
"""Op types that mean "this weighted layer runs an integer kernel" in a graph ONNX
Runtime optimized. Exactly the integer Conv/Gemm/MatMul kernels the CPU provider
registers (``onnxruntime.capi._pybind_state.get_all_opkernel_def()``, ORT 1.32):
the NHWC transformer keeps the name QLinearConv (com.microsoft domain); there is no
CPU ``NhwcQLinearConv`` or ``QLinearConvTranspose`` kernel."""

FLOAT_WEIGHTED_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "Gemm", "MatMul", "FusedMatMul", "FusedGemm", "NhwcConv"})
"""Float weighted ops as they may appear after ONNX Runtime's fusions."""


def is_standard(node: onnx.NodeProto) -> bool:
    """True when ``node`` is a standard ONNX operator (default domain)."""
    return node.domain in DEFAULT_DOMAINS
