"""Does the sensitivity-seeded search beat random search, and does the default study beat greedy?

The default strategy (``sensisearch run`` with no search flags: the guided
sampler over fusion groups, its sensitivity probes taken off its trials and put
on its clock) is printed with the others, as hypervolume against trials and
against wall time.

YOLOv5n with the TensorRT quantization profile, its accuracy scored by ONNX
Runtime on exactly the Q/DQ graph TensorRT would get; calibration on one half of
``coco-dev``, evaluation on a fixed subset of the other half. Latency is the
*estimated* cost of :mod:`sensisearch.latency` (MACs x precision weight, no
latency table): ONNX Runtime's speed on a TensorRT graph says nothing about
TensorRT, and the estimate keeps the comparison free of this shared CPU's noise.

Prints hypervolume (mAP vs estimated cost; reference point: FP32 cost and FP32
mAP - 5) against trials for: random search, plain TPE over all 60 layers, the
seeded study (sensitivity seeds, then TPE over the top-k layers), the seeded
study over fusion groups (``--search groups``: one parameter per group of layers
joined by a residual Add or Concat, seeds = all-INT8 minus the top-k groups),
and a greedy "revert the worst layer to float" baseline (NNCF's accuracy
control, here with the static sensitivity ranking). The calibration choices
include ``mixed`` (percentile where a tensor needs clipping, min-max elsewhere).
Goal 2 compares each strategy's hypervolume with a reference front: the union of
every point any strategy evaluated. Plus the issue's goal 1: the best configuration
with >= 57/60 convs INT8 and the best all-INT8, against FP32. Figures are
printed, never asserted. The sensitivity probes' evaluations are printed too:
the seeded and greedy searches pay for them once per model.

    python benchmarks/search_quality.py              # ~15 min on 2 cores: 12 trials, 24 eval images
    python benchmarks/search_quality.py --full       # the issue's figures: 50 trials (random 100), 128 calibration images
    python benchmarks/search_quality.py --digits --trials 50   # the MNIST CNN: whole studies, real paired latency

``--digits`` runs every sampler (the default, random, TPE, NSGA-II, seeded) as a whole
``sensisearch run`` of the bundled MNIST CNN with the ONNX Runtime profile: there the
speed axis is each trial's paired speed-up measured on this machine, not an estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import optuna
from optuna._hypervolume import compute_hypervolume  # what optuna's plot_hypervolume_history uses

from sensisearch.latency import ESTIMATE_LABEL, estimated_cost, layer_macs
from sensisearch.quantize.config import CalibrationAlgorithm, Precision, TrialConfig
from sensisearch.quantize import fusion_groups
from sensisearch.study import compact_space, groups_space, head_rule_layers, make_sampler, seed_configs
from sensisearch.study import score_config, sensitivity_profile
from sensisearch.study import prepare
from sensisearch.study import StudySettings
from sensisearch.calibration.spread import calibration_label
from sensisearch.quantize.config import CalibrationChoice
from sensisearch.study import GuidedPlan, GuidedSampler, rank_groups
from sensisearch.study.store import TrialRecord

SHARED = Path(os.environ.get("SENSISEARCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def split_coco(coco: Path, out: Path) -> tuple[Path, Path]:
    """First half of the annotation file's images: evaluation pool (with --eval-limit); second half: calibration (symlinks)."""
    data = json.loads((coco / "instances.json").read_text())
    names = [im["file_name"] for im in data["images"]]
    calib = out / "calib"
    calib.mkdir(parents=True, exist_ok=True)
    for name in names[len(names) // 2:]:
        link = calib / Path(name).name
        if not link.exists():
            link.symlink_to((coco / "images" / name).resolve())
    return coco / "images", calib


def hypervolume(points: list[tuple[float, float]], fp32_value: float, fp32_cost: float) -> float:
    """Of (metric, cost) points, maximising metric and minimising cost, against (FP32 - 5, FP32 cost)."""
    ref = (-(fp32_value - 5.0), fp32_cost)
    loss = [(-v, c) for v, c in points if -v < ref[0] and c < ref[1]]
    if not loss:
        return 0.0
    import numpy as np

    return float(compute_hypervolume(np.asarray(loss), np.asarray(ref)))


# --------------------------------------------------------------------------- the MNIST CNN, real paired latency
DIGITS_STRATEGIES: dict[str, dict[str, str]] = {
    "default": {},  # `sensisearch run` with no search flags: guided, fusion groups, probes on its budget and clock
    "random": {"sampler": "random", "search": "full"},
    "tpe": {"sampler": "tpe", "search": "full"},
    "nsga2": {"sampler": "nsga2", "search": "full"},
    "seeded": {"sampler": "seeded", "search": "groups"},
}


def digits_quality(args: argparse.Namespace) -> None:
    """Every sampler as a whole ``sensisearch run`` of the bundled MNIST CNN with the ONNX Runtime profile: each
    trial's speed is its paired speed-up against FP32 timed in that study on this machine (no estimate), so the
    hypervolume is of (top-1, 1 / speed-up) and carries the timing noise of a shared machine. The reference front
    is the union of every strategy's points; a lucky timing anywhere lifts it, so a strategy's share is a lower
    bound. Each study's budget is ``--trials`` (the default's probes come off it, as in a user's run)."""
    import datetime

    from sensisearch.study import prepare, records, run_study

    results: dict[str, list[tuple[float, float, int]]] = {}
    elapsed: dict[str, list[float]] = {}
    all_int8: dict[str, float] = {}
    for name, flags in DIGITS_STRATEGIES.items():
        settings = StudySettings.from_flat(example="digits", out=args.out / f"digits-{name}", budget=args.trials,
                                           eval_limit=args.eval_images, verify=False, seed=0, **flags)
        shutil.rmtree(settings.storage.out, ignore_errors=True)  # a fresh study: its wall time is the whole run
        t0, started_at = time.monotonic(), datetime.datetime.now()
        ctx = prepare(settings)
        study = run_study(ctx)
        done = {t.number: (t.datetime_complete - started_at).total_seconds() for t in study.trials if t.datetime_complete}
        recs = [r for r in records(study) if r.state == "COMPLETE" and r.value is not None and r.speedup]
        fp32 = next(r for r in recs if r.baseline == "fp32")
        recs.sort(key=lambda r: r.number)
        # Points as (metric change vs this study's FP32, cost = 1 / paired speed-up, INT8 layers): each study's own
        # FP32 is the reference its speed-ups pair with.
        results[name] = [(float(r.value) - float(fp32.value), 1.0 / float(r.speedup),
                          sum(1 for p in r.config.precisions.values() if p is Precision.INT8)) for r in recs]
        elapsed[name] = [done[r.number] for r in recs]
        int8 = next((r for r in recs if r.baseline == "int8"), None)
        # Each study times its own all-INT8 baseline: how far those differ between studies is the timing noise
        # that the union reference carries (within-study CIs are far narrower).
        if int8 is not None and int8.speedup:
            all_int8[name] = float(int8.speedup)
        int8_text = "" if int8 is None or int8.speedup_ci95 is None else (
            f"; all-INT8 {int8.speedup:.2f}x [{int8.speedup_ci95[0]:.2f}, {int8.speedup_ci95[1]:.2f}]")
        print(f"{name}: {len(study.trials)} trials in {time.monotonic() - t0:.0f} s (preparation and probes included); "
              f"FP32 top-1 {fp32.value:.2f} on {ctx.evaluator.image_count()} images{int8_text}")
    print_curves(results, elapsed, 0.0, 1.0, args.trials, args.trials, "top-1 change vs FP32 x 1 / paired speed-up",
                 len(ctx.space.layers), "top-1")
    if len(all_int8) == len(results):
        # The same all-INT8 graph measured 2.0x in one study and 2.6x in the next: that shift moves every point of a
        # study and, through the union reference, every other strategy's share. Rescaling each study's speed-ups so
        # its own all-INT8 reads the mean takes the shift out and leaves what the search found.
        mean = sum(all_int8.values()) / len(all_int8)
        rescaled = {name: [(v, c * all_int8[name] / mean, n) for v, c, n in points] for name, points in results.items()}
        reference = hypervolume([(v, c) for points in rescaled.values() for v, c, _ in points], 0.0, 1.0)
        print(f"\ngoal 2, each study's speed-ups rescaled so its all-INT8 reads the mean all-INT8 {mean:.2f}x "
              f"(studies' own: {', '.join(f'{n} {x:.2f}x' for n, x in all_int8.items())}); reference hv {reference:.3g}")
        for name, points in rescaled.items():
            hv = hypervolume([(v, c) for v, c, _ in points[:args.trials]], 0.0, 1.0)
            print(f"{name:<9} {hv / reference if reference else float('nan'):7.1%}")


def print_curves(results: dict[str, list[tuple[float, float, int]]], elapsed: dict[str, list[float]], fp32_value: float,
                 fp32_cost: float, trials: int, random_trials: int, axes: str, layers: int, metric: str = "mAP") -> None:
    """Hypervolume against trials and against wall time, goal 1 and goal 2, for every strategy."""
    checkpoints = sorted({n for n in (5, 10, 12, 20, 25, 50, 100) if n <= random_trials} | {trials, random_trials})
    print(f"\nhypervolume ({axes}; ref = FP32 cost, FP32 {metric} - 5) after n trials")
    print("strategy  " + "".join(f"{n:>9d}" for n in checkpoints))
    for name, points in results.items():
        row = [hypervolume([(v, c) for v, c, _ in points[:n]], fp32_value, fp32_cost) if n <= len(points) else None for n in checkpoints]
        print(f"{name:<9} " + "".join(f"{h:9.3g}" if h is not None else f"{'-':>9}" for h in row))
    longest = max(t[-1] for t in elapsed.values() if t)
    marks = [longest * f for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
    print("\nhypervolume against wall time (s; probes included where a strategy uses them; this machine's load: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    print("strategy  " + "".join(f"{m:>9.0f}" for m in marks))
    for name, points in results.items():
        times = elapsed.get(name, [])
        row = [hypervolume([(v, c) for (v, c, _), t in zip(points, times) if t <= m], fp32_value, fp32_cost) for m in marks]
        print(f"{name:<9} " + "".join(f"{h:9.3g}" for h in row))
    print(f"\ngoal 1 (FP32 {fp32_value:.2f}): best with >= {layers - 3}/{layers} INT8 / best all-INT8, drop in {metric} points")
    for name, points in results.items():
        near = [fp32_value - v for v, _, n in points if n >= layers - 3]
        full = [fp32_value - v for v, _, n in points if n == layers]
        print(f"{name:<9} {min(near) if near else float('nan'):+.2f} / {min(full) if full else float('nan'):+.2f}")
    reference = hypervolume([(v, c) for points in results.values() for v, c, _ in points], fp32_value, fp32_cost)
    random_hv = hypervolume([(v, c) for v, c, _ in results["random"][:random_trials]], fp32_value, fp32_cost)
    print(f"\ngoal 2: hypervolume after {trials} trials / reference front (union of all {sum(map(len, results.values()))} "
          f"points, hv {reference:.3g}); and / random after {random_trials}")
    for name, points in results.items():
        hv = hypervolume([(v, c) for v, c, _ in points[:trials]], fp32_value, fp32_cost)
        print(f"{name:<9} {hv / reference if reference else float('nan'):7.1%}  {hv / random_hv if random_hv else float('nan'):7.2f}x random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12, help="trials per strategy (random gets --random-trials)")
    parser.add_argument("--random-trials", type=int, default=None, help="default: 2 x --trials")
    parser.add_argument("--eval-images", type=int, default=None, help="default: 24 (YOLOv5n), 2000 (--digits)")
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--max-drop", type=float, default=0.5, help="the default study's --max-drop (points)")
    parser.add_argument("--full", action="store_true", help="50 trials, random 100, 85 eval images, 128 calibration images")
    parser.add_argument("--digits", action="store_true",
                        help="the MNIST CNN instead: every sampler as a whole study with real paired latency "
                             "(ONNX Runtime profile); --trials is each study's --budget, --eval-images its --eval-limit")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sensisearch-search-quality")
    args = parser.parse_args()
    if args.full:
        args.trials, args.random_trials, args.eval_images, args.calib_images = 50, 100, 85, 128
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.digits:
        args.eval_images = args.eval_images or 2000
        digits_quality(args)
        return
    args.eval_images = args.eval_images or 24
    random_trials = args.random_trials or 2 * args.trials

    eval_dir, calib_dir = split_coco(SHARED / "coco-dev", args.out / "split")
    settings = StudySettings.from_flat(
        model=SHARED / "yolov5n.onnx", eval_data=eval_dir, annotations=SHARED / "coco-dev" / "instances.json",
        calib_data=calib_dir, out=args.out, eval_limit=args.eval_images, backend="onnxruntime", profile="tensorrt",
        sample_counts=[args.calib_images], algorithms=[CalibrationAlgorithm.MINMAX, CalibrationAlgorithm.PERCENTILE, CalibrationAlgorithm.MSE, CalibrationAlgorithm.MIXED],
        percentiles=[99.99], default_algorithm=CalibrationAlgorithm.MSE,
    )
    ctx = prepare(settings)
    layers = list(ctx.space.layers)
    macs = layer_macs(ctx.model, ctx.info)
    started = time.monotonic()
    profile, cached = sensitivity_profile(ctx.sensitivity_inputs())
    probe_seconds = profile.seconds or time.monotonic() - started  # a cached profile keeps what it cost
    print(f"sensitivity: {profile.probes} probes ({profile.cost_trials:.1f} full evaluations, counted in the default "
          f"study's trials), {probe_seconds:.0f} s{' (cached)' if cached else ''}; "
          f"calibration {profile.calibration}; top-8 {profile.ranking[:8]}")
    fp32_cost = estimated_cost(macs, {n: Precision.FP32 for n in layers})
    work = args.out / "work"
    results: dict[str, list[tuple[float, float, int]]] = {}

    def evaluate(config: TrialConfig) -> tuple[float, float, int]:
        value = score_config(ctx.pipeline, config, work)[0].value
        return value, estimated_cost(macs, config.precisions), len(config.layers_with(Precision.INT8))

    # FP32 on the images every strategy is scored on: the probes' own FP32 is on their subset (subset-first).
    fp32_value = evaluate(ctx.space.uniform(Precision.FP32))[0]
    print(f"FP32 mAP {fp32_value:.2f} on {ctx.evaluator.image_count()} images (probes: {profile.fp32:.2f} on "
          f"{profile.eval_count}); cost: {ESTIMATE_LABEL}")

    elapsed: dict[str, list[float]] = {}

    def study_run(name: str, sampler: optuna.samplers.BaseSampler, n: int, space, seeds=(), attrs=None,  # noqa: ANN001
                  start_seconds: float = 0.0) -> None:
        """``n`` trials; ``start_seconds``: time already spent for this strategy (its sensitivity probes)."""
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        for i, config in enumerate(seeds):
            study.enqueue_trial(space.params_for(config), user_attrs=None if attrs is None else attrs[i])
        points: list[tuple[float, float, int]] = []
        times: list[float] = []
        t0 = time.monotonic()

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            if TrialRecord.from_attrs(trial.number, trial.user_attrs).baseline is None:
                trial.set_user_attr(TrialRecord.attr_key("role"), "evaluate")
            point = evaluate(space.suggest(trial))
            points.append(point)
            times.append(start_seconds + time.monotonic() - t0)
            return point[0], point[1]

        study.optimize(objective, n_trials=n)
        results[name] = points
        elapsed[name] = times
        print(f"{name}: {n} trials in {time.monotonic() - t0:.0f} s (+ {start_seconds:.0f} s of probes)")

    # The default study (`sensisearch run` with no search flags): the guided sampler over fusion groups. Its
    # probes count: their images, in full evaluations, come off its trials, and their seconds onto its clock.
    head = head_rule_layers(ctx.model, ctx.info, ctx.pipeline.index)
    groups = fusion_groups(ctx.pipeline.index, ctx.info.layers, ctx.backend.profile)
    grouped = groups_space(ctx.space, groups)
    probe_trials = int(math.ceil(profile.cost_trials))
    plan = GuidedPlan(space=grouped, units=rank_groups(groups, profile.ranking), max_drop=args.max_drop,
                      budget=lambda study: args.trials - probe_trials,
                      float_precision=Precision.FP16 if Precision.FP16 in grouped.precisions else Precision.FP32)
    guided_seeds = [grouped.uniform(Precision.FP32), grouped.uniform(Precision.INT8)]
    guided_attrs = [TrialRecord.baseline_attrs("fp32"), TrialRecord.baseline_attrs("int8")]
    percentile = profile.calibration_choice.percentile
    samples = max(grouped.sample_counts)  # --calib-images capped by the images there are (coco-dev's half: 85)
    ranked = sorted(grouped.algorithms, key=lambda a: -profile.calibration_scores.get(calibration_label(a, percentile), -1e9))
    for algorithm in ranked:
        guided_seeds.append(TrialConfig.uniform(layers, Precision.INT8, CalibrationChoice(algorithm, samples, percentile)))
        guided_attrs.append({})
    for algorithm in ranked[:2]:
        for _, config in seed_configs(layers, profile.ranking, CalibrationChoice(algorithm, samples, percentile), head,
                                      float_precision=plan.float_precision, groups=groups):
            guided_seeds.append(config)
            guided_attrs.append({})
    n_default = max(1, args.trials - probe_trials) + 2  # + the two baselines the study runs besides its budget
    study_run("default", GuidedSampler(plan, 0), n_default, grouped, guided_seeds, guided_attrs, start_seconds=probe_seconds)
    # The study's own samplers (make_sampler: TrialSeededSampler, as `sensisearch run --sampler ...`).
    study_run("random", make_sampler("random", 0), random_trials, ctx.space)
    study_run("tpe", make_sampler("tpe", 0), args.trials, ctx.space)
    seeds = [c for _, c in seed_configs(layers, profile.ranking, profile.calibration_choice, head)]
    topk = compact_space(ctx.space, profile.ranking, args.top_k)
    study_run("seeded", make_sampler("seeded", 0), args.trials, topk, [s for s in seeds if topk.expresses(s)],
              start_seconds=probe_seconds)
    print(f"fusion groups ({ctx.backend.profile.name} profile): {len(layers)} layers -> {len(groups)} groups; "
          f"multi-layer: {[len(g) for g in groups if len(g) > 1]}")
    group_seeds = [c for _, c in seed_configs(layers, profile.ranking, profile.calibration_choice, head, groups=groups)]
    study_run("groups", make_sampler("seeded", 0), args.trials, grouped, [s for s in group_seeds if grouped.expresses(s)],
              start_seconds=probe_seconds)
    # Greedy: all-INT8, then revert the next most sensitive layer to float, one per trial.
    greedy = []
    elapsed["greedy"] = []
    t0 = time.monotonic()
    for k in range(args.trials):
        floats = set(profile.ranking[:k])
        greedy.append(evaluate(TrialConfig({n: Precision.FP32 if n in floats else Precision.INT8 for n in layers}, profile.calibration_choice)))
        elapsed["greedy"].append(probe_seconds + time.monotonic() - t0)
    results["greedy"] = greedy

    print_curves(results, elapsed, fp32_value, fp32_cost, args.trials, random_trials, "mAP x estimated cost", len(layers))


if __name__ == "__main__":
    main()
