"""TensorRT build time per precision, with and without the study's timing cache.

Builds the bundled digits example (and YOLOv5n with --yolo) all-FP32, all-FP16,
all-INT8 and mixed through sensisearch's own build path, three times each:
once with no timing cache, then twice sharing one cache file (the first fills
it, the second reuses it), and prints the times side by side with the ratios.

On full TensorRT (10.x / 11.x, on a GPU) autotuning dominates build time and
the cache should cut the second build sharply. On TensorRT-RTX the builder
does no kernel timing ahead of time (tactics are picked by JIT on the GPU), so
the cache is a no-op there: the ratio stays ~1 and says nothing about TRT 10/11.

    python benchmarks/tensorrt_build.py [--flavor tensorrt|tensorrt-rtx] [--yolo]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from sensisearch.backends.tensorrt import make_tensorrt_backend
from sensisearch.calibration import collect_statistics
from sensisearch.calibration.thresholds import ThresholdTable
from sensisearch.evaluation.datasets import Preprocess, load_npz
from sensisearch.examples import load_example
from sensisearch.model import analyze_model
from sensisearch.quantize import TENSORRT, Precision, TensorRange, TrialConfig, emit_deployable_onnx, plan_placement, save_model, statistics_tensors
from sensisearch.quantize.config import CalibrationChoice


def ranges_for(model_path: Path, feeds: list[dict[str, np.ndarray]]) -> tuple:
    info, model = analyze_model(model_path)
    tensors = statistics_tensors(model, info)
    stats = collect_statistics(model_path, tensors, feeds, [sum(next(iter(f.values())).shape[0] for f in feeds)])
    table = ThresholdTable(stats)
    samples = table.sample_counts[-1]
    amax = table.amaxes(CalibrationChoice(samples=samples), tensors)
    ranges = {t: TensorRange(max(a, 1e-12), table.statistics(t, samples).min >= 0) for t, a in amax.items()}
    return info, model, ranges


def configs(layers: list[str]) -> dict[str, TrialConfig]:
    mixed = {name: [Precision.INT8, Precision.FP16, Precision.FP32][i % 3] for i, name in enumerate(layers)}
    return {
        "fp32": TrialConfig.uniform(layers, Precision.FP32),
        "fp16": TrialConfig.uniform(layers, Precision.FP16),
        "int8": TrialConfig.uniform(layers, Precision.INT8),
        "mixed": TrialConfig(mixed),
    }


def bench(name: str, model_path: Path, feeds: list[dict[str, np.ndarray]], flavor: str | None, workdir: Path) -> None:
    info, model, ranges = ranges_for(model_path, feeds)
    print(f"\n{name}: {len(info.layers)} layers")
    print(f"  {'config':<7} {'no cache':>9} {'cache 1st':>10} {'cache 2nd':>10} {'2nd/none':>9}  layers run")
    for label, config in configs(info.layer_names).items():
        onnx_path = workdir / f"{name}-{label}.onnx"
        save_model(emit_deployable_onnx(model, info, plan_placement(info, model, config, TENSORRT), ranges, TENSORRT), onnx_path)
        times = {}
        for run, cache in (("none", None), ("first", workdir / f"{name}-{label}.cache"), ("second", workdir / f"{name}-{label}.cache")):
            backend = make_tensorrt_backend(flavor, timing_cache=cache)
            t0 = time.perf_counter()
            result = backend.build(onnx_path, workdir / f"{name}-{label}-{run}")
            times[run] = time.perf_counter() - t0
        print(
            f"  {label:<7} {times['none']:8.2f}s {times['first']:9.2f}s {times['second']:9.2f}s "
            f"{times['second'] / times['none']:8.2f}x  {dict(result.layer_precisions)}"
        )
    print(f"  backend: {backend.flavor.backend} {backend.flavor.version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", choices=["tensorrt", "tensorrt-rtx"], default=None)
    parser.add_argument("--yolo", action="store_true", help="also YOLOv5n from SENSISEARCH_SHARED_DATA (default ../shared/data)")
    args = parser.parse_args()
    example = load_example("digits")
    data = load_npz(example.calib_data)
    x = Preprocess(tuple(example.mean), tuple(example.std)).apply(data.images[:128])
    with tempfile.TemporaryDirectory() as tmp:
        bench("digits", example.model, [{"input": x[i : i + 32]} for i in range(0, 128, 32)], args.flavor, Path(tmp))
        if args.yolo:
            from sensisearch.evaluation.tensor_store import TensorStore

            shared = Path(os.environ.get("SENSISEARCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
            images = sorted((shared / "coco-dev" / "images").glob("*.jpg"))[:8]
            # The letterboxed tensor store a detector study calibrates from.
            store = TensorStore.build(images, (640, 640))
            feeds = [{"images": store.batch([i])} for i in range(len(store))]
            bench("yolov5n", shared / "yolov5n.onnx", feeds, args.flavor, Path(tmp))


if __name__ == "__main__":
    main()
