"""The hand-off texts: one pure function per deployment tool, from plain data.

Every function takes the trial's configuration in the format of
:meth:`sensisearch.quantize.config.TrialConfig.to_dict` and returns text or a
JSON-able dict; nothing here touches the file system (``_export.py`` writes).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sensisearch.errors import SensisearchError
from sensisearch.quantize.config import CalibrationAlgorithm, Precision

if TYPE_CHECKING:
    from sensisearch.backends.tensorrt.builder import ProfileShape

# Where the flag spellings come from (checked, not remembered):
# - trtexec: TensorRT's samples/common/sampleOptions.cpp (NVIDIA/TensorRT, main
#   branch, 2026): --onnx, --saveEngine, --shapes, --minShapes/--optShapes/--maxShapes,
#   --stronglyTyped ("[Deprecated] Strongly typed network is now enabled by default.
#   This flag is a no-op." in 11.x), and NVIDIA's "Migrating trtexec Usage from
#   TensorRT 10.x to 11.x" page (--fp16/--int8/--best/--calib removed in 11.x).
# - Polygraphy: tools/Polygraphy/polygraphy/tools/args/ (--onnxrt, --trt,
#   --strongly-typed, --input-shapes, --trt-min/opt/max-shapes, --save-inputs,
#   --save-outputs, --load-inputs, --load-outputs, --atol, --rtol,
#   --check-error-stat) and examples/cli/run/02_comparing_across_runs.
# - ModelOpt: modelopt/onnx/quantization/__main__.py (NVIDIA/Model-Optimizer):
#   --onnx_path, --quantize_mode, --calibration_method {max, entropy} for int8,
#   --calibration_data_path, --calibration_shapes, --nodes_to_exclude (regular
#   expressions), --high_precision_dtype {fp32, fp16, bf16}, --output_path.
# - ONNX Runtime: onnxruntime.quantization.quantize_static (nodes_to_exclude,
#   calibrate_method = CalibrationMethod.MinMax/Entropy/Percentile,
#   extra_options["CalibPercentile"]).

TENSORRT_MAJORS = (10, 11)

# Our calibration algorithm -> ModelOpt's INT8 calibration_method (it offers
# only "max" and "entropy"). Percentile and MSE both clip outliers below the
# observed maximum, as entropy does; "max" never clips, so entropy is nearest.
MODELOPT_CALIBRATION = {
    CalibrationAlgorithm.MINMAX: "max",
    CalibrationAlgorithm.ENTROPY: "entropy",
    CalibrationAlgorithm.PERCENTILE: "entropy",
    CalibrationAlgorithm.MSE: "entropy",
    CalibrationAlgorithm.MIXED: "entropy",  # clips where a tensor needs it
}

# Our calibration algorithm -> onnxruntime.quantization.CalibrationMethod member.
# ORT has MinMax, Entropy, Percentile (and Distribution, meant for float8); MSE
# clips by a histogram criterion like Entropy does, so Entropy is nearest.
ONNXRUNTIME_CALIBRATION = {
    CalibrationAlgorithm.MINMAX: "MinMax",
    CalibrationAlgorithm.ENTROPY: "Entropy",
    CalibrationAlgorithm.PERCENTILE: "Percentile",
    CalibrationAlgorithm.MSE: "Entropy",
    CalibrationAlgorithm.MIXED: "Percentile",  # percentile on the tensors that need clipping
}


def _precisions(config: Mapping[str, Any]) -> dict[str, Precision]:
    try:
        return {name: Precision(p) for name, p in config["precisions"].items()}
    except (KeyError, ValueError, AttributeError) as exc:
        raise SensisearchError(
            f"trial configuration: expected {{'precisions': {{layer: 'int8'|'fp16'|'fp32'}}, 'calibration': {{...}}}} ({exc})"
        ) from None


def _algorithm(config: Mapping[str, Any]) -> CalibrationAlgorithm:
    raw = config.get("calibration", {}).get("algorithm", CalibrationAlgorithm.MINMAX.value)
    try:
        return CalibrationAlgorithm(raw)
    except ValueError:
        choices = ", ".join(a.value for a in CalibrationAlgorithm)
        raise SensisearchError(f"trial configuration: calibration algorithm {raw!r} is not one of {choices}") from None


def float_layers(config: Mapping[str, Any]) -> list[str]:
    """Layers the trial keeps in FP16 or FP32, in the configuration's (graph) order."""
    return [name for name, p in _precisions(config).items() if p is not Precision.INT8]


def layers_in(config: Mapping[str, Any], precision: Precision) -> list[str]:
    return [name for name, p in _precisions(config).items() if p is precision]


def shape_text(shape: Sequence[int]) -> str:
    """``(1, 3, 640, 640)`` -> ``1x3x640x640``, the shape syntax of trtexec and ModelOpt."""
    return "x".join(str(int(d)) for d in shape)


