"""The typed input of the review: plain data the study (or anyone) fills in.

Nothing here knows about Optuna or trial attributes; the study converts its
records into these dataclasses, and the renderers (``_html.py``, ``_png.py``)
read only them. The small pure functions below are what both renderers share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from sensisearch.quantize.config import Precision

# One home for how a precision looks, in the HTML and in the PNGs alike.
PRECISION_COLOURS: Mapping[str, str] = {
    Precision.INT8.value: "#2a9d8f",
    Precision.FP16.value: "#e9c46a",
    Precision.FP32.value: "#e76f51",
}
PRECISION_ORDER: tuple[str, ...] = tuple(p.value for p in Precision)  # int8, fp16, fp32
MISSING_CODE = -1

LATENCY_SPEED_AXIS = "speed-up vs FP32 (latency, batch 1)"
THROUGHPUT_SPEED_AXIS = "speed-up vs FP32 (throughput)"


class PointKind(str, Enum):
    """What a point on the Pareto plot is."""

    SEARCHED = "searched"
    BASELINE = "baseline"
    """All-FP32 / all-INT8 / all-FP16; ``ReviewPoint.label`` says which."""
    REFERENCE = "reference"
    """A reference quantizer (e.g. ONNX Runtime's quantize_static); the label names it."""


@dataclass(frozen=True)
class ReviewPoint:
    """One finished trial as the reviewer sees it.

    ``drop`` is points below FP32 (positive = worse); the plots show the metric
    change, ``-drop``. CIs are 95 % intervals ``(low, high)`` of the same
    quantity, or None when the study did not compute one.
    """

    trial: int
    metric: float
    drop: float
    speedup: float
    kind: PointKind = PointKind.SEARCHED
    label: str = ""
    """Baseline kind (``fp32``, ``int8``, ``fp16``), reference-quantizer name, or empty."""
    drop_ci95: tuple[float, float] | None = None
    speedup_ci95: tuple[float, float] | None = None
    on_front: bool = False
    is_winner: bool = False
    feasible: bool = True
    precisions: Mapping[str, str] = field(default_factory=dict)
    """Layer -> ``int8``/``fp16``/``fp32``, in graph order."""
    calibration: str = ""
    """Human-readable calibration, e.g. ``entropy n=256``."""
    latencies_ms: Sequence[float] = ()
    """Per-round latencies in milliseconds, for the distributions."""
    relative_cost: float | None = None
    """The MAC estimate's relative cost (FP32 = 1) when nothing was measured: shown as that cost,
    never as the speed-up ``speedup`` (its inverse) would suggest."""
    holdout_drop: float | None = None
    """The drop on the images ``--holdout`` kept from the search (None: not scored there): the honest
    figure for a trial picked as the best of many on the search images."""
    holdout_drop_ci95: tuple[float, float] | None = None

    @property
    def speed_value(self) -> float:
        """What the speed axis shows for this point: the relative cost of an estimate, else the speed-up."""
        return self.relative_cost if self.relative_cost is not None else self.speedup

    def speed_text(self, digits: int = 3, ci_digits: int | None = 2) -> str:
        """``1.962x [1.90, 2.02]`` (``ci_digits`` None: no CI), or ``cost 0.62 (FP32 = 1, estimated)`` for an estimate."""
        if self.relative_cost is not None:
            return f"cost {self.relative_cost:.2f} (FP32 = 1, estimated)"
        ci = self.speedup_ci95
        text = "" if ci is None or ci_digits is None else f" [{ci[0]:.{ci_digits}f}, {ci[1]:.{ci_digits}f}]"
        return f"{self.speedup:.{digits}f}x{text}"

    @property
    def metric_change(self) -> float:
        return 0.0 - self.drop  # not -self.drop: FP32's change reads +0.000, never -0.000

    @property
    def holdout_change(self) -> float | None:
        """The change vs FP32 on the held-out images (None: not scored there)."""
        return None if self.holdout_drop is None else 0.0 - self.holdout_drop

    @property
    def name(self) -> str:
        """``#12``, ``#0 fp32 baseline``, ``#40 ort-quantize_static minmax``."""
        if self.kind is PointKind.BASELINE:
            return f"#{self.trial} all-{self.label.upper()} baseline" if self.label else f"#{self.trial} baseline"
        return f"#{self.trial} {self.label}".rstrip()


@dataclass(frozen=True)
class SensitivityRow:
    """Accuracy drop (points below FP32) with only this layer in INT8, and with
    every layer but this one in INT8. None where not measured."""

    layer: str
    drop_only_this_int8: float | None
    drop_all_but_this_int8: float | None
    speed_all_but_this_int8: tuple[float, float, float] | None = None
    """Every layer but this one INT8, its speed over all-INT8 (median, 95% CI; timed interleaved with it); None: not timed."""


@dataclass(frozen=True)
class ClassAPRow:
    """Per-class AP of the winner against FP32 (points), with the class's instance count."""

    name: str
    instances: int
    fp32_ap: float
    winner_ap: float

    @property
    def change(self) -> float:
        return self.winner_ap - self.fp32_ap


@dataclass(frozen=True)
class FloatLayerEvidence:
    """Why the winner keeps ``layer`` in FP16/FP32, in words backed by a measurement."""

    layer: str
    precision: str
    evidence: str


@dataclass(frozen=True)
class ReviewData:
    """Everything ``report.html`` and the PNGs show."""

    metric_name: str
    points: Sequence[ReviewPoint]
    layers: Sequence[str]
    """Quantizable layers in graph order."""
    speed_axis: str = LATENCY_SPEED_AXIS
    title: str = "sensisearch study review"
    sensitivity: Sequence[SensitivityRow] = ()
    winner_classes: Sequence[ClassAPRow] = ()
    float_layer_evidence: Sequence[FloatLayerEvidence] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)
    """Model path/sha256, calibration and evaluation data identity, versions,
    machine; values may be nested mappings."""
    noise: str = ""
    """One line on measurement noise, e.g. the speed-up a repeated FP32 run shows."""
    # The honest verdict and stage 2 (predicted vs measured).
    verdicts: Sequence[str] = ()
    """Sentences on INT8's speed here (e.g. partial INT8 slower than FP32), shown under the winner."""
    prediction_summary: str = ""
    """Stage 2's rank correlation of in-study (predicted or paired) vs verified speed-up, in words."""
    prediction_rows: Sequence[tuple[int, float, float]] = ()
    """(trial, in-study speed-up, verified speed-up)."""
    prediction_source: str = ""
    """Where the in-study figures came from ("estimate": shown as relative costs, not speed-ups)."""
    holdout_images: int = 0
    """How many evaluation images ``--holdout`` kept from the search (0: none; the points'
    ``holdout_drop`` are scored on them)."""
    accuracy_notes: Sequence[str] = ()
    """Sentences on how far the accuracy figures can be trusted: how finely the images resolve a drop
    against ``--max-drop``, and which trials the held-out images ruled out."""

    @property
    def cost_axis(self) -> bool:
        """Is every trial's speed figure an estimate, so the speed axis is a relative cost (lower is faster)?"""
        trials = [p for p in self.points if p.kind is not PointKind.REFERENCE]
        return bool(trials) and all(p.relative_cost is not None for p in trials)

    def x_of(self, point: ReviewPoint) -> float:
        """The point's position on the speed axis: a relative cost on a cost axis, else its speed-up."""
        return point.speed_value if self.cost_axis else point.speedup

    def __post_init__(self) -> None:
        trials = [p.trial for p in self.points]
        duplicated = sorted(t for t, n in Counter(trials).items() if n > 1)
        if duplicated:
            raise ValueError(f"trial numbers appear more than once: {duplicated}")
        if sum(p.is_winner for p in self.points) > 1:
            raise ValueError("more than one point is marked is_winner")
        known = set(self.layers)
        for p in self.points:
            unknown = [layer for layer in p.precisions if layer not in known]
            if unknown:
                raise ValueError(f"trial {p.trial}: layers not in ReviewData.layers: {unknown[:3]}")
            bad = sorted({v for v in p.precisions.values() if v not in PRECISION_ORDER})
            if bad:
                raise ValueError(f"trial {p.trial}: precisions {bad} are not one of {PRECISION_ORDER}")

    @property
    def winner(self) -> ReviewPoint | None:
        return next((p for p in self.points if p.is_winner), None)

    def front(self) -> list[ReviewPoint]:
        """Pareto-front points (the winner included), fastest first."""
        return sorted((p for p in self.points if p.on_front or p.is_winner), key=lambda p: -p.speedup)


