"""Where Q/DQ goes and how it is written: trial configurations, backend profiles,
the graph index and INT8 regions, the placement, and the deployable-ONNX emitter."""

from sensisearch.quantize._groups import fusion_groups
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
from sensisearch.quantize.emit import emit_deployable_onnx, save_model
from sensisearch.quantize.graph import Epilogue, GraphIndex, ResidualAdd, activation_epilogue, feeds_layers, residual_adds
from sensisearch.quantize.opset import upgrade_opset
from sensisearch.quantize.placement import ActivationQdq, Placement, plan_placement, statistics_tensors
from sensisearch.quantize.profiles import ONNXRUNTIME_CPU, PROFILES, TENSORRT, QuantizationProfile
from sensisearch.quantize.ranges import TensorRange
from sensisearch.quantize.region import Int8Region, int8_region

__all__ = [
    "ActivationQdq",
    "CalibrationAlgorithm",
    "CalibrationChoice",
    "Epilogue",
    "GraphIndex",
    "Int8Region",
    "ONNXRUNTIME_CPU",
    "PROFILES",
    "Placement",
    "Precision",
    "QuantizationProfile",
    "ResidualAdd",
    "TENSORRT",
    "TensorRange",
    "TrialConfig",
    "activation_epilogue",
    "emit_deployable_onnx",
    "feeds_layers",
    "fusion_groups",
    "int8_region",
    "plan_placement",
    "residual_adds",
    "save_model",
    "statistics_tensors",
    "upgrade_opset",
]
