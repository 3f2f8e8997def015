"""Command line: ``sensisearch run | worker | evaluate | build | verify | sensitivity | doctor | report | export``. The only place that uses rich."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sensisearch.errors import SensisearchError

if TYPE_CHECKING:
    from sensisearch.study._context import StudyContext
    from sensisearch.study.runner import StudySummary
    from sensisearch.study.settings import StudySettings

# Piped output (a file, CI log, `| less`) is read by tools and by people who
# search it: no wrapping at rich's 80-column default, so paths and table rows stay
# on one line. A terminal keeps its own width.
PIPED_WIDTH = 100_000


def make_console(stderr: bool = False) -> Console:
    """A console that wraps only for a terminal."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=PIPED_WIDTH, soft_wrap=True)


console = make_console(stderr=True)
stdout = make_console()


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
    """Issue 13: how images become the model's input (values checked by StudySettings.validate, as in a study file)."""
    p.add_argument("--preprocess", help="yolo (letterbox), imagenet (resize shorter side, centre crop, ImageNet mean/std) "
                                        "or raw (resize only); default: yolo for detectors, raw otherwise")
    p.add_argument("--channel-order", help="rgb (default) or bgr: the channel order the model takes")
    p.add_argument("--layout", help="nchw or nhwc (default: from the model input's shape)")
    p.add_argument("--letterbox", help="detectors: yolov5 or ultralytics resize rules (default: the output layout's own)")


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    """Issue 10: the quantization profile and the sensitivity-guided search."""
    p.add_argument("--profile", choices=["tensorrt", "onnxruntime-cpu"],
                   help="Q/DQ profile of the deployable ONNX (default: the backend's own); with --backend onnxruntime, "
                        "--profile tensorrt scores exactly TensorRT's graph (its latency is then only an estimate)")
    p.add_argument("--sampler", choices=["tpe", "random", "nsga2", "seeded"],
                   help="tpe (default), random, nsga2, or seeded: TPE after the sensitivity seeds (all-INT8 minus the top-k "
                        "sensitive layers, first conv + head in float)")
    p.add_argument("--search", choices=["full", "topk", "groups"],
                   help="full (default): every layer free; topk: only the --top-k most sensitive layers; groups: one choice per "
                        "fusion group (layers joined by a residual Add or Concat share a precision)")
    p.add_argument("--top-k", type=int, help="layers --search topk leaves free (default 8)")
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
    """Issue 10: the per-layer latency table measured once on the target."""
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
    """Issue 12: trial isolation and disk flags (run and worker)."""
    p.add_argument("--isolation", choices=["process", "none"],
                   help="process (default): each trial's build, timing and evaluation in a child process; none: in the worker")
    p.add_argument("--build-timeout", type=float, help="seconds a trial may take until its engine is loaded (default 1800)")
    p.add_argument("--eval-timeout", type=float, help="seconds a trial may take for timing and evaluation (default 3600)")
    p.add_argument("--keep-artifacts", type=_keep_count,
                   help="keep the artifacts of the top K trials by metric, besides front, baselines and winner (default 10; all)")


def _add_override_flags(p: argparse.ArgumentParser) -> None:
    """Paths that differ on this host; everything else comes from the study."""
    p.add_argument("--model", type=Path, help="the model on this host (default: the path stored in the study)")
    p.add_argument("--eval-data", type=Path, help="evaluation data on this host")
    p.add_argument("--calib-data", type=Path, help="calibration data on this host")
    p.add_argument("--annotations", type=Path, help="COCO annotations on this host")
    p.add_argument("--cache-dir", type=Path, help="calibration/tensor cache on this host (default <out>/cache)")
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
    # Stage 2 runs on the target: its paths to the model and data may differ from the study machine's.
    vf.add_argument("--model", type=Path, help="the model on this host (default: the path stored in the study)")
    vf.add_argument("--eval-data", type=Path, help="evaluation data on this host")
    vf.add_argument("--calib-data", type=Path, help="calibration data on this host")
    vf.add_argument("--annotations", type=Path, help="COCO annotations on this host")
    vf.add_argument("--cache-dir", type=Path, help="calibration/tensor cache on this host (default <out>/cache)")
    vf.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    dr = sub.add_parser(
        "doctor", help="what can build and run here: TensorRT flavor, GPU, driver, ONNX Runtime, Optuna",
        description="Report what can build and what can run on this machine: TensorRT flavor, GPU, driver, ONNX Runtime, Optuna.",
    )
    dr.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_review_commands(sub)
    return parser


