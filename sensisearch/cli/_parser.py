"""The argument parser: every subcommand's flags, the shared flag groups, and the flags that become study settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from sensisearch.study import StudySettings


def _csv(kind: type) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list ({exc})") from exc

    return parse


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="FP32 ONNX model")
    p.add_argument("--example", help="bundled example instead of --model (e.g. digits)")
    p.add_argument("--eval-data", type=Path, help="evaluation data: ImageFolder dir, .npz (images, labels), idx folder, or Ultralytics dataset .yaml")
    p.add_argument("--calib-data", type=Path, help="calibration data (no labels needed): same formats, or preprocessed tensors .npy / input-keyed .npz")
    p.add_argument("--annotations", type=Path, help="COCO instances json for detectors")
    p.add_argument("--mean", type=_csv(float), help="per-channel mean after pixel/255, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", type=_csv(float), help="per-channel std after pixel/255")
    p.add_argument("--metric", help="metric to optimize (top1, top5; mAP50-95, mAP50 for detectors)")
    p.add_argument("--task", choices=["auto", "classification", "detection"], help="default: detected from the model")
    p.add_argument("--evaluator", help="your own evaluation function MODULE:FUNCTION(runner) -> float|dict")
    p.add_argument("--batch-size", type=int, help="evaluation batch for models with a dynamic batch (default 64; detectors 8)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N samples only (quick studies)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: cores, at most 4)")
    p.add_argument("--backend", help="auto (default: TensorRT if an engine can run here, else onnxruntime), onnxruntime, tensorrt, tensorrt-rtx")
    p.add_argument("--shapes", type=_csv(str), help="TensorRT optimization profile, e.g. images:1x3x640x640/8x3x640x640/16x3x640x640")
    p.add_argument("--workspace-mb", type=int, help="TensorRT builder workspace limit in MiB")
    p.add_argument("--opt-level", type=int, help="TensorRT builder optimization level 0-5 (default 3)")
    p.add_argument("--iou", type=float, help="detector NMS IoU threshold (default: YOLOv5 0.6, YOLOv8/YOLO11 0.7)")
    _add_input_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_input_flags(p: argparse.ArgumentParser) -> None:
    """How images become the model's input (values checked by StudySettings.validate, as in a study file)."""
    p.add_argument("--preprocess", help="yolo (letterbox), imagenet (resize shorter side, centre crop, ImageNet mean/std) "
                                        "or raw (resize only); default: yolo for detectors, raw otherwise")
    p.add_argument("--channel-order", help="rgb (default) or bgr: the channel order the model takes")
    p.add_argument("--layout", help="nchw or nhwc (default: from the model input's shape)")
    p.add_argument("--letterbox", help="detectors: yolov5 or ultralytics resize rules (default: the output layout's own)")


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    """The quantization profile and the sensitivity-guided search."""
    p.add_argument("--profile", choices=["tensorrt", "onnxruntime-cpu"],
                   help="Q/DQ profile of the deployable ONNX (default: the backend's own); with --backend onnxruntime, "
                        "--profile tensorrt scores exactly TensorRT's graph (its latency is then only an estimate)")
    p.add_argument("--sampler", choices=["guided", "tpe", "random", "nsga2", "seeded"],
                   help="guided (default for a new study): sensitivity seeds, then a bisection to the --max-drop boundary, "
                        "multi-objective TPE seeded with it, and a local search around the front; tpe, random, nsga2, or "
                        "seeded: TPE after the sensitivity seeds. A resumed study keeps the sampler it was made with")
    p.add_argument("--search", choices=["full", "topk", "groups"],
                   help="groups (default for a new study): one choice per fusion group (layers joined by a residual Add or "
                        "Concat share a precision); full: every layer free; topk: only the --top-k most sensitive layers")
    p.add_argument("--top-k", type=int, help="layers --search topk leaves free (default 8)")
    p.add_argument("--bias-correction", choices=["auto", "search", "on", "off"],
                   help="fold each INT8 layer's mean output shift into its bias: auto (default; searched by the guided "
                        "study, kept only where it helps), search, on, off")
    p.add_argument("--latency-table", type=Path,
                   help="per-layer latency table measured on the target (`sensisearch latency-table`): trials take their "
                        "latency from it instead of being timed here")


