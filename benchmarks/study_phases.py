"""Where a trial's time goes, and what the cached-statistics path saves.

Runs a small study on the bundled digits example and prints, per phase
(statistics lookup, ONNX emission, backend build, latency, evaluation), its
share of trial time; then the time to produce one trial's deployable ONNX from
cached statistics against ``onnxruntime.quantization.quantize_static`` making a
comparable Q/DQ model from the same calibration data (which re-runs
calibration inference every time). Goals: sensisearch's own phases <= 10% of a
trial; the cached path >= 10x faster. Figures are printed, never asserted.

    python benchmarks/study_phases.py [--budget 12] [--yolo]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
from sensisearch.study import quiet_quantizer
from sensisearch.study import prepare, run_study
from sensisearch.study import StudyContext
from sensisearch.study import StudySettings

PHASES = ("thresholds", "emit", "build", "load", "latency", "evaluate")
OWN = ("thresholds", "emit")


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self._it = iter([{name: b} for b in batches])

    def get_next(self):  # noqa: ANN201 - ORT's interface
        return next(self._it, None)


def phase_shares(out: Path) -> None:
    totals = dict.fromkeys(PHASES, 0.0)
    trials = 0
    for path in sorted((out / "trials").glob("*/trial.json")):
        record = json.loads(path.read_text())
        if record.get("status") != "complete":
            continue
        trials += 1
        for phase in PHASES:
            totals[phase] += record["timings"].get(phase, 0.0)
    whole = sum(totals.values())
    print(f"\nPhase shares over {trials} complete trials ({whole / max(trials, 1):.2f} s per trial):")
    for phase in PHASES:
        print(f"  {phase:<11} {100 * totals[phase] / whole:6.2f} %   {totals[phase] / max(trials, 1) * 1e3:8.1f} ms/trial")
    baselines = {}
    for path in sorted((out / "trials").glob("*/trial.json")):
        record = json.loads(path.read_text())
        if record.get("baseline") and record.get("status") == "complete":
            baselines[record["baseline"]] = record["latency"]["median_ms"]
    if "fp32" in baselines and "int8" in baselines:
        print(
            f"  all-INT8 vs all-FP32 median latency: {baselines['int8']:.3f} ms vs {baselines['fp32']:.3f} ms "
            f"= {baselines['fp32'] / baselines['int8']:.2f}x (the example must stay measurably faster in INT8)"
        )
    own = sum(totals[p] for p in OWN)
    print(f"  sensisearch's own phases (statistics lookup + emission): {100 * own / whole:.2f} % of trial time (goal <= 10 %)")


def cached_vs_quantize_static(ctx, samples: int, repeats: int) -> None:  # noqa: ANN001
    layers = list(ctx.space.layers)
    config = TrialConfig.uniform(layers, Precision.INT8, CalibrationChoice(CalibrationAlgorithm.MINMAX, samples))
    with tempfile.TemporaryDirectory() as tmp:
        ctx.pipeline.emit(config, Path(tmp) / "warm")  # first call pays for the memo
        cached = []
        for i in range(repeats):
            # A new calibration choice each time defeats the per-choice memo:
            # this is the honest per-trial cost of a fresh threshold lookup.
            choice = CalibrationChoice(CalibrationAlgorithm.PERCENTILE, samples, 99.0 + i * 1e-3)
            t0 = time.perf_counter()
            ctx.pipeline.emit(TrialConfig(config.precisions, choice), Path(tmp) / f"c{i}")
            cached.append(time.perf_counter() - t0)
        spec = ctx.info.inputs[0]
        calib = ctx_calibration_batches(ctx, samples)
        baseline = []
        for i in range(max(1, repeats // 3)):
            t0 = time.perf_counter()
            with quiet_quantizer():
                quantize_static(
                    str(ctx.model_path), str(Path(tmp) / f"ort{i}.onnx"), _Reader(spec.name, calib),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                )
            baseline.append(time.perf_counter() - t0)
    ours, theirs = statistics.median(cached), statistics.median(baseline)
    print(f"\nOne trial's deployable ONNX, {samples} calibration samples ({ctx.model_path.name}):")
    print(f"  sensisearch from cached statistics: {ours * 1e3:8.1f} ms (median of {len(cached)})")
    print(f"  onnxruntime quantize_static:        {theirs * 1e3:8.1f} ms (median of {len(baseline)})")
    print(f"  ratio: cached path is {theirs / ours:.1f}x faster (goal >= 10x)")


def ctx_calibration_batches(ctx: StudyContext, samples: int) -> list[np.ndarray]:
    from sensisearch.calibration import deterministic_order

    source = ctx.evaluation.calibration
    assert source is not None, "the benchmark study searches INT8, so it has a calibration source"
    order = deterministic_order(source.size, ctx.settings.search.seed)[:samples]
    return list(source.batches(order, source.static_batch or 32))


def main() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "digits"
        settings = StudySettings.from_flat(example="digits", budget=args.budget, out=out, sample_counts=[128, 256, 512], latency_seconds=0.5)
        t0 = time.perf_counter()
        ctx = prepare(settings)
        print(f"prepare (model analysis + calibration statistics, once): {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        run_study(ctx)
        print(f"study of {args.budget} trials: {time.perf_counter() - t0:.1f} s")
        phase_shares(out)
        cached_vs_quantize_static(ctx, 256, args.repeats)


if __name__ == "__main__":
    main()