def _add_review_commands(sub: argparse._SubParsersAction) -> None:
    """``report`` and ``export``: read a finished run, never run a trial (issue 11)."""
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
    "profile", "sampler", "search", "top_k",  # issue 10
    "latency_table",  # issue 10 (lstudy)
    "isolation", "build_timeout", "eval_timeout", "keep_artifacts",  # issue 12
)
SETTING_FLAGS += ("preprocess", "channel_order", "layout", "letterbox")  # issue 13
# What `worker` and `report` take from the command line; the rest comes from the study.
OVERRIDE_FLAGS = ("model", "eval_data", "calib_data", "annotations", "cache_dir", "out", "threads")


# Issue 8: paired timing, verification, the winner rule and accuracy CIs.
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


# Issue 10, multi-fidelity: score a fixed subset first, stop clearly dominated trials.
SETTING_FLAGS += ("fidelity_subset",)


def _add_fidelity_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--fidelity-subset", type=float,
        help="score each searched trial on this many evaluation images first (or this fraction, e.g. 0.25), the same "
             "images for every trial, and stop it there (PRUNED, counted in --budget) when its drop CI lies above "
             "--max-drop or a completed trial is surely faster and more accurate; complete trials are still scored on "
             "every image. 0 turns it off (default: a quarter of the images for detectors, off for classifiers)",
    )


