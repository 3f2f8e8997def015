"""The timing evidence a study stores, typed: in-study paired timing, the verify tournament, stage 2's check.

Each class reads exactly the JSON earlier versions wrote (``from_dict``) and writes
it back key for key, in the same order (``to_dict``), so a stored study reads back
identically and the files written from it stay byte-identical.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from sensisearch.latency import SOURCE_ESTIMATE, SOURCE_TABLE
from sensisearch.measure import PairedLatency

PREDICTED_SOURCES = (SOURCE_TABLE, SOURCE_ESTIMATE)
"""Latency sources that are a predictor's figure, not a timing."""
_OPTIONAL_KEYS = ("timed_as", "control", "under_load", "forced_under_load")
"""Keys the verify tournament (and a latency class's figure) add to a stored timing, written only when set."""
_CLASS_KEYS = ("class_timings", "class_members", "own_speedup", "own_speedup_ci95")
"""Keys a latency class's figure adds to a stored timing (see ``PairedTiming.class_figure``)."""


@dataclass(frozen=True)
class PairedTiming(PairedLatency):
    """A :class:`PairedLatency` as stored: a trial's ``paired`` attribute, or a verify-tournament entry's ``timing``.

    A subclass rather than a wrapper so readers use the measurement's own names
    (``speedup``, ``speedup_ci95``, ``candidate_times_ms``) without a second hop.
    """

    median_ms: float | None = None
    """Verify tournament only: the study's FP32 reference latency over the verified speed-up."""
    facts: dict[str, Any] | None = None
    """What else the timing depended on (GPU clocks, other GPU processes), as the runner reported it;
    free-form per backend. None: not stored (never omitted by this version)."""
    backend: str | None = None
    """Verify tournament only: the backend that timed it (stage 2 may time on another backend)."""
    timed_as: int | None = None
    """Verify tournament only: the trial whose arm was timed for this one (one arm per latency class)."""
    control: dict[str, Any] | None = None
    """Verify tournament only: the round's A/A control (``ControlResult.to_dict()`` without per-round
    times, plus ``corrected``)."""
    under_load: bool | None = None
    """Some timing behind this figure finished under load (verify round, or a latency class's pooled timings)."""
    forced_under_load: bool | None = None
    """Verify tournament only: ``verify --force`` ran it although the machine was busy."""
    class_figure: dict[str, Any] | None = None
    """Latency classes (``store._classes``): how the class's pooled figure was made (``class_timings``,
    ``class_members``, ``under_load``, and the trial's own ``own_speedup``/``own_speedup_ci95`` when the
    record reports the class's figure instead of its own). None: a timing of its own, stored as before."""

    @property
    def own_speedup(self) -> float:
        """The trial's own timed speed-up (``speedup`` is the class's pooled one when the two differ)."""
        own = (self.class_figure or {}).get("own_speedup")
        return self.speedup if own is None else float(own)

    def with_class_figure(self, figure: Mapping[str, Any]) -> PairedTiming:
        """This timing reporting a latency class's pooled figure (``LatencyClass.figure()``); its own speed-up kept."""
        lo, hi = figure["speedup_ci95"]
        extra = {k: copy.deepcopy(v) for k, v in figure.items() if k in _CLASS_KEYS}
        extra["own_speedup"] = self.own_speedup
        extra["own_speedup_ci95"] = list((self.class_figure or {}).get("own_speedup_ci95") or self.speedup_ci95)
        under_load = figure.get("under_load", self.under_load)
        return dataclasses.replace(
            self, speedup=float(figure["speedup"]), speedup_ci95=(float(lo), float(hi)),
            ratio_iqr=float(figure.get("ratio_iqr", self.ratio_iqr)), rounds=int(figure.get("rounds", self.rounds)),
            under_load=None if under_load is None else bool(under_load), class_figure=extra,
        )

    @classmethod
    def of(
        cls, paired: PairedLatency, facts: Mapping[str, Any] | None, *, median_ms: float | None = None,
        backend: str | None = None,
    ) -> PairedTiming:
        """``paired`` with what is stored beside it."""
        base = {f.name: getattr(paired, f.name) for f in dataclasses.fields(PairedLatency)}
        return cls(**base, median_ms=median_ms, facts=None if facts is None else dict(facts), backend=backend)

    def to_dict(self) -> dict[str, Any]:
        # Key order is what the writers produced: the measurement, then median_ms, facts, backend.
        data = super().to_dict()
        if self.median_ms is not None:
            data["median_ms"] = self.median_ms
        if self.facts is not None:
            data["facts"] = copy.deepcopy(self.facts)
        if self.backend is not None:
            data["backend"] = self.backend
        for name in _OPTIONAL_KEYS:
            value = getattr(self, name)
            if value is not None:
                data[name] = copy.deepcopy(value)
        if self.class_figure is not None:
            data.update(copy.deepcopy(self.class_figure))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairedTiming:
        median_ms = data.get("median_ms")
        facts = data.get("facts")
        backend = data.get("backend")
        timing = cls.of(
            PairedLatency.from_dict(data), None if facts is None else copy.deepcopy(dict(facts)),
            median_ms=None if median_ms is None else float(median_ms), backend=None if backend is None else str(backend),
        )
        timed_as, control = data.get("timed_as"), data.get("control")
        under_load, forced = data.get("under_load"), data.get("forced_under_load")
        extra = {k: copy.deepcopy(data[k]) for k in _CLASS_KEYS if k in data}
        return dataclasses.replace(
            timing, timed_as=None if timed_as is None else int(timed_as),
            control=None if control is None else copy.deepcopy(dict(control)),
            under_load=None if under_load is None else bool(under_load),
            forced_under_load=None if forced is None else bool(forced), class_figure=extra or None,
        )

    def summary_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the per-round times: what ``pareto.json`` shows."""
        return {k: v for k, v in self.to_dict().items() if k != "candidate_times_ms"}


@dataclass(frozen=True)
class Verification:
    """One trial's entry in the verify tournament's study attribute."""

    timing: PairedTiming
    drop_ci95: tuple[float, float] | None = None
    """The verify step's drop CI (more resamples than in-study), in points; None when not computed."""

    def to_dict(self) -> dict[str, Any]:
        return {"timing": self.timing.to_dict(), "drop_ci95": None if self.drop_ci95 is None else list(self.drop_ci95)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verification:
        drop = data.get("drop_ci95")
        return cls(PairedTiming.from_dict(data["timing"]), None if drop is None else (float(drop[0]), float(drop[1])))


@dataclass(frozen=True)
class PredictionCheck:
    """How far the in-study speed-ups (predicted or paired) were from the verified ones (stage 2)."""

    backend: str
    source: str
    """The in-study figures' source: "table", "estimate" or "paired"."""
    spearman: float | None
    """Rank correlation over ``rows`` (None with fewer than 3 trials, or no spread)."""
    rows: tuple[tuple[int, float, float], ...]
    """(trial, in-study speed-up, verified speed-up), FP32 (the reference arm) left out."""

    @property
    def n(self) -> int:
        return len(self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "source": self.source, "spearman": self.spearman, "n": self.n,
            "trials": [{"number": n, "in_study_speedup": a, "verified_speedup": b} for n, a, b in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PredictionCheck:
        rows = tuple((int(t["number"]), float(t["in_study_speedup"]), float(t["verified_speedup"])) for t in data.get("trials", []))
        spearman = data.get("spearman")
        return cls(str(data.get("backend", "")), str(data.get("source", "")), None if spearman is None else float(spearman), rows)

    def summary(self) -> str:
        what = "predicted" if self.source in PREDICTED_SOURCES else "in-study paired"
        rho = "n/a (needs 3 trials with a spread)" if self.spearman is None else f"{self.spearman:.2f}"
        return f"Spearman rank correlation of {what} vs verified speed-up on {self.backend}: {rho} over {self.n} trials"
