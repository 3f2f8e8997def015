"""The study: settings, search space, per-trial pipeline, Optuna runner, results and report."""

from sensisearch.study._context import StudyContext
from sensisearch.study._identity import StudyIdentity, effective_config_key
from sensisearch.study._record import LatencyRecord, TrialRecord, WorstClass
from sensisearch.study._storage import mask_url, open_storage
from sensisearch.study._verify import VerifyResult, VerifySettings, select_for_verification, verify_study
from sensisearch.study.pipeline import TimingPlan
from sensisearch.study.report import ReportContext
from sensisearch.study.settings import StudySettings
from sensisearch.study.tasks import CalibrationSource, EvaluationSetup

__all__ = [
    "CalibrationSource",
    "EvaluationSetup",
    "LatencyRecord",
    "ReportContext",
    "StudyContext",
    "StudyIdentity",
    "StudySettings",
    "TimingPlan",
    "TrialRecord",
    "VerifyResult",
    "VerifySettings",
    "WorstClass",
    "effective_config_key",
    "mask_url",
    "open_storage",
    "select_for_verification",
    "verify_study",
]