def _settings(args: argparse.Namespace) -> StudySettings:
    from sensisearch.study.settings import merge_settings, read_study_file

    flags = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    study_file = getattr(args, "study_file", None)
    file_values = read_study_file(study_file) if study_file else {}
    return merge_settings(file_values, flags, study_file.resolve().parent if study_file else None)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )
    # Per-trial lines come from the progress callback; library INFO only with -v.
    logging.getLogger("sensisearch").setLevel(logging.DEBUG if verbose else logging.WARNING)
    import optuna

    # Optuna logs a failed trial's traceback at WARNING; our progress line names
    # the failure, and tracebacks are for -v only.
    optuna.logging.set_verbosity(optuna.logging.WARNING if verbose else optuna.logging.ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised inside the running trial like Ctrl-C, so the trial is failed and re-queued."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: `sensisearch --help` and `doctor` stay fast without Optuna and ONNX.
    from sensisearch.study.runner import TrialEvent, finished_count, open_study, prepare, run_study, write_results

    from sensisearch.study._verify import save_run_settings

    settings = _settings(args)
    # Issue 9: SIGTERM ends a run like Ctrl-C: the running trial is failed and re-queued.
    signal.signal(signal.SIGTERM, _raise_terminated)
    if settings.storage:
        # A wrong URL or password: one line now, before any calibration work.
        from sensisearch.study._storage import open_storage

        open_storage(settings.storage, settings.heartbeat_seconds).remove_session()
    with _statistics_progress() as on_statistics:
        ctx = prepare(settings, on_statistics=on_statistics)
    save_run_settings(ctx.settings, ctx.out)
    backend = ctx.backend.describe()
    console.print(f"backend [bold]{ctx.backend.name}[/] — {escape(ctx.backend_reason)}", highlight=False)
    console.print(
        escape(
            f"{len(ctx.info.layers)} quantizable layers; task {ctx.task}, metric {ctx.evaluator.metric}; out {ctx.out}; "
            + ", ".join(f"{k}={v}" for k, v in backend.items() if k != "name")
        ),
        highlight=False,
    )
    for warning in ctx.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    started = time.monotonic()
    with Progress(
        TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task("", total=settings.budget)  # searched configurations; baselines are extra
        # Show progress of a resumed study from where it stands.
        study = open_study(ctx)
        progress.update(task, completed=min(finished_count(study), settings.budget))

        # Issue 10: a predicted latency says so (the estimate is a unitless cost, not ms).
        predictor = ctx.pipeline.predictor
        unit_of_latency = "ms" if predictor is None else ("ms predicted" if predictor.unit == "ms" else "estimated cost")

        def on_trial(event: TrialEvent) -> None:
            if event.state == "COMPLETE":
                line = f"trial {event.number}: {ctx.evaluator.metric} {event.value:.2f}, {event.latency_ms:.3f} {unit_of_latency} ({event.seconds:.1f} s)"
            elif event.state == "PRUNED" and event.error:  # issue 10: stopped early on the subset
                line = f"[yellow]trial {event.number}[/]: {escape(str(event.error))} ({event.seconds:.1f} s)"
            else:
                line = f"[red]trial {event.number} {event.state.lower()}[/]: {escape(str(event.error))}"
            progress.console.print(line)
            best = "" if event.best_value is None else f"best {ctx.evaluator.metric} {event.best_value:.2f} @ {event.best_latency_ms:.3f} {unit_of_latency}"
            progress.update(task, completed=min(event.finished, event.budget), description=best)

        study = run_study(ctx, on_trial, study)
    if settings.verify:
        _verify(ctx, study, force=False)
    summary = write_results(ctx, study)
    _print_summary(ctx, summary, time.monotonic() - started)
    return 0


def _verify(
    ctx: StudyContext, study: Any, force: bool, seconds: float | None = None, rounds: int | None = None, backend: str | None = None,
) -> None:
    from sensisearch.study._verify import VerifySettings, verify_backend, verify_study

    settings = VerifySettings.for_study(ctx.settings, seconds, rounds)
    on = None if backend is None else verify_backend(ctx, backend)  # issue 10: stage 2 on the target
    with console.status("verifying: FP32, all-INT8, the front and its noise band, interleaved"):
        result = verify_study(ctx, study, settings, force=force, backend=on)
    if result is not None:
        console.print(
            f"verified trials {', '.join(map(str, result.trials))} in one tournament "
            f"({result.rounds} rounds, {result.seconds:.1f} s; FP32 trial {result.reference_trial} the reference)",
            highlight=False,
        )


def cmd_verify(args: argparse.Namespace) -> int:
    from sensisearch.study._verify import load_run_settings
    from sensisearch.study.runner import open_study, prepare, write_results

    if args.seconds is not None and args.seconds <= 0:
        raise SensisearchError(f"--seconds {args.seconds}: must be positive")
    if args.rounds is not None and args.rounds < 3:
        raise SensisearchError(f"--rounds {args.rounds}: use at least 3 rounds (a CI needs a spread)")
    started = time.monotonic()
    overrides = {name: getattr(args, name) for name in ("model", "eval_data", "calib_data", "annotations", "cache_dir")}
    ctx = prepare(load_run_settings(args.run_dir, args.storage, args.study_name, overrides), reviewing=True)
    study = open_study(ctx)
    _verify(ctx, study, force=True, seconds=args.seconds, rounds=args.rounds, backend=args.backend)
    summary = write_results(ctx, study)
    _print_summary(ctx, summary, time.monotonic() - started)
    _print_disk(ctx, summary)
    return 0


def _print_disk(ctx: StudyContext, summary: StudySummary) -> None:
    from sensisearch.study._worker import append_disk_section

    used = append_disk_section(summary.report, ctx.out, ctx.settings.keep_artifacts)
    stdout.print(f"disk: {ctx.out} uses {used / 2**20:.1f} MiB")


def cmd_worker(args: argparse.Namespace) -> int:
    """`run` with the settings stored in the study, this host's paths and worker flags applied."""
    from sensisearch.study._worker import stored_settings

    overrides = {name: getattr(args, name, None) for name in (*OVERRIDE_FLAGS, "isolation", "build_timeout", "eval_timeout", "keep_artifacts")}
    settings = stored_settings(args.storage, args.study_name, overrides)
    run_args = argparse.Namespace(study_file=None, **{name: None for name in SETTING_FLAGS})
    for name, value in settings.to_dict().items():
        if name in SETTING_FLAGS:
            setattr(run_args, name, value)
    run_args.storage = args.storage  # stored masked; this is the real one
    run_args.keep_artifacts = "all" if settings.keep_artifacts is None else settings.keep_artifacts
    console.print(f"worker on study [bold]{escape(args.study_name)}[/]", highlight=False)
    return cmd_run(run_args)


@contextlib.contextmanager
def _statistics_progress() -> Iterator[Callable[[int, int], None]]:
    """A progress bar for the calibration statistics pass, shown only if a pass runs (not on a cache hit)."""
    progress = Progress(
        TextColumn("[bold]calibration statistics"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    )
    task: list[Any] = []

    def update(seen: int, total: int) -> None:
        if not task:
            progress.start()
            task.append(progress.add_task("", total=total))
        progress.update(task[0], completed=seen)

    try:
        yield update
    finally:
        if task:
            progress.stop()


def _print_summary(ctx: StudyContext, summary: StudySummary, seconds: float) -> None:
    from sensisearch.study.report import FRONT_COLUMNS, front_row, timing_noise_lines
    from sensisearch.study.results import baseline

    fp32 = baseline(summary.records, "fp32")
    metric = ctx.evaluator.metric
    axis = ctx.pipeline.timing.axis_label if ctx.pipeline.timing else f"latency, median ms per batch of {ctx.settings.latency_batch}"
    if ctx.pipeline.predictor is not None:  # issue 10: never "measured" for a predicted figure
        axis = f"latency {ctx.pipeline.predictor.label}"
    table = Table(title=f"Pareto front ({metric} vs {axis})")
    for col in FRONT_COLUMNS:
        table.add_column(col.format(metric=metric), justify="right", no_wrap=col != "calibration")
    for r in summary.front:
        table.add_row(*dataclasses.astuple(front_row(r, fp32)))
    stdout.print(table)
    stdout.print(escape(summary.int8_verdict.replace("**", "")))
    if summary.partial_int8_verdict:  # issue 10: the honest verdict on partial INT8
        stdout.print(escape(summary.partial_int8_verdict.replace("**", "")))
    _print_prediction_check(summary)
    for line in timing_noise_lines(summary.records):
        stdout.print(escape(line))
    choice = summary.winner
    if choice.record is None:
        stdout.print(f"[red]No winner:[/] {escape(choice.reason)}")
    else:
        tag = "[green]winner[/]" if choice.qualified else "[yellow]best-effort (no trial met the target)[/]"
        stdout.print(f"{tag}: trial {choice.record.number} — {escape(choice.reason)} → {escape(str(summary.winner_dir))}")
    stdout.print(
        escape(f"report: {summary.report}   review: {ctx.out / 'report.html'}   pareto: {ctx.out / 'pareto.json'}   ({seconds:.0f} s)"),
        highlight=False,
    )


def _print_prediction_check(summary: StudySummary) -> None:
    """Issue 10: stage 2's rank correlation and each trial's in-study vs verified speed-up, side by side."""
    check = summary.prediction_check
    if check is None:
        return
    stdout.print(escape(check.summary()), highlight=False)
    table = Table("trial", "in-study speed-up", "verified speed-up", title="predicted (in-study) vs measured (verified)")
    for number, in_study, verified in check.rows:
        table.add_row(str(number), f"{in_study:.2f}x", f"{verified:.2f}x")
    stdout.print(table)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sensisearch.study.evaluate import evaluate_model

    settings = _settings(args)
    result = evaluate_model(settings)
    if args.json:
        print(json.dumps(result, indent=None))
        return 0
    metrics = result["metrics"]
    stdout.print(", ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + f" on {result['images']} images")
    if args.per_class and result.get("per_class"):
        instances = result.get("per_class_instances") or {}
        table = Table("class", "instances", "score")
        for name, value in result["per_class"].items():
            table.add_row(escape(name), str(instances.get(name, "n/a")), f"{value:.2f}")
        stdout.print(table)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from sensisearch.backends.factory import BackendSettings, choose_backend
    from sensisearch.study.build import build_from_config

    settings = BackendSettings(
        name=args.backend, threads=args.threads, shapes=None if args.shapes is None else tuple(args.shapes),
        workspace_mb=args.workspace_mb, opt_level=args.opt_level,
    )
    choice = choose_backend(settings)
    backend = choice.backend
    console.print(f"backend [bold]{backend.name}[/] — {escape(choice.reason)}", highlight=False)
    out, result = build_from_config(args.config, backend, args.out, args.model)
    kernels = ", ".join(f"{k} {v}" for k, v in result.layer_precisions.items())
    stdout.print(f"built {out} in {result.seconds:.2f} s ({kernels})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rewrite a run's results from its storage: settings from the study, no trial, no calibration, no build."""
    from sensisearch.study._finished import open_finished_run, run_settings
    from sensisearch.study.runner import prepare, write_results
    from sensisearch.study.settings import read_study_file

    started = time.monotonic()
    run_dir = args.run_dir or args.out
    if run_dir is None:
        raise SensisearchError("report: give the run folder (with study.db), or --storage URL --study-name NAME --out DIR")
    run = open_finished_run(run_dir, args.storage, args.study_name)
    if args.out is not None:
        run = dataclasses.replace(run, out=args.out)
    flags = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    settings = run_settings(run, read_study_file(args.study_file) if args.study_file else {}, flags)
    ctx = prepare(settings, calibrate=False, reviewing=True)
    summary = write_results(ctx, run.study)
    _print_summary(ctx, summary, time.monotonic() - started)
    _print_disk(ctx, summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sensisearch.study._finished import export_run_trial, open_finished_run

    run = open_finished_run(args.run_dir, args.storage, args.study_name)
    exported = export_run_trial(run, args.trial, args.format, args.out, args.model, args.shapes, args.max_batch)
    for role, path in exported.files.items():
        stdout.print(escape(f"{role}: {path}"), highlight=False)
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from sensisearch.study._sensitivity import sensitivity_profile
    from sensisearch.study.runner import open_study, prepare

    ctx = prepare(_settings(args))
    for warning in ctx.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    study = open_study(ctx) if ctx.settings.storage or (ctx.out / "study.db").is_file() else None
    probes = 2 + len(ctx.space.algorithms) + 2 * len(ctx.space.layers)
    with Progress(TextColumn("[bold]probes"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("", total=probes - 1)
        profile, cached = sensitivity_profile(
            ctx, study, refresh=args.refresh,
            on_probe=lambda name, value: progress.update(task, advance=1, description=escape(f"{name}: {value:.2f}")),
        )
    if args.json:
        print(json.dumps(profile.to_dict()))
        return 0
    metric = profile.metric
    cal = profile.calibration
    table = Table(title=f"Layer sensitivity ({metric}, {profile.eval_count} samples; FP32 {profile.fp32:.2f}, "
                        f"all-INT8 {profile.all_int8:.2f} with {cal['algorithm']} n={cal['samples']})")
    for col in ("rank", "layer", "only-this-INT8 drop", "all-but-this recovery", "score", "output distortion"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in profile.layers:
        table.add_row(str(row.rank), escape(row.layer), f"{row.alone_drop:+.2f}", f"{row.recovery:+.2f}", f"{row.score:+.2f}", f"{row.distortion:.2e}")
    stdout.print(table)
    clipping = [t for t in profile.tensors if t.needs_clipping]
    stdout.print(f"{len(clipping)}/{len(profile.tensors)} activation tensors need clipping (some algorithm's amax < half their min-max):")
    for t in sorted(clipping, key=lambda t: t.clipping)[:10]:
        stdout.print(f"  {escape(t.tensor)}: {t.strongest} at {t.clipping:.2f} of min-max")
    stdout.print(f"{'cached' if cached else 'written'}: {ctx.out / 'sensitivity.json'}")
    return 0


def cmd_latency_table(args: argparse.Namespace) -> int:
    import tempfile

    from sensisearch.latency._measure import measure_table, table_pipeline
    from sensisearch.measure._machine import machine_identity
    import numpy as np

    if args.repeats < 1:
        raise SensisearchError(f"--repeats {args.repeats}: give at least 1 profiled run per configuration")
    if args.out.is_dir() or args.out.suffix.lower() != ".json":
        raise SensisearchError(f"--out {args.out}: give the table's .json file path")
    settings = _settings(args)
    cache_dir = args.cache_dir or args.out.parent / ".sensisearch-cache"
    pipeline, calibration, feeds, model_path = table_pipeline(settings, cache_dir, args.profile, settings.threads)
    device = args.device or machine_identity().cpu_model
    with tempfile.TemporaryDirectory(prefix="latency-table-") as tmp:
        with console.status(f"profiling {len(pipeline.info.layers)} layers x 6 configurations, {args.repeats} runs each, then timing them"):
            table = measure_table(pipeline, calibration, feeds, Path(tmp), model_path=model_path, repeats=args.repeats, device=device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.save(args.out)
    fp32 = {n: "fp32" for n in table.layers}
    int8 = {n: "int8" for n in table.layers}
    title = (f"Latency table: {model_path.name}, profile {table.profile} on {table.backend} ({table.device}), "
             f"predicted all-INT8 speed-up {table.speedup(int8):.2f}x")
    rows = Table(title=title)
    for col in ("layer", "fp32 ms", "int8 ms", "INT8 saving ms"):
        rows.add_column(col, justify="left" if col == "layer" else "right")
    def int8_ms(costs: dict[str, float]) -> float:  # inside an INT8 region, else entered at a precision boundary
        return costs.get("int8", costs.get("int8@entry", float("nan")))

    savings = sorted(table.layers.items(), key=lambda kv: kv[1].get("fp32", 0.0) - int8_ms(kv[1]), reverse=True)
    for name, costs in savings[:15]:
        rows.add_row(escape(name), f"{costs.get('fp32', float('nan')):.4f}", f"{int8_ms(costs):.4f}",
                     f"{costs.get('fp32', 0.0) - int8_ms(costs):+.4f}")
    stdout.print(rows)
    qdq = sorted(table.boundaries.values())
    stdout.print(
        f"boundaries: {len(qdq)} Q/DQ tensors, median {np.median(qdq) if qdq else 0.0:.4f} ms each; layout "
        f"{table.layout_ms_per_boundary:+.4f} ms per precision boundary; rest {table.rest_ms:.4f} ms; "
        f"unmapped share of profiled time {100 * table.unmapped_share:.1f}%", highlight=False,
    )
    stdout.print(
        f"end-to-end anchor (session.run without the profiler, paired timing): {table.kernel_scale:.3f} x kernel ms "
        f"{1e3 * table.ms_per_kernel:+.2f} us per kernel {table.offset_ms:+.3f} ms", highlight=False,
    )
    for record in table.configs:
        timed = record.get("end_to_end_ms")
        stdout.print(
            f"  {record['name']}: profiled kernels {record['measured_ms']:.3f} ms (table {record['predicted_kernel_ms']:.3f}), "
            f"end to end {'-' if timed is None else f'{timed:.3f}'} ms (table {record['predicted_ms']:.3f})", highlight=False,
        )
    stdout.print(escape(f"written: {args.out}"), highlight=False)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from sensisearch.doctor import doctor_report, format_doctor

    report = doctor_report()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_doctor(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "worker":
            return cmd_worker(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "build":
            return cmd_build(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "sensitivity":
            return cmd_sensitivity(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "latency-table":
            return cmd_latency_table(args)
    except SensisearchError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        console.print(f"[yellow]{what}[/]: finished trials are in the study, the running one is queued again; "
                      "re-run the same command to resume")
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # the last line of defence: one line, the traceback only with -v
        if getattr(args, "verbose", False):
            console.print_exception()
        message = " ".join(str(exc).split())
        storage = getattr(args, "storage", None)
        if storage:
            from sensisearch.study._storage import mask_url

            message = message.replace(storage, mask_url(storage))
        console.print(
            f"[red]error:[/] internal error: {type(exc).__name__}: {escape(message)} "
            "(run with -v for the traceback)", highlight=False, soft_wrap=True,
        )
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
