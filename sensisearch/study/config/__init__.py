"""What a study is asked to do: its settings (flags, study files, stored studies) and the inputs they resolve to."""

from sensisearch.study.config._inputs import (
    EvaluationSetup,
    ResolvedInputs,
    build_evaluation,
    calibration_source,
    preprocessing,
    resolve_inputs,
    with_example,
)
from sensisearch.study.config._faults import EnvironmentalFailure, Fault, classify as classify_fault
from sensisearch.study.config._stop import StopFlag, StopRequested
from sensisearch.study.config._settings import SAMPLERS, SEARCHES, StudySettings, merge_settings, read_study_file

__all__ = [
    "EnvironmentalFailure",
    "Fault",
    "StopFlag",
    "StopRequested",
    "classify_fault",
    "SAMPLERS",
    "SEARCHES",
    "EvaluationSetup",
    "ResolvedInputs",
    "StudySettings",
    "build_evaluation",
    "calibration_source",
    "merge_settings",
    "preprocessing",
    "read_study_file",
    "resolve_inputs",
    "with_example",
]
