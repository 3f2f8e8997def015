"""Command line: ``sensisearch run | evaluate``. The only place that uses rich."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

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

console = Console(stderr=True)
stdout = Console()


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
    p.add_argument("--eval-data", type=Path, help="evaluation data: ImageFolder dir, .npz (images, labels), or idx folder")
    p.add_argument("--calib-data", type=Path, help="calibration data (no labels needed); same formats")
    p.add_argument("--annotations", type=Path, help="COCO instances json for detectors")
    p.add_argument("--mean", type=_csv(float), help="per-channel mean after pixel/255, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", type=_csv(float), help="per-channel std after pixel/255")
    p.add_argument("--metric", help="metric to optimize (top1, top5; mAP50-95, mAP50 for detectors)")
    p.add_argument("--task", choices=["auto", "classification", "detection"], help="default: detected from the model")
    p.add_argument("--evaluator", help="your own evaluation function MODULE:FUNCTION(runner) -> float|dict")
    p.add_argument("--batch-size", type=int, help="evaluation batch for models with a dynamic batch (default 64)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N samples only (quick studies)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: cores, at most 4)")
    p.add_argument("--backend", help="auto (default: TensorRT if an engine can run here, else onnxruntime), onnxruntime, tensorrt, tensorrt-rtx")
    p.add_argument("--shapes", type=_csv(str), help="TensorRT optimization profile, e.g. images:1x3x640x640/8x3x640x640/16x3x640x640")
    p.add_argument("--workspace-mb", type=int, help="TensorRT builder workspace limit in MiB")
    p.add_argument("--opt-level", type=int, help="TensorRT builder optimization level 0-5 (default 3)")
    p.add_argument("--iou", type=float, help="detector NMS IoU threshold (default 0.6)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sensisearch", description="Search per-layer INT8/FP16/FP32 precision and calibration for vision models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run or resume a study", description="Run or resume a study. Flags override the study file.")
    run.add_argument("study_file", nargs="?", type=Path, help="TOML study file (see studies/)")
    _add_data_flags(run)
    run.add_argument("--budget", type=int, help="total finished trials in the study (default 50); re-running resumes up to it")
    run.add_argument("--out", type=Path, help="output folder (default runs/<model stem>)")
    run.add_argument("--storage", help="Optuna storage URL (default: SQLite file in --out)")
    run.add_argument("--study-name", help="study name in the storage (default: model stem)")
    run.add_argument("--seed", type=int, help="sampler and calibration-order seed (default 0)")
    run.add_argument("--max-drop", type=float, help="winner's allowed metric drop vs FP32, in points (default 1.0)")
    run.add_argument("--precisions", type=_csv(str), help="precisions to search, e.g. int8,fp32 (default: backend's)")
    run.add_argument("--algorithms", type=_csv(str), help="calibration algorithms (default minmax,entropy,percentile,mse)")
    run.add_argument("--sample-counts", type=_csv(int), help="calibration sample counts (default 128,256,512,1024, capped by data)")
    run.add_argument("--percentiles", type=_csv(float), help="clip percentiles for percentile calibration (default 99.9,99.99,99.999)")
    run.add_argument("--latency-batch", type=int, help="batch size for latency (default 1)")
    run.add_argument("--latency-seconds", type=float, help="minimum timed seconds per trial (default 0.5)")
    run.add_argument("--calib-limit", type=int, help="use the first N calibration samples only")
    run.add_argument("--max-class-drop", type=float, help="detectors: a trial is infeasible if any class AP drops more (points)")
    run.add_argument("--cache-dir", type=Path, help="calibration/tensor cache (default <out>/cache)")
    run.add_argument("--compare-ort-quantizer", action="store_true", default=None,
                     help="also score ONNX Runtime quantize_static (minmax, percentile 99.99) beside the front")
    run.add_argument("--heartbeat-seconds", type=int, help="worker heartbeat; a dead worker's trial is retried after 2x this (default 30)")

    ev = sub.add_parser("evaluate", help="score one model (FP32 ONNX or a trial's deployable ONNX)")
    _add_data_flags(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ev.add_argument("--per-class", action="store_true", help="also print per-class scores")
    ev.add_argument("--cache-dir", type=Path, help="preprocessed-data cache (default: runs/cache)")
    bd = sub.add_parser("build", help="rebuild one configuration (winner/config.json or a trial.json) into an artifact")
    bd.add_argument("--config", type=Path, required=True, help="winner/config.json or trials/NNNN/trial.json")
    bd.add_argument("--model", type=Path, help="the model (default: the path recorded in the config)")
    bd.add_argument("--backend", default="auto", help="auto (default), onnxruntime, tensorrt, tensorrt-rtx (builds .plan on any CPU)")
    bd.add_argument("--threads", type=int, help="ONNX Runtime threads")
    bd.add_argument("--shapes", type=_csv(str), help="TensorRT optimization profile name:MIN/OPT/MAX")
    bd.add_argument("--workspace-mb", type=int, help="TensorRT builder workspace limit in MiB")
    bd.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0-5")
    bd.add_argument("--out", type=Path, help="artifact path (default: beside the config)")
    bd.add_argument("-v", "--verbose", action="store_true")

    dr = sub.add_parser("doctor", help="what can build and run here: TensorRT flavor, GPU, driver, ONNX Runtime, Optuna")
    dr.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


SETTING_FLAGS = (
    "model", "example", "eval_data", "calib_data", "annotations", "mean", "std", "metric", "task", "evaluator",
    "batch_size", "eval_limit", "threads", "backend", "iou", "budget", "out", "storage", "study_name", "seed",
    "max_drop", "precisions", "algorithms", "sample_counts", "percentiles", "latency_batch", "latency_seconds",
    "calib_limit", "max_class_drop", "cache_dir", "shapes", "workspace_mb", "opt_level", "heartbeat_seconds", "compare_ort_quantizer",
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

    settings = _settings(args)
    # Issue 9: SIGTERM ends a run like Ctrl-C: the running trial is failed and re-queued.
    signal.signal(signal.SIGTERM, _raise_terminated)
    ctx = prepare(settings)
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

        def on_trial(event: TrialEvent) -> None:
            if event.state == "COMPLETE":
                line = f"trial {event.number}: {ctx.evaluator.metric} {event.value:.2f}, {event.latency_ms:.3f} ms ({event.seconds:.1f} s)"
            else:
                line = f"[red]trial {event.number} {event.state.lower()}[/]: {escape(str(event.error))}"
            progress.console.print(line)
            best = "" if event.best_value is None else f"best {ctx.evaluator.metric} {event.best_value:.2f} @ {event.best_latency_ms:.3f} ms"
            progress.update(task, completed=min(event.finished, event.budget), description=best)

        study = run_study(ctx, on_trial, study)
    summary = write_results(ctx, study)
    _print_summary(ctx, summary, time.monotonic() - started)
    return 0


def _print_summary(ctx: StudyContext, summary: StudySummary, seconds: float) -> None:
    from sensisearch.study.report import FRONT_COLUMNS, front_row
    from sensisearch.study.results import baseline

    fp32 = baseline(summary.records, "fp32")
    metric = ctx.evaluator.metric
    table = Table(title=f"Pareto front ({metric} vs median latency, ms per batch of {ctx.settings.latency_batch})")
    for col in FRONT_COLUMNS:
        table.add_column(col.format(metric=metric), justify="right", no_wrap=col != "calibration")
    for r in summary.front:
        table.add_row(*dataclasses.astuple(front_row(r, fp32)))
    stdout.print(table)
    stdout.print(escape(summary.int8_verdict.replace("**", "")))
    choice = summary.winner
    if choice.record is None:
        stdout.print(f"[red]No winner:[/] {escape(choice.reason)}")
    else:
        tag = "[green]winner[/]" if choice.qualified else "[yellow]best-effort (no trial met the target)[/]"
        stdout.print(f"{tag}: trial {choice.record.number} — {escape(choice.reason)} → {escape(str(summary.winner_dir))}")
    stdout.print(f"report: {summary.report}   pareto: {ctx.out / 'pareto.json'}   ({seconds:.0f} s)")


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
        table = Table("class", "score")
        for name, value in result["per_class"].items():
            table.add_row(name, f"{value:.2f}")
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
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "build":
            return cmd_build(args)
        if args.command == "doctor":
            return cmd_doctor(args)
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
