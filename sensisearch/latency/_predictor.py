"""What the study asks of latency that is not timed here: one small interface.

The target's latency, measured away from the target. A study whose
quantization profile is another backend's (``--profile tensorrt`` on ONNX
Runtime) cannot time that target, so a trial's speed comes from a
:class:`LatencyPredictor` instead of paired timing:

- a measured per-layer latency table (``sensisearch latency-table``, measured
  once on the target; :class:`sensisearch.latency.LatencyTable`), source ``"table"``;
- without one, :class:`MacEstimate` (MACs x precision weight), source ``"estimate"``.

Every figure a predictor gives is stored with its ``source`` and ``label`` and
shown with them; the study's trial latency record says
``{"source": "table"|"estimate", "label": ...}`` where paired timing says
``"source": "paired"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Protocol, runtime_checkable

from sensisearch.latency._estimate import ESTIMATE_LABEL, estimated_cost, layer_macs
from sensisearch.quantize.config import Precision

if TYPE_CHECKING:
    import onnx

    from sensisearch.model.analysis import ModelInfo

SOURCE_PAIRED = "paired"
SOURCE_TABLE = "table"
SOURCE_ESTIMATE = "estimate"


@runtime_checkable
class LatencyPredictor(Protocol):
    """Latency of a precision configuration, predicted without running it."""

    source: str
    """:data:`SOURCE_TABLE` or :data:`SOURCE_ESTIMATE`."""
    label: str
    """What the figure is, in words, shown wherever it appears (e.g. "predicted from latency table ...")."""
    unit: str
    """"ms" for a measured table; "cost" (relative, unitless) for an estimate."""

    def predict(self, precisions: Mapping[str, Precision | str]) -> float:
        """The configuration's latency (``unit``), lower is faster; ``precisions`` names every quantizable layer."""
        ...

    def speedup(self, precisions: Mapping[str, Precision | str]) -> float:
        """Predicted speed-up against all-FP32 (> 1: faster)."""
        ...


@dataclass(frozen=True)
class MacEstimate:
    """The documented fallback: :func:`estimated_cost` over :func:`layer_macs` (see ``_estimate``)."""

    macs: Mapping[str, float]
    source: str = SOURCE_ESTIMATE
    label: str = ESTIMATE_LABEL
    unit: str = "cost"

    @classmethod
    def for_model(cls, model: onnx.ModelProto, info: ModelInfo) -> MacEstimate:
        return cls(layer_macs(model, info))

    def predict(self, precisions: Mapping[str, Precision | str]) -> float:
        return estimated_cost(self.macs, precisions)

    def speedup(self, precisions: Mapping[str, Precision | str]) -> float:
        fp32 = estimated_cost(self.macs, {name: Precision.FP32 for name in self.macs})
        return fp32 / max(self.predict(precisions), 1e-12)
