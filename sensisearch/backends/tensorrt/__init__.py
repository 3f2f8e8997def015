"""TensorRT backend: TensorRT 10.x / 11.x and TensorRT-RTX through one strongly typed path.

Importing this package does not import TensorRT; :func:`detect_flavor` does.

* :func:`make_tensorrt_backend` -> :class:`TensorRTBackend` (build ``.plan`` + sidecar, load on a GPU)
* :func:`detect_flavor`, :func:`can_run_tensorrt`: what is installed / usable here
* :func:`parse_shapes`: ``--shapes name:MIN/OPT/MAX``
* :func:`check_sidecar`: does a plan fit this machine
* :func:`network_precisions`: the CPU-side precision check of a deployable ONNX
* :func:`parse_inspector_json`: per-layer precision from the engine inspector (GPU)
"""

from sensisearch.backends.tensorrt.backend import PLAN_SUFFIX, TensorRTBackend, make_tensorrt_backend
from sensisearch.backends.tensorrt.builder import (
    BuilderSettings,
    ProfileShape,
    TimingCache,
    build_engine,
    parse_shapes,
    resolve_profile,
)
from sensisearch.backends.tensorrt.flavor import (
    DriverInfo,
    GpuInfo,
    MachineInfo,
    TensorRTFlavor,
    available_flavors,
    can_build,
    can_run_on,
    can_run_tensorrt,
    detect_flavor,
    probe_machine,
    require_flavor,
)
from sensisearch.backends.tensorrt.inspector import InspectorSummary, parse_inspector_json
from sensisearch.backends.tensorrt.network import NetworkPrecisions, network_precisions, parse_onnx, precision_problems
from sensisearch.backends.tensorrt.sidecar import check_sidecar, read_sidecar, sidecar_path

__all__ = [
    "PLAN_SUFFIX",
    "BuilderSettings",
    "DriverInfo",
    "GpuInfo",
    "InspectorSummary",
    "MachineInfo",
    "NetworkPrecisions",
    "ProfileShape",
    "TensorRTBackend",
    "TensorRTFlavor",
    "TimingCache",
    "available_flavors",
    "build_engine",
    "can_build",
    "can_run_on",
    "can_run_tensorrt",
    "check_sidecar",
    "detect_flavor",
    "make_tensorrt_backend",
    "network_precisions",
    "parse_inspector_json",
    "parse_onnx",
    "parse_shapes",
    "precision_problems",
    "probe_machine",
    "read_sidecar",
    "require_flavor",
    "resolve_profile",
    "sidecar_path",
]
