"""Single-purpose tools outside a study run: ``evaluate``, ``build``, ``sensitivity``, ``latency-table``, ``doctor``."""

from __future__ import annotations

import argparse
import json

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sensisearch.cli._console import console, stdout
from sensisearch.cli._parser import settings_from_args


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sensisearch.study import evaluate_model

    settings = settings_from_args(args)
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
    from sensisearch.export import build_from_config

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


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from sensisearch.study import sensitivity_profile
    from sensisearch.study import open_study, prepare

    ctx = prepare(settings_from_args(args))
    for warning in ctx.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    study = open_study(ctx) if ctx.settings.storage.storage or (ctx.out / "study.db").is_file() else None
    probes = 2 + len(ctx.space.algorithms) + 2 * len(ctx.space.layers)
    with Progress(TextColumn("[bold]probes"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("", total=probes - 1)
        profile, cached = sensitivity_profile(
            ctx.sensitivity_inputs(within_budget=False), study, refresh=args.refresh,
            on_probe=lambda name, value: progress.update(task, advance=1, description=escape(f"{name}: {value:.2f}")),
        )
    if args.json:
        print(json.dumps(profile.to_dict()))
        return 0
    metric = profile.metric
    cal = profile.calibration
    table = Table(title=f"Layer sensitivity ({metric}, {profile.eval_count} samples; FP32 {profile.fp32:.2f}, "
                        f"all-INT8 {profile.all_int8:.2f} with {cal['algorithm']} n={cal['samples']})")
    timed = any(row.revert_speedup is not None for row in profile.layers)
    columns = ["rank", "layer", "only-this-INT8 drop", "all-but-this recovery", "score", "output distortion"]
    for col in columns + (["all-but-this speed vs all-INT8 (95% CI)"] if timed else []):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in profile.layers:
        cells = [str(row.rank), escape(row.layer), "not scored" if row.alone_drop is None else f"{row.alone_drop:+.2f}",
                 f"{row.recovery:+.2f}", f"{row.score:+.2f}", f"{row.distortion:.2e}"]
        if timed:
            cells.append("-" if row.revert_speedup is None else "{:.2f}x [{:.2f}, {:.2f}]".format(*row.revert_speedup))
        table.add_row(*cells)
    stdout.print(table)
    if timed:
        faster = profile.faster_in_float
        stdout.print(f"faster in float than in INT8 (the model with only it in float beats all-INT8): "
                     f"{', '.join(f'{escape(n)} {g:.2f}x' for n, g in faster.items()) if faster else 'none'}")
    clipping = [t for t in profile.tensors if t.needs_clipping]
    stdout.print(f"{len(clipping)}/{len(profile.tensors)} activation tensors need clipping (some algorithm's amax < half their min-max):")
    for t in sorted(clipping, key=lambda t: t.clipping)[:10]:
        stdout.print(f"  {escape(t.tensor)}: {t.strongest} at {t.clipping:.2f} of min-max")
    stdout.print(f"{'cached' if cached else 'written'}: {ctx.out / 'sensitivity.json'}")
    return 0


def cmd_latency_table(args: argparse.Namespace) -> int:
    import numpy as np

    from sensisearch.study import measure_latency_table

    settings = settings_from_args(args)
    with console.status(f"profiling the model's layers x 6 configurations, {args.repeats} runs each, then timing them"):
        table, model_path = measure_latency_table(
            settings, args.out, args.profile, args.repeats, device=args.device, cache_dir=args.cache_dir
        )
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
