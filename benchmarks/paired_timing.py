"""Unpaired medians against paired, interleaved speed-ups on a machine whose load changes.

On the bundled digits example, FP32 and all-INT8 (built through the study
pipeline) are timed four ways and printed side by side:

1. unpaired, quiet: FP32 median, then INT8 median, ratio of the two;
2. unpaired, drifting: FP32 median, then a busy-loop process starts on one core
   and INT8 is timed while it runs (what happens when a neighbour job starts
   between the baseline and a trial);
3. paired (:func:`sensisearch.measure.time_interleaved`), quiet;
4. paired, with the same busy loop running throughout.

The claim under test: the unpaired ratio moves with the load; the paired
speed-up stays put (inside its CI). With ``--coco`` it also times
``DetectionMatches.accumulate`` against ``COCOeval.accumulate`` on the real
YOLOv5n / coco-dev evaluation (needs shared/data). Figures are printed, never
asserted.

    python benchmarks/paired_timing.py [--seconds 3] [--coco]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from sensisearch.backends.base import LatencySettings
from sensisearch.measure import PairedLatency, PairedTimingSettings, noise_summary, time_interleaved
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
from sensisearch.study import prepare
from sensisearch.study import StudySettings


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_core():  # noqa: ANN201
    """One process spinning on a core for the duration (a neighbour job)."""
    proc = multiprocessing.Process(target=_spin, daemon=True)
    proc.start()
    time.sleep(0.2)  # let the scheduler place it
    try:
        yield
    finally:
        proc.terminate()
        proc.join()


def unpaired(fp32, int8, feeds, seconds: float, load_second: bool) -> tuple[float, float]:  # noqa: ANN001
    settings = LatencySettings(warmup_runs=5, min_runs=30, max_runs=100_000, min_seconds=seconds)
    ref = fp32.measure_latency(feeds, settings).median_ms
    with busy_core() if load_second else contextlib.nullcontext():
        cand = int8.measure_latency(feeds, settings).median_ms
    return ref, cand


def paired(fp32, int8, feeds, seconds: float, loaded: bool) -> PairedLatency:  # noqa: ANN001
    # The benchmark wants a fixed duration to compare like with like, so the CI target is unreachable.
    settings = PairedTimingSettings(max_seconds=2 * seconds, max_rounds=100_000, target_ci_width=1e-9)
    with busy_core() if loaded else contextlib.nullcontext():
        return time_interleaved({"fp32": lambda: fp32.run(feeds), "int8": lambda: int8.run(feeds)}, "fp32", settings)["int8"]


def digits(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "digits"
        ctx = prepare(StudySettings.from_flat(example="digits", budget=1, out=out, sample_counts=[128]))
        config = TrialConfig.uniform(list(ctx.space.layers), Precision.INT8, CalibrationChoice(CalibrationAlgorithm.MINMAX, 128))
        deployable, _ = ctx.pipeline.emit(config, out / "int8")
        int8_artifact = ctx.backend.build(deployable, out / "int8").artifact
        fp32_artifact = ctx.backend.build(ctx.model_path, out / "fp32").artifact
        feeds = dict(ctx.evaluator.latency_feeds(ctx.settings.backend.latency_batch))
        with ctx.backend.load(fp32_artifact) as fp32, ctx.backend.load(int8_artifact) as int8:
            print(f"digits, batch {ctx.settings.backend.latency_batch}, {os.cpu_count()} cores; busy loop = one spinning process\n")
            rows = []
            for loaded in (False, True):
                ref, cand = unpaired(fp32, int8, feeds, seconds, loaded)
                rows.append(("unpaired", "INT8 under load" if loaded else "quiet", ref, cand, ref / cand, ""))
            results = []
            for loaded in (False, True):
                r = paired(fp32, int8, feeds, seconds, loaded)
                results.append(r)
                ci = f"[{r.speedup_ci95[0]:.3f}, {r.speedup_ci95[1]:.3f}] ({r.rounds} rounds, IQR {r.ratio_iqr:.3f})"
                rows.append(("paired", "both under load" if loaded else "quiet", r.reference_median_ms, r.candidate_median_ms, r.speedup, ci))
            print(f"{'timing':<9} {'conditions':<16} {'FP32 ms':>8} {'INT8 ms':>8} {'speed-up':>9}  95% CI")
            for kind, cond, ref, cand, ratio, ci in rows:
                print(f"{kind:<9} {cond:<16} {ref:8.3f} {cand:8.3f} {ratio:8.3f}x  {ci}")
            shift_unpaired = rows[1][4] / rows[0][4] - 1
            shift_paired = rows[3][4] / rows[2][4] - 1
            print(f"\nspeed-up moved by the load: unpaired {100 * shift_unpaired:+.1f} %, paired {100 * shift_paired:+.1f} %")
            print(noise_summary(results))


def coco_accumulate(repeats: int) -> None:
    from pycocotools.cocoeval import COCOeval

    from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
    from pycocotools.coco import COCO

    from sensisearch.evaluation.detection import CocoDetectionEvaluator, coco80_to_coco91, coco_results
    from sensisearch.measure import DetectionMatches, resample_weights

    data = Path(os.environ.get("SENSISEARCH_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    model, coco = data / "yolov5n.onnx", data / "coco-dev"
    from sensisearch.model import analyze_model

    evaluator = CocoDetectionEvaluator(coco / "images", coco / "instances.json", input_spec=analyze_model(model)[0].inputs[0])
    with OnnxRuntimeBackend().load(model) as runner:
        predictions = evaluator.predict(runner)
    results = coco_results(predictions, coco80_to_coco91())  # YOLOv5n predicts COCO's 80 classes
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco / "instances.json"))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [100]
        t0 = time.perf_counter()
        ev.evaluate()
        t_evaluate = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            ev.accumulate()
        t_coco = (time.perf_counter() - t0) / repeats
    matches = DetectionMatches.from_cocoeval(ev)
    weights = resample_weights(len(matches), repeats, seed=0)
    t0 = time.perf_counter()
    for _ in range(repeats):
        matches.accumulate()
    t_ours = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for w in weights:
        matches.accumulate(w)
    t_weighted = (time.perf_counter() - t0) / repeats
    print(f"\nYOLOv5n on {len(matches)} coco-dev images, {matches.num_detections} detections kept (area all, maxDets 100):")
    print(f"  COCOeval.evaluate (once per trial):          {t_evaluate * 1e3:8.1f} ms")
    print(f"  COCOeval.accumulate:                         {t_coco * 1e3:8.1f} ms / call (takes no weights)")
    print(f"  DetectionMatches.accumulate():               {t_ours * 1e3:8.1f} ms / call ({t_coco / t_ours:.1f}x faster)")
    print(f"  DetectionMatches.accumulate(bootstrap w):    {t_weighted * 1e3:8.1f} ms / call; 1000 resamples x 2 models = {2000 * t_weighted:.0f} s")
    for images in (40, len(matches)):  # a study's 40 search images, and all of coco-dev
        vectorized_against_loop(matches.restricted_to(matches.image_ids[:images]), 200)
    trial_drop_ci(matches)


def looped_precision(m, weights):  # noqa: ANN001, ANN201
    """The loop this package used before (pycocotools' own: per category, per IoU threshold), on the same
    arrays: the reference the vectorized :meth:`DetectionMatches.precision` is timed against."""
    from sensisearch.measure import IOU_THRESHOLDS, RECALL_THRESHOLDS

    n_iou, n_rec, n_cat = IOU_THRESHOLDS.size, RECALL_THRESHOLDS.size, m.category_ids.size
    precision = -np.ones((n_iou, n_rec, n_cat))
    # Detection indices with image i's block of each category repeated weights[i] times, whole.
    key = m.det_category.astype(np.int64) * len(m) + m.det_image
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    lengths = np.diff(np.r_[starts, m.num_detections])
    expanded = lengths * weights[m.det_image[starts]]
    segment = np.repeat(np.arange(starts.size), expanded)
    local = np.arange(int(expanded.sum())) - np.repeat(np.cumsum(expanded) - expanded, expanded)
    order = starts[segment] + local % lengths[segment]
    npig = weights @ m.gt_counts.astype(np.int64)
    ranked = order[np.lexsort((-m.det_score[order], m.det_category[order]))]
    category = m.det_category[ranked]
    bounds = np.searchsorted(category, np.arange(n_cat + 1), side="left")
    matched, ignore = m.det_matched[ranked].T, m.det_ignore[ranked].T
    tps, fps = matched & ~ignore, ~matched & ~ignore
    for k in range(n_cat):
        if npig[k] == 0:
            continue
        lo, hi = bounds[k], bounds[k + 1]
        if hi == lo:
            precision[:, :, k] = 0.0
            continue
        tp = np.cumsum(tps[:, lo:hi], axis=1).astype(float)
        fp = np.cumsum(fps[:, lo:hi], axis=1).astype(float)
        rc = tp / npig[k]
        pr = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]
        for t in range(n_iou):
            inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
            valid = inds < hi - lo
            row = np.zeros(n_rec)
            row[valid] = pr[t, inds[valid]]
            precision[t, :, k] = row
    return precision


def vectorized_against_loop(matches, resamples: int, rounds: int = 5) -> None:  # noqa: ANN001
    """One trial's bootstrap re-accumulations (``resamples`` weighted calls), the loop against the vectorized
    version in alternating pairs: the paired ratio and its range, and whether every result is the same float."""
    from sensisearch.measure import resample_weights

    weights = resample_weights(len(matches), resamples, seed=1)
    same = all(np.array_equal(looped_precision(matches, w), matches.precision(w)) for w in weights[:20])
    matches.precision(weights[0])  # the ranking is computed once per model, as in a study
    ratios, loop_s, vector_s = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for w in weights:
            looped_precision(matches, w)
        t1 = time.perf_counter()
        for w in weights:
            matches.precision(w)
        t2 = time.perf_counter()
        loop_s.append(t1 - t0)
        vector_s.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    print(f"  {resamples} bootstrap re-accumulations on {len(matches)} images ({matches.num_detections} detections), "
          f"{rounds} alternating pairs (load {os.getloadavg()[0]:.1f}): loop {statistics.median(loop_s):.2f} s, vectorized "
          f"{statistics.median(vector_s):.2f} s; paired ratio median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}); same floats on 20 resamples: {same}")


def trial_drop_ci(matches, resamples: int = 200, rounds: int = 4) -> None:  # noqa: ANN001
    """One trial's drop CI as the study computes it (``--drop-resamples`` 200): a fresh bootstrap per trial
    (FP32's side re-scored each time) against the worker's reused one, in alternating pairs."""
    from sensisearch.measure import PairedBootstrap, map50_95_points

    reused = PairedBootstrap(matches, map50_95_points, resamples, seed=0)
    reused.drop(matches)  # FP32's side, computed once per worker
    ratios, fresh_s, reused_s = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        PairedBootstrap(matches, map50_95_points, resamples, seed=0).drop(matches)
        t1 = time.perf_counter()
        reused.drop(matches)
        t2 = time.perf_counter()
        fresh_s.append(t1 - t0)
        reused_s.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    print(f"  one trial's drop CI ({resamples} resamples), {rounds} alternating pairs (load {os.getloadavg()[0]:.1f}):")
    print(f"    fresh bootstrap per trial: median {statistics.median(fresh_s):.2f} s; reused FP32 side: {statistics.median(reused_s):.2f} s;"
          f" paired ratio median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per unpaired median (paired: twice this)")
    parser.add_argument("--coco", action="store_true", help="also time mAP re-accumulation on YOLOv5n (shared/data)")
    args = parser.parse_args()
    digits(args.seconds)
    if args.coco:
        coco_accumulate(20)


if __name__ == "__main__":
    main()
