"""Command line: ``sensisearch run | worker | evaluate | build | verify | sensitivity | doctor | report | export``. The only place that uses rich.

One private module per concept: ``_console`` (rich consoles, logging), ``_parser``
(flags), ``_run`` (run, worker, verify), ``_review`` (report, export), ``_tools``
(evaluate, build, sensitivity, latency-table, doctor), ``_summary`` (a study's result
on the terminal) and ``_main`` (:func:`main`, the one entry point).
"""

import os

# An image OpenCV cannot decode becomes one error line of ours; OpenCV's own log line about it
# would be a second. OpenCV reads this when cv2 is first imported, which the imports below do;
# a user's own setting wins.
os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")

from sensisearch.cli._console import PIPED_WIDTH, console, make_console, stdout
from sensisearch.cli._main import main
from sensisearch.cli._parser import MEASUREMENT_FLAGS, OVERRIDE_FLAGS, SETTING_FLAGS, build_parser
from sensisearch.cli._review import cmd_export, cmd_report
from sensisearch.cli._output import StopSignals
from sensisearch.cli._run import cmd_run, cmd_verify, cmd_worker
from sensisearch.cli._tools import cmd_build, cmd_doctor, cmd_evaluate, cmd_latency_table, cmd_sensitivity

__all__ = [
    "MEASUREMENT_FLAGS",
    "OVERRIDE_FLAGS",
    "PIPED_WIDTH",
    "SETTING_FLAGS",
    "StopSignals",
    "build_parser",
    "cmd_build",
    "cmd_doctor",
    "cmd_evaluate",
    "cmd_export",
    "cmd_latency_table",
    "cmd_report",
    "cmd_run",
    "cmd_sensitivity",
    "cmd_verify",
    "cmd_worker",
    "console",
    "main",
    "make_console",
    "stdout",
]
