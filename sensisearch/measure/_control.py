"""A/A control: the FP32 reference timed against a second FP32 copy built the way trials are.

Two FP32 sessions of the same model should time 1.00x against each other. When
they do not (a 16-core host gave 1.17x [1.15, 1.20]), every candidate's speed-up
carries the same bias, since the candidate differs from the reference in more than
precision: how its artifact was made and loaded, its session options, where its
threads run. The control arm is an FP32 copy made exactly like a candidate (the
backend's ``build`` of the all-FP32 deployable, then ``load``), timed in the same
interleaved rounds as the candidates. Its ratio says whether the comparison is fair
(:func:`control_ok`) and, where it is not, what to divide by (:func:`corrected`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sensisearch.measure._timing import (
    PairedLatency,
    PairedTimingSettings,
    time_interleaved,
)

if TYPE_CHECKING:
    from sensisearch.measure._load import LoadPolicy

CONTROL_ARM = "__aa_control__"
DEFAULT_CONTROL_TOLERANCE = 0.02
"""A control within 2% of 1.00 is accepted even when its (narrow) CI misses 1.00."""


def control_ok(ratio: float, ci: tuple[float, float], tolerance: float = DEFAULT_CONTROL_TOLERANCE) -> bool:
    """True when an A/A ratio is consistent with no bias: 1.0 inside its CI, or ``|ratio - 1| <= tolerance``."""
    lo, hi = ci
    return lo <= 1.0 <= hi or abs(ratio - 1.0) <= tolerance


@dataclass(frozen=True)
class ControlResult:
    """The A/A ratio (reference time / control time, > 1: the control copy ran faster) and its verdict."""

    ratio: float
    ci95: tuple[float, float]
    ok: bool
    tolerance: float
    paired: PairedLatency
    """The control arm's full paired timing (rounds, load record, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "ci95": list(self.ci95), "ok": self.ok, "tolerance": self.tolerance,
                "paired": self.paired.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ControlResult:
        lo, hi = data["ci95"]
        return cls(float(data["ratio"]), (float(lo), float(hi)), bool(data["ok"]), float(data["tolerance"]),
                   PairedLatency.from_dict(data["paired"]))


def control_result(paired: PairedLatency, tolerance: float = DEFAULT_CONTROL_TOLERANCE) -> ControlResult:
    """A :class:`ControlResult` from the control arm's :class:`PairedLatency`."""
    return ControlResult(paired.speedup, paired.speedup_ci95, control_ok(paired.speedup, paired.speedup_ci95, tolerance),
                         tolerance, paired)


def corrected_speedup(speedup: float, control_ratio: float) -> float:
    """A candidate's speed-up over the reference, with the A/A bias divided out."""
    return speedup / control_ratio


def corrected(paired: PairedLatency, control: ControlResult | float) -> PairedLatency:
    """``paired`` with its speed-up and CI bounds divided by the control ratio.

    The CI is the candidate's own, rescaled (the control's uncertainty is not added
    in: report the control's CI beside it). For a per-round correction, time with the
    control arm as the reference instead: the per-round ratio control / candidate is
    (ref / candidate) / (ref / control)."""
    ratio = control.ratio if isinstance(control, ControlResult) else float(control)
    lo, hi = paired.speedup_ci95
    return dataclasses.replace(paired, speedup=paired.speedup / ratio, speedup_ci95=(lo / ratio, hi / ratio),
                               ratio_iqr=paired.ratio_iqr / ratio)


def time_with_control(
    arms: Mapping[str, Callable[[], object]],
    reference: str,
    control: Callable[[], object],
    settings: PairedTimingSettings | None = None,
    load: LoadPolicy | None = None,
    tolerance: float = DEFAULT_CONTROL_TOLERANCE,
) -> tuple[dict[str, PairedLatency], ControlResult]:
    """:func:`time_interleaved` of ``arms`` plus the control arm, in the same rounds.

    Returns the arms' results (the control left out) and the :class:`ControlResult`.
    The stop rule waits for the control's CI too, so the control is as precise as
    the candidates."""
    if CONTROL_ARM in arms:
        raise ValueError(f"arm name {CONTROL_ARM!r} is reserved for the control")
    timed = time_interleaved({**arms, CONTROL_ARM: control}, reference, settings, load=load)
    result = control_result(timed.pop(CONTROL_ARM), tolerance)
    return timed, result


def aa_control(
    reference: Callable[[], object],
    control: Callable[[], object],
    settings: PairedTimingSettings | None = None,
    load: LoadPolicy | None = None,
    tolerance: float = DEFAULT_CONTROL_TOLERANCE,
) -> ControlResult:
    """The reference timed against the control alone: the A/A ratio, its CI and whether it is ok."""
    _, result = time_with_control({"reference": reference}, "reference", control, settings, load, tolerance)
    return result
