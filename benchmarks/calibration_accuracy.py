"""All-INT8 YOLOv5n accuracy per calibration algorithm (TensorRT profile, scored by ONNX Runtime).

Calibrates on the 85 COCO train2017 images of ``shared/data/coco-dev`` and
evaluates the deployable ONNX (TensorRT profile: symmetric Q/DQ on every
quantizable layer's inputs) with ONNX Runtime on the 85 val2017 images, so the
calibration images are never scored. Printed, never asserted.

Rows:
* ``minmax``, ``percentile 99.99``, ``mse``, ``entropy``: the study's path
  (one pass, 2048-bin |x| histograms whose width doubles, thresholds from
  :class:`~sensisearch.calibration.ThresholdTable`).
* ``entropy, exact [0,max] histogram``: the same KL search on 2048 bins laid
  exactly over [0, max|x|] (TensorRT's published histogram; needs a second pass
  once max|x| is known) -- shows what the doubling histogram's coarser
  occupancy (1024-2048 bins used) changes.
* ``entropy, pytorch-quantization edge i*w``: amax = lower edge of the first
  clipped bin instead of TensorRT's ``(i + 0.5) * w``.
* ``ORT EntropyCalibrater (defaults)`` with ``--ort``: ONNX Runtime's own
  entropy thresholds (signed histogram, 128 bins, 128 quantized bins) made
  symmetric, placed by the same TensorRT profile.

    python benchmarks/calibration_accuracy.py [--ort] [--threads N]
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
from sensisearch.calibration import (
    TensorStatistics,
    collect_statistics,
    entropy_amax,
    needs_clipping,
    percentile_amax,
    update_statistics,
)
from sensisearch.calibration.thresholds import CLIPPING_ERROR_RATIO
from sensisearch.evaluation.detection import CocoDetectionEvaluator
from sensisearch.evaluation.tensor_store import TensorStore
from sensisearch.model.analysis import analyze_model
from sensisearch.quantize import (
    TENSORRT, Precision, TensorRange, TrialConfig, emit_deployable_onnx, plan_placement, save_model, statistics_tensors,
)
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice
from sensisearch.calibration.ranges import CalibrationRanges

DATA = Path(os.environ.get("SENSISEARCH_SHARED_DATA", Path(__file__).resolve().parents[1] / "../shared/data"))


def _split(annotations: Path) -> dict[str, list[dict]]:
    images = json.loads(annotations.read_text())["images"]
    return {s: [im for im in images if im["coco_split"] == s] for s in ("train2017", "val2017")}


def _symmetric_ranges(amaxes: dict[str, float], statistics: dict[str, TensorStatistics]) -> dict[str, TensorRange]:
    """TensorRanges as CalibrationRanges builds them, for amaxes computed here."""
    out = {}
    for name, amax in amaxes.items():
        amax = max(float(amax), 1e-12)
        lowest = statistics[name].min
        out[name] = TensorRange(amax=amax, nonnegative=lowest >= 0.0, min=min(0.0, max(lowest, -amax)))
    return out


def exact_histograms(model_path: Path, tensors: list[str], batches: list[np.ndarray], statistics: dict[str, TensorStatistics],
                     ort_collector=None) -> dict[str, TensorStatistics]:  # noqa: ANN001
    """Second pass: 2048 bins laid exactly over [0, max|x|] (max|x| known from the first pass).

    A one-value seed batch at max|x| fixes the bin width to max/2048, so no
    later batch doubles it; the seed is then removed from the counts.
    """
    probe = onnx.load(str(model_path))
    graph_inputs = {i.name for i in probe.graph.input}
    fetch = [t for t in tensors if t not in graph_inputs]
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in fetch)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    running = {t: update_statistics(None, np.array([statistics[t].amax], np.float32)) for t in tensors}
    seed_bin = {t: int(np.flatnonzero(running[t].counts)[0]) for t in tensors}
    input_name = session.get_inputs()[0].name
    for x in batches:
        values = dict(zip(fetch, session.run(fetch, {input_name: x})))
        values.update({t: x for t in tensors if t in graph_inputs})
        for t in tensors:
            running[t] = update_statistics(running[t], values[t])
        if ort_collector is not None:  # only called without --quick
            ort_collector.collect({t: values[t] for t in tensors})
    out = {}
    for t, s in running.items():
        counts = s.counts.copy()
        counts[seed_bin[t]] -= 1
        out[t] = TensorStatistics(statistics[t].min, statistics[t].max, counts, s.bin_width, s.nonfinite)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ort", action="store_true", help="also score ONNX Runtime's own EntropyCalibrater thresholds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="only the study's algorithms and mixed (no second pass, no entropy variants)")
    args = parser.parse_args()

    model_path = DATA / "yolov5n.onnx"
    coco = DATA / "coco-dev"
    split = _split(coco / "instances.json")
    info, model = analyze_model(model_path)
    tensors = statistics_tensors(model, info)
    calib_paths = [coco / "images" / im["file_name"] for im in split["train2017"]]
    val_ids = [int(im["id"]) for im in split["val2017"]]

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        store = TensorStore.build(calib_paths, (640, 640), tmp_dir / "cache")
        batches = [store.batch([i]) for i in range(len(calib_paths))]
        t0 = time.perf_counter()
        by_count = collect_statistics(model_path, tensors, ({"images": b} for b in batches), [len(batches)])
        samples = max(by_count)
        statistics = by_count[samples]
        print(f"statistics of {len(tensors)} tensors over {samples} train2017 images: {time.perf_counter() - t0:.1f} s")

        ort_collector = None
        if args.ort:
            from onnxruntime.quantization.calibrate import HistogramCollector

            # EntropyCalibrater's defaults (create_calibrator): num_bins=128, num_quantized_bins=128.
            ort_collector = HistogramCollector("entropy", True, 128, 128, None, None)
        if not args.quick:
            t0 = time.perf_counter()
            exact = exact_histograms(model_path, tensors, batches, statistics, ort_collector)
            print(f"second pass (exact [0, max] histograms{', ORT collector' if args.ort else ''}): {time.perf_counter() - t0:.1f} s")
        used = np.array([int(np.flatnonzero(s.counts).max()) + 1 for s in statistics.values() if s.total])
        print(f"bins used by the data in the study's histograms: median {int(np.median(used))}, min {used.min()} of 2048")

        table = CalibrationRanges(by_count)
        variants: dict[str, dict[str, TensorRange]] = {}
        for label, choice in (
            ("minmax", CalibrationChoice(CalibrationAlgorithm.MINMAX, samples)),
            ("percentile 99.99", CalibrationChoice(CalibrationAlgorithm.PERCENTILE, samples, 99.99)),
            ("mse", CalibrationChoice(CalibrationAlgorithm.MSE, samples)),
            ("entropy", CalibrationChoice(CalibrationAlgorithm.ENTROPY, samples)),
        ):
            variants[label] = table.ranges(tensors, choice)
        # "mixed" (the study's rule, CLIPPING_ERROR_RATIO) and the same rule at other
        # error ratios, to show where the rule's margin comes from.
        variants["mixed 99.99"] = table.ranges(tensors, CalibrationChoice(CalibrationAlgorithm.MIXED, samples, 99.99))
        for error_ratio in (0.25, 0.9):
            amax = {}
            for t, st in statistics.items():
                clipped = percentile_amax(st.counts, st.bin_width, 99.99, observed_max=st.amax)
                amax[t] = clipped if needs_clipping(st.counts, st.bin_width, clipped, st.amax, error_ratio) else st.amax
            variants[f"mixed 99.99, error ratio {error_ratio}"] = _symmetric_ranges(amax, statistics)
        clipped_count = sum(
            needs_clipping(st.counts, st.bin_width, percentile_amax(st.counts, st.bin_width, 99.99, observed_max=st.amax), st.amax)
            for st in statistics.values()
        )
        print(f"mixed 99.99: {clipped_count} of {len(statistics)} tensors need clipping (error ratio {CLIPPING_ERROR_RATIO})")
        if not args.quick:
            variants["entropy, exact [0,max] histogram"] = CalibrationRanges({samples: exact}).ranges(
                tensors, CalibrationChoice(CalibrationAlgorithm.ENTROPY, samples)
            )
            edge = {t: max(entropy_amax(s.counts, s.bin_width, observed_max=s.amax) - 0.5 * s.bin_width, 0.0) for t, s in statistics.items()}
            variants["entropy, pytorch-quantization edge i*w"] = _symmetric_ranges(edge, statistics)
        if ort_collector is not None:  # only called without --quick
            thresholds = ort_collector.compute_collection_result()
            ort_amax = {t: max(abs(float(v[0])), abs(float(v[1]))) for t, v in thresholds.items()}
            variants["ORT EntropyCalibrater (defaults)"] = _symmetric_ranges(ort_amax, statistics)

        evaluator = CocoDetectionEvaluator(
            coco / "images", coco / "instances.json", cache_dir=tmp_dir / "cache", input_spec=info.inputs[0], image_ids=val_ids
        )
        backend = OnnxRuntimeBackend(threads=args.threads)
        with backend.load(model_path) as runner:
            fp32 = evaluator.evaluate(runner).metrics
        rows = [("fp32", fp32, None)]
        minmax = variants["minmax"]
        for label, ranges in variants.items():
            config = TrialConfig.uniform(info.layer_names, Precision.INT8, CalibrationChoice(samples=samples))
            placement = plan_placement(info, model, config, TENSORRT)
            path = save_model(emit_deployable_onnx(model, info, placement, ranges, TENSORRT), tmp_dir / "deployable.onnx")
            with backend.load(path) as runner:
                metrics = evaluator.evaluate(runner).metrics
            ratio = np.median([ranges[t].amax / max(minmax[t].amax, 1e-12) for t in tensors])
            rows.append((label, metrics, ratio))

    print(f"\nYOLOv5n all-INT8, TensorRT profile, ONNX Runtime CPU; calibrate {samples} train2017, evaluate {len(val_ids)} val2017")
    print(f"{'calibration':<40} {'mAP50-95':>9} {'drop':>7} {'mAP50':>7} {'drop':>7} {'median amax/minmax':>19}")
    for label, m, ratio in rows:
        drop = m["mAP50-95"] - fp32["mAP50-95"]
        drop50 = m["mAP50"] - fp32["mAP50"]
        r = "" if ratio is None else f"{ratio:.3f}"
        print(f"{label:<40} {m['mAP50-95']:9.2f} {drop:+7.2f} {m['mAP50']:7.2f} {drop50:+7.2f} {r:>19}")


if __name__ == "__main__":
    main()
