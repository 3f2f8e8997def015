"""The one entry point: parse, dispatch to the subcommand, and turn every failure into one line and an exit code."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

from rich.markup import escape

from sensisearch.cli._console import console, setup_logging, stdout
from sensisearch.cli._output import reset_output
from sensisearch.cli._parser import build_parser
from sensisearch.cli._review import cmd_export, cmd_report
from sensisearch.cli._run import cmd_run, cmd_verify, cmd_worker
from sensisearch.cli._tools import cmd_build, cmd_doctor, cmd_evaluate, cmd_latency_table, cmd_sensitivity
from sensisearch.errors import SensisearchError


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "worker": cmd_worker, "verify": cmd_verify, "report": cmd_report, "export": cmd_export,
    "evaluate": cmd_evaluate, "build": cmd_build, "doctor": cmd_doctor, "sensitivity": cmd_sensitivity,
    "latency-table": cmd_latency_table,
}
"""Subcommand name -> its function (the parser in ``_parser`` defines the same names)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    reset_output([console, stdout])
    try:
        command = COMMANDS.get(args.command)
        if command is not None:
            return command(args)
    except SensisearchError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as exc:
        what = getattr(exc, "reason", "interrupted")
        console.print(f"[yellow]{what}[/]: finished trials are in the study, the running one is queued again; "
                      "re-run the same command to resume")
        return 143 if "SIGTERM" in what else 130
    except Exception as exc:  # the last line of defence: one line, the traceback only with -v
        if getattr(args, "verbose", False):
            console.print_exception()
        from sensisearch.study import classify_fault as classify

        out = getattr(args, "out", None)
        fault = classify(exc, out)
        if fault is not None:  # disk full, storage commit failed: what to free or fix, not "internal error"
            console.print(f"[red]error:[/] {escape(_masked(fault.line, args))}", highlight=False, soft_wrap=True)
            return 2
        message = " ".join(str(exc).split())
        storage = getattr(args, "storage", None)
        if storage:
            from sensisearch.study import mask_url

            message = message.replace(storage, mask_url(storage))
        console.print(
            f"[red]error:[/] internal error: {type(exc).__name__}: {escape(message)} "
            "(run with -v for the traceback)", highlight=False, soft_wrap=True,
        )
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


def _masked(message: str, args: argparse.Namespace) -> str:
    storage = getattr(args, "storage", None)
    if storage:
        from sensisearch.study import mask_url

        return message.replace(storage, mask_url(storage))
    return message
