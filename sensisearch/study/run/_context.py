"""Everything a study resolved once from its settings, shared by the runner, results and references."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sensisearch.study.config._stop import StopFlag
from sensisearch.study.search._sensitivity import SensitivityInputs
from sensisearch.study.trial._isolation import IsolationSettings

if TYPE_CHECKING:
    import onnx
    import optuna

    from sensisearch.backends.base import Backend
    from sensisearch.backends.factory import BackendSettings
    from sensisearch.evaluation.base import Evaluator
    from sensisearch.model.analysis import ModelInfo
    from sensisearch.study.run._identity import StudyIdentity
    from sensisearch.calibration.ranges import CalibrationRanges
    from sensisearch.study.trial._pipeline import TrialPipeline
    from sensisearch.study.config._settings import StudySettings
    from sensisearch.study.search._space import SearchSpace
    from sensisearch.study.config._inputs import EvaluationSetup


@dataclass
class StudyContext:
    settings: StudySettings
    """The flags / study file, with an example's files and preprocessing filled in."""
    out: Path
    model_path: Path
    model: onnx.ModelProto
    info: ModelInfo
    backend_settings: BackendSettings
    backend: Backend
    evaluation: EvaluationSetup
    space: SearchSpace
    pipeline: TrialPipeline
    calibration: CalibrationRanges | None
    storage_url: str
    study_name: str
    model_warnings: tuple[str, ...] = ()
    backend_reason: str = ""
    # The storage opened (and checked) before calibration, and the study's identity.
    storage: optuna.storages.BaseStorage | None = None
    identity: StudyIdentity | None = None
    identity_may_differ: tuple[str, ...] = ()
    stop: StopFlag = field(default_factory=StopFlag)
    """Set by a signal; the run loop, the waits and the trial runner stop at their next check."""
    """Identity fields this context may see differ from the study's (``prepare(reviewing=True)``)."""

    @property
    def trials_dir(self) -> Path:
        return self.out / "trials"

    @property
    def evaluator(self) -> Evaluator:
        return self.evaluation.evaluator

    @property
    def task(self) -> str:
        return self.evaluation.task

    @property
    def warnings(self) -> list[str]:
        """What the user should know about the inputs (shown by the CLI and in the report)."""
        return [*self.evaluation.warnings, *self.model_warnings]

    def sensitivity_key(self) -> dict[str, Any]:
        """What the sensitivity probes' scores depend on: a cached profile is reused only when all of it matches."""
        settings = self.settings
        calib = self.evaluation.calibration
        return {
            "model_sha256": self.info.sha256,
            "eval_data": str(settings.data.eval_data) if settings.data.eval_data else settings.data.example,
            "annotations": str(settings.data.annotations) if settings.data.annotations else None,
            "eval_limit": settings.data.eval_limit,
            "calib_data": None if calib is None else calib.fingerprint,
            "seed": settings.search.seed,
            "metric": self.evaluator.metric,
            "profile": self.backend.profile.name,
            "algorithms": [a.value for a in self.space.algorithms],
            "samples": self.space.default_calibration.samples,
            # Probes on a fixed subset first, the layers near the ranking's cut on every image.
            "probes": "subset-first",
            # Timed here (not predicted): the probes are timed too and say which layers are faster in float.
            "probe_timing": self.pipeline.timed_here,
            # Probes score the search images only when --holdout keeps some back.
            **({"holdout": self.evaluation.evaluation["holdout"]} if "holdout" in self.evaluation.evaluation else {}),
        }

    def sensitivity_inputs(self, within_budget: bool = True) -> SensitivityInputs:
        """The parts of this study the sensitivity probes use; ``within_budget``: the probes keep to their
        share of ``--budget`` (a study), else every probe runs (``sensisearch sensitivity``)."""
        return SensitivityInputs(
            pipeline=self.pipeline, space=self.space, calibration=self.calibration, out=self.out,
            key=self.sensitivity_key(), latency_batch=self.settings.backend.latency_batch,
            classification=self.task == "classification",
            isolation=None if self.settings.execution.isolation == "none" else IsolationSettings.from_settings(self.settings),
            budget=self.settings.search.budget if within_budget else None,
        )
