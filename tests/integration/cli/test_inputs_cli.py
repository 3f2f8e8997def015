"""Issue 13 end to end through ``python -m sensisearch``: tensor files, dataset YAMLs,
preprocessing presets, the YOLOv8/YOLO11 layout and dynamic batches, on real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from sensisearch.evaluation.preprocess import Preprocess
from sensisearch.examples import load_example

# Helpers that build the real model variants live beside the evaluation-side tests.
from integration.evaluation.test_inputs import _dynamic_yolov5, _yolo_copy_of_coco_dev, _yolov8_layout_wrapper

# These tests are about inputs, not the search: plain TPE over every layer, no sensitivity probes
# (the default guided study would probe every layer of YOLOv5n first).
PLAIN_TPE = ["--sampler", "tpe", "--search", "full"]

REFERENCE_ALL = (35.63, 55.60)  # shared/data/README.md: YOLOv5n FP32 on the 170 coco-dev images, NMS IoU 0.6


def _cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "400"}  # rich wraps warnings at the terminal width
    result = subprocess.run(
        [sys.executable, "-m", "sensisearch", *args], capture_output=True, text=True, timeout=900, env=env
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def _evaluate(*args: str) -> dict:
    return json.loads(_cli("evaluate", *args, "--json").stdout)


def _one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _trials(out: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in (out / "trials").glob("*/trial.json")}


def _statistics_file(out: Path) -> dict[str, np.ndarray]:
    (path,) = (out / "cache").glob("stats-*.npz")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
        meta = json.loads(bytes(data["__meta__"]).decode())
    arrays["tensors"] = np.asarray(meta["tensors"])
    arrays["sample_counts"] = np.asarray(meta["sample_counts"])
    return arrays


# --------------------------------------------------------------------------- tensor files
@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_npy_and_keyed_npz_calibrate_like_the_image_source(tmp_path: Path) -> None:
    """The digits example calibrated from its uint8 images, from those images preprocessed into
    an .npy, and into an input-keyed .npz: the same statistics, thresholds and INT8 accuracy."""
    example = load_example("digits")
    with np.load(example.calib_data) as data:
        images = data["images"][:96]
    np.savez(tmp_path / "images.npz", images=images)
    # Preprocessed by hand, independently of the package: (pixel/255 - 0.5) / 0.5, NCHW float32.
    tensors = ((images.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None]
    assert tensors.dtype == np.float32
    np.testing.assert_allclose(tensors, Preprocess((0.5,), (0.5,)).apply(images[..., None]), atol=1e-6)
    tensors = Preprocess((0.5,), (0.5,)).apply(images[..., None])  # bit-identical floats for exact statistics
    np.save(tmp_path / "calib.npy", tensors)
    np.savez(tmp_path / "calib_keyed.npz", input=tensors)

    common = ["--example", "digits", "--budget", "2", "--precisions", "int8,fp32", "--sample-counts", "32,96",
              "--eval-limit", "300", "--latency-seconds", "0.05", "--algorithms", "minmax", *PLAIN_TPE]
    outs = {}
    for name in ("images.npz", "calib.npy", "calib_keyed.npz"):
        outs[name] = tmp_path / f"run-{name.replace('.', '_')}"
        _cli("run", *common, "--calib-data", str(tmp_path / name), "--out", str(outs[name]))
    reference = _statistics_file(outs["images.npz"])
    assert reference["sample_counts"].tolist() == [32, 96] and len(reference["tensors"]) > 5
    int8 = {}
    for name, out in outs.items():
        stats = _statistics_file(out)
        assert stats.keys() == reference.keys()
        for key in reference:
            np.testing.assert_array_equal(stats[key], reference[key], err_msg=f"{name}: {key}")
        trials = _trials(out)
        assert trials[1]["baseline"] == "int8" and trials[1]["status"] == "complete"
        int8[name] = trials[1]["evaluation"]["metrics"]
    assert int8["calib.npy"] == int8["calib_keyed.npz"] == int8["images.npz"]
    assert int8["images.npz"]["top1"] > 80


def test_tensor_file_errors_are_one_line(tmp_path: Path) -> None:
    good = np.zeros((8, 1, 32, 32), np.float32)
    np.save(tmp_path / "u8.npy", good.astype(np.uint8))
    np.save(tmp_path / "f64.npy", good.astype(np.float64))
    np.save(tmp_path / "shape.npy", np.zeros((8, 1, 28, 28), np.float32))
    np.savez(tmp_path / "wrongkey.npz", image=good)
    cases = [
        ("u8.npy", ("--calib-data", "u8.npy", "uint8", "float32")),
        ("f64.npy", ("--calib-data", "f64.npy", "float64", "float32")),
        ("shape.npy", ("--calib-data", "shape.npy", "[8, 1, 28, 28]", "[None, 1, 32, 32]")),
        ("wrongkey.npz", ("--calib-data", "wrongkey.npz", "arrays named after the model inputs", "'input'")),
        ("missing.npy", ("--calib-data", "missing.npy", "no such file")),
    ]
    for name, needles in cases:
        result = _cli("run", "--example", "digits", "--budget", "2", "--calib-data", str(tmp_path / name),
                      "--eval-limit", "50", "--out", str(tmp_path / "out"), ok=False)
        _one_line_error(result, *needles)


# --------------------------------------------------------------------------- preprocessing presets
def test_imagenet_preset_centre_crops_a_padded_classifier_folder(tmp_path: Path) -> None:
    """Digits padded from 32x32 to 36x36 in an ImageFolder: ``imagenet`` resizes the shorter side
    to floor(32 / 0.875) = 36 (no change) and centre-crops 32, i.e. recovers each original image,
    so it scores exactly what the unpadded .npz scores; ``raw`` stretches the border in instead."""
    example = load_example("digits")
    with np.load(example.eval_data) as data:
        images, labels = data["images"][:400], data["labels"][:400]
    folder = tmp_path / "padded"
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / str(label) / f"{i:04d}.png"), np.pad(image, 2, mode="edge"))
    np.savez(tmp_path / "eval.npz", images=images, labels=labels)
    model = ["--model", str(example.model), "--mean", "0.5", "--std", "0.5"]
    reference = _evaluate(*model, "--eval-data", str(tmp_path / "eval.npz"))
    assert set(labels.tolist()) == set(range(10)) and reference["images"] == 400
    cropped = _evaluate(*model, "--eval-data", str(folder), "--preprocess", "imagenet")
    assert cropped["top1"] == reference["top1"] and cropped["top5"] == reference["top5"]
    assert cropped["evaluation"]["preprocess"]["kind"] == "imagenet"
    assert cropped["evaluation"]["preprocess"]["mean"] == [0.5]  # --mean overrides the ImageNet mean
    # The same settings from a study file (TOML keys), and the raw stretch, which is a different input.
    study = tmp_path / "study.toml"
    study.write_text(f'model = "{example.model}"\neval_data = "{folder}"\nmean = [0.5]\nstd = [0.5]\npreprocess = "raw"\n')
    stretched = json.loads(_cli("evaluate", "--json", *_study_flags(study)).stdout)
    assert stretched["evaluation"]["preprocess"]["kind"] == "raw"
    assert stretched["evaluation"] != cropped["evaluation"]
    assert stretched["top1"] != reference["top1"] or stretched["top5"] != reference["top5"]


def _study_flags(study: Path) -> list[str]:
    """``evaluate`` has no study-file argument: the TOML's keys as flags, read by the same code."""
    from sensisearch.study.config._settings import read_study_file

    flags: list[str] = []
    for key, value in read_study_file(study).items():
        flags += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def test_input_flag_errors_are_one_line(tmp_path: Path) -> None:
    cases = [
        (["--preprocess", "letterbox"], ("--preprocess letterbox", "yolo, imagenet, raw")),
        (["--channel-order", "grb"], ("--channel-order grb", "rgb, bgr")),
        (["--layout", "chw"], ("--layout chw", "nchw, nhwc")),
        (["--letterbox", "v7"], ("--letterbox v7", "yolov5, ultralytics")),
    ]
    for flags, needles in cases:
        _one_line_error(_cli("evaluate", "--example", "digits", *flags, ok=False), *needles)
    study = tmp_path / "s.toml"
    study.write_text('example = "digits"\npreprocess = "centre"\n')
    _one_line_error(_cli("run", str(study), "--out", str(tmp_path / "o"), ok=False), "--preprocess centre", "'preprocess'")


