"""Model loading and analysis: which layers sensisearch can put in INT8/FP16.

Where their Q/DQ goes (graph index, INT8 regions, placement) is :mod:`sensisearch.quantize`.
"""

from sensisearch.model.analysis import (
    ModelInfo,
    QuantizableLayer,
    analyze_model,
    assign_node_names,
    find_layers,
    load_onnx,
)
from sensisearch.model.tensor import TensorSpec

__all__ = [
    "ModelInfo",
    "QuantizableLayer",
    "TensorSpec",
    "analyze_model",
    "assign_node_names",
    "find_layers",
    "load_onnx",
]
