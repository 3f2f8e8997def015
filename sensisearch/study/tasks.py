"""From settings to model, evaluator and calibration data, per task."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from sensisearch.errors import SensisearchError
from sensisearch.evaluation.base import Evaluator
from sensisearch.evaluation.classification import ClassificationEvaluator
from sensisearch.evaluation.custom import FunctionEvaluator, load_function
from sensisearch.evaluation.datasets import ImageArray, Preprocess, load_images
from sensisearch.examples import load_example
from sensisearch.model.analysis import ModelInfo, analyze_model
from sensisearch.model.tensor import TensorSpec
from sensisearch.study.settings import StudySettings

log = logging.getLogger(__name__)

EVAL_ON_CALIB_WARNING = (
    "no --calib-data: calibrating on a deterministic sample of the evaluation data, which inflates the "
    "measured accuracy; pass separate calibration data for numbers you can trust"
)


@dataclass
class ResolvedInputs:
    settings: StudySettings
    model_path: Path
    model: onnx.ModelProto
    info: ModelInfo
    warnings: list[str] = field(default_factory=list)

    @property
    def input_spec(self) -> TensorSpec:
        if len(self.info.inputs) != 1:
            raise SensisearchError(
                f"{self.model_path}: the model has {len(self.info.inputs)} inputs; image tasks need exactly one "
                "(use --evaluator MODULE:FUNCTION for other models)"
            )
        return self.info.inputs[0]


@dataclass(frozen=True)
class EvaluationSetup:
    """How a study scores a model and where its calibration batches come from, resolved once."""

    evaluator: Evaluator
    task: str
    """"classification", "detection" or "custom"."""
    calibration: CalibrationSource | None
    """None when no precision needs calibration."""
    preprocess: Preprocess
    """The ``--mean``/``--std`` normalisation (detectors letterbox and scale by 1/255 instead)."""
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CalibrationSource:
    """Calibration inputs: ``size`` samples, served as preprocessed batches in a given order."""

    fingerprint: str
    size: int
    input_name: str
    batches: Callable[[Sequence[int], int], Iterator[np.ndarray]]
    static_batch: int | None = None


def with_example(settings: StudySettings) -> StudySettings:
    """``settings`` with an ``--example``'s files and preprocessing filled in where the user gave none.

    The one rule for ``run`` and ``evaluate``: each of model, calibration data,
    evaluation data, mean and std that is not given comes from the example.
    """
    if settings.example is None:
        return settings
    example = load_example(settings.example)
    defaults = {
        "model": example.model, "calib_data": example.calib_data, "eval_data": example.eval_data,
        "mean": example.mean, "std": example.std,
    }
    return dataclasses.replace(settings, **{k: v for k, v in defaults.items() if getattr(settings, k) is None})


def preprocessing(settings: StudySettings) -> Preprocess:
    """``(pixel/255 - mean) / std`` from the (example-filled) settings; identity where none is given."""
    return Preprocess(tuple(settings.mean or (0.0,)), tuple(settings.std or (1.0,)))


def resolve_inputs(settings: StudySettings) -> ResolvedInputs:
    """Fill in an example's files, then load and analyse the model."""
    settings = with_example(settings)
    assert settings.model is not None
    info, model = analyze_model(settings.model)
    return ResolvedInputs(settings, Path(settings.model), model, info)


