"""What a study keeps: its storage, one typed record per trial, the front and the winner, finished runs, workers."""

from sensisearch.study.store._finished import FinishedRun, export_run_trial, open_finished_run, run_settings
from sensisearch.study.store._owner import Owner, fail_dead_owner_trials
from sensisearch.study.store._record import VERIFY_SUMMARY_ATTR, HoldoutScore, LatencyRecord, TrialRecord, WorstClass
from sensisearch.study.store._results import WinnerChoice, baseline, choose_winner, pareto_front, records
from sensisearch.study.store._storage import mask_url, open_storage
from sensisearch.study.store._worker import append_disk_section, stored_settings

__all__ = [
    "Owner",
    "fail_dead_owner_trials",
    "VERIFY_SUMMARY_ATTR",
    "FinishedRun",
    "HoldoutScore",
    "LatencyRecord",
    "TrialRecord",
    "WinnerChoice",
    "WorstClass",
    "append_disk_section",
    "baseline",
    "choose_winner",
    "export_run_trial",
    "mask_url",
    "open_finished_run",
    "open_storage",
    "pareto_front",
    "records",
    "run_settings",
    "stored_settings",
]
