"""``sensisearch evaluate``: score one model file as the study would."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

from sensisearch.backends.factory import make_backend
from sensisearch.errors import SensisearchError
from sensisearch.onnx_compat import check_loadable_ir
from sensisearch.study.config._settings import StudySettings
from sensisearch.study.config._inputs import build_evaluation, with_example


def evaluate_model(settings: StudySettings) -> dict[str, Any]:
    """Build ``settings.data.model`` on the backend and evaluate it; a JSON-ready dict.

    Works for an FP32 ONNX and for a trial's deployable ONNX alike (no
    quantizable-layer analysis is needed to evaluate).
    """
    settings = with_example(settings)
    if settings.data.model is None:
        raise SensisearchError("evaluate needs --model FILE.onnx (or --example NAME)")
    model_path = Path(settings.data.model)
    if not model_path.is_file():
        raise SensisearchError(f"--model {model_path}: no such file")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise SensisearchError(f"--model {model_path}: not an ONNX file ({type(exc).__name__})") from exc
    # Evaluation runs on onnxruntime-based backends here: a model it cannot load is one line, not a crash.
    check_loadable_ir(model, f"--model {model_path}")
    backend = make_backend(settings.backend_settings())
    out = settings.data.cache_dir or Path("runs") / "cache"
    with tempfile.TemporaryDirectory(prefix="sensisearch-eval-") as tmp:
        build = backend.build(model_path, Path(tmp))
        with backend.load(build.artifact) as runner:
            if len(runner.inputs) != 1:
                raise SensisearchError(f"--model {model_path}: {len(runner.inputs)} inputs; image evaluation needs one")
            evaluation = build_evaluation(settings, runner.inputs[0], model, out, need_calibration=False)
            if evaluation.task == "classification":
                from sensisearch.study.run._prepare import check_classifier_output

                check_classifier_output(model, f"--model {model_path}")
            result = evaluation.evaluator.evaluate(runner)
    return {
        "model": str(model_path),
        "task": evaluation.task,
        "metric": result.metric,
        **result.metrics,
        "metrics": result.metrics,
        "images": result.count,
        "per_class": result.per_class,
        "per_class_instances": result.per_class_instances,
        "timings": result.timings,
        "layers_run": dict(build.layer_precisions),
        "evaluation": evaluation.identity_parts()["evaluation"],
    }
