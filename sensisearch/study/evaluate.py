"""``sensisearch evaluate``: score one model file as the study would."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import onnx

from sensisearch.backends.factory import make_backend
from sensisearch.errors import SensisearchError
from sensisearch.examples import load_example
from sensisearch.study.settings import StudySettings
from sensisearch.study.tasks import build_evaluator


def evaluate_model(settings: StudySettings) -> dict[str, Any]:
    """Build ``settings.model`` on the backend and evaluate it; a JSON-ready dict.

    Works for an FP32 ONNX and for a trial's deployable ONNX alike (no
    quantizable-layer analysis is needed to evaluate).
    """
    if settings.example is not None:
        example = load_example(settings.example)
        settings = dataclasses.replace(
            settings,
            model=settings.model or example.model,
            eval_data=settings.eval_data or example.eval_data,
            calib_data=settings.calib_data or example.calib_data,
            mean=example.mean if settings.mean == [0.0] else settings.mean,
            std=example.std if settings.std == [1.0] else settings.std,
        )
    if settings.model is None:
        raise SensisearchError("evaluate needs --model FILE.onnx (or --example NAME)")
    model_path = Path(settings.model)
    if not model_path.is_file():
        raise SensisearchError(f"--model {model_path}: no such file")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise SensisearchError(f"--model {model_path}: not an ONNX file ({type(exc).__name__})") from exc
    backend = make_backend(settings)
    out = settings.cache_dir or Path("runs") / "cache"
    with tempfile.TemporaryDirectory(prefix="sensisearch-eval-") as tmp:
        build = backend.build(model_path, Path(tmp))
        with backend.load(build.artifact) as runner:
            if len(runner.inputs) != 1:
                raise SensisearchError(f"--model {model_path}: {len(runner.inputs)} inputs; image evaluation needs one")
            evaluator, task, _, _ = build_evaluator(settings, runner.inputs[0], model, out, need_calibration=False)
            result = evaluator.evaluate(runner)
    return {
        "model": str(model_path),
        "task": task,
        "metric": result.metric,
        **result.metrics,
        "metrics": result.metrics,
        "images": result.count,
        "per_class": result.per_class,
        "timings": result.timings,
        "layers_run": dict(build.layer_precisions),
    }
