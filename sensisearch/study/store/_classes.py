"""Latency classes: trials whose artifacts differ only in scale values share one speed.

Two trials with the same precision placement (the same Q/DQ tensors, the same
per-layer precisions) build the same graph up to the numbers inside their Q/DQ
nodes: calibration changes scales, not kernels. Timing them separately only
measures noise, and noise then ranks them (three calibrations of one placement
held a front at 2.217x/2.211x/2.203x). So a placement is one *latency class*: it
is timed once, the paired per-round ratios are pooled when it is timed again, and
every member reports the class's figure.

Classes live in the study's user attributes (one attribute per class), so every
worker sharing the storage sees them. Two workers refining one class at the same
moment may each write a pooled record; the later write wins and loses the other's
rounds, never a figure: both records hold a complete, valid pooled timing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from sensisearch.measure import bootstrap_ci

_CLASS_ATTR_PREFIX = "latency_class:"
MAX_POOLED_ROUNDS = 4000
"""Rounds kept per class (the newest): enough for a 1% CI, small enough for a study attribute."""
DEFAULT_MAX_TIMINGS = 3
"""A class is timed at most this many times in a study; later members reuse its figure whatever its CI."""


def class_key(payload: Mapping[str, Any]) -> str:
    """A short stable key of a placement description (see ``TrialPipeline.latency_class_key``)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LatencyClass:
    """One placement's pooled paired timing against FP32."""

    key: str
    ratios: tuple[float, ...]
    """Per-round speed-ups (reference time / candidate time of one round), every timing pooled."""
    timings: int
    """How many timings were pooled."""
    members: tuple[int, ...]
    """Trial numbers that report this class's figure."""
    last: Mapping[str, Any]
    """The last timing's ``PairedLatency.to_dict()`` (without per-round times): what it was taken under."""
    under_load: bool = False
    """Some pooled timing finished under load (see ``LoadRecord.under_load``)."""
    control_ratios: tuple[float, ...] = ()
    """The A/A control's ratio of each pooled timing."""

    def figure(self, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
        """The pooled speed-up: median of every pooled round, its bootstrap CI, and how it was made."""
        ratios = np.asarray(self.ratios, dtype=np.float64)
        q25, q75 = np.percentile(ratios, [25, 75])
        lo, hi = bootstrap_ci(ratios, np.median, n_resamples, 0.95, seed)
        return {
            "speedup": float(np.median(ratios)),
            "speedup_ci95": [float(lo), float(hi)],
            "ratio_iqr": float(q75 - q25),
            "rounds": int(ratios.size),
            "class_timings": self.timings,
            "class_members": list(self.members),
            "under_load": self.under_load,
        }

    def settled(self, target_ci_width: float, max_timings: int = DEFAULT_MAX_TIMINGS) -> bool:
        """True when another timing is not worth it: the pooled CI meets the target, or the cap is reached."""
        if self.timings >= max_timings:
            return True
        figure = self.figure(n_resamples=500)
        lo, hi = figure["speedup_ci95"]
        return (hi - lo) / figure["speedup"] <= target_ci_width

    def pooled(self, ratios: Iterable[float], last: Mapping[str, Any], under_load: bool, control_ratio: float | None) -> LatencyClass:
        """This class with one more timing's rounds."""
        merged = (*self.ratios, *(float(r) for r in ratios))[-MAX_POOLED_ROUNDS:]
        controls = self.control_ratios if control_ratio is None else (*self.control_ratios, float(control_ratio))
        return dataclasses.replace(self, ratios=merged, timings=self.timings + 1, last=dict(last),
                                   under_load=self.under_load or under_load, control_ratios=controls)

    def with_member(self, number: int) -> LatencyClass:
        return self if number in self.members else dataclasses.replace(self, members=tuple(sorted((*self.members, number))))

    @classmethod
    def first(cls, key: str, ratios: Iterable[float], last: Mapping[str, Any], under_load: bool, control_ratio: float | None) -> LatencyClass:
        return cls(key, (), 0, (), {}).pooled(ratios, last, under_load, control_ratio)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "ratios": [round(r, 6) for r in self.ratios], "timings": self.timings,
            "members": list(self.members), "last": dict(self.last), "under_load": self.under_load,
            "control_ratios": list(self.control_ratios),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyClass:
        return cls(
            key=str(data["key"]), ratios=tuple(float(r) for r in data.get("ratios", ())), timings=int(data.get("timings", 0)),
            members=tuple(int(m) for m in data.get("members", ())), last=dict(data.get("last") or {}),
            under_load=bool(data.get("under_load", False)),
            control_ratios=tuple(float(r) for r in data.get("control_ratios", ())),
        )


def latency_class_attrs(cls: LatencyClass) -> dict[str, Any]:
    """The study attribute holding ``cls``."""
    return {_CLASS_ATTR_PREFIX + cls.key: cls.to_dict()}


def read_latency_class(study_attrs: Mapping[str, Any], key: str | None) -> LatencyClass | None:
    if key is None:
        return None
    data = study_attrs.get(_CLASS_ATTR_PREFIX + key)
    return None if data is None else LatencyClass.from_dict(data)


def read_latency_classes(study_attrs: Mapping[str, Any]) -> dict[str, LatencyClass]:
    """Every class stored in the study, by key."""
    return {
        k[len(_CLASS_ATTR_PREFIX):]: LatencyClass.from_dict(v) for k, v in study_attrs.items() if k.startswith(_CLASS_ATTR_PREFIX)
    }
