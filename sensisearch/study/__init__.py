"""The study: settings in, a verified Pareto front of speed against accuracy out.

The concepts, each a subpackage whose imports point one way only
(``config`` <- ``store`` <- ``trial`` <- ``search`` <- ``run`` <- ``review``):

- :mod:`~sensisearch.study.config`: settings (flags, study files, stored studies) and the inputs they resolve to;
- :mod:`~sensisearch.study.store`: the Optuna storage, typed trial records, the front and the winner, workers;
- :mod:`~sensisearch.study.trial`: one trial's artifact, paired timing, accuracy and its isolated process;
- :mod:`~sensisearch.study.search`: the space, the sensitivity profile, seeds, samplers, the budget;
- :mod:`~sensisearch.study.run`: prepare once, then the run loop and the trial server;
- :mod:`~sensisearch.study.review`: verify, results, report and references.

A whole run, as the CLI does it::

    from sensisearch.study import StudySettings, prepare, run_study, write_results

    ctx = prepare(StudySettings(example="digits", budget=20))
    run_study(ctx)
    summary = write_results(ctx)
"""

from sensisearch.study.config import (
    SAMPLERS,
    SEARCHES,
    EvaluationSetup,
    ResolvedInputs,
    StudySettings,
    build_evaluation,
    calibration_source,
    merge_settings,
    read_study_file,
    resolve_inputs,
)
from sensisearch.study.review import (
    FRONT_COLUMNS,
    ReportContext,
    StudySummary,
    VerifyResult,
    VerifySettings,
    front_row,
    load_run_settings,
    quiet_quantizer,
    report_context,
    save_run_settings,
    select_for_verification,
    timing_noise_lines,
    verify_backend,
    verify_study,
    write_results,
)
from sensisearch.study.run import (
    StudyContext,
    StudyIdentity,
    TrialEvent,
    child_settings,
    effective_config_key,
    evaluate_model,
    finished_count,
    measure_latency_table,
    open_study,
    prepare,
    run_study,
    table_pipeline,
)
from sensisearch.study.search import (
    PHASE_ATTR,
    PROBE_COST_ATTR,
    GuidedPlan,
    GuidedSampler,
    find_boundary,
    rank_groups,
    SearchSpace,
    SensitivityProfile,
    compact_space,
    groups_space,
    head_rule_layers,
    make_sampler,
    score_config,
    seed_configs,
    sensitivity_profile,
)
from sensisearch.study.store import (
    FinishedRun,
    LatencyRecord,
    TrialRecord,
    WinnerChoice,
    WorstClass,
    append_disk_section,
    baseline,
    choose_winner,
    export_run_trial,
    mask_url,
    open_finished_run,
    open_storage,
    pareto_front,
    records,
    run_settings,
    stored_settings,
)
from sensisearch.study.trial import (
    IsolatedTrialRunner,
    IsolationSettings,
    TimingPlan,
    TrialOutcome,
    TrialPipeline,
)

__all__ = [
    "PHASE_ATTR",
    "PROBE_COST_ATTR",
    "GuidedPlan",
    "GuidedSampler",
    "find_boundary",
    "rank_groups",
    "FRONT_COLUMNS",
    "SAMPLERS",
    "SEARCHES",
    "EvaluationSetup",
    "FinishedRun",
    "IsolatedTrialRunner",
    "IsolationSettings",
    "LatencyRecord",
    "ReportContext",
    "ResolvedInputs",
    "SearchSpace",
    "SensitivityProfile",
    "StudyContext",
    "StudyIdentity",
    "StudySettings",
    "StudySummary",
    "TimingPlan",
    "TrialEvent",
    "TrialOutcome",
    "TrialPipeline",
    "TrialRecord",
    "VerifyResult",
    "VerifySettings",
    "WinnerChoice",
    "WorstClass",
    "append_disk_section",
    "baseline",
    "build_evaluation",
    "calibration_source",
    "child_settings",
    "choose_winner",
    "compact_space",
    "effective_config_key",
    "evaluate_model",
    "export_run_trial",
    "finished_count",
    "front_row",
    "groups_space",
    "head_rule_layers",
    "load_run_settings",
    "make_sampler",
    "mask_url",
    "measure_latency_table",
    "merge_settings",
    "open_finished_run",
    "open_storage",
    "open_study",
    "pareto_front",
    "prepare",
    "quiet_quantizer",
    "read_study_file",
    "records",
    "report_context",
    "resolve_inputs",
    "run_settings",
    "run_study",
    "save_run_settings",
    "score_config",
    "seed_configs",
    "select_for_verification",
    "sensitivity_profile",
    "stored_settings",
    "table_pipeline",
    "timing_noise_lines",
    "verify_backend",
    "verify_study",
    "write_results",
]
