"""YOLOv5n all-INT8 COCO mAP with and without bias correction (TensorRT profile, scored by ONNX Runtime).

Calibrates on the 85 COCO train2017 images of ``shared/data/coco-dev`` (the
study's statistics pass and thresholds, :class:`~sensisearch.study.calibrate.CalibrationRanges`),
emits the all-INT8 deployable ONNX (TensorRT profile: symmetric int8 Q/DQ on every
quantizable layer's input, per-channel int8 weights, float bias), then computes the
bias shifts of :mod:`sensisearch.calibration.bias` on the first ``--bc-samples``
of those calibration images and folds them into the biases. Both deployables are
evaluated with ONNX Runtime on the 85 val2017 images, so calibration images are
never scored. Also printed: the per-channel output-mean error of the INT8 layers
against FP32 on the first ``--probe-images`` val2017 images, before and after.
Printed, never asserted.

    python benchmarks/bias_correction.py [--algorithms minmax,mse] [--bc-samples 64] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
from sensisearch.calibration import collect_statistics
from sensisearch.calibration.bias import (
    BIAS_CORRECTION_SAMPLES,
    apply_bias_shifts,
    bias_shifts,
)
from sensisearch.evaluation.detection import CocoDetectionEvaluator
from sensisearch.evaluation.tensor_store import TensorStore
from sensisearch.model.analysis import analyze_model
from sensisearch.quantize import (
    TENSORRT,
    Precision,
    TrialConfig,
    emit_deployable_onnx,
    plan_placement,
    save_model,
    statistics_tensors,
)
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice
from sensisearch.study.calibrate import CalibrationRanges

DATA = Path(os.environ.get("SENSISEARCH_SHARED_DATA", Path(__file__).resolve().parents[1] / "../shared/data"))


def _split(annotations: Path) -> dict[str, list[dict]]:
    images = json.loads(annotations.read_text())["images"]
    return {s: [im for im in images if im["coco_split"] == s] for s in ("train2017", "val2017")}


def _layer_outputs(model: onnx.ModelProto, tensors: list[str], batches: list[np.ndarray], threads: int | None) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) mean of each tensor over ``batches``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in have)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    for x in batches:
        for t, v in zip(tensors, session.run(tensors, {"images": x})):
            m = v.mean(axis=(0, 2, 3), dtype=np.float64)
            sums[t] = sums.get(t, 0.0) + m
    return {t: s / len(batches) for t, s in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="minmax,mse", help="comma-separated calibration algorithms")
    parser.add_argument("--bc-samples", type=int, default=BIAS_CORRECTION_SAMPLES, help="calibration images for the bias shifts")
    parser.add_argument("--probe-images", type=int, default=8, help="val2017 images for the output-mean error figures")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    algorithms = [CalibrationAlgorithm(a.strip()) for a in args.algorithms.split(",")]

    model_path = DATA / "yolov5n.onnx"
    coco = DATA / "coco-dev"
    split = _split(coco / "instances.json")
    info, model = analyze_model(model_path)
    tensors = statistics_tensors(model, info)
    calib_paths = [coco / "images" / im["file_name"] for im in split["train2017"]]
    val_paths = [coco / "images" / im["file_name"] for im in split["val2017"]]
    val_ids = [int(im["id"]) for im in split["val2017"]]

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        store = TensorStore.build(calib_paths, (640, 640), tmp_dir / "cache")
        batches = [store.batch([i]) for i in range(len(calib_paths))]
        probe_store = TensorStore.build(val_paths[: args.probe_images], (640, 640), tmp_dir / "probe")
        probe = [probe_store.batch([i]) for i in range(min(args.probe_images, len(val_paths)))]
        t0 = time.perf_counter()
        by_count = collect_statistics(model_path, tensors, ({"images": b} for b in batches), [len(batches)], intra_op_threads=args.threads or 0)
        samples = max(by_count)
        print(f"statistics of {len(tensors)} tensors over {samples} train2017 images: {time.perf_counter() - t0:.1f} s", flush=True)
        table = CalibrationRanges(by_count)

        evaluator = CocoDetectionEvaluator(
            coco / "images", coco / "instances.json", cache_dir=tmp_dir / "cache", input_spec=info.inputs[0], image_ids=val_ids
        )
        backend = OnnxRuntimeBackend(threads=args.threads)
        with backend.load(model_path) as runner:
            fp32 = evaluator.evaluate(runner).metrics
        layer_outputs = [l.output for l in info.layers]
        fp32_means = _layer_outputs(model, layer_outputs, probe, args.threads)

        def mean_error(deployable: onnx.ModelProto) -> float:
            """Median over INT8 layers of the RMS over channels of (deployed - FP32) output mean."""
            got = _layer_outputs(deployable, layer_outputs, probe, args.threads)
            return float(np.median([np.sqrt(np.mean((got[t] - fp32_means[t]) ** 2)) for t in layer_outputs]))

        rows = [("fp32", fp32, None)]
        config = TrialConfig.uniform(info.layer_names, Precision.INT8, CalibrationChoice(samples=samples))
        placement = plan_placement(info, model, config, TENSORRT)
        for algorithm in algorithms:
            ranges = table.ranges(placement.threshold_tensors, CalibrationChoice(algorithm, samples))
            deployable = emit_deployable_onnx(model, info, placement, ranges, TENSORRT)
            t0 = time.perf_counter()
            shifts = bias_shifts(deployable, model, info.layers, ({"images": b} for b in batches),
                                 max_samples=args.bc_samples, threads=args.threads or 0)
            seconds = time.perf_counter() - t0
            corrected = apply_bias_shifts(deployable, shifts, TENSORRT)
            print(f"{algorithm.value}: bias shifts of {len(shifts)} layers over {min(args.bc_samples, len(batches))} images "
                  f"in {seconds:.1f} s; median max|shift| {np.median([np.abs(s).max() for s in shifts.values()]):.4f}", flush=True)
            for label, m in ((algorithm.value, deployable), (f"{algorithm.value} + bias correction", corrected)):
                path = save_model(m, tmp_dir / "deployable.onnx")
                with backend.load(path) as runner:
                    metrics = evaluator.evaluate(runner).metrics
                rows.append((label, metrics, mean_error(m)))
                print(f"  {label}: mAP50-95 {metrics['mAP50-95']:.2f} (FP32 {fp32['mAP50-95']:.2f}), "
                      f"channel-mean err {rows[-1][2]:.4f}", flush=True)

    print(f"\nYOLOv5n all-INT8, TensorRT profile, ONNX Runtime CPU; calibrate {samples} train2017 "
          f"(bias shifts: first {min(args.bc_samples, samples)}), evaluate {len(val_ids)} val2017")
    print(f"{'calibration':<32} {'mAP50-95':>9} {'drop':>7} {'mAP50':>7} {'drop':>7} {'channel-mean err':>17}")
    for label, m, err in rows:
        drop = m["mAP50-95"] - fp32["mAP50-95"]
        drop50 = m["mAP50"] - fp32["mAP50"]
        e = "" if err is None else f"{err:.4f}"
        print(f"{label:<32} {m['mAP50-95']:9.2f} {drop:+7.2f} {m['mAP50']:7.2f} {drop50:+7.2f} {e:>17}")
    print(f"channel-mean err: median over the {len(info.layers)} layers of the RMS over channels of "
          f"(INT8 - FP32) per-channel output mean, whole network, {len(probe)} val2017 images")


if __name__ == "__main__":
    main()
