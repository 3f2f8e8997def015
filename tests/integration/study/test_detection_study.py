"""YOLOv5n end to end through the CLI: evaluate (FP32 and INT8) and a short detection study."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sensisearch.cli import main

# Whole studies in subprocesses (minutes): left out of the quick lowest-versions CI run.
pytestmark = pytest.mark.slow

EVAL_IMAGES = 40


def _evaluate_json(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "sensisearch", "evaluate", *args, "--json"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def yolo_study(yolo_model: Path, coco_dev: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("yolo")
    # Calibrate on images the evaluation does not use (the last ones of the json).
    images = json.loads((coco_dev / "instances.json").read_text())["images"]
    calib = out / "calib"
    calib.mkdir()
    for image in images[-16:]:
        (calib / image["file_name"]).symlink_to(coco_dev / "images" / image["file_name"])
    code = main([
        "run", "--model", str(yolo_model), "--eval-data", str(coco_dev / "images"), "--calib-data", str(calib),
        "--annotations", str(coco_dev / "instances.json"), "--budget", "1", "--out", str(out / "study"),
        "--eval-limit", str(EVAL_IMAGES), "--sample-counts", "16", "--latency-seconds", "0.1",
        "--algorithms", "minmax,percentile", "--max-class-drop", "50", "--verify-seconds", "5",
        "--sampler", "tpe", "--search", "full",  # the detector's scoring is the subject, not the search
    ])  # --budget counts searched configurations: 2 baselines + 1
    assert code == 0
    return out / "study"


def test_evaluate_fp32_matches_reference(yolo_model: Path, coco_dev: Path) -> None:
    """shared/data/README.md: all 170 images, mAP@[.5:.95] 0.3563 and mAP@.5 0.5560 (pycocotools, NMS IoU 0.6)."""
    result = _evaluate_json("--model", str(yolo_model), "--eval-data", str(coco_dev / "images"),
                            "--annotations", str(coco_dev / "instances.json"))
    assert result["images"] == 170
    assert result["mAP50-95"] == pytest.approx(35.63, abs=0.5)
    assert result["mAP50"] == pytest.approx(55.60, abs=0.5)
    # Classes without ground truth in these images have no AP (as pycocotools reports -1).
    assert 60 < len(result["per_class"]) <= 80 and result["per_class"]["person"] > 0


def test_detection_study_outputs_and_int8_drop(yolo_study: Path, yolo_model: Path, coco_dev: Path) -> None:
    trials = {int(p.parent.name): json.loads(p.read_text()) for p in (yolo_study / "trials").glob("*/trial.json")}
    assert len(trials) == 3
    fp32, int8 = trials[0], trials[1]
    assert fp32["baseline"] == "fp32" and int8["baseline"] == "int8"
    assert fp32["evaluation"]["metric"] == "mAP50-95"
    assert set(fp32["timings"]) >= {"build", "latency", "evaluate"}
    assert set(fp32["evaluation"]["timings"]) == {"preprocess", "inference", "nms", "cocoeval"}
    assert json.loads((yolo_study / "pareto.json").read_text())
    assert (yolo_study / "winner" / "config.json").is_file()
    report = (yolo_study / "report.md").read_text()
    assert "mAP50-95" in report
    # The all-INT8 deployable ONNX evaluates on its own, below FP32 on the same images.
    deployable = yolo_study / "trials" / "0001" / "deployable.onnx"
    common = ["--eval-data", str(coco_dev / "images"), "--annotations", str(coco_dev / "instances.json"), "--eval-limit", str(EVAL_IMAGES)]
    ref = _evaluate_json("--model", str(yolo_model), *common)
    quant = _evaluate_json("--model", str(deployable), *common)
    assert quant["mAP50-95"] == pytest.approx(int8["evaluation"]["value"], abs=1e-6)
    assert ref["mAP50-95"] == pytest.approx(fp32["evaluation"]["value"], abs=1e-6)
    assert 0 < quant["mAP50-95"] < ref["mAP50-95"]
    # The class guard ran: every complete trial records its worst class against FP32.
    assert "Classes that lost most" in report or trials[1]["status"] == "complete"


def test_detection_bad_inputs(tmp_path: Path, yolo_model: Path, coco_dev: Path, mnist_dir: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "empty").mkdir()
    cases = [
        (["--model", str(yolo_model), "--eval-data", str(coco_dev / "images"), "--annotations", str(tmp_path / "bad.json")], "bad.json"),
        (["--model", str(yolo_model), "--eval-data", str(tmp_path / "empty"), "--annotations", str(coco_dev / "instances.json")], "empty"),
        (["--model", str(mnist_dir / "mnist_cnn.onnx"), "--task", "detection", "--eval-data", str(coco_dev / "images"),
          "--annotations", str(coco_dev / "instances.json")], "detector"),
    ]
    for args, must in cases:
        result = subprocess.run([sys.executable, "-m", "sensisearch", "evaluate", *args], capture_output=True, text=True, timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert must in errors[0]