def _add_sensitivity_parser(sub: Any) -> None:
    se = sub.add_parser(
        "sensitivity", help="rank the layers by how much their INT8 hurts (two probes per layer) and the tensors by calibration",
        description="Per-layer sensitivity: only this layer INT8, and all INT8 except this layer, on the evaluation subset "
                    "(--eval-limit). Cached in <out>/sensitivity.json (and the study, if one exists).",
    )
    se.add_argument("study_file", nargs="?", type=Path, help="TOML study file (see studies/)")
    _add_data_flags(se)
    se.add_argument("--out", type=Path, help="output folder (default runs/<model stem>)")
    se.add_argument("--storage", help="Optuna storage URL of the study to store the profile in (default: SQLite file in --out, if present)")
    se.add_argument("--study-name", help="study name in the storage (default: model stem)")
    se.add_argument("--seed", type=int, help="calibration-order seed (default 0)")
    se.add_argument("--algorithms", type=_csv(str), help="calibration algorithms to try; the probes use the best all-INT8 one")
    se.add_argument("--sample-counts", type=_csv(int), help="calibration sample counts (the probes use the study's default)")
    se.add_argument("--percentiles", type=_csv(float), help="clip percentiles for the per-tensor threshold table")
    se.add_argument("--calib-limit", type=int, help="use the first N calibration samples only")
    se.add_argument("--cache-dir", type=Path, help="calibration/tensor cache (default <out>/cache)")
    se.add_argument("--profile", choices=["tensorrt", "onnxruntime-cpu"], help="Q/DQ profile of the probes (default: the backend's own)")
    se.add_argument("--json", action="store_true", help="print the profile as one JSON object on stdout")
    se.add_argument("--refresh", action="store_true", help="measure again even if a matching profile is cached")


def _add_latency_table_parser(sub: Any) -> None:
    """The per-layer latency table measured once on the target."""
    lt = sub.add_parser(
        "latency-table", help="measure a per-layer latency table (per precision, plus precision-boundary cost) with the backend's profiler",
        description="Profiles all-FP32, all-INT8, two complementary INT8/FP32 checkerboards and all-INT8 but the first / last "
                    "quarter with the backend's per-node profiler (ONNX Runtime: interleaved; TensorRT: trtexec --exportProfile), "
                    "times them end to end without the profiler (paired against FP32) to anchor the table, and writes it as JSON "
                    "(`run --latency-table FILE` predicts latency from it).",
    )
    lt.add_argument("study_file", nargs="?", type=Path, help="TOML study file (see studies/)")
    _add_data_flags(lt)
    lt.add_argument("--profile", choices=["tensorrt", "onnxruntime-cpu"], help="Q/DQ profile of the profiled graphs (default: onnxruntime-cpu)")
    lt.add_argument("--out", type=Path, required=True, help="the table's JSON file")
    lt.add_argument("--repeats", type=int, default=20, help="profiled runs per configuration (default 20; median per node)")
    lt.add_argument("--cache-dir", type=Path, help="calibration cache (default: beside --out)")
    lt.add_argument("--device", help="device label stored in the table (default: this CPU / GPU name)")


