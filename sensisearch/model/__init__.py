"""Model loading and analysis: which layers sensisearch can put in INT8/FP16."""

from sensisearch.model.analysis import (
    ModelInfo,
    QuantizableLayer,
    analyze_model,
    assign_node_names,
    find_layers,
    load_onnx,
    statistics_tensors,
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
    "statistics_tensors",
]
