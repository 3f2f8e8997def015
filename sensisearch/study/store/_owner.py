"""Which process owns a RUNNING trial, so a dead one is recognised at once instead of after the heartbeat grace.

A trial records its owner as host, PID and the process's start time (field 22 of
``/proc/<pid>/stat``, in clock ticks since boot): a PID reused by another process
after a reboot or a wrap has another start time, so it is not taken for the owner.
Only owners on this host can be checked; trials owned on other hosts still go
through Optuna's heartbeat.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from sensisearch.study.store._record import TrialRecord

if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)

OWNER_ATTR = "owner"
# Optuna's own mark on a re-queued trial (RetryFailedTrialCallback uses it too): the trial it retries.
FAILED_TRIAL_ATTR = "failed_trial"


def process_start_time(pid: int) -> int | None:
    """Field 22 (starttime) of ``/proc/<pid>/stat``; None when there is no such process (or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing one.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 counted from field 3
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start_time: int | None

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start_time(pid))

    def to_attr(self) -> dict[str, object]:
        return {"host": self.host, "pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_attr(cls, value: object) -> Owner | None:
        if not isinstance(value, dict) or not isinstance(value.get("pid"), int) or not isinstance(value.get("host"), str):
            return None
        start = value.get("start_time")
        return cls(value["host"], value["pid"], start if isinstance(start, int) else None)

    def alive(self) -> bool | None:
        """True or False on this host; None (unknown, ask the heartbeat) for another host."""
        if self.host != socket.gethostname():
            return None
        started = process_start_time(self.pid)
        if started is None:
            return False
        return self.start_time is None or started == self.start_time


def claim(trial: optuna.Trial) -> None:
    """Record this process as the trial's owner (first thing a trial does)."""
    trial.set_user_attr(OWNER_ATTR, Owner.current().to_attr())


def owner_of(trial: FrozenTrial) -> Owner | None:
    return Owner.from_attr(trial.user_attrs.get(OWNER_ATTR))


def requeue(study: Study, trial: FrozenTrial) -> None:
    """Queue the trial's configuration again (baseline mark kept), pointing at the trial it retries."""
    record = TrialRecord.from_trial(trial)
    attrs = TrialRecord.baseline_attrs(record.baseline) if record.baseline else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=dict(trial.params), distributions=dict(trial.distributions),
            user_attrs=attrs, system_attrs={FAILED_TRIAL_ATTR: trial.system_attrs.get(FAILED_TRIAL_ATTR, trial.number)},
        ))


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Trials some later trial retries (re-queued by us or by Optuna's heartbeat callback)."""
    out: set[int] = set()
    for t in trials:
        if FAILED_TRIAL_ATTR in t.system_attrs:
            out.add(int(t.system_attrs[FAILED_TRIAL_ATTR]))
    return out


def fail_dead_owner_trials(study: Study) -> list[int]:
    """Fail every RUNNING trial whose owner on this host is gone and queue its configuration again.

    Returns the failed trial numbers. The failed trial records no error of its own,
    so it does not count against the budget (like a trial failed by the heartbeat).
    """
    storage = study._storage  # Optuna has no public way to fail another process's trial
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = owner_of(t)
        if owner is None or owner.alive() is not False:
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):
                continue  # finished meanwhile
        except RuntimeError:  # another worker failed it first
            continue
        log.info("trial %d: its worker (pid %d on %s) is gone; failed and queued again", t.number, owner.pid, owner.host)
        requeue(study, t)
        failed.append(t.number)
    return failed


def orphaned_running(study: Study) -> list[int]:
    """RUNNING trials whose owner on this host is gone (what :func:`fail_dead_owner_trials` would fail)."""
    return [
        t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if (owner := owner_of(t)) is not None and owner.alive() is False
    ]