def _array_source(data: ImageArray, preprocess: Preprocess, spec: TensorSpec) -> CalibrationSource:
    def batches(order: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
        return data.batches(preprocess, batch_size, order)

    key = f"{data.fingerprint}|{preprocess.to_dict()}"
    return CalibrationSource(key, len(data), spec.name, batches, spec.static_batch)


def build_evaluation(
    settings: StudySettings, spec: TensorSpec, model: onnx.ModelProto, out: Path, need_calibration: bool = True
) -> EvaluationSetup:
    """The evaluator for the task, and where calibration batches come from.

    ``settings`` are example-filled (:func:`with_example`). ``model`` is only
    read for metadata (e.g. a detector's class names).
    """
    warnings: list[str] = []
    preprocess = preprocessing(settings)
    if settings.evaluator is not None:
        fn = load_function(settings.evaluator, Path.cwd())
        calib = None
        feeds_source: ImageArray | None = None
        if settings.calib_data is not None:
            feeds_source = load_images(settings.calib_data, spec, "--calib-data")
            calib = _array_source(feeds_source, preprocess, spec)
        if feeds_source is None:
            raise SensisearchError("--evaluator needs --calib-data too: its images time the model and calibrate INT8")
        feeds = {spec.name: preprocess.apply(feeds_source.images[: settings.latency_batch])}
        return EvaluationSetup(FunctionEvaluator(fn, feeds, settings.metric or "score"), "custom", calib, preprocess, warnings)

    if settings.eval_data is None:
        raise SensisearchError("no evaluation data: pass --eval-data DIR (or --example digits)")
    if _is_detection(settings, model, spec):
        return _detection(settings, spec, out, need_calibration, preprocess)
    eval_data = load_images(settings.eval_data, spec, "--eval-data")
    if settings.eval_limit is not None:
        eval_data = dataclasses.replace(
            eval_data,
            images=eval_data.images[: settings.eval_limit],
            labels=None if eval_data.labels is None else eval_data.labels[: settings.eval_limit],
            fingerprint=f"{eval_data.fingerprint}|limit={settings.eval_limit}",
        )
    evaluator = ClassificationEvaluator(eval_data, preprocess, spec.name, settings.batch_size, settings.metric or "top1")
    if not need_calibration:
        return EvaluationSetup(evaluator, "classification", None, preprocess, warnings)
    if settings.calib_data is not None:
        calib_data = load_images(settings.calib_data, spec, "--calib-data")
    else:
        warnings.append(EVAL_ON_CALIB_WARNING)
        calib_data = eval_data
    if settings.calib_limit is not None:
        calib_data = dataclasses.replace(
            calib_data, images=calib_data.images[: settings.calib_limit],
            fingerprint=f"{calib_data.fingerprint}|limit={settings.calib_limit}",
        )
    return EvaluationSetup(evaluator, "classification", _array_source(calib_data, preprocess, spec), preprocess, warnings)


def _output_shapes(model: onnx.ModelProto) -> list[tuple[int | None, ...]]:
    shapes = []
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        shapes.append(tuple(d.dim_value if d.HasField("dim_value") else None for d in dims))
    return shapes


def _is_detection(settings: StudySettings, model: onnx.ModelProto, spec: TensorSpec) -> bool:
    # Detection pulls in OpenCV and pycocotools: imported only when a detector is in play.
    from sensisearch.evaluation.detection import is_yolov5_detector

    if settings.task == "detection":
        return True
    if settings.task == "classification":
        return False
    hw = (spec.shape[2], spec.shape[3]) if len(spec.shape) == 4 else None
    return settings.annotations is not None or is_yolov5_detector(_output_shapes(model), input_hw=hw)


def _detection(
    settings: StudySettings, spec: TensorSpec, out: Path, need_calibration: bool, preprocess: Preprocess
) -> EvaluationSetup:
    from sensisearch.evaluation.detection import (
        CocoDetectionEvaluator,
        DetectionSettings,
        list_images,
        read_onnx_class_names,
    )
    from sensisearch.evaluation.tensor_store import TensorStore, store_key

    warnings: list[str] = []
    if settings.annotations is None:
        raise SensisearchError("detector evaluation needs --annotations instances.json (COCO format) with --eval-data IMAGES_DIR")
    assert settings.model is not None and settings.eval_data is not None
    cache = settings.cache_dir or out / "cache"
    evaluator = CocoDetectionEvaluator(
        settings.eval_data, settings.annotations,
        settings=DetectionSettings(iou_threshold=settings.iou), cache_dir=cache, input_spec=spec,
        class_names=read_onnx_class_names(settings.model), metric=settings.metric or "mAP50-95",
        limit=settings.eval_limit,
    )
    if not need_calibration:
        return EvaluationSetup(evaluator, "detection", None, preprocess, warnings)
    if settings.calib_data is not None:
        paths = list_images(settings.calib_data)
    else:
        warnings.append(EVAL_ON_CALIB_WARNING)
        paths = list(evaluator.image_paths)
    if settings.calib_limit is not None:
        paths = paths[: settings.calib_limit]
    shape = (int(spec.shape[2] or 640), int(spec.shape[3] or 640))
    store = TensorStore.build(paths, shape, cache)

    def batches(order: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
        order = np.asarray(order)
        for start in range(0, len(order), batch_size):
            yield store.batch(order[start : start + batch_size])

    # The store's key already covers the image files and the letterbox settings.
    source = CalibrationSource(store_key(paths, shape), len(paths), spec.name, batches, spec.static_batch)
    return EvaluationSetup(evaluator, "detection", source, preprocess, warnings)
