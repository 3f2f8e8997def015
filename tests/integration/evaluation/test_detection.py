"""YOLOv5 ONNX detectors scored with COCO mAP, against the shared/data README's reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from sensisearch.backends.base import LatencySettings, LatencyStats, Runner
from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
from sensisearch.errors import SensisearchError
from sensisearch.evaluation.detection import (
    CocoDetectionEvaluator,
    DetectionPredictions,
    category_mapping,
    coco80_to_coco91,
    is_yolov5_detector,
    parse_class_names,
    read_onnx_class_names,
)
from sensisearch.evaluation.letterbox import preprocess_bgr, scale_boxes_to_input, scale_boxes_to_original
from sensisearch.evaluation.nms import batched_nms, nms
from sensisearch.evaluation.tensor_store import TensorStore
from sensisearch.model.tensor import TensorSpec
from sensisearch.study.run._evaluate import evaluate_model
from sensisearch.study.config._settings import StudySettings
from sensisearch.study.config._inputs import EvaluationSetup, build_evaluation, resolve_inputs

# shared/data/README.md: YOLOv5n FP32 on coco-dev, pycocotools, val.py v7.0 settings (NMS IoU 0.6).
REFERENCE = {  # subset: (mAP@[.5:.95], mAP@.5) in points
    "all": (35.63, 55.60),
    "val2017": (35.01, 55.13),
    "train2017": (37.78, 58.10),
}
TOLERANCE = 0.5  # points; the README numbers are rounded to 0.01 points


# --------------------------------------------------------------------------- fixtures
def _study_evaluation(
    model: Path, coco_dev: Path, cache: Path, *, need_calibration: bool = False, **flags: object
) -> EvaluationSetup:
    """The evaluator and calibration source exactly as `sensisearch run` builds them from its flags."""
    settings = StudySettings.from_flat(
        model=model, eval_data=coco_dev / "images", annotations=coco_dev / "instances.json", cache_dir=cache, **flags  # type: ignore[arg-type]
    )
    resolved = resolve_inputs(settings)
    return build_evaluation(resolved.settings, resolved.input_spec, resolved.model, cache, need_calibration)


def _split_ids(coco_dev: Path, split: str) -> list[int]:
    data = json.loads((coco_dev / "instances.json").read_text())
    return [im["id"] for im in data["images"] if im["coco_split"] == split]


# --------------------------------------------------------------------------- end-to-end mAP
def test_yolov5n_fp32_map_matches_reference(
    coco_evaluator: CocoDetectionEvaluator, yolo_fp32_predictions: DetectionPredictions
) -> None:
    result = coco_evaluator.score(yolo_fp32_predictions)
    ref_map, ref_map50 = REFERENCE["all"]
    print(f"mAP50-95 {result.metrics['mAP50-95']:.4f} (ref {ref_map}), mAP50 {result.metrics['mAP50']:.4f} (ref {ref_map50}), "
          f"{yolo_fp32_predictions.num_detections} detections, timings {result.timings}")
    assert result.metric == "mAP50-95"
    assert result.count == 170
    assert abs(result.metrics["mAP50-95"] - ref_map) <= TOLERANCE
    assert abs(result.metrics["mAP50"] - ref_map50) <= TOLERANCE
    # The pipeline reproduces val.py exactly here (37,353 detections, 0.3563 / 0.5560);
    # anything beyond README rounding means preprocessing or NMS drifted.
    assert abs(result.metrics["mAP50-95"] - ref_map) <= 0.01
    assert abs(result.metrics["mAP50"] - ref_map50) <= 0.01
    assert set(result.timings) >= {"preprocess", "inference", "nms", "cocoeval"}
    assert result.value == result.metrics["mAP50-95"]
    # Per-class AP by the model's class names, only for classes with ground truth.
    assert result.per_class is not None and "person" in result.per_class
    assert all(0.0 <= v <= 100.0 for v in result.per_class.values())
    assert 50 <= len(result.per_class) <= 80


@pytest.mark.parametrize("split", ["val2017", "train2017"])
def test_yolov5n_fp32_map_subsets(
    split: str, coco_dev: Path, coco_evaluator: CocoDetectionEvaluator, yolo_fp32_predictions: DetectionPredictions
) -> None:
    ids = _split_ids(coco_dev, split)
    assert len(ids) == 85
    result = coco_evaluator.score(yolo_fp32_predictions, ids)
    ref_map, ref_map50 = REFERENCE[split]
    assert result.count == 85
    assert abs(result.metrics["mAP50-95"] - ref_map) <= TOLERANCE
    assert abs(result.metrics["mAP50"] - ref_map50) <= TOLERANCE


def test_evaluate_subset_and_map50_metric(yolo_model: Path, coco_dev: Path, coco_cache: Path) -> None:
    ev = _study_evaluation(yolo_model, coco_dev, coco_cache, eval_limit=4, metric="mAP50").evaluator
    assert isinstance(ev, CocoDetectionEvaluator)
    assert len(ev.image_ids) == 4
    with OnnxRuntimeBackend().load(yolo_model) as runner:
        result = ev.evaluate(runner)
    assert result.metric == "mAP50" and result.value == result.metrics["mAP50"]
    assert result.count == 4
    assert 0.0 < result.metrics["mAP50-95"] <= result.metrics["mAP50"] <= 100.0
    feeds = ev.latency_feeds(3)
    (name, batch), = feeds.items()
    assert name == "images" and batch.shape == (3, 3, 640, 640) and batch.dtype == np.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0


class BatchLoopRunner(Runner):
    """Presents a batch-1 ONNX Runtime runner as a batch ``batch`` (None: dynamic) model.

    Each image of a batch goes through the real session; the outputs are stacked.
    It checks that the evaluator pads a static last batch and honours a chosen
    dynamic batch size without changing any detection.
    """

    def __init__(self, inner: Runner, batch: int | None) -> None:
        self.inner = inner
        self.batches: list[int] = []
        spec = inner.inputs[0]
        self._inputs = [TensorSpec(spec.name, (batch, *spec.shape[1:]), spec.dtype)]
        out = inner.outputs[0]
        self._outputs = [TensorSpec(out.name, (batch, *out.shape[1:]), out.dtype)]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    def run(self, feeds):  # type: ignore[no-untyped-def]
        (name, x), = feeds.items()
        if self._inputs[0].static_batch is not None:
            assert x.shape[0] == self._inputs[0].static_batch
        self.batches.append(x.shape[0])
        return [np.concatenate([self.inner.run({name: x[i : i + 1]})[0] for i in range(x.shape[0])])]

    def measure_latency(self, feeds, settings: LatencySettings) -> LatencyStats:  # type: ignore[no-untyped-def]
        return self.inner.measure_latency(feeds, settings)


def test_static_and_dynamic_batches_give_the_same_detections(yolo_model: Path, coco_dev: Path, coco_cache: Path) -> None:
    # The study's construction (input spec, class names from the export), with a batch of 2 for dynamic models.
    spec = resolve_inputs(StudySettings.from_flat(model=yolo_model)).input_spec
    ev = CocoDetectionEvaluator(
        coco_dev / "images", coco_dev / "instances.json", input_spec=spec, class_names=read_onnx_class_names(yolo_model),
        cache_dir=coco_cache, limit=5, batch_size=2,
    )
    with OnnxRuntimeBackend().load(yolo_model) as runner:
        single = ev.predict(runner)
        static3 = BatchLoopRunner(runner, 3)
        padded = ev.predict(static3)
        dynamic = BatchLoopRunner(runner, None)
        chosen = ev.predict(dynamic)
    assert static3.batches == [3, 3] and dynamic.batches == [2, 2, 1]
    for other in (padded, chosen):
        assert other.image_ids == single.image_ids
        for a, b in zip(single.detections, other.detections):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- NMS
def _reference_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """torchvision.ops.nms's CPU kernel, transcribed loop for loop (float32 arithmetic)."""
    boxes = boxes.astype(np.float32)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    suppressed = [False] * len(scores)
    keep = []
    for a, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[a + 1 :]:
            if suppressed[j]:
                continue
            w = max(np.float32(0), min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]))
            h = max(np.float32(0), min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]))
            inter = w * h
            if float(inter / (areas[i] + areas[j] - inter)) > thr:
                suppressed[j] = True
    return keep


