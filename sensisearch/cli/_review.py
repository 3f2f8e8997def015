"""The commands that read a finished run and never run a trial: ``report`` and ``export``."""

from __future__ import annotations

import argparse
import dataclasses
import time

from rich.markup import escape

from sensisearch.cli._console import stdout
from sensisearch.cli._parser import SETTING_FLAGS
from sensisearch.cli._summary import print_disk, print_summary
from sensisearch.errors import SensisearchError


def cmd_report(args: argparse.Namespace) -> int:
    """Rewrite a run's results from its storage: settings from the study, no trial, no calibration, no build."""
    from sensisearch.study import open_finished_run, run_settings
    from sensisearch.study import prepare, write_results
    from sensisearch.study import read_study_file

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
    print_summary(ctx, summary, time.monotonic() - started)
    print_disk(ctx, summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sensisearch.study import export_run_trial, open_finished_run

    run = open_finished_run(args.run_dir, args.storage, args.study_name)
    exported = export_run_trial(run, args.trial, args.format, args.out, args.model, args.shapes, args.max_batch)
    for role, path in exported.files.items():
        stdout.print(escape(f"{role}: {path}"), highlight=False)
    return 0
