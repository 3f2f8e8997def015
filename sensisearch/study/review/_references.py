"""Reference quantizers beside the front: what an existing tool scores on the same data.

``--compare-ort-quantizer`` runs ONNX Runtime's ``quantize_static`` the way users
commonly do for TensorRT (symmetric INT8, per-channel weights, only the weighted
ops quantized) with MinMax and with Percentile 99.99 calibration, on the study's
own calibration samples, then builds, times and evaluates each on the study's
backend. They are not trials: they never win, they show what the search beat.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from sensisearch.calibration import deterministic_order
from sensisearch.fileio import write_json_atomic
from sensisearch.quantize.emit import save_model
from sensisearch.quantize.opset import upgraded

if TYPE_CHECKING:
    from sensisearch.study.run._context import StudyContext

log = logging.getLogger(__name__)

WEIGHTED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]


@dataclass(frozen=True)
class ReferenceSpec:
    name: str
    method: str
    percentile: float | None = None


REFERENCES = (
    ReferenceSpec("ort-quantize_static minmax", "MinMax"),
    ReferenceSpec("ort-quantize_static percentile 99.99", "Percentile", 99.99),
)


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """quantize_static prints progress and logs advice on the root logger; keep the CLI clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def run_references(ctx: StudyContext, samples: int) -> list[dict[str, Any]]:
    """Quantize, build, time and evaluate each reference; results also go to ``references.json``.

    They calibrate on the study's own calibration source (none: no references).
    """
    # Heavy (pulls in onnxruntime's quantization tooling), and only needed with --compare-ort-quantizer.
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    source = ctx.evaluation.calibration
    if source is None:
        return []
    order = deterministic_order(source.size, ctx.settings.search.seed)[:samples]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = source.batches(order, source.static_batch or 32)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {source.input_name: batch}

    # quantize_static writes per-channel DequantizeLinear (axis) even below opset
    # 13, which ONNX Runtime then rejects (seen on the opset-11 MNIST model):
    # give it the same opset-13 model our emitter starts from.
    model = upgraded(ctx.model, 13, key=ctx.info.sha256, source=str(ctx.model_path))
    source_model = ctx.out / "references" / "model-opset13.onnx"
    save_model(model, source_model)

    results = []
    for spec in REFERENCES:
        folder = ctx.out / "references" / spec.name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "deployable.onnx"
        extra: dict[str, Any] = {"ActivationSymmetric": True, "WeightSymmetric": True}
        if spec.percentile is not None:
            extra["CalibPercentile"] = spec.percentile
        start = time.perf_counter()
        try:
            with quiet_quantizer():
                quantize_static(
                    str(source_model), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=WEIGHTED_OPS, per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, spec.method), extra_options=extra,
                )
            quantize_seconds = time.perf_counter() - start
            build = ctx.backend.build(path, folder)
            with ctx.backend.load(build.artifact) as runner:
                latency = ctx.pipeline.latency_of(runner, artifact=build.artifact)  # paired with FP32, like every trial
                evaluation = ctx.evaluator.evaluate(runner)
        except Exception as exc:  # a reference that fails must not stop the study
            log.warning("reference %s failed: %s", spec.name, exc)
            results.append({"name": spec.name, "error": " ".join(str(exc).split())})
            continue
        results.append({
            "name": spec.name,
            "samples": int(len(order)),
            "metric": evaluation.metric,
            "value": evaluation.value,
            "latency": latency,
            "layers_run": dict(build.layer_precisions),
            "quantize_seconds": quantize_seconds,
            "deployable_onnx": str(path),
        })
    write_json_atomic(ctx.out / "references.json", results)
    return results
