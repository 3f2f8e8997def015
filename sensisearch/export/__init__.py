"""Hand-off of one trial to deployment tools: the deployable ONNX plus ready commands.

* :func:`export_trial` writes ``deployable.onnx``, ``config.json`` and, per
  :class:`ExportFormat`, ``trtexec.sh`` (TensorRT 10.x / 11.x), ``modelopt.json``
  + ``modelopt.txt``, ``onnxruntime.json``, ``polygraphy.sh``.
* The texts come from pure functions: :func:`trtexec_command`,
  :func:`trtexec_script`, :func:`modelopt_settings`, :func:`onnxruntime_settings`,
  :func:`polygraphy_script`.
"""

from sensisearch.export._build import build_from_config, read_config
from sensisearch.export._export import (
    CONFIG_FILE,
    DEPLOYABLE_FILE,
    FP32_FILE,
    ExportedTrial,
    ExportFormat,
    export_trial,
    model_input_shapes,
)
from sensisearch.export._formats import (
    MODELOPT_CALIBRATION,
    ONNXRUNTIME_CALIBRATION,
    exact_name_patterns,
    float_layers,
    modelopt_settings,
    onnxruntime_settings,
    polygraphy_script,
    shape_text,
    trtexec_command,
    trtexec_script,
)

__all__ = [
    "build_from_config",
    "read_config",
    "CONFIG_FILE",
    "DEPLOYABLE_FILE",
    "ExportFormat",
    "ExportedTrial",
    "FP32_FILE",
    "MODELOPT_CALIBRATION",
    "ONNXRUNTIME_CALIBRATION",
    "exact_name_patterns",
    "export_trial",
    "float_layers",
    "model_input_shapes",
    "modelopt_settings",
    "onnxruntime_settings",
    "polygraphy_script",
    "shape_text",
    "trtexec_command",
    "trtexec_script",
]
