"""The commands that run trials or re-time them: ``run``, ``worker`` and ``verify``, with SIGTERM and progress."""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sensisearch.cli._console import console, stdout
from sensisearch.cli._output import StopSignals, route_output
from sensisearch.cli._parser import OVERRIDE_FLAGS, SETTING_FLAGS, settings_from_args
from sensisearch.cli._summary import print_disk, print_summary
from sensisearch.errors import SensisearchError
from sensisearch.progress import Heartbeat, PhaseProgress

if TYPE_CHECKING:
    from sensisearch.study import StudyContext


def cmd_run(args: argparse.Namespace) -> int:
    # SIGTERM and Ctrl-C set a flag; the running trial is failed and re-queued, the exit is one line.
    signals = StopSignals().install()
    log = route_output([console, stdout], getattr(args, "log_file", None))
    try:
        return _run(args, signals)
    finally:
        signals.restore()
        if log is not None:
            log.close()


def _run(args: argparse.Namespace, signals: StopSignals) -> int:
    # Imported here, not at the top: `sensisearch --help` and `doctor` stay fast without Optuna and ONNX.
    from sensisearch.study import TrialEvent, finished_count, open_study, prepare, run_study, write_results

    from sensisearch.study import save_run_settings

    settings = settings_from_args(args)
    # The run's wall time includes preparation: the statistics pass and the sensitivity probes are the study's cost too.
    started = time.monotonic()
    if settings.storage.storage:
        # A wrong URL or password: one line now, before any calibration work.
        from sensisearch.study import open_storage

        open_storage(settings.storage.storage, settings.execution.heartbeat_seconds).remove_session()
    preparing = PhaseProgress("prepare (model, backend, calibration statistics, sensitivity)")
    preparing.start()
    with _statistics_progress() as on_statistics, signals.flag.interruptible(), Heartbeat(preparing):
        ctx = prepare(settings, on_statistics=on_statistics)
    signals.flag.check()  # a signal whose exception was lost inside prepare
    preparing.end()
    ctx.stop = signals.flag
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
    with Progress(
        TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task("", total=settings.search.budget)  # searched configurations; baselines are extra
        # Show progress of a resumed study from where it stands.
        study = open_study(ctx)
        progress.update(task, completed=min(finished_count(study), settings.search.budget))

        # A predicted latency says so (the estimate is a unitless cost, not ms).
        predictor = ctx.pipeline.predictor
        unit_of_latency = "ms" if predictor is None else ("ms predicted" if predictor.unit == "ms" else "estimated relative cost (FP32 = 1)")

        trials = PhaseProgress("trials", "configurations", total=settings.search.budget)
        trials.start(f"budget {settings.search.budget}")
        evaluated: list[float] = []

        def on_trial(event: TrialEvent) -> None:
            if event.note is None:
                # Baselines take time but are not counted: the ETA uses seconds per trial, not elapsed/counted.
                evaluated.append(event.seconds)
                trials.seconds_per_item = sum(evaluated) / len(evaluated)
            if event.note is not None:  # not evaluated: over budget, a repeat, or queued again
                line = f"trial {event.number}: {escape(event.note)}"
            elif event.state == "COMPLETE":
                line = f"trial {event.number}: {ctx.evaluator.metric} {event.value:.2f}, {event.latency_ms:.3f} {unit_of_latency} ({event.seconds:.1f} s)"
            elif event.state == "PRUNED" and event.error:  # stopped early on the subset
                line = f"[yellow]trial {event.number}[/]: {escape(str(event.error))} ({event.seconds:.1f} s)"
            else:
                line = f"[red]trial {event.number} {event.state.lower()}[/]: {escape(str(event.error))}"
            progress.console.print(line)
            best = "" if event.best_value is None else f"best {ctx.evaluator.metric} {event.best_value:.2f} @ {event.best_latency_ms:.3f} {unit_of_latency}"
            # event.budget: --budget less the sensitivity probes' share (the guided study's probes count in it).
            progress.update(task, total=event.budget, completed=min(event.finished, event.budget), description=best)
            trials.step(min(event.finished, event.budget), event.budget)

        with Heartbeat(trials):  # a line at least every interval, also inside one long trial
            study = run_study(ctx, on_trial, study)
        trials.end(f"{min(finished_count(study), settings.search.budget)}/{settings.search.budget}")
    if settings.measurement.verify:
        with signals.flag.interruptible():
            _verify(ctx, study, force=False)
        signals.flag.check()
    summary = write_results(ctx, study)
    print_summary(ctx, summary, time.monotonic() - started)
    return 0


def _verify(
    ctx: StudyContext, study: Any, force: bool, seconds: float | None = None, rounds: int | None = None, backend: str | None = None,
    refuse_under_load: bool = False,
) -> None:
    from sensisearch.study import VerifySettings, verify_backend, verify_study

    settings = VerifySettings.for_study(ctx.settings, seconds, rounds)
    on = None if backend is None else verify_backend(ctx, backend)  # stage 2 on the target
    # The tournament's timing is capped at settings.seconds: that is its ETA before anything is counted.
    verifying = PhaseProgress("verify", expected_seconds=settings.seconds)
    verifying.start()
    with console.status("verifying: FP32, all-INT8, the front and its noise band, interleaved"), Heartbeat(verifying):
        result = verify_study(ctx, study, settings, force=force, backend=on, refuse_under_load=refuse_under_load)
    verifying.end()
    if result is not None:
        control = result.control
        console.print(
            f"verified trials {', '.join(map(str, result.trials))} in {result.tournaments} tournament round(s) "
            f"({result.seconds:.1f} s; FP32 trial {result.reference_trial} the reference"
            + ("" if control is None else f"; A/A control {control['ratio']:.3f}x [{control['ci95'][0]:.3f}, {control['ci95'][1]:.3f}]")
            + ")",
            highlight=False,
        )
        if result.unverified:
            console.print(f"[yellow]not verified[/] (round cap reached): trials {', '.join(map(str, result.unverified))}", highlight=False)
        if result.unsettled:
            console.print(f"[yellow]unsettled[/] (no two timings agreed within 5% with a narrow CI; the machine was disturbed, "
                          f"verify again when quiet): trials {', '.join(map(str, result.unsettled))}", highlight=False)
        if result.under_load:
            console.print("[yellow]figures taken under load[/]: the machine stayed busier than the sessions need", highlight=False)


def cmd_verify(args: argparse.Namespace) -> int:
    from sensisearch.study import load_run_settings
    from sensisearch.study import open_study, prepare, write_results

    if args.seconds is not None and args.seconds <= 0:
        raise SensisearchError(f"--seconds {args.seconds}: must be positive")
    if args.rounds is not None and args.rounds < 3:
        raise SensisearchError(f"--rounds {args.rounds}: use at least 3 rounds (a CI needs a spread)")
    started = time.monotonic()
    overrides = {name: getattr(args, name) for name in ("model", "eval_data", "calib_data", "annotations", "cache_dir")}
    ctx = prepare(load_run_settings(args.run_dir, args.storage, args.study_name, overrides), reviewing=True)
    study = open_study(ctx)
    _verify(ctx, study, force=True, seconds=args.seconds, rounds=args.rounds, backend=args.backend,
            refuse_under_load=not args.force)
    summary = write_results(ctx, study)
    print_summary(ctx, summary, time.monotonic() - started)
    print_disk(ctx, summary)
    return 0



def cmd_worker(args: argparse.Namespace) -> int:
    """`run` with the settings stored in the study, this host's paths and worker flags applied."""
    from sensisearch.study import stored_settings

    overrides = {name: getattr(args, name, None) for name in (*OVERRIDE_FLAGS, "isolation", "build_timeout", "eval_timeout", "keep_artifacts")}
    settings = stored_settings(args.storage, args.study_name, overrides)
    run_args = argparse.Namespace(study_file=None, **{name: None for name in SETTING_FLAGS})
    for name in SETTING_FLAGS:
        setattr(run_args, name, settings.get(name))
    run_args.storage = args.storage  # stored masked; this is the real one
    run_args.keep_artifacts = "all" if settings.execution.keep_artifacts is None else settings.execution.keep_artifacts
    run_args.log_file = getattr(args, "log_file", None)
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

    lines = PhaseProgress("calibration statistics", "samples")

    def update(seen: int, total: int) -> None:
        if not task:
            progress.start()
            task.append(progress.add_task("", total=total))
            lines.start(f"{total} samples")
        progress.update(task[0], completed=seen)
        lines.step(seen, total, force=seen >= total)

    try:
        yield update
    finally:
        if task:
            progress.stop()
