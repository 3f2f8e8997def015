"""Run (or resume) a study: prepare everything once, then trials until the budget is met.

The public face of the study's run; each part lives in its own private module:
``_prepare`` (inputs, backend, identity checks, calibration statistics), ``_run_loop``
(open the study, baselines, trials until the budget), ``_objective`` (one trial) and
``_results_writer`` (pareto, winner, report, the summary).
"""

from sensisearch.study._objective import (
    check_metric_value,
    decide_trial,
    make_objective,
    proposed_config,
    record_heartbeat_now,
    requeue_interrupted,
    worst_class_drop,
)
from sensisearch.study._prepare import (
    check_classifier_output,
    check_stored_identity,
    check_task_settings,
    make_out_dir,
    prepare,
)
from sensisearch.study._results_writer import StudySummary, report_context, write_results
from sensisearch.study._run_loop import (
    FINISHED_STATES,
    TrialEvent,
    baseline_names,
    complete_baselines,
    enqueue_baselines,
    finished_count,
    open_study,
    run_study,
)

__all__ = [
    "FINISHED_STATES",
    "StudySummary",
    "TrialEvent",
    "baseline_names",
    "check_classifier_output",
    "check_metric_value",
    "check_stored_identity",
    "check_task_settings",
    "complete_baselines",
    "decide_trial",
    "enqueue_baselines",
    "finished_count",
    "make_objective",
    "make_out_dir",
    "open_study",
    "prepare",
    "proposed_config",
    "record_heartbeat_now",
    "report_context",
    "requeue_interrupted",
    "run_study",
    "worst_class_drop",
    "write_results",
]
