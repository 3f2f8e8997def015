"""What makes a study one experiment: its identity, and when two configurations are the same.

A study's results are only comparable with each other when every trial ran on
the same model, data, metric, backend and machine. :class:`StudyIdentity`
records those facts once, in the study itself; a later run (a resume, another
worker) computes its own and is refused when they differ, with one line that
names what differs and which flag to change.

:func:`effective_config_key` says when two proposed configurations would build
the same deployable model, so the study never evaluates one twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from sensisearch.quantize.config import CalibrationAlgorithm, Precision, TrialConfig

# Which flag (or file) a user changes to make each part of the identity differ.
_FLAG_OF_FIELD: dict[str, str] = {
    "model_sha256": "--model",
    "eval_data": "--eval-data / --eval-limit / --annotations",
    "calib_data": "--calib-data / --calib-limit",
    "task": "--task / --evaluator",
    "metric": "--metric",
    "evaluation": "evaluation settings (--preprocess, --mean, --std, --iou, --evaluator)",
    "backend": "--backend",
    "profile": "the backend's quantization profile",
    "timing": "--objective / --latency-batch",
    "search_space": "--precisions / --algorithms / --sample-counts / --percentiles",
    "device": "the machine (CPU model or GPU); run each device type in its own study",
}


@dataclass(frozen=True)
class StudyIdentity:
    """Everything a trial's numbers depend on besides its configuration.

    Values are plain JSON types so the identity round-trips through the
    storage's study attributes unchanged.
    """

    model_sha256: str
    eval_data: str
    """Content digest of the evaluation data, including any limit."""
    calib_data: str | None
    """Content digest of the calibration data (None when nothing is INT8)."""
    task: str
    metric: str
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    """Preprocessing, NMS IoU, evaluator function: whatever changes the metric."""
    backend: str = ""
    profile: str = ""
    timing: Mapping[str, Any] = field(default_factory=dict)
    """What latency means: objective, batch size."""
    search_space: Mapping[str, Any] = field(default_factory=dict)
    device: str = ""
    """CPU model, or GPU name and driver: latencies of different devices never share a front."""

    def to_dict(self) -> dict[str, Any]:
        # Through JSON so tuples become lists, exactly as the storage returns them.
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudyIdentity":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def differences(self, recorded: Mapping[str, Any]) -> list[str]:
        """One phrase per identity field that differs from ``recorded`` (a stored :meth:`to_dict`).

        Fields the recorded identity does not have (written by an older
        version) are not reported.
        """
        current = self.to_dict()
        out: list[str] = []
        for name, value in current.items():
            if name not in recorded:
                continue
            old = recorded[name]
            if old == value:
                continue
            out.append(f"{_FLAG_OF_FIELD.get(name, name)}: {_short(old)} in the study, {_short(value)} now")
        return out


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"  # a sha256
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_short(v)}" for k, v in sorted(value.items())) or "{}"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "…"


def effective_config_key(config: TrialConfig) -> str:
    """A canonical string: equal for two configurations iff they build the same model.

    Calibration only matters when some layer is INT8, the sample count and
    clip percentile only for the algorithms that read them: the clip
    percentile is meaningless to minmax, entropy and MSE.
    """
    precisions = {name: p.value for name, p in sorted(config.precisions.items())}
    calibration: dict[str, Any] = {}
    if any(p is Precision.INT8 for p in config.precisions.values()):
        choice = config.calibration
        calibration = {"algorithm": choice.algorithm.value, "samples": choice.samples}
        if choice.algorithm is CalibrationAlgorithm.PERCENTILE:
            calibration["percentile"] = choice.percentile
    return json.dumps({"precisions": precisions, "calibration": calibration}, sort_keys=True, separators=(",", ":"))
