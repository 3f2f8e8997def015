"""From settings to model, evaluator and calibration data, per task."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import onnx

from sensisearch.calibration.source import CalibrationSource
from sensisearch.errors import SensisearchError
from sensisearch.evaluation.base import Evaluator, ImageSubset, holdout_positions, images_requested
from sensisearch.evaluation.classification import ClassificationEvaluator
from sensisearch.evaluation.custom import FunctionEvaluator, load_function
from sensisearch.evaluation.datasets import ImageArray, Preprocess, load_images
from sensisearch.evaluation.tensors import ImageFeeds, TensorData, load_feed_source
from sensisearch.examples import load_example
from sensisearch.fileio import sha256_file
from sensisearch.model.analysis import ModelInfo, analyze_model
from sensisearch.model.tensor import TensorSpec
from sensisearch.study.config._settings import StudySettings

if TYPE_CHECKING:
    from sensisearch.evaluation.detection import DetectionSettings, YoloOutput

log = logging.getLogger(__name__)

CLASSIFIER_BATCH = 64
"""Evaluation batch of a dynamic-batch classifier when ``--batch-size`` is not given."""

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
    """The resolved ``--preprocess`` preset with ``--mean``/``--std``, ``--channel-order``, ``--layout``
    (detectors: the ``yolo`` letterbox their tensor store applies)."""
    warnings: list[str] = field(default_factory=list)
    eval_data: str = ""
    """Content fingerprint of the evaluation data, including any limit ("" for ``--evaluator``)."""
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    """Every evaluation setting that changes the metric: preprocessing, detector layout, NMS and letterbox."""
    holdout: Evaluator | None = None
    """The images ``--holdout`` keeps from the search (``evaluator`` then scores the others); None: off."""

    def identity_parts(self) -> dict[str, Any]:
        """The study-identity fields this setup decides, as plain JSON values.

        Keys are :class:`~sensisearch.study.run._identity.StudyIdentity`'s field names:
        ``eval_data``, ``calib_data`` (None without calibration), ``task``, ``metric``, ``evaluation``.
        """
        return json.loads(json.dumps({
            "eval_data": self.eval_data,
            "calib_data": None if self.calibration is None else self.calibration.fingerprint,
            "task": self.task,
            "metric": self.evaluator.metric,
            "evaluation": dict(self.evaluation),
        }, sort_keys=True))


def with_example(settings: StudySettings) -> StudySettings:
    """``settings`` with an ``--example``'s files and preprocessing filled in where the user gave none.

    The one rule for ``run`` and ``evaluate``: each of model, calibration data,
    evaluation data, mean and std that is not given comes from the example.
    """
    if settings.data.example is None:
        return settings
    example = load_example(settings.data.example)
    defaults = {
        "model": example.model, "calib_data": example.calib_data, "eval_data": example.eval_data,
        "mean": example.mean, "std": example.std,
    }
    return settings.replace(**{k: v for k, v in defaults.items() if settings.get(k) is None})


def preprocessing(settings: StudySettings) -> Preprocess:
    """The ``--preprocess`` preset (``raw`` when not given) with the (example-filled) settings'
    mean/std, channel order and layout; the preset's own mean/std where none is given."""
    overrides: dict[str, Any] = {"channel_order": settings.data.channel_order, "layout": settings.data.layout}
    if settings.data.mean is not None:
        overrides["mean"] = tuple(settings.data.mean)
    if settings.data.std is not None:
        overrides["std"] = tuple(settings.data.std)
    return Preprocess.preset(settings.data.preprocess or "raw", **overrides)  # type: ignore[arg-type]


def resolve_inputs(settings: StudySettings) -> ResolvedInputs:
    """Fill in an example's files, then load and analyse the model."""
    settings = with_example(settings)
    assert settings.data.model is not None
    info, model = analyze_model(settings.data.model)
    return ResolvedInputs(settings, Path(settings.data.model), model, info)


