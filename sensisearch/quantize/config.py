"""The backend-neutral configuration of one trial: what the search chooses."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping


class Precision(str, Enum):
    """Compute precision of one quantizable layer."""

    INT8 = "int8"
    FP16 = "fp16"
    FP32 = "fp32"


class CalibrationAlgorithm(str, Enum):
    """How an activation's clipping threshold (amax) is derived from its statistics."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    MSE = "mse"
    MIXED = "mixed"
    """Per tensor: the percentile amax where the tensor needs clipping, min-max elsewhere
    (:func:`sensisearch.calibration.thresholds.needs_clipping`)."""

    @property
    def reads_percentile(self) -> bool:
        """Whether the threshold depends on :attr:`CalibrationChoice.percentile`."""
        return self in (CalibrationAlgorithm.PERCENTILE, CalibrationAlgorithm.MIXED)


@dataclass(frozen=True)
class CalibrationChoice:
    """Calibration settings of a trial.

    ``samples`` is a prefix length of the study's deterministic calibration order;
    ``percentile`` is only used by :attr:`CalibrationAlgorithm.PERCENTILE` and ``MIXED``.
    """

    algorithm: CalibrationAlgorithm = CalibrationAlgorithm.MINMAX
    samples: int = 128
    percentile: float = 99.99
    bias_correction: bool = False
    """Fold each INT8 layer's mean output shift (FP32 minus quantized, on calibration data) into its bias
    (:mod:`sensisearch.calibration.bias`)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"algorithm": self.algorithm.value, "samples": self.samples, "percentile": self.percentile}
        if self.bias_correction:  # absent when off, so configurations stored before it read back unchanged
            out["bias_correction"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CalibrationChoice":
        return cls(
            algorithm=CalibrationAlgorithm(data["algorithm"]),
            samples=int(data["samples"]),
            percentile=float(data.get("percentile", 99.99)),
            bias_correction=bool(data.get("bias_correction", False)),
        )


@dataclass(frozen=True)
class TrialConfig:
    """Precision per quantizable layer (keyed by ONNX node name) plus calibration."""

    precisions: Mapping[str, Precision]
    calibration: CalibrationChoice = field(default_factory=CalibrationChoice)

    def layers_with(self, precision: Precision) -> list[str]:
        return [name for name, p in self.precisions.items() if p is precision]

    @property
    def uses_int8(self) -> bool:
        return any(p is Precision.INT8 for p in self.precisions.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "precisions": {name: p.value for name, p in self.precisions.items()},
            "calibration": self.calibration.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrialConfig":
        return cls(
            precisions={name: Precision(p) for name, p in data["precisions"].items()},
            calibration=CalibrationChoice.from_dict(data["calibration"]),
        )

    @classmethod
    def uniform(cls, layers: list[str], precision: Precision, calibration: CalibrationChoice | None = None) -> "TrialConfig":
        return cls({name: precision for name in layers}, calibration or CalibrationChoice())
