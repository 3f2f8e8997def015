"""How the worker runs a trial: in a forked child of the trial server (``--isolation process``), or in itself."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

from sensisearch.study.trial._isolation import IsolatedTrialRunner, IsolationSettings, RunTrial

if TYPE_CHECKING:
    from sensisearch.study.config._settings import StudySettings
    from sensisearch.study.run._context import StudyContext


def child_settings(ctx: StudyContext) -> StudySettings:
    """The settings the trial server prepares from: the worker's, with its output folder fixed."""
    return ctx.settings.replace(out=ctx.out.resolve())


@contextlib.contextmanager
def trial_runner(ctx: StudyContext) -> Iterator[RunTrial]:
    """``run(config, out_dir) -> TrialOutcome`` as ``--isolation`` says: in a child process, or in this one."""
    if ctx.settings.execution.isolation == "none":
        yield ctx.pipeline.run
        return
    with IsolatedTrialRunner(child_settings(ctx), IsolationSettings.from_settings(ctx.settings), ctx.out, ctx.stop) as runner:
        yield runner.run
