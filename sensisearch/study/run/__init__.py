"""Run (or resume) a study: prepare everything once, then trials until the budget is met.

Each part lives in its own private module: ``_prepare`` (inputs, backend, identity
checks, calibration statistics), ``_run_loop`` (open the study, baselines, trials
until the budget), ``_objective`` (one trial), ``_trial_server`` (the forked trial
children) and ``_identity`` (what makes a study one experiment).
"""

from sensisearch.study.run._context import StudyContext
from sensisearch.study.run._evaluate import evaluate_model
from sensisearch.study.run._identity import StudyIdentity, effective_config_key
from sensisearch.study.run._latency_table import measure_latency_table, table_pipeline
from sensisearch.study.run._objective import (
    check_metric_value,
    decide_trial,
    make_objective,
    proposed_config,
    record_heartbeat_now,
    requeue_interrupted,
    worst_class_drop,
)
from sensisearch.study.run._prepare import (
    check_classifier_output,
    check_stored_identity,
    check_task_settings,
    make_out_dir,
    prepare,
)
from sensisearch.study.run._trial_runner import child_settings, trial_runner
from sensisearch.study.run._run_loop import (
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
    "StudyContext",
    "StudyIdentity",
    "TrialEvent",
    "baseline_names",
    "check_classifier_output",
    "child_settings",
    "check_metric_value",
    "check_stored_identity",
    "check_task_settings",
    "complete_baselines",
    "decide_trial",
    "effective_config_key",
    "enqueue_baselines",
    "evaluate_model",
    "finished_count",
    "make_objective",
    "make_out_dir",
    "measure_latency_table",
    "open_study",
    "prepare",
    "proposed_config",
    "record_heartbeat_now",
    "requeue_interrupted",
    "run_study",
    "table_pipeline",
    "trial_runner",
    "worst_class_drop",
]