def _array_source(data: ImageArray, preprocess: Preprocess, spec: TensorSpec) -> CalibrationSource:
    def batches(order: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
        return data.batches(preprocess, batch_size, order)

    key = f"{data.fingerprint}|{preprocess.to_dict()}"
    return CalibrationSource(key, len(data), spec.name, batches, spec.static_batch)


def _tensor_source(data: TensorData, spec: TensorSpec, static_batch: int | None) -> CalibrationSource:
    """Calibration batches straight from an ``.npy`` / input-keyed ``.npz`` (already preprocessed)."""

    def batches(order: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
        for feeds in data.feeds(order, batch_size):
            yield feeds[spec.name]

    return CalibrationSource(f"tensors:{data.fingerprint}", len(data), spec.name, batches, static_batch)


def _limited(source: ImageArray | TensorData, limit: int | None) -> ImageArray | TensorData:
    """The first ``limit`` samples (``--calib-limit``), with the limit in the fingerprint."""
    if limit is None:
        return source
    if isinstance(source, TensorData):
        arrays = {name: array[:limit] for name, array in source.arrays.items()}
        return TensorData(arrays, source.source, f"{source.fingerprint}|limit={limit}")
    return dataclasses.replace(source, images=source.images[:limit], fingerprint=f"{source.fingerprint}|limit={limit}")


def _calibration_data(settings: StudySettings, spec: TensorSpec, preprocess: Preprocess) -> ImageArray | TensorData:
    """``--calib-data`` in any supported format: tensor files as they are, images decoded for ``spec``."""
    assert settings.data.calib_data is not None
    source = load_feed_source(settings.data.calib_data, [spec], "--calib-data", preprocess)
    return source.data if isinstance(source, ImageFeeds) else source


def calibration_source(
    settings: StudySettings, model: onnx.ModelProto, spec: TensorSpec, data: ImageArray | TensorData | None = None,
    preprocess: Preprocess | None = None,
) -> CalibrationSource:
    """The calibration batches for these (example-filled) settings: ``data`` or ``--calib-data``, up to ``--calib-limit``.

    ``preprocess`` defaults to the study's own: YOLO letterboxing for a detector, else the settings' preprocessing.
    """
    if preprocess is None:
        preprocess = Preprocess.preset("yolo") if _detector_output(settings, model, spec) is not None else preprocessing(settings)
    data = _limited(data if data is not None else _calibration_data(settings, spec, preprocess), settings.data.calib_limit)
    return _tensor_source(data, spec, spec.static_batch) if isinstance(data, TensorData) else _array_source(data, preprocess, spec)


def build_evaluation(
    settings: StudySettings, spec: TensorSpec, model: onnx.ModelProto, out: Path, need_calibration: bool = True
) -> EvaluationSetup:
    """The evaluator for the task, and where calibration batches come from.

    ``settings`` are example-filled (:func:`with_example`). ``model`` is only
    read for metadata (e.g. a detector's class names).
    """
    warnings: list[str] = []
    if settings.data.evaluator is not None:
        preprocess = preprocessing(settings)
        fn = load_function(settings.data.evaluator, Path.cwd())
        if settings.data.calib_data is None:
            raise SensisearchError("--evaluator needs --calib-data too: its images time the model and calibrate INT8")
        calib_data = _limited(_calibration_data(settings, spec, preprocess), settings.data.calib_limit)
        if isinstance(calib_data, TensorData):
            calib = _tensor_source(calib_data, spec, spec.static_batch)
            first = calib_data.arrays[spec.name][: settings.backend.latency_batch]
        else:
            calib = _array_source(calib_data, preprocess, spec)
            first = preprocess.apply(calib_data.images[: settings.backend.latency_batch], calib_data.layout)
        feeds = {spec.name: np.ascontiguousarray(first)}
        evaluation = {"evaluator": settings.data.evaluator, "preprocess": preprocess.to_dict()}
        return EvaluationSetup(
            FunctionEvaluator(fn, feeds, settings.data.metric or "score"), "custom", calib, preprocess, warnings,
            evaluation=evaluation,
        )

    if settings.data.eval_data is None:
        raise SensisearchError("no evaluation data: pass --eval-data DIR (or --example digits)")
    detector = _detector_output(settings, model, spec)
    if detector is not None:
        return _detection(settings, spec, model, detector, out, need_calibration)
    preprocess = preprocessing(settings)
    eval_data = load_images(settings.data.eval_data, spec, "--eval-data", preprocess)
    if settings.data.eval_limit is not None:
        eval_data = dataclasses.replace(
            eval_data,
            images=eval_data.images[: settings.data.eval_limit],
            labels=None if eval_data.labels is None else eval_data.labels[: settings.data.eval_limit],
            fingerprint=f"{eval_data.fingerprint}|limit={settings.data.eval_limit}",
        )
    evaluator = ClassificationEvaluator(
        eval_data, preprocess, spec.name, settings.data.batch_size or CLASSIFIER_BATCH, settings.data.metric or "top1"
    )
    identity = {"eval_data": eval_data.fingerprint, "evaluation": {"preprocess": preprocess.to_dict()}}
    if not need_calibration:
        return EvaluationSetup(evaluator, "classification", None, preprocess, warnings, **identity)
    if settings.data.calib_data is None:
        warnings.append(EVAL_ON_CALIB_WARNING)
    calib = calibration_source(settings, model, spec, None if settings.data.calib_data is not None else eval_data, preprocess)
    return EvaluationSetup(evaluator, "classification", calib, preprocess, warnings, **identity)


def _output_shapes(model: onnx.ModelProto) -> list[tuple[int | None, ...]]:
    shapes = []
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        shapes.append(tuple(d.dim_value if d.HasField("dim_value") else None for d in dims))
    return shapes


def _is_yaml(path: Path | None) -> bool:
    return path is not None and path.suffix.lower() in (".yaml", ".yml")


def _detector_output(settings: StudySettings, model: onnx.ModelProto, spec: TensorSpec) -> YoloOutput | None:
    """The model's YOLO detection output when the study evaluates a detector, else None (a classifier)."""
    # Detection pulls in OpenCV and pycocotools: imported only when a detector is in play.
    from sensisearch.evaluation.detection import YoloOutput, yolo_output

    if settings.data.task == "classification":
        return None
    hw = (spec.shape[2], spec.shape[3]) if len(spec.shape) == 4 else None
    output = yolo_output(_output_shapes(model), input_hw=hw)
    if output is not None:
        return output
    if settings.data.task == "detection" or settings.data.annotations is not None or _is_yaml(settings.data.eval_data):
        # Told it is a detector, but no output has a YOLO layout: the evaluator says so per runner.
        return YoloOutput(0, "yolov5")
    return None


def _detection_settings(settings: StudySettings, layout: str) -> DetectionSettings:
    from sensisearch.evaluation.detection import DetectionSettings

    # An --iou / --letterbox the user did not give falls back to the layout's own validation default.
    return DetectionSettings.for_layout(layout, iou_threshold=settings.data.iou, letterbox=settings.data.letterbox)


def _check_detector_preprocessing(settings: StudySettings) -> None:
    """Detectors take letterboxed RGB NCHW in 0..1 (their tensor store); anything else is refused."""
    given = {
        "--preprocess": settings.data.preprocess not in (None, "yolo") and settings.data.preprocess,
        "--channel-order": settings.data.channel_order != "rgb" and settings.data.channel_order,
        "--layout": settings.data.layout not in (None, "nchw") and settings.data.layout,
        "--mean": settings.data.mean is not None and ",".join(map(str, settings.data.mean)),
        "--std": settings.data.std is not None and ",".join(map(str, settings.data.std)),
    }
    for flag, value in given.items():
        if value:
            raise SensisearchError(
                f"{flag} {value}: YOLO detectors take letterboxed RGB NCHW pixels/255 (--preprocess yolo); "
                "drop the flag, or pass --task classification for a classifier"
            )


def _detection_fingerprint(image_paths: Sequence[Path], image_ids: Sequence[int], annotation_files: Sequence[Path]) -> str:
    """Images (path, size, mtime), the evaluated ids and the ground-truth files' contents."""
    from sensisearch.evaluation.tensor_store import store_key

    # store_key is the one stat-based digest of image files; the letterbox is in the evaluation settings.
    digest = hashlib.sha256(store_key(image_paths, (0, 0)).encode())
    digest.update(json.dumps([int(i) for i in image_ids]).encode())
    for path in annotation_files:
        digest.update(f"|{path.name}:{sha256_file(path) if path.is_file() else 'absent'}".encode())
    return digest.hexdigest()


def _detection(
    settings: StudySettings, spec: TensorSpec, model: onnx.ModelProto, output: YoloOutput, out: Path,
    need_calibration: bool,
) -> EvaluationSetup:
    from sensisearch.evaluation.detection import CocoDetectionEvaluator, list_images, read_onnx_class_names
    from sensisearch.evaluation.tensor_store import TensorStore, store_key
    from sensisearch.evaluation.yolo_dataset import label_path_for, load_yolo_dataset

    _check_detector_preprocessing(settings)
    warnings: list[str] = []
    assert settings.data.model is not None and settings.data.eval_data is not None
    detection = _detection_settings(settings, output.layout)
    preprocess = Preprocess.preset("yolo", pad_value=detection.pad_value)
    cache = settings.data.cache_dir or out / "cache"
    common: dict[str, Any] = dict(
        settings=detection, cache_dir=cache, input_spec=spec, metric=settings.data.metric or "mAP50-95",
        limit=settings.data.eval_limit, batch_size=settings.data.batch_size,
    )
    if _is_yaml(settings.data.eval_data):
        if settings.data.annotations is not None:
            raise SensisearchError(
                f"--annotations {settings.data.annotations}: a dataset YAML brings its own labels (labels/*.txt); drop --annotations"
            )
        # Class names: the YAML's (category id = class index + 1, Ultralytics' convention).
        evaluator = CocoDetectionEvaluator.from_yolo_dataset(settings.data.eval_data, "val", "--eval-data", **common)
        labels = [label_path_for(p) for p in evaluator.image_paths]
        ground_truth = [settings.data.eval_data, *labels]
    else:
        if settings.data.annotations is None:
            raise SensisearchError(
                "detector evaluation needs ground truth: --eval-data IMAGES_DIR with --annotations instances.json (COCO), "
                "or --eval-data DATASET.yaml (Ultralytics)"
            )
        evaluator = CocoDetectionEvaluator(
            settings.data.eval_data, settings.data.annotations, class_names=read_onnx_class_names(settings.data.model), **common
        )
        ground_truth = [settings.data.annotations]
    evaluation = {
        "preprocess": preprocess.to_dict(),
        "layout": output.layout,
        "iou": detection.iou_threshold,
        "detection": detection.to_dict(),
    }
    identity = {
        "eval_data": _detection_fingerprint(evaluator.image_paths, evaluator.image_ids, ground_truth),
        "evaluation": evaluation,
    }
    if not need_calibration:
        return EvaluationSetup(evaluator, "detection", None, preprocess, warnings, **identity)
    # A dynamic batch calibrates one image at a time: at 640x640 a batch of 32 needs gigabytes of
    # activations, and exports such as YOLOv5 v7.0's hard-code batch 1 in their Reshapes.
    calib_batch = spec.static_batch or 1
    calib_path = settings.data.calib_data
    if calib_path is not None and calib_path.is_file() and calib_path.suffix in (".npy", ".npz"):
        data = _limited(load_feed_source(calib_path, [spec], "--calib-data"), settings.data.calib_limit)
        if not isinstance(data, TensorData):
            raise SensisearchError(
                f"--calib-data {calib_path}: a detector calibrates on an image folder, a dataset YAML, "
                "or preprocessed float tensors (.npy / input-keyed .npz), not an .npz of uint8 images"
            )
        return EvaluationSetup(evaluator, "detection", _tensor_source(data, spec, calib_batch), preprocess, warnings, **identity)
    if calib_path is None:
        warnings.append(EVAL_ON_CALIB_WARNING)
        paths = list(evaluator.image_paths)
    elif _is_yaml(calib_path):
        paths = list(load_yolo_dataset(calib_path, "val", "--calib-data").image_paths)
    else:
        paths = list_images(calib_path)
    if settings.data.calib_limit is not None:
        paths = paths[: settings.data.calib_limit]
    shape = evaluator.input_shape
    store = TensorStore.build(paths, shape, cache, detection.pad_value, detection.letterbox)

    def batches(order: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
        order = np.asarray(order)
        for start in range(0, len(order), batch_size):
            yield store.batch(order[start : start + batch_size])

    # The store's key already covers the image files and the letterbox settings.
    key = store_key(paths, shape, detection.pad_value, detection.letterbox)
    source = CalibrationSource(key, len(paths), spec.name, batches, calib_batch)
    return EvaluationSetup(evaluator, "detection", source, preprocess, warnings, **identity)


def hold_out(evaluation: EvaluationSetup, requested: float | None, seed: int) -> EvaluationSetup:
    """``evaluation`` with ``--holdout`` applied: its evaluator sees the search images only and
    :attr:`EvaluationSetup.holdout` the others; unchanged when ``requested`` is None or 0.

    The split (its size and seed) is part of the evaluation's identity: a study resumed with
    another split would mix trials scored on other images.
    """
    if not requested:
        return evaluation
    total = evaluation.evaluator.image_count()
    if total is None:
        raise SensisearchError(
            f"--holdout {requested:g}: this evaluator scores only all images at once (a user's --evaluator); leave --holdout out"
        )
    size = images_requested(requested, total)
    if not 2 <= size <= total - 2:
        raise SensisearchError(
            f"--holdout {requested:g}: would hold out {size} of the {total} evaluation images; leave at least 2 on each side "
            "(a count such as 50 or a fraction such as 0.3; 0 turns it off)"
        )
    search, held = holdout_positions(total, size, seed)
    return dataclasses.replace(
        evaluation,
        evaluator=ImageSubset(evaluation.evaluator, search, "search"),
        holdout=ImageSubset(evaluation.evaluator, held, "holdout"),
        evaluation={**evaluation.evaluation, "holdout": {"images": size, "of": total, "seed": seed}},
    )
