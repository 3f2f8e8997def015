"""The one entry point: parse, dispatch to the subcommand, and turn every failure into one line and an exit code."""

from __future__ import annotations

from typing import Sequence

from rich.markup import escape

from sensisearch.cli._console import console, setup_logging
from sensisearch.cli._parser import build_parser
from sensisearch.cli._review import cmd_export, cmd_report
from sensisearch.cli._run import Terminated, cmd_run, cmd_verify, cmd_worker
from sensisearch.cli._tools import cmd_build, cmd_doctor, cmd_evaluate, cmd_latency_table, cmd_sensitivity
from sensisearch.errors import SensisearchError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
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
