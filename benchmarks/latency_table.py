"""How well a per-layer latency table predicts real speed-ups.

For digits and YOLOv5n, under the TensorRT and the onnxruntime-cpu Q/DQ profiles on
ONNX Runtime (CPU): measure the table (``sensisearch latency-table``'s code), then time
held-out configurations for real with paired interleaved timing against FP32
(``time_interleaved``): uniform all-INT8, "all-INT8 minus the first k layers" seeds and
seeded random mixes. Prints predicted vs measured speed-up side by side and the
Spearman rank correlation (goal >= 0.9), and the same for the MAC estimate
(``MacEstimate``), and of the table's kernel sum alone (before the end-to-end anchor). Figures are printed, never asserted; on a shared machine they move.

    python benchmarks/latency_table.py [--models digits,yolov5n] [--profiles tensorrt,onnxruntime-cpu] [--random 6] [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

from sensisearch.latency import MacEstimate
from sensisearch.latency import measure_table
from sensisearch.study import table_pipeline
from sensisearch.measure import PairedTimingSettings, spearman_rho, time_interleaved
from sensisearch.quantize.config import Precision, TrialConfig
from sensisearch.study import StudySettings

SHARED = Path(os.environ.get("SENSISEARCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def settings_for(model: str) -> StudySettings:
    if model == "digits":
        return StudySettings.from_flat(example="digits")
    return StudySettings.from_flat(model=SHARED / "yolov5n.onnx", calib_data=SHARED / "coco-dev" / "images", preprocess="yolo")


def held_out(layers: list[str], calibration, n_random: int, seed: int = 1) -> dict[str, TrialConfig]:  # noqa: ANN001
    configs = {"all-int8": TrialConfig.uniform(layers, Precision.INT8, calibration)}
    for k in (1, 3, len(layers) // 2):
        configs[f"int8 minus first {k}"] = TrialConfig({n: Precision.FP32 if i < k else Precision.INT8 for i, n in enumerate(layers)}, calibration)
    for k in (1, 3):  # the head's layers in float (the "first conv + Detect head" rule's shape)
        configs[f"int8 minus last {k}"] = TrialConfig(
            {n: Precision.FP32 if i >= len(layers) - k else Precision.INT8 for i, n in enumerate(layers)}, calibration
        )
    rng = random.Random(seed)
    for i in range(n_random):
        share = rng.random()
        configs[f"random {i} ({share:.0%} int8)"] = TrialConfig(
            {n: Precision.INT8 if rng.random() < share else Precision.FP32 for n in layers}, calibration
        )
    return configs


def run(model: str, profile: str, n_random: int, seconds: float, repeats: int, threads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        pipeline, calibration, feeds, model_path = table_pipeline(settings_for(model), tmp_path / "cache", profile, threads)
        table = measure_table(
            pipeline, calibration, feeds, tmp_path / "table", model_path=model_path, repeats=repeats, timing_seconds=seconds
        )
        macs = MacEstimate.for_model(pipeline.model, pipeline.info)
        layers = pipeline.info.layer_names
        configs = {"fp32": TrialConfig.uniform(layers, Precision.FP32, calibration), **held_out(layers, calibration, n_random)}
        runners = {}
        for name, config in configs.items():
            out = tmp_path / "held" / str(len(runners))
            deployable, _ = pipeline.emit(config, out)
            runners[name] = pipeline.backend.load(pipeline.build(deployable, out, config).artifact)
        arms = {name: runner.timing_arm(feeds) for name, runner in runners.items()}
        paired = time_interleaved(arms, "fp32", PairedTimingSettings(max_seconds=seconds, min_rounds=10))
        print(f"\n== {model}, profile {profile} on onnxruntime ({table.device}); table from {repeats} profiled runs x "
              f"{len(table.configs)} configs; unmapped share {100 * table.unmapped_share:.1f}%")
        print(f"  anchor: end-to-end = {table.kernel_scale:.3f} x kernel ms {table.ms_per_kernel * 1e3:+.2f} us/kernel "
              f"{table.offset_ms:+.3f} ms (fitted on {len(table.configs)} profiled configs timed end to end)")
        print(f"  {'configuration':<28} {'measured':>9} {'CI95':>15} {'table':>7} {'kernels':>8} {'MAC est.':>8}")
        measured, predicted, kernel_only, estimated = [], [], [], []
        fp32_kernel_ms = table.kernel_ms({n: Precision.FP32 for n in layers})
        for name, config in configs.items():
            if name == "fp32":
                continue
            latency = paired[name]
            lo, hi = latency.speedup_ci95
            measured.append(latency.speedup)
            predicted.append(table.speedup(config.precisions))
            estimated.append(macs.speedup(config.precisions))
            kernel_only.append(fp32_kernel_ms / table.kernel_ms(config.precisions))
            print(f"  {name:<28} {latency.speedup:8.2f}x [{lo:5.2f}, {hi:5.2f}] {predicted[-1]:6.2f}x {kernel_only[-1]:7.2f}x "
                  f"{estimated[-1]:7.2f}x")
        def rho(predictions: list[float]) -> str:
            value = spearman_rho(measured, predictions)
            return "n/a" if value is None else f"{value:+.2f}"

        print(f"  Spearman rank correlation with measured: table {rho(predicted)} (goal >= 0.9), "
              f"kernel sum only {rho(kernel_only)}, MAC estimate {rho(estimated)}")
        for runner in runners.values():
            runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,yolov5n")
    parser.add_argument("--profiles", default="tensorrt,onnxruntime-cpu")
    parser.add_argument("--random", type=int, default=6, help="seeded random mixes per model and profile")
    parser.add_argument("--seconds", type=float, default=10.0, help="cap on the paired timing of each model/profile")
    parser.add_argument("--repeats", type=int, default=20, help="profiled runs per table configuration")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for model in args.models.split(","):
        for profile in args.profiles.split(","):
            run(model, profile, args.random, args.seconds, args.repeats, args.threads)


if __name__ == "__main__":
    main()
