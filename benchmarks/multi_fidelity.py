"""Multi-fidelity: the same short YOLOv5n study with and without subset-first evaluation.

YOLOv5n with the TensorRT quantization profile, its accuracy scored on ONNX Runtime
(the Q/DQ graph TensorRT would get), calibration and evaluation from disjoint halves
of ``coco-dev``. Both studies use the same seed, sampler and budget, run as a user
runs them (``--isolation process``); the second scores each searched trial on a
fixed subset first (``--fidelity-subset``) and stops it there when it is clearly
infeasible or dominated.

Prints (never asserts): total and per-trial evaluation seconds of the searched
trials, how many were stopped early and why, and whether the final front is the
same (by configuration). Once a trial is stopped, TPE's model differs between the
two runs and later proposals may differ; the configurations both runs evaluated are
counted too. Speed-ups are ONNX Runtime's on the TensorRT graph, and on a loaded
machine both the timings and the seconds are noisy: read them side by side.

    python benchmarks/multi_fidelity.py [--trials 6] [--eval-images 60] [--subset 0.25]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from search_quality import split_coco  # the same calibration/evaluation split as the search benchmark
from sensisearch.quantize.config import CalibrationAlgorithm, Precision
from sensisearch.study import pareto_front, records
from sensisearch.study import prepare, run_study
from sensisearch.study import StudySettings

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SENSISEARCH_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def one_study(args: argparse.Namespace, name: str, subset: float, eval_dir: Path, calib_dir: Path) -> dict[str, object]:
    settings = StudySettings.from_flat(
        model=SHARED / "yolov5n.onnx", eval_data=eval_dir, annotations=SHARED / "coco-dev" / "instances.json",
        calib_data=calib_dir, out=args.out / name, cache_dir=args.out / "cache", eval_limit=args.eval_images,
        backend="onnxruntime", profile="tensorrt", precisions=[Precision.INT8, Precision.FP32],
        sample_counts=[args.calib_images], percentiles=[99.99],
        algorithms=[CalibrationAlgorithm.MINMAX, CalibrationAlgorithm.PERCENTILE, CalibrationAlgorithm.MSE],
        budget=args.trials, seed=args.seed, max_drop=args.max_drop, timing_max_seconds=args.timing_seconds,
        verify=False, fidelity_subset=subset,
    )
    settings.validate()
    started = time.monotonic()
    ctx = prepare(settings)
    study = run_study(ctx)
    wall = time.monotonic() - started
    recs = records(study)
    searched = [r for r in recs if r.baseline is None and r.role == "evaluate" and r.state in ("COMPLETE", "PRUNED")]
    evaluate = [float(r.timings.get("evaluate", 0.0)) for r in searched]
    front = pareto_front(recs)
    return {
        "name": name,
        "subset": None if ctx.pipeline.subset is None else len(ctx.pipeline.subset.positions),
        "wall": wall,
        "evaluate": evaluate,
        "stopped": [(r.number, r.stopped_early) for r in searched if r.stopped_early],
        "keys": {r.config_key for r in searched},
        "front": {r.config_key: (r.value, r.speedup) for r in front},
        "values": {r.config_key: r.value for r in searched if r.state == "COMPLETE"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="searched configurations per study (--budget)")
    parser.add_argument("--eval-images", type=int, default=60)
    parser.add_argument("--calib-images", type=int, default=32)
    parser.add_argument("--subset", type=float, default=0.25, help="--fidelity-subset of the second study")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--timing-seconds", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sensisearch-multi-fidelity")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("full", "subset-first"):  # fresh studies; the calibration and image caches (out/cache) are shared
        shutil.rmtree(args.out / name, ignore_errors=True)
    eval_dir, calib_dir = split_coco(SHARED / "coco-dev", args.out / "split")
    runs = [one_study(args, "full", 0, eval_dir, calib_dir), one_study(args, "subset-first", args.subset, eval_dir, calib_dir)]

    print(f"YOLOv5n, TensorRT profile on ONNX Runtime, {args.eval_images} eval images, {args.trials} searched trials, "
          f"seed {args.seed}, --max-drop {args.max_drop:g} (machine shared: seconds are noisy)")
    print(f"{'study':<14} {'subset':>6} {'eval s total':>12} {'eval s/trial':>12} {'median':>8} {'stopped':>8} {'wall s':>8}")
    for run in runs:
        ev = run["evaluate"]
        print(f"{run['name']:<14} {str(run['subset'] or 'all'):>6} {sum(ev):>12.1f} {sum(ev) / max(1, len(ev)):>12.2f} "
              f"{statistics.median(ev) if ev else 0.0:>8.2f} {len(run['stopped']):>8} {run['wall']:>8.0f}")
    full, staged = runs
    ratio = sum(staged["evaluate"]) / max(1e-9, sum(full["evaluate"]))
    print(f"evaluation seconds, subset-first / full: {ratio:.2f}")
    for number, why in staged["stopped"]:
        print(f"  trial {number}: {why}")
    shared = full["keys"] & staged["keys"]
    print(f"configurations evaluated by both: {len(shared)} of {len(full['keys'])}")
    same_values = all(full["values"][k] == staged["values"][k] for k in shared if k in full["values"] and k in staged["values"])
    print(f"complete trials evaluated by both have identical full-set values: {same_values}")
    same_front = set(full["front"]) == set(staged["front"])
    print(f"final front the same (by configuration): {same_front} "
          f"({len(full['front'])} vs {len(staged['front'])} members; {len(set(full['front']) & set(staged['front']))} shared)")


if __name__ == "__main__":
    main()
