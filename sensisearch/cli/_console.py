"""The CLI's rich consoles and logging set-up: the only place that makes a rich console."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

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


def setup_logging(verbose: bool) -> None:
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