def precision_codes(layers: Sequence[str], points: Sequence[ReviewPoint]) -> np.ndarray:
    """``[points, layers]`` int array: index into :data:`PRECISION_ORDER`, -1 where unset."""
    index = {p: i for i, p in enumerate(PRECISION_ORDER)}
    column = {layer: j for j, layer in enumerate(layers)}
    codes = np.full((len(points), len(layers)), MISSING_CODE, dtype=np.int8)
    for i, point in enumerate(points):
        for layer, precision in point.precisions.items():
            codes[i, column[layer]] = index[precision]
    return codes


def ci_offsets(values: Sequence[float], cis: Sequence[tuple[float, float] | None]) -> tuple[np.ndarray, np.ndarray]:
    """Error-bar lengths below and above each value (0 where no CI), never negative."""
    vals = np.asarray(values, dtype=float)
    low = np.array([c[0] if c else v for v, c in zip(vals, cis)], dtype=float)
    high = np.array([c[1] if c else v for v, c in zip(vals, cis)], dtype=float)
    return np.maximum(vals - low, 0.0), np.maximum(high - vals, 0.0)


def negate_ci(ci: tuple[float, float] | None) -> tuple[float, float] | None:
    """CI of ``-x`` from the CI of ``x`` (a drop's CI -> the metric change's CI)."""
    return None if ci is None else (-ci[1], -ci[0])


def configuration_summary(point: ReviewPoint, limit: int = 12) -> str:
    """The configuration in a few lines: the majority precision and the exceptions.

    A YOLO has ~60 layers; listing all on hover is unreadable, while "INT8
    except 3" with the three named is the whole configuration, exactly.
    """
    if not point.precisions:
        return point.calibration or "(configuration not recorded)"
    counts = Counter(point.precisions.values())
    majority, _ = counts.most_common(1)[0]
    exceptions = [(layer, p) for layer, p in point.precisions.items() if p != majority]
    head = " / ".join(f"{counts.get(p, 0)} {p.upper()}" for p in PRECISION_ORDER)
    lines = [f"layers: {head}", f"all {majority.upper()}" + (f" except {len(exceptions)}:" if exceptions else "")]
    lines += [f"  {layer}: {p.upper()}" for layer, p in exceptions[:limit]]
    if len(exceptions) > limit:
        lines.append(f"  ... and {len(exceptions) - limit} more")
    if point.calibration:
        lines.append(f"calibration: {point.calibration}")
    return "\n".join(lines)


def flatten_provenance(provenance: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested mapping -> ``("calibration.sha256", "ab12...")`` rows, in insertion order."""
    rows: list[tuple[str, str]] = []
    for key, value in provenance.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += flatten_provenance(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            rows.append((name, ", ".join(str(v) for v in value)))
        else:
            rows.append((name, "" if value is None else str(value)))
    return rows
