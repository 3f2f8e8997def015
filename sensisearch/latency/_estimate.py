"""An explicit latency estimate: multiply-accumulates per layer, weighted by precision.

Estimated cost = sum over quantizable layers of MACs(layer) x PRECISION_COST[precision],
in units of "FP16 MACs" (so an all-FP16 model's cost is its MAC count). It is a
*relative cost*, never a speed-up: without a latency table of the target nothing
here was measured, so reports print it on the cost scale (FP32 = 1), labelled
:data:`ESTIMATE_LABEL`, and never as "N x faster".

The weights are published end-to-end TensorRT latencies of small convolutional
models at batch 1, not peak tensor-core ratios (dense INT8 is 2x FP16 on paper,
which gave an invented "8.00x" for all-INT8 YOLOv5n over FP32). What was found
(third-party measurements; no NVIDIA document with INT8-vs-FP16 figures for a small
detector turned up, so none is cited):

- https://github.com/the0807/YOLOv8-ONNX-TensorRT (README, Jetson Orin Nano):
  YOLOv8n engine FP16 7.3 ms, INT8 5.8 ms (1.26x); YOLOv8s FP16 11.4 ms, INT8 8.2 ms (1.39x).
- https://rosepetal.ai/blog/model-conversion-times (a YOLOv8-based inspection model,
  1x1 latency): TensorRT FP32 17.8 ms (dynamic profile; 21.6 ms batch-1 engine),
  FP16 11.0 ms, INT8 9.2 ms: INT8 over FP16 1.20x, FP16 over FP32 1.62x (1.96x).
- https://github.com/kentaroy47/benchmark-FP32-FP16-INT8-with-TensorRT (a classifier,
  resnet18 at 1x3x256x256 on Jetson): FP32 3.8 ms, FP16 2.1 ms, INT8 1.7 ms:
  FP16 over FP32 1.81x, INT8 over FP16 1.24x.

INT8 over FP16 is taken as 1.2x, the lowest detector figure above, so the estimate
does not favour INT8 beyond what was published; FP16 over FP32 as 1.8x, inside the
1.62-1.96x above. They rank configurations only: memory traffic, reformat layers
between precision regions and the non-weighted ops are ignored, and one GPU's ratios
are not another's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from sensisearch.quantize.config import Precision

if TYPE_CHECKING:
    from sensisearch.model.analysis import ModelInfo

ESTIMATE_LABEL = "relative cost estimate (MACs x published precision weight, no latency table; not a speed-up)"
PRECISION_COST: Mapping[Precision, float] = {Precision.INT8: 1.0 / 1.2, Precision.FP16: 1.0, Precision.FP32: 1.8}


def layer_macs(model: onnx.ModelProto, info: ModelInfo) -> dict[str, float]:
    """Multiply-accumulates per quantizable layer at the model's input shape (batch 1).

    weight elements / output channels x output elements: exact for Conv,
    ConvTranspose (per input pixel), Gemm and MatMul with a constant weight.
    """
    inferred = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
        shapes[value.name] = dims
    weights = {i.name: i for i in model.graph.initializer}
    macs: dict[str, float] = {}
    for layer in info.layers:
        w = weights.get(layer.weight)
        w_shape = list(numpy_helper.to_array(w).shape) if w is not None else [1]
        out_shape = shapes.get(layer.output) or [1]
        if layer.op_type == "ConvTranspose":
            in_shape = shapes.get(layer.activation_input) or [1]
            macs[layer.name] = float(np.prod(w_shape)) * float(np.prod(in_shape[2:]))
            continue
        out_channels = w_shape[layer.weight_axis] if w_shape else 1
        macs[layer.name] = float(np.prod(w_shape)) / max(out_channels, 1) * float(np.prod(out_shape[1:] or [1]))
    return macs


def estimated_cost(macs: Mapping[str, float], precisions: Mapping[str, Precision | str]) -> float:
    """The estimate for one configuration (see the module docstring); same units for every configuration of a model."""
    return float(sum(m * PRECISION_COST[Precision(precisions[name])] for name, m in macs.items()))