def _shapes_arg(shapes: Mapping[str, ProfileShape], which: str) -> str:
    return ",".join(f"{name}:{shape_text(getattr(ps, which))}" for name, ps in shapes.items())


def _is_dynamic(shapes: Mapping[str, ProfileShape]) -> bool:
    return any(ps.min != ps.max for ps in shapes.values())


def trtexec_command(onnx_name: str, shapes: Mapping[str, ProfileShape], engine_name: str, tensorrt_major: int) -> str:
    """One trtexec command line building ``onnx_name`` into ``engine_name``.

    Precision is not a flag: it lives in the deployable ONNX (Q/DQ for INT8,
    float16 weights and Casts for FP16). TensorRT 10.x needs ``--stronglyTyped``
    to honour it exactly; 11.x is always strongly typed and dropped the flag's
    effect, so it is left out there. Static inputs get ``--shapes``; dynamic ones
    an optimization profile (``--minShapes/--optShapes/--maxShapes``) and
    ``--shapes`` at OPT for the timing run.
    """
    if tensorrt_major not in TENSORRT_MAJORS:
        raise SensisearchError(f"TensorRT major version {tensorrt_major}: the hand-off supports {', '.join(map(str, TENSORRT_MAJORS))}")
    args = ["trtexec", f"--onnx={onnx_name}"]
    if tensorrt_major == 10:
        args.append("--stronglyTyped")
    args.append(f"--saveEngine={engine_name}")
    if shapes:
        if _is_dynamic(shapes):
            for flag, which in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
                args.append(f"{flag}={_shapes_arg(shapes, which)}")
        args.append(f"--shapes={_shapes_arg(shapes, 'opt')}")
    return " ".join(shlex.quote(a) for a in args)


def trtexec_script(onnx_name: str, shapes: Mapping[str, ProfileShape], engine_name: str = "deployable.plan") -> str:
    """``trtexec.sh``: the 10.x and 11.x commands, picked by ``TENSORRT_MAJOR`` (default 10)."""
    return "\n".join(
        [
            "#!/usr/bin/env sh",
            "# Build the deployable ONNX into a TensorRT engine. Precision comes from the ONNX",
            "# itself (Q/DQ = INT8, float16 weights = FP16), so no precision flags are given.",
            "# TENSORRT_MAJOR=11 sh trtexec.sh for TensorRT 11.x (always strongly typed).",
            "set -eu",
            'cd "$(dirname "$0")"',
            'if [ "${TENSORRT_MAJOR:-10}" -ge 11 ]; then',
            f"  {trtexec_command(onnx_name, shapes, engine_name, 11)}",
            "else",
            f"  {trtexec_command(onnx_name, shapes, engine_name, 10)}",
            "fi",
            "",
        ]
    )


def exact_name_patterns(names: Sequence[str]) -> list[str]:
    """Regular expressions matching exactly these node names.

    ModelOpt treats ``nodes_to_exclude`` as regular expressions; a raw name like
    ``/model.1/conv/Conv`` would also match ``/model.1/conv/Conv_1``.
    """
    return [f"^{re.escape(n)}$" for n in names]


def modelopt_settings(
    config: Mapping[str, Any], fp32_onnx_name: str, shapes: Mapping[str, ProfileShape], calibration_data_name: str = "calib.npy"
) -> dict[str, Any]:
    """ModelOpt ONNX PTQ settings that re-quantize the FP32 model like this trial.

    ``nodes_to_exclude`` holds the exact FP16/FP32 layer names (for reading and
    for the Python API after :func:`exact_name_patterns`); ``command`` is the CLI
    with anchored, escaped patterns. ModelOpt quantizes more op types than
    sensisearch's weighted layers (e.g. Add, pooling) and places Q/DQ by its own
    rules, so its model is a re-quantization, not a copy of the deployable ONNX.
    """
    algorithm = _algorithm(config)
    excluded = float_layers(config)
    # ModelOpt converts every non-quantized op to one high-precision type; FP32
    # is the safe choice whenever the trial kept any layer in FP32.
    high = "fp32" if layers_in(config, Precision.FP32) else "fp16"
    method = MODELOPT_CALIBRATION[algorithm]
    args = [
        "python", "-m", "modelopt.onnx.quantization",
        f"--onnx_path={fp32_onnx_name}",
        "--quantize_mode=int8",
        f"--calibration_method={method}",
        f"--calibration_data_path={calibration_data_name}",
        f"--high_precision_dtype={high}",
        "--output_path=modelopt_int8.onnx",
    ]
    if shapes:
        args.append(f"--calibration_shapes={_shapes_arg(shapes, 'opt')}")
    if excluded:
        args.append("--nodes_to_exclude")
        args += exact_name_patterns(excluded)
    note = f"sensisearch calibration {algorithm.value}"
    if algorithm.value != method:
        note += f" has no ModelOpt equivalent; {method!r} is the nearest (both clip outliers)"
    clips = algorithm.value in ("percentile", "mse", "mixed")
    return {
        # ModelOpt re-calibrates with its own entropy or max: the study's calibration does not come along.
        # Measured: a percentile-calibrated YOLOv5n winner (59/60 layers INT8) lost 1.65 mAP through this
        # command against 0.58 for the deployable ONNX, whose Q/DQ scales carry the study's calibration.
        "recalibration_warning": (
            f"this command re-calibrates with ModelOpt's {method!r}, not the study's {algorithm.value!r}: "
            + ("expect a larger accuracy drop than the study measured (percentile-calibrated YOLOv5n: -1.65 mAP "
               "here vs -0.58 for the deployable ONNX)" if clips else "the drop may differ from the study's")
        ),
        "recommendation": "build deployable.onnx instead (trtexec --onnx=deployable.onnx --int8 --fp16): "
                          "its Q/DQ scales are the study's calibration, the accuracy the study measured",
        "quantize_mode": "int8",
        "nodes_to_exclude": excluded,
        "calibration_method": method,
        "calibration_method_note": note,
        "calibration_samples": config.get("calibration", {}).get("samples"),
        "high_precision_dtype": high,
        "calibration_data_path_note": (
            f"{calibration_data_name}: the study's first {config.get('calibration', {}).get('samples')} calibration "
            "samples, preprocessed as the model expects, as one array (npy) or a dict keyed by input name (npz)"
        ),
        "command": " ".join(shlex.quote(a) for a in args),
    }