def _random_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.uniform(0, 640, size=(max(1, n // 8), 2))  # clusters, so boxes overlap a lot
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 12, size=(n, 2))
    wh = rng.uniform(8, 120, size=(n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    scores[rng.integers(0, n, n // 10)] = np.float32(0.5)  # ties
    return boxes, scores


@pytest.mark.parametrize("seed", range(6))
def test_nms_matches_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    boxes, scores = _random_boxes(rng, 300)
    for thr in (0.3, 0.45, 0.6, 0.65):
        expected = _reference_nms(boxes, scores, thr)
        got = nms(boxes, scores, thr)
        assert got.tolist() == expected
        assert nms(boxes, scores, thr, max_keep=7).tolist() == expected[:7]


@pytest.mark.parametrize("seed", range(4))
def test_batched_nms_matches_offset_trick(seed: int) -> None:
    """Per-class NMS = class-agnostic NMS on boxes shifted by class * 7680 (in float32), as YOLOv5 does."""
    rng = np.random.default_rng(100 + seed)
    boxes, scores = _random_boxes(rng, 400)
    classes = rng.integers(0, 5, 400)
    offset = boxes + classes[:, None].astype(np.float32) * np.float32(7680)
    expected = _reference_nms(offset, scores, 0.6)
    assert batched_nms(boxes, scores, classes, 0.6).tolist() == expected
    assert batched_nms(boxes, scores, classes, 0.6, max_keep=25).tolist() == expected[:25]


def test_nms_edge_cases() -> None:
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []
    same = np.array([[0, 0, 10, 10]] * 3, dtype=np.float32)
    assert nms(same, np.array([0.1, 0.9, 0.5], np.float32), 0.5).tolist() == [1]
    # IoU exactly at the threshold is kept (suppress only when IoU > threshold).
    pair = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], dtype=np.float32)  # IoU = 0.5
    assert nms(pair, np.array([0.9, 0.8], np.float32), 0.5).tolist() == [0, 1]


# --------------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (500, 381), (612, 612), (240, 320), (1000, 200), (640, 640), (900, 1600)])
def test_letterbox_geometry_round_trip(hw: tuple[int, int]) -> None:
    h0, w0 = hw
    img = np.zeros((h0, w0, 3), dtype=np.uint8)
    box = np.array([[0.2 * w0, 0.3 * h0, 0.7 * w0, 0.9 * h0]])
    x1, y1, x2, y2 = box[0].round().astype(int)
    img[y1:y2, x1:x2] = (0, 0, 255)  # red in BGR
    chw, meta = preprocess_bgr(img, (640, 640))
    assert chw.shape == (3, 640, 640) and chw.dtype == np.uint8
    assert meta.orig_shape == (h0, w0)
    # The long side fills the input exactly; padding is 114 and centred.
    gain = meta.gain[0]
    assert max(round(h0 * gain), round(w0 * gain)) in (639, 640)
    dw, dh = meta.pad
    assert abs(dw - (640 - int(w0 * min(640 / h0, 640 / w0))) / 2) < 1e-9
    if dw >= 1:
        assert (chw[:, :, 0] == 114).all()
    if dh >= 1:
        assert (chw[:, 0, :] == 114).all()
    # The red box sits where the forward mapping says (channel 0 is R after BGR->RGB).
    mapped = scale_boxes_to_input(box, gain, meta.pad)[0]
    ys, xs = np.nonzero(chw[0] > 127)
    assert abs(xs.min() - mapped[0]) <= 1.5 and abs(xs.max() + 1 - mapped[2]) <= 1.5
    assert abs(ys.min() - mapped[1]) <= 1.5 and abs(ys.max() + 1 - mapped[3]) <= 1.5
    # And back: input px -> original px recovers the box.
    back = scale_boxes_to_original(mapped[None].astype(np.float32), gain, meta.pad, meta.orig_shape)
    np.testing.assert_allclose(back[0], box[0], atol=1e-2)


def test_scale_boxes_clips_to_image() -> None:
    boxes = np.array([[-20, -5, 700, 650]], dtype=np.float32)
    out = scale_boxes_to_original(boxes, 1.0, (0.0, 80.0), (480, 640))
    assert out.tolist() == [[0, 0, 640, 480]]


# --------------------------------------------------------------------------- tensor store / calibration
def test_tensor_store_built_once_and_keyed_by_files(coco_dev: Path, tmp_path: Path) -> None:
    src = sorted((coco_dev / "images").glob("*.jpg"))[:3]
    images = tmp_path / "imgs"
    images.mkdir()
    for p in src:
        (images / p.name).write_bytes(p.read_bytes())
    paths = sorted(images.iterdir())
    cache = tmp_path / "cache"
    first = TensorStore.build(paths, (320, 320), cache)
    assert first.location is not None and first.location.is_file()
    assert isinstance(first.images, np.memmap) or isinstance(first.images.base, np.memmap)
    again = TensorStore.build(paths, (320, 320), cache)
    assert again.location == first.location
    np.testing.assert_array_equal(again.images, first.images)
    in_memory = TensorStore.build(paths, (320, 320), None)
    np.testing.assert_array_equal(in_memory.images, first.images)
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    # A changed image (new mtime) gets a new store; another input size too.
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert TensorStore.build(paths, (320, 320), cache).location != first.location
    assert TensorStore.build(paths, (256, 320), cache).location != first.location
    # Batches are uint8 / 255 in float32.
    batch = first.batch([1, 2])
    assert batch.dtype == np.float32 and batch.shape == (2, 3, 320, 320)
    np.testing.assert_array_equal(batch, first.images[[1, 2]].astype(np.float32) / np.float32(255))


def test_study_calibration_source_serves_letterboxed_images_in_the_asked_order(
    yolo_model: Path, coco_dev: Path, tmp_path: Path
) -> None:
    """A detector study's calibration batches (--calib-data DIR) are the evaluation's letterbox, in the given order."""
    calib = tmp_path / "calib"
    calib.mkdir()
    paths = sorted((coco_dev / "images").glob("*.jpg"))[:5]
    for p in paths:
        (calib / p.name).write_bytes(p.read_bytes())
    setup = _study_evaluation(yolo_model, coco_dev, tmp_path / "cache", need_calibration=True, calib_data=calib, eval_limit=1)
    source = setup.calibration
    assert source is not None and source.size == 5 and source.input_name == "images"
    assert not setup.warnings  # separate calibration data: no eval-on-calib warning
    batches = list(source.batches([4, 2, 0, 1, 3], 2))
    assert [b.shape for b in batches] == [(2, 3, 640, 640), (2, 3, 640, 640), (1, 3, 640, 640)]
    for got, index in zip(np.concatenate(batches), [4, 2, 0, 1, 3]):
        chw, _ = preprocess_bgr(cv2.imread(str(paths[index])), (640, 640))
        np.testing.assert_array_equal(got, chw.astype(np.float32) / np.float32(255))
    # Without --calib-data the study calibrates on its evaluation images, and says so.
    fallback = _study_evaluation(yolo_model, coco_dev, tmp_path / "cache", need_calibration=True, calib_limit=3)
    assert fallback.calibration is not None and fallback.calibration.size == 3 and fallback.warnings


# --------------------------------------------------------------------------- model recognition and classes
def test_is_yolov5_detector_shapes() -> None:
    assert is_yolov5_detector([(1, 25200, 85)], (640, 640))
    assert is_yolov5_detector([(1, 25500, 85)], (640, 640))  # P6 model
    assert is_yolov5_detector([(1, 6300, 8)], (320, 320))  # 3 classes at 320
    assert is_yolov5_detector([(None, None, 85)])
    assert is_yolov5_detector((1, 25200, 85))
    assert not is_yolov5_detector([(1, 84, 8400)], (640, 640))  # YOLOv8 layout
    assert not is_yolov5_detector([(1, 25200, 85)], (320, 320))  # anchors do not fit the input
    assert not is_yolov5_detector([(1, 10)])
    assert not is_yolov5_detector([(1, 25200, 85)], (640, 640), num_classes=3)


def test_class_names_from_onnx_metadata(yolo_model: Path, coco_dev: Path) -> None:
    names = read_onnx_class_names(yolo_model)
    assert names is not None and len(names) == 80 and names[0] == "person" and names[-1] == "toothbrush"
    categories = json.loads((coco_dev / "instances.json").read_text())["categories"]
    assert category_mapping(categories, 80, names) == coco80_to_coco91()
    assert category_mapping(categories, 80, None) == coco80_to_coco91()
    assert parse_class_names("{0: 'a', 1: 'b'}") == ["a", "b"]
    assert parse_class_names("['a', 'b']") == ["a", "b"]
    assert parse_class_names("not python") is None


# --------------------------------------------------------------------------- bad inputs
def _assert_one_line(exc: pytest.ExceptionInfo[SensisearchError], *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_annotation_errors(coco_dev: Path, tmp_path: Path) -> None:
    images = coco_dev / "images"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SensisearchError) as exc:
        CocoDetectionEvaluator(images, bad)
    _assert_one_line(exc, "bad.json", "not valid JSON")
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(SensisearchError) as exc:
        CocoDetectionEvaluator(images, bad)
    _assert_one_line(exc, "bad.json", "'categories'")
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(SensisearchError) as exc:
        CocoDetectionEvaluator(images, bad)
    _assert_one_line(exc, "not COCO")
    with pytest.raises(SensisearchError) as exc:
        CocoDetectionEvaluator(images, tmp_path / "nope.json")
    _assert_one_line(exc, "nope.json", "does not exist")


def test_image_folder_errors(coco_dev: Path, tmp_path: Path) -> None:
    ann = coco_dev / "instances.json"
    with pytest.raises(SensisearchError) as exc:
        CocoDetectionEvaluator(tmp_path / "missing", ann)
    _assert_one_line(exc, "missing", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SensisearchError) as exc:
        CocoDetectionEvaluator(empty, ann)
    _assert_one_line(exc, "contains no images")
    partial = tmp_path / "partial"
    partial.mkdir()
    first = sorted((coco_dev / "images").glob("*.jpg"))[0]
    (partial / first.name).write_bytes(first.read_bytes())
    with pytest.raises(SensisearchError) as exc:
        CocoDetectionEvaluator(partial, ann)
    _assert_one_line(exc, "169 of 170 images", "missing from", ".jpg")

def test_empty_calibration_folder_errors(yolo_model: Path, coco_dev: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SensisearchError) as exc:
        _study_evaluation(yolo_model, coco_dev, tmp_path / "cache", need_calibration=True, calib_data=empty, eval_limit=1)
    _assert_one_line(exc, "contains no images")


def test_category_mismatch_errors(coco_dev: Path) -> None:
    images, ann = coco_dev / "images", coco_dev / "instances.json"
    names = ["person", "bicycle", "motorbike"] + [f"class{i}" for i in range(77)]
    with pytest.raises(SensisearchError) as exc:
        CocoDetectionEvaluator(images, ann, class_names=names, limit=2)
    _assert_one_line(exc, "78 of the model's 80 class names", "'motorbike'")
    categories = json.loads(ann.read_text())["categories"]
    with pytest.raises(SensisearchError) as exc:
        category_mapping(categories, 20)
    _assert_one_line(exc, "20 classes", "80 categories")
    with pytest.raises(SensisearchError) as exc:
        CocoDetectionEvaluator(images, ann, image_ids=[1, 2, 3])
    _assert_one_line(exc, "requested image ids")
    with pytest.raises(SensisearchError) as exc:
        CocoDetectionEvaluator(images, ann, metric="top1")
    _assert_one_line(exc, "mAP50-95")


def test_not_a_detector_errors(mnist_dir: Path, coco_dev: Path, tmp_path: Path) -> None:
    # `sensisearch evaluate --model mnist_cnn.onnx --annotations ...`: a classifier given COCO annotations.
    settings = StudySettings.from_flat(
        model=mnist_dir / "mnist_cnn.onnx", eval_data=coco_dev / "images", annotations=coco_dev / "instances.json",
        cache_dir=tmp_path,
    )
    with pytest.raises(SensisearchError) as exc:
        evaluate_model(settings)
    _assert_one_line(exc, "YOLOv5 detector takes [N, 3, H, W] images")
    # The same check at evaluation time, for a runner built elsewhere.
    ev = CocoDetectionEvaluator(coco_dev / "images", coco_dev / "instances.json", limit=1)
    with OnnxRuntimeBackend().load(mnist_dir / "mnist_cnn.onnx") as runner, pytest.raises(SensisearchError) as exc:
        ev.evaluate(runner)
    message = str(exc.value)
    assert "\n" not in message and ("YOLOv5" in message or "detector" in message)
