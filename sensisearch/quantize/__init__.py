"""Trial configurations, backend profiles and the deployable-ONNX emitter."""

from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
from sensisearch.quantize.emit import (
    INTEGER_KERNEL_OPS,
    count_integer_kernels,
    emit_deployable_onnx,
    save_model,
    tensors_to_quantize,
)
from sensisearch.quantize.opset import upgrade_opset
from sensisearch.quantize.placement import ActivationQdq, Placement, plan_placement
from sensisearch.quantize.profiles import ONNXRUNTIME_CPU, PROFILES, TENSORRT, QuantizationProfile
from sensisearch.quantize.ranges import TensorRange

__all__ = [
    "ActivationQdq",
    "CalibrationAlgorithm",
    "CalibrationChoice",
    "INTEGER_KERNEL_OPS",
    "ONNXRUNTIME_CPU",
    "PROFILES",
    "Placement",
    "Precision",
    "QuantizationProfile",
    "TENSORRT",
    "TensorRange",
    "TrialConfig",
    "count_integer_kernels",
    "emit_deployable_onnx",
    "plan_placement",
    "save_model",
    "tensors_to_quantize",
    "upgrade_opset",
]