def onnxruntime_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments for ``onnxruntime.quantization.quantize_static`` reproducing the layer choice."""
    algorithm = _algorithm(config)
    calibration = config.get("calibration", {})
    extra: dict[str, Any] = {}
    if algorithm is CalibrationAlgorithm.PERCENTILE:
        extra["CalibPercentile"] = float(calibration.get("percentile", 99.99))
    settings: dict[str, Any] = {
        "nodes_to_exclude": float_layers(config),
        "calibrate_method": ONNXRUNTIME_CALIBRATION[algorithm],
        "quant_format": "QDQ",
        "per_channel": True,
        "activation_type": "QUInt8",
        "weight_type": "QInt8",
        "op_types_to_quantize": sorted({"Conv", "ConvTranspose", "Gemm", "MatMul"}),
        "extra_options": extra,
        "calibration_samples": calibration.get("samples"),
    }
    if algorithm is CalibrationAlgorithm.MSE:
        settings["calibrate_method_note"] = "sensisearch calibration mse has no ONNX Runtime equivalent; Entropy is the nearest"
    return settings


def polygraphy_script(
    deployable_name: str,
    fp32_onnx_name: str,
    shapes: Mapping[str, ProfileShape],
    atol: float = 0.05,
    rtol: float = 0.05,
    error_stat: str = "median",
) -> str:
    """``polygraphy.sh``: run the FP32 model on ONNX Runtime, then the deployable
    ONNX on TensorRT and ONNX Runtime with the same inputs, compared with FP32.

    Quantized outputs differ element-wise from FP32 by design; the default check
    is on the median error (``--check-error-stat``) with loose tolerances, so a
    broken engine fails it while ordinary INT8 noise passes.
    """
    shape_args: list[str] = []
    trt_args: list[str] = []
    if shapes:
        shape_args = ["--input-shapes", *(f"{n}:[{','.join(map(str, ps.opt))}]" for n, ps in shapes.items())]
        if _is_dynamic(shapes):
            for flag, which in (("--trt-min-shapes", "min"), ("--trt-opt-shapes", "opt"), ("--trt-max-shapes", "max")):
                trt_args += [flag, *(f"{n}:[{','.join(map(str, getattr(ps, which)))}]" for n, ps in shapes.items())]
    q = shlex.quote
    reference = ["polygraphy", "run", fp32_onnx_name, "--onnxrt", *shape_args,
                 "--save-inputs", "inputs.json", "--save-outputs", "fp32_outputs.json"]
    compare = ["polygraphy", "run", deployable_name, "--trt", "--onnxrt", "--strongly-typed", *shape_args, *trt_args,
               "--load-inputs", "inputs.json", "--load-outputs", "fp32_outputs.json",
               "--atol", f"{atol:g}", "--rtol", f"{rtol:g}", "--check-error-stat", error_stat]
    return "\n".join(
        [
            "#!/usr/bin/env sh",
            "# Compare the deployable ONNX (TensorRT and ONNX Runtime) with the FP32 model on the same inputs.",
            "set -eu",
            'cd "$(dirname "$0")"',
            " ".join(q(a) for a in reference),
            " ".join(q(a) for a in compare),
            "",
        ]
    )
