"""``export_trial``: one folder a deployment engineer can take to the target machine."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import onnx

from sensisearch.backends.tensorrt.builder import ProfileShape, resolve_profile
from sensisearch.errors import SensisearchError
from sensisearch.export._formats import (
    modelopt_settings,
    onnxruntime_settings,
    polygraphy_script,
    trtexec_script,
)
from sensisearch.fileio import write_bytes_atomic, write_json_atomic, write_text_atomic
from sensisearch.model.analysis import load_onnx

log = logging.getLogger(__name__)

DEPLOYABLE_FILE = "deployable.onnx"
FP32_FILE = "model_fp32.onnx"
CONFIG_FILE = "config.json"


class ExportFormat(str, Enum):
    """What ``sensisearch export --format`` writes besides the deployable ONNX."""

    ONNX = "onnx"
    TRTEXEC = "trtexec"
    MODELOPT = "modelopt"
    ONNXRUNTIME = "onnxruntime"
    POLYGRAPHY = "polygraphy"


_NEEDS_FP32 = frozenset({ExportFormat.MODELOPT, ExportFormat.POLYGRAPHY})


@dataclass(frozen=True)
class ExportedTrial:
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    """File role (``deployable``, ``config``, ``fp32``, ``trtexec``, ``modelopt``,
    ``modelopt_exclude``, ``onnxruntime``, ``polygraphy``) -> path written."""


def _graph_inputs(model: onnx.ModelProto) -> list[tuple[str, tuple[int, ...]]]:
    initializers = {i.name for i in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        # -1 marks a symbolic or unknown dimension, as resolve_profile expects.
        inputs.append((value.name, tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims)))
    return inputs


def model_input_shapes(
    model: onnx.ModelProto,
    explicit: Mapping[str, ProfileShape] | None = None,
    opt_batch: int = 1,
    max_batch: int | None = None,
) -> dict[str, ProfileShape]:
    """MIN/OPT/MAX shape of every graph input: static ones as they are, a dynamic
    batch as ``1 / opt_batch / max_batch`` (``max_batch`` defaults to ``opt_batch``),
    anything else from ``explicit`` (``--shapes name:MIN/OPT/MAX``)."""
    return resolve_profile(_graph_inputs(model), explicit or {}, opt_batch, max_batch or opt_batch)


def _check_layers(model: onnx.ModelProto, config: Mapping[str, Any], path: Path) -> None:
    nodes = {n.name for n in model.graph.node}
    missing = [name for name in config.get("precisions", {}) if name not in nodes]
    if missing:
        raise SensisearchError(
            f"{path}: {len(missing)} layers of the configuration are not nodes of this ONNX (first: {missing[0]}); "
            "export the deployable.onnx of the same trial"
        )


def _write_npy(path: Path, calibration: Any) -> Path:
    """``calibration`` as ``.npy`` (one array, or a dict by input name saved as an object array), atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, calibration if not isinstance(calibration, Mapping) else np.array(dict(calibration), dtype=object),
            allow_pickle=isinstance(calibration, Mapping))
    return write_bytes_atomic(path, buffer.getvalue())


def export_trial(
    deployable: str | Path,
    config: Mapping[str, Any],
    out_dir: str | Path,
    formats: Iterable[ExportFormat | str] = tuple(ExportFormat),
    fp32_model: str | Path | None = None,
    shapes: Mapping[str, ProfileShape] | None = None,
    opt_batch: int = 1,
    max_batch: int | None = None,
    calibration: Any = None,
) -> ExportedTrial:
    """Write the deployable ONNX, the configuration and the hand-off of each format.

    ``calibration``: the trial's calibration samples (an array, or a dict by input name),
    written as the ``calib.npy`` the ModelOpt command names.

    ``config`` is :meth:`TrialConfig.to_dict` of the trial that made ``deployable``.
    ModelOpt and Polygraphy start from the FP32 model, so those formats need
    ``fp32_model``; it is copied next to the deployable ONNX so the folder is
    self-contained. Every file is written atomically.
    """
    deployable = Path(deployable)
    out_dir = Path(out_dir)
    try:
        wanted = {ExportFormat(f) for f in formats}
    except ValueError as exc:
        raise SensisearchError(f"--format: {exc}; choose from {', '.join(f.value for f in ExportFormat)}") from None
    if not deployable.is_file():
        raise SensisearchError(f"{deployable}: deployable ONNX not found; run the trial (or `sensisearch build`) first")
    if wanted & _NEEDS_FP32 and (fp32_model is None or not Path(fp32_model).is_file()):
        need = ", ".join(sorted(f.value for f in wanted & _NEEDS_FP32))
        raise SensisearchError(f"--format {need}: needs the FP32 model, and {fp32_model} is not a file; pass --model MODEL.onnx")
    data = deployable.read_bytes()
    model = load_onnx(deployable)
    _check_layers(model, config, deployable)
    profile = model_input_shapes(model, shapes, opt_batch, max_batch)

    files: dict[str, Path] = {}
    files["deployable"] = write_bytes_atomic(out_dir / DEPLOYABLE_FILE, data)
    files["config"] = write_json_atomic(out_dir / CONFIG_FILE, dict(config))
    if wanted & _NEEDS_FP32:
        # Saved as sensisearch names it on load (assign_node_names), so the excluded
        # layer names exist in the file ModelOpt and Polygraphy are given.
        fp32 = load_onnx(fp32_model)  # type: ignore[arg-type]
        files["fp32"] = write_bytes_atomic(out_dir / FP32_FILE, fp32.SerializeToString())
    if ExportFormat.TRTEXEC in wanted:
        files["trtexec"] = write_text_atomic(out_dir / "trtexec.sh", trtexec_script(DEPLOYABLE_FILE, profile))
    if ExportFormat.MODELOPT in wanted:
        settings = modelopt_settings(config, FP32_FILE, profile)
        files["modelopt"] = write_json_atomic(out_dir / "modelopt.json", settings)
        files["modelopt_exclude"] = write_text_atomic(out_dir / "modelopt.txt", "".join(f"{n}\n" for n in settings["nodes_to_exclude"]))
        if calibration is not None:
            # The file the command names: without it the command cannot run at all.
            files["modelopt_calibration"] = _write_npy(out_dir / "calib.npy", calibration)
        log.warning("modelopt: %s; %s", settings["recalibration_warning"], settings["recommendation"])
    if ExportFormat.ONNXRUNTIME in wanted:
        files["onnxruntime"] = write_json_atomic(out_dir / "onnxruntime.json", onnxruntime_settings(config))
    if ExportFormat.POLYGRAPHY in wanted:
        files["polygraphy"] = write_text_atomic(out_dir / "polygraphy.sh", polygraphy_script(DEPLOYABLE_FILE, FP32_FILE, profile))
    for key in ("trtexec", "polygraphy"):
        if key in files:
            files[key].chmod(files[key].stat().st_mode | 0o111)
    log.info("exported %s to %s", ", ".join(sorted(files)), out_dir)
    return ExportedTrial(out_dir, files)