# --------------------------------------------------------------------------- detectors
@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("letterbox-cache")


def test_yolov8_layout_wrapper_through_evaluate(yolo_model: Path, coco_dev: Path, tmp_path: Path, eval_cache: Path) -> None:
    wrapped = _yolov8_layout_wrapper(yolo_model, tmp_path / "yolov5n_v8layout.onnx")
    data = ["--eval-data", str(coco_dev / "images"), "--annotations", str(coco_dev / "instances.json"), "--cache-dir", str(eval_cache)]
    # The same NMS IoU and letterbox as the YOLOv5 reference: the layout is the only difference.
    result = _evaluate("--model", str(wrapped), *data, "--iou", "0.6", "--letterbox", "yolov5")
    assert result["images"] == 170 and result["task"] == "detection"
    assert result["evaluation"]["layout"] == "yolov8" and result["evaluation"]["iou"] == 0.6
    print(f"YOLOv8-layout wrapper: {result['mAP50-95']:.2f} / {result['mAP50']:.2f}")
    assert abs(result["mAP50-95"] - REFERENCE_ALL[0]) <= 0.05
    assert abs(result["mAP50"] - REFERENCE_ALL[1]) <= 0.05
    assert "person" in result["per_class"]  # class names from the export's metadata
    # Unset, --iou and the letterbox resolve to Ultralytics' validation defaults for this layout.
    default = _evaluate("--model", str(wrapped), *data, "--eval-limit", "4")
    assert default["evaluation"]["iou"] == 0.7
    assert default["evaluation"]["detection"]["letterbox"] == "ultralytics"
    assert default["evaluation"]["detection"]["max_det"] == 300 and default["evaluation"]["detection"]["conf_threshold"] == 0.001
    v5 = _evaluate("--model", str(yolo_model), *data, "--eval-limit", "4")
    assert v5["evaluation"]["layout"] == "yolov5" and v5["evaluation"]["iou"] == 0.6