def _keep_count(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("give a number of trials, or all") from exc


def _add_worker_flags(p: argparse.ArgumentParser) -> None:
    """Trial isolation and disk flags (run and worker)."""
    p.add_argument("--isolation", choices=["process", "none"],
                   help="process (default): each trial's build, timing and evaluation in a child process; none: in the worker")
    p.add_argument("--build-timeout", type=float, help="seconds a trial may take until its engine is loaded (default 1800)")
    p.add_argument("--eval-timeout", type=float, help="seconds a trial may take for timing and evaluation (default 3600)")
    p.add_argument("--keep-artifacts", type=_keep_count,
                   help="keep the artifacts of the top K trials by metric, besides front, baselines and winner (default 10; all)")
    p.add_argument("--log-file", type=Path, help="also write every line (phases, progress with ETA, trials) to this file")


def _add_host_path_flags(p: argparse.ArgumentParser) -> None:
    """The model and data paths on this host, where they differ from the study machine's."""
    p.add_argument("--model", type=Path, help="the model on this host (default: the path stored in the study)")
    p.add_argument("--eval-data", type=Path, help="evaluation data on this host")
    p.add_argument("--calib-data", type=Path, help="calibration data on this host")
    p.add_argument("--annotations", type=Path, help="COCO annotations on this host")
    p.add_argument("--cache-dir", type=Path, help="calibration/tensor cache on this host (default <out>/cache)")


def _add_override_flags(p: argparse.ArgumentParser) -> None:
    """Paths that differ on this host; everything else comes from the study."""
    _add_host_path_flags(p)
    p.add_argument("--out", type=Path, help="this host's output folder (default: the stored one)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sensisearch", description="Search per-layer INT8/FP16/FP32 precision and calibration for vision models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run or resume a study",
        description="Run or resume a study: baselines, then searched trials until --budget; writes the Pareto front, "
        "the winner, report.md and report.html. Flags override the study file.",
    )
    run.add_argument("study_file", nargs="?", type=Path, help="TOML study file (see studies/)")
    _add_data_flags(run)
    run.add_argument("--budget", type=int, help="total finished trials in the study (default 50); re-running resumes up to it")
    run.add_argument("--out", type=Path, help="output folder (default runs/<model stem>)")
    run.add_argument("--storage", help="Optuna storage URL (default: SQLite file in --out)")
    run.add_argument("--study-name", help="study name in the storage (default: model stem)")
    run.add_argument("--seed", type=int, help="sampler and calibration-order seed (default 0)")
    run.add_argument("--max-drop", type=float, help="winner's allowed metric drop vs FP32, in points (default 1.0)")
    run.add_argument(
        "--holdout", type=float,
        help="hold this many evaluation images (or this fraction, e.g. 0.3) out of the search: trials score on the "
             "rest, then FP32, all-INT8, the front and the winner are scored on the held-out images with a paired CI, "
             "and a winner whose held-out drop CI lies wholly above --max-drop is passed over (the best of many trials "
             "scored on one image set looks better there than it is). Off by default (0)",
    )
    run.add_argument("--precisions", type=_csv(str), help="precisions to search, e.g. int8,fp32 (default: backend's)")
    run.add_argument("--algorithms", type=_csv(str), help="calibration algorithms (default minmax,entropy,percentile,mse,mixed)")
    run.add_argument("--sample-counts", type=_csv(int), help="calibration sample counts (default 128,256,512,1024, capped by data)")
    run.add_argument("--percentiles", type=_csv(float), help="clip percentiles for percentile calibration (default 99.9,99.99,99.999)")
    run.add_argument("--latency-batch", type=int, help="batch size for latency (default 1)")
    run.add_argument("--latency-seconds", type=float, help="old name of --timing-max-seconds")
    run.add_argument("--calib-limit", type=int, help="use the first N calibration samples only")
    run.add_argument("--max-class-drop", type=float, help="detectors: a trial is infeasible if any class AP drops more (points)")
    run.add_argument("--cache-dir", type=Path, help="calibration/tensor cache (default <out>/cache)")
    run.add_argument("--compare-ort-quantizer", action="store_true", default=None,
                     help="also score ONNX Runtime quantize_static (minmax, percentile 99.99) beside the front")
    run.add_argument("--heartbeat-seconds", type=int, help="worker heartbeat; a dead worker's trial is retried after 2x this (default 30)")
    _add_search_flags(run)
    _add_worker_flags(run)
    _add_measurement_flags(run)
    _add_fidelity_flags(run)

    wk = sub.add_parser(
        "worker", help="one more worker on a study: settings come from the study itself",
        description="Run trials of an existing study until its budget is met. Everything but the storage, "
        "the study name and (where they differ on this host) the data paths is read from the study.",
    )
    wk.add_argument("--storage", required=True, help="the study's storage URL, e.g. postgresql://user:pw@host/db")
    wk.add_argument("--study-name", required=True, help="the study's name in the storage")
    _add_override_flags(wk)
    _add_worker_flags(wk)

    ev = sub.add_parser(
        "evaluate", help="score one model (FP32 ONNX or a trial's deployable ONNX)",
        description="Score one model (an FP32 ONNX or a trial's deployable ONNX) on the evaluation data, as a study would.",
    )
    _add_data_flags(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ev.add_argument("--per-class", action="store_true", help="also print per-class scores with their instance counts")
    ev.add_argument("--cache-dir", type=Path, help="preprocessed-data cache (default: runs/cache)")
    bd = sub.add_parser(
        "build", help="rebuild one configuration (winner/config.json or a trial.json) into an artifact",
        description="Rebuild one configuration (winner/config.json or trials/NNNN/trial.json) into a backend artifact, "
        "from the recorded ranges alone.",
    )
    bd.add_argument("--config", type=Path, required=True, help="winner/config.json or trials/NNNN/trial.json")
    bd.add_argument("--model", type=Path, help="the model (default: the path recorded in the config)")
    bd.add_argument("--backend", default="auto", help="auto (default), onnxruntime, tensorrt, tensorrt-rtx (builds .plan on any CPU)")
    bd.add_argument("--threads", type=int, help="ONNX Runtime threads")
    bd.add_argument("--shapes", type=_csv(str), help="TensorRT optimization profile name:MIN/OPT/MAX")
    bd.add_argument("--workspace-mb", type=int, help="TensorRT builder workspace limit in MiB")
    bd.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0-5")
    bd.add_argument("--out", type=Path, help="artifact path (default: beside the config)")
    bd.add_argument("-v", "--verbose", action="store_true")

    _add_sensitivity_parser(sub)
    _add_latency_table_parser(sub)

    vf = sub.add_parser(
        "verify", help="re-time FP32, all-INT8, the front and its noise band together; rewrite front, winner, report",
        description="Re-time the trials that decide a study's result in one interleaved tournament (FP32 the reference) "
        "and rewrite pareto.json, winner/ and report.md with the verified figures.",
    )
    vf.add_argument("run_dir", type=Path, help="the --out folder of a `sensisearch run`")
    vf.add_argument("--storage", help="Optuna storage URL (default: the run's, else RUN_DIR/study.db)")
    vf.add_argument("--study-name", help="study name in the storage (default: the run's)")
    vf.add_argument("--seconds", type=float, help="cap on the tournament's timed rounds (default: the run's --verify-seconds, 30)")
    vf.add_argument("--rounds", type=int, help="exactly this many interleaved rounds (--seconds still caps)")
    vf.add_argument("--backend", help="stage 2: build the candidates' deployable.onnx with this backend (tensorrt on the target, "
                                      "onnxruntime, ...) into RUN_DIR/verify/<backend>/ and time them there; reports predicted "
                                      "vs measured speed-up (default: time the study's own artifacts)")
    vf.add_argument("--force", action="store_true",
                    help="time even when the machine is busier than the sessions need (figures marked as taken under load)")
    _add_host_path_flags(vf)  # stage 2 runs on the target: its model and data paths may differ
    vf.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    dr = sub.add_parser(
        "doctor", help="what can build and run here: TensorRT flavor, GPU, driver, ONNX Runtime, Optuna",
        description="Report what can build and what can run on this machine: TensorRT flavor, GPU, driver, ONNX Runtime, Optuna.",
    )
    dr.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_review_commands(sub)
    return parser


def _add_review_commands(sub: argparse._SubParsersAction) -> None:
    """``report`` and ``export``: read a finished run, never run a trial."""
    rp = sub.add_parser(
        "report", help="rewrite pareto, winner/, report.md and report.html of a run without running trials",
        description="Rewrite pareto.json/.csv, winner/, report.md, report.html, pareto.png and precision_map.png "
        "from the study's storage, without running, calibrating or building anything. The run's settings are "
        "read from the study; a study file or flags override them (e.g. --max-drop).",
    )
    rp.add_argument("run_dir", nargs="?", type=Path, help="the run's output folder (--out of `sensisearch run`); or give --storage")
    rp.add_argument("--out", type=Path, help="folder to write the results to (default RUN_DIR)")
    rp.add_argument("study_file", nargs="?", type=Path, help="the run's TOML study file, for studies that do not record settings")
    _add_data_flags(rp)
    rp.add_argument("--storage", help="Optuna storage URL (default: RUN_DIR/study.db)")
    rp.add_argument("--study-name", help="study name in the storage (default: the only one)")
    rp.add_argument("--max-drop", type=float, help="winner's allowed metric drop vs FP32, in points")
    rp.add_argument("--budget", type=int, help="budget shown in the report (default: the run's)")

    ex = sub.add_parser(
        "export", help="hand one trial to deployment tools: deployable ONNX plus trtexec/ModelOpt/ORT/Polygraphy",
        description="Write one trial's deployable ONNX and configuration, plus a ready trtexec command (TensorRT 10.x "
        "and 11.x), ModelOpt's nodes_to_exclude and calibration method, ONNX Runtime's quantize_static settings, "
        "or a Polygraphy comparison with FP32.",
    )
    ex.add_argument("run_dir", type=Path, help="the run's output folder")
    ex.add_argument("--trial", default="winner", help="trial number, or 'winner' (default)")
    ex.add_argument("--format", type=_csv(str), default=["onnx"],
                    help="comma-separated: onnx, trtexec, modelopt, onnxruntime, polygraphy (default onnx)")
    ex.add_argument("--out", type=Path, help="folder to write (default RUN_DIR/export/trial-NNNN)")
    ex.add_argument("--model", type=Path, help="the FP32 model for modelopt/polygraphy (default: the study's)")
    ex.add_argument("--shapes", type=_csv(str), help="input shapes name:MIN/OPT/MAX for dynamic inputs other than the batch")
    ex.add_argument("--max-batch", type=int, help="largest batch of a dynamic-batch profile (default 1)")
    ex.add_argument("--storage", help="Optuna storage URL (default: RUN_DIR/study.db)")
    ex.add_argument("--study-name", help="study name in the storage (default: the only one)")
    ex.add_argument("-v", "--verbose", action="store_true", help="debug logging")


SETTING_FLAGS = (
    "model", "example", "eval_data", "calib_data", "annotations", "mean", "std", "metric", "task", "evaluator",
    "batch_size", "eval_limit", "threads", "backend", "iou", "budget", "out", "storage", "study_name", "seed",
    "max_drop", "precisions", "algorithms", "sample_counts", "percentiles", "latency_batch", "latency_seconds",
    "calib_limit", "max_class_drop", "cache_dir", "shapes", "workspace_mb", "opt_level", "heartbeat_seconds", "compare_ort_quantizer",
    "profile", "sampler", "search", "top_k", "bias_correction", "holdout",
    "latency_table",
    "isolation", "build_timeout", "eval_timeout", "keep_artifacts",
)
SETTING_FLAGS += ("preprocess", "channel_order", "layout", "letterbox")
# What `worker` and `report` take from the command line; the rest comes from the study.
OVERRIDE_FLAGS = ("model", "eval_data", "calib_data", "annotations", "cache_dir", "out", "threads")


# Paired timing, verification, the winner rule and accuracy CIs.
MEASUREMENT_FLAGS = (
    "objective", "throughput_batch", "timing_target_ci", "timing_max_seconds", "verify", "verify_seconds",
    "min_speedup", "min_class_instances", "drop_resamples",
)
SETTING_FLAGS += MEASUREMENT_FLAGS


def _add_measurement_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument("--objective", choices=["latency", "throughput"],
                     help="latency: ms per batch at --latency-batch (default); throughput: images/s at --throughput-batch")
    run.add_argument("--throughput-batch", type=int, help="batch for --objective throughput (default: TensorRT opt shape, else 8)")
    run.add_argument("--timing-target-ci", type=float,
                     help="stop a trial's paired timing once its speed-up 95%% CI is narrower than this fraction (default 0.05)")
    run.add_argument("--timing-max-seconds", type=float, help="cap on a trial's paired timing in seconds (default 3)")
    run.add_argument("--verify-seconds", type=float, help="cap on the verify tournament after the last trial (default 30)")
    run.add_argument("--no-verify", dest="verify", action="store_const", const=False,
                     help="skip the verify tournament after the last trial (run `sensisearch verify RUN_DIR` later)")
    run.add_argument("--min-speedup", type=float,
                     help="the winner's speed-up CI lower bound must exceed this (default 1.0: significantly faster than FP32)")
    run.add_argument("--min-class-instances", type=int,
                     help="--max-class-drop judges only classes with at least this many instances (default 10)")
    run.add_argument("--drop-resamples", type=int, help="bootstrap resamples of each trial's accuracy-drop CI (default 200)")


# Multi-fidelity: score a fixed subset first, stop clearly dominated trials.
SETTING_FLAGS += ("fidelity_subset",)


def _add_fidelity_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--fidelity-subset", type=float,
        help="score each searched trial on this many evaluation images first (or this fraction, e.g. 0.25), the same "
             "images for every trial, and stop it there (PRUNED, counted in --budget) when its drop CI lies above "
             "--max-drop or a completed trial is surely faster and more accurate; complete trials are still scored on "
             "every image. Off by default (0); e.g. 0.25 for a detector study whose proposals are often clearly infeasible",
    )


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    from sensisearch.study import merge_settings, read_study_file

    flags = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    study_file = getattr(args, "study_file", None)
    file_values = read_study_file(study_file) if study_file else {}
    return merge_settings(file_values, flags, study_file.resolve().parent if study_file else None)
