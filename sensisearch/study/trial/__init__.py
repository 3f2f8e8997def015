"""One trial: its artifact, paired timing, staged accuracy, predicted latency, and the process it runs in."""

from sensisearch.study.trial._isolation import IsolatedTrialRunner, IsolationSettings
from sensisearch.study.trial._pipeline import TimingPlan, TrialOutcome, TrialPipeline

__all__ = [
    "IsolatedTrialRunner",
    "IsolationSettings",
    "TimingPlan",
    "TrialOutcome",
    "TrialPipeline",
]