def _subset_json(coco_dev: Path, out: Path, file_names: set[str]) -> Path:
    data = json.loads((coco_dev / "instances.json").read_text())
    ids = {im["id"] for im in data["images"] if im["file_name"] in file_names}
    data["images"] = [im for im in data["images"] if im["id"] in ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    out.write_text(json.dumps(data))
    return out


@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_dataset_yaml_evaluates_like_instances_json(yolo_model: Path, coco_dev: Path, tmp_path: Path, eval_cache: Path) -> None:
    """On coco-dev's val2017 half, whose instances.json boxes were converted from YOLO txt
    (shared/data/README.md), a dataset YAML of YOLO labels scores what the json scores."""
    root = tmp_path / "coco-dev-yolo"
    yaml_path, names = _yolo_copy_of_coco_dev(coco_dev, root, as_txt_list=False)
    data = json.loads((coco_dev / "instances.json").read_text())
    val = sorted(im["file_name"] for im in data["images"] if im["coco_split"] == "val2017")
    (root / "val2017.txt").write_text("".join(f"./images/val/{n}\n" for n in val))
    yaml_path.write_text(yaml_path.read_text().replace("val: images/val", "val: val2017.txt"))
    reference_json = _subset_json(coco_dev, tmp_path / "val2017.json", set(val))
    subset_images = tmp_path / "val2017-images"
    subset_images.mkdir()
    for name in val:
        (subset_images / name).symlink_to(coco_dev / "images" / name)
    cache = ["--cache-dir", str(eval_cache)]
    from_yaml = _evaluate("--model", str(yolo_model), "--eval-data", str(yaml_path), *cache)
    from_json = _evaluate("--model", str(yolo_model), "--eval-data", str(subset_images), "--annotations", str(reference_json), *cache)
    print(f"YAML {from_yaml['mAP50-95']:.2f}/{from_yaml['mAP50']:.2f}, json {from_json['mAP50-95']:.2f}/{from_json['mAP50']:.2f}")
    assert from_yaml["images"] == from_json["images"] == 85
    for key in ("mAP50-95", "mAP50"):
        assert abs(from_yaml[key] - from_json[key]) <= 0.05, key
    assert set(from_yaml["per_class"]) <= set(names) and from_yaml["per_class"]["person"] > 0

    # Malformed YAMLs: one line each, naming the file and what to fix.
    bad = [
        ("path: nowhere\nval: images/val\nnames: [a]\n", ("--eval-data", "bad.yaml", "'path'")),
        ("path: .\nval: images/missing\nnames: [a]\n", ("--eval-data", "bad.yaml", "'val' path", "does not exist")),
        ("path: .\nval: images/val\n", ("--eval-data", "bad.yaml", "no 'names'")),
    ]
    for text, needles in bad:
        (root / "bad.yaml").write_text(text)
        _one_line_error(_cli("evaluate", "--model", str(yolo_model), "--eval-data", str(root / "bad.yaml"), ok=False), *needles)
    _one_line_error(
        _cli("evaluate", "--model", str(yolo_model), "--eval-data", str(yaml_path), "--preprocess", "imagenet", ok=False),
        "--preprocess imagenet", "letterboxed",
    )


@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_dynamic_batch_detector_evaluate_and_run(yolo_model: Path, coco_dev: Path, tmp_path: Path, eval_cache: Path) -> None:
    dynamic = _dynamic_yolov5(yolo_model, tmp_path / "dyn.onnx")
    batch1_inside = _dynamic_yolov5(yolo_model, tmp_path / "dyn_reshape1.onnx", fix_reshapes=False)
    data = ["--eval-data", str(coco_dev / "images"), "--annotations", str(coco_dev / "instances.json"),
            "--eval-limit", "7", "--cache-dir", str(eval_cache)]
    static = _evaluate("--model", str(yolo_model), *data)
    batched = _evaluate("--model", str(dynamic), *data, "--batch-size", "3")
    assert static["images"] == batched["images"] == 7
    for key in ("mAP50-95", "mAP50"):
        assert abs(static[key] - batched[key]) <= 0.05, key  # batched convolutions may round differently
    # --batch-size reaches the evaluator: this export fails at that batch and falls back to one image at a time.
    result = _cli("evaluate", "--model", str(batch1_inside), *data, "--batch-size", "4", "--json")
    assert "fails at batch 4" in result.stderr and "one image at a time" in result.stderr
    assert json.loads(result.stdout)["mAP50-95"] == static["mAP50-95"]

    calib = tmp_path / "calib"
    calib.mkdir()
    for path in sorted((coco_dev / "images").glob("*.jpg"))[-6:]:
        (calib / path.name).symlink_to(path)
    out = tmp_path / "study"
    _cli("run", "--model", str(batch1_inside), *data, "--calib-data", str(calib), "--batch-size", "4", "--budget", "2",
         "--precisions", "int8,fp32", "--sample-counts", "6", "--latency-seconds", "0.05", "--out", str(out), *PLAIN_TPE)
    trials = _trials(out)
    assert [trials[k]["status"] for k in (0, 1)] == ["complete", "complete"]
    assert trials[0]["evaluation"]["value"] == pytest.approx(static["mAP50-95"], abs=1e-9)
    assert 0 < trials[1]["evaluation"]["value"] < static["mAP50-95"] + 5


# --------------------------------------------------------------------------- classifiers with a dynamic batch
def _batch7_inside(model_path: Path, out: Path) -> Path:
    """The digits CNN (dynamic batch) with a Reshape to batch 7 first: runs only at batch 7."""
    model = onnx.load(str(model_path))
    graph = model.graph
    name = graph.input[0].name
    for node in graph.node:
        node.input[:] = ["reshaped" if i == name else i for i in node.input]
    graph.initializer.append(numpy_helper.from_array(np.asarray([7, 1, 32, 32], np.int64), "batch7_shape"))
    graph.node.insert(0, helper.make_node("Reshape", [name, "batch7_shape"], ["reshaped"], name="batch7"))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_dynamic_batch_classifier_honours_batch_size(tmp_path: Path) -> None:
    example = load_example("digits")
    model = _batch7_inside(example.model, tmp_path / "digits_batch7.onnx")
    common = ["--example", "digits", "--eval-limit", "700"]
    reference = _evaluate(*common)
    batch7 = _evaluate(*common, "--model", str(model), "--batch-size", "7")  # 700 = 100 batches of 7
    assert (batch7["top1"], batch7["top5"], batch7["images"]) == (reference["top1"], reference["top5"], 700)
    failed = _cli("evaluate", *common, "--model", str(model), "--json", ok=False)  # the default batch, 64
    assert failed.returncode != 0
    # A dynamic-batch classifier through a study, evaluated at --batch-size 50.
    out = tmp_path / "study"
    _cli("run", "--example", "digits", "--eval-limit", "700", "--batch-size", "50", "--budget", "2", "--precisions", "int8,fp32",
         "--sample-counts", "64", "--latency-seconds", "0.05", "--out", str(out), *PLAIN_TPE)
    trials = _trials(out)
    assert trials[0]["evaluation"]["metrics"] == {"top1": reference["top1"], "top5": reference["top5"]}
    assert trials[1]["status"] == "complete"
