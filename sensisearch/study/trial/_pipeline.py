"""One trial, start to finish: placement -> thresholds -> deployable ONNX -> build -> latency -> accuracy.

:class:`TrialPipeline` is :class:`sensisearch.artifact.ArtifactPipeline` (the
artifact a configuration turns into, shared with ``sensisearch build --config``) plus
the paired timing against the FP32 reference and the accuracy evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import onnx

from sensisearch.backends.base import Backend, BuildResult, LatencySettings, LatencyStats, Runner
from sensisearch.evaluation.base import EvaluationResult, Evaluator
from sensisearch.measure import (
    CONTROL_ARM,
    ControlResult,
    LoadPolicy,
    PairedLatency,
    PairedTimingSettings,
    control_result,
    corrected,
    time_interleaved,
)
from sensisearch.model.analysis import ModelInfo
from sensisearch.quantize.config import Precision, TrialConfig
from sensisearch.quantize.emit import save_model
from sensisearch.quantize.ranges import TensorRange
from sensisearch.artifact import DEPLOYABLE_NAME, ArtifactPipeline, Phases
from sensisearch.calibration.ranges import CalibrationRanges
from sensisearch.quantize.ranges import ranges_from_dict, ranges_to_dict
from sensisearch.study.store._classes import class_key
from sensisearch.study.store._timing import PairedTiming
from sensisearch.study.trial import _fidelity

if TYPE_CHECKING:
    from sensisearch.latency import LatencyPredictor

log = logging.getLogger(__name__)

REFERENCE_ARM = "fp32"
CANDIDATE_ARM = "candidate"


@dataclass(frozen=True)
class TimingPlan:
    """How every trial is timed: interleaved with the FP32 reference, at the objective's batch."""

    objective: str = "latency"
    """"latency": time per batch at the latency batch; "throughput": images/s at a larger batch."""
    batch: int = 1
    settings: PairedTimingSettings = field(default_factory=PairedTimingSettings)
    load: LoadPolicy | None = None
    """Load-aware timing: wait for free cores, pin to them, re-time rounds taken under load (None: plain)."""
    control: bool = True
    """Time an FP32 copy built like a trial beside every candidate: the A/A control."""
    control_repeats: int = 1
    """Re-timings when the control is off 1.00 beyond its CI; after them the figure is divided by it."""

    @property
    def axis_label(self) -> str:
        """What the front's speed axis measured, in words."""
        if self.objective == "throughput":
            return f"throughput, images/s at batch {self.batch} (shown as ms per batch of {self.batch})"
        return f"latency, median ms per batch of {self.batch}"


MIN_ROUND_MS = 2.0
"""Each arm's share of a round lasts at least this long: sub-millisecond models run a block of
runs per round. On this 2-core machine single ~0.3 ms runs of the digits model gave per-round
ratio IQRs of 20-30% (scheduler jitter is charged whole to one run); blocks average it out."""
MAX_RUNS_PER_ROUND = 50


def runs_per_round(arms: Mapping[str, Callable[[], object]], target_ms: float = MIN_ROUND_MS) -> int:
    """Runs per round so the fastest arm's block lasts about ``target_ms`` (1 for models slower than that)."""
    fastest = float("inf")
    for arm in arms.values():
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            result = arm()
            elapsed = (time.perf_counter() - t0) * 1e3
            samples.append(result if type(result) is float else elapsed)
        fastest = min(fastest, sorted(samples)[2])
    return int(min(MAX_RUNS_PER_ROUND, max(1, math.ceil(target_ms / max(fastest, 1e-6)))))


def paired_latency_record(
    paired: PairedLatency, reference_ms: float, objective: str, batch: int, block: int = 1
) -> dict[str, Any]:
    """The trial's ``latency``: drift-free figures from the paired speed-up and the study's FP32 reference.

    ``median_ms`` (what the front minimises) is ``reference_ms / speedup``; ``p90_ms``
    keeps the candidate's own p90/median spread on that scale. The raw medians of
    both arms are kept beside them, but they drift with the machine.
    """
    median_ms = paired.median_ms_for(reference_ms)
    return {
        "median_ms": median_ms,
        "p90_ms": median_ms * paired.candidate_p90_ms / paired.candidate_median_ms,
        "runs": paired.rounds * block,
        "rounds": paired.rounds,
        "runs_per_round": block,
        "batch_size": batch,
        "objective": objective,
        "reference_ms": reference_ms,
        "images_per_second": batch * 1e3 / median_ms,
        "speedup": paired.speedup,
        "speedup_ci95": list(paired.speedup_ci95),
        "ratio_iqr": paired.ratio_iqr,
        "candidate_median_ms": paired.candidate_median_ms,
        "reference_median_ms": paired.reference_median_ms,
        "stopped_by": paired.stopped_by,
        "load": None if paired.load is None else paired.load.to_dict(),
        "load_record": None if paired.load_record is None else paired.load_record.to_dict(),
        "under_load": bool(paired.load_record is not None and paired.load_record.under_load),
    }


OUTCOME_FORMAT = "sensisearch-trial-outcome/1"
"""What :meth:`TrialOutcome.to_full_dict` writes under ``format``."""


@dataclass(frozen=True)
class ControlledTiming:
    """One candidate's paired timing against FP32, with its A/A control and what was done about it."""

    paired: PairedLatency
    """The candidate against the reference (divided by the control ratio when :attr:`corrected`)."""
    block: int
    """Runs per round."""
    ratios: tuple[float, ...]
    """Per-round speed-ups (corrected likewise): what a latency class pools."""
    control: ControlResult | None = None
    corrected: bool = False
    """The control stayed off 1.00 beyond its CI after the repeats: the figure is divided by it."""
    attempts: int = 1

    def control_dict(self) -> dict[str, Any] | None:
        if self.control is None:
            return None
        data = self.control.to_dict()
        data["paired"] = {k: v for k, v in data["paired"].items() if k != "candidate_times_ms"}
        return {**data, "corrected": self.corrected, "attempts": self.attempts}

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON types (the trial child hands it to its parent in the outcome file)."""
        return {
            "paired": self.paired.to_dict(), "block": self.block, "ratios": list(self.ratios),
            "control": None if self.control is None else self.control.to_dict(), "corrected": self.corrected,
            "attempts": self.attempts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ControlledTiming:
        control = data["control"]
        return cls(
            paired=PairedLatency.from_dict(data["paired"]), block=int(data["block"]),
            ratios=tuple(float(r) for r in data["ratios"]),
            control=None if control is None else ControlResult.from_dict(control),
            corrected=bool(data["corrected"]), attempts=int(data["attempts"]),
        )


@dataclass
class TrialOutcome:
    config: TrialConfig
    deployable: Path
    build: BuildResult
    latency: LatencyStats
    evaluation: EvaluationResult
    timings: dict[str, float] = field(default_factory=dict)
    ranges: dict[str, TensorRange] = field(default_factory=dict)
    """Calibrated range of every tensor any backend profile may quantize, so the
    configuration can be rebuilt for another backend without calibration data."""
    paired: PairedLatency | None = None
    """The candidate timed interleaved with the FP32 reference (None: unpaired timing)."""
    timed: ControlledTiming | None = None
    """The timing itself (per-round ratios, A/A control); None when not timed here (a latency class's figure reused)."""
    latency_class: str | None = None
    """Its placement's latency class key."""
    class_reused: bool = False
    """True: not timed, the class's pooled figure was given (calibration-only variant)."""
    latency_record: dict[str, Any] | None = None
    """:func:`paired_latency_record` when paired, else ``latency.to_dict()``."""
    timing_facts: dict[str, Any] = field(default_factory=dict)
    """What else the timing depended on (GPU clocks, other GPU processes), where visible."""
    # Multi-fidelity: the subset scored first, and why the trial stopped there (if it did).
    subset: _fidelity.SubsetFigures | None = None
    early_stop: _fidelity.StopDecision | None = None
    """Set when the trial was stopped after the subset: ``evaluation`` then covers the subset only."""

    @property
    def median_ms(self) -> float:
        """Optuna's second objective: the drift-free figure when paired."""
        return float(self.latency_record["median_ms"]) if self.latency_record else self.latency.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "thresholds": ranges_to_dict(self.ranges),
            "deployable_onnx": str(self.deployable),
            "artifact": str(self.build.artifact),
            "build": {"seconds": self.build.seconds, "layer_precisions": dict(self.build.layer_precisions), **dict(self.build.details)},
            "latency": self.latency_record or self.latency.to_dict(),
            "paired": None if self.paired is None else PairedTiming.of(self.paired, self.timing_facts).to_dict(),
            "latency_class": {"key": self.latency_class, "reused": self.class_reused},
            "control": None if self.timed is None else self.timed.control_dict(),
            "evaluation": self.evaluation.to_dict(),
            "timings": self.timings,
            **({"subset": self.subset.to_dict()} if self.subset is not None else {}),
            **({"stopped_early": self.early_stop.text} if self.early_stop is not None else {}),
        }

    def to_full_dict(self) -> dict[str, Any]:
        """Every field exactly, as JSON types, except ``evaluation.per_image`` (arrays travel as an ``.npz``).

        :meth:`to_dict` is ``trial.json``'s view and leaves things out (the unpaired
        latency figures when paired, the early-stop decision's parts); this is what a
        trial child hands its parent, and :meth:`from_dict` reads it back.
        """
        return {
            "format": OUTCOME_FORMAT,
            "config": self.config.to_dict(),
            "deployable": str(self.deployable),
            "build": self.build.to_dict(),
            "latency": self.latency.to_dict(),
            "evaluation": self.evaluation.to_dict(),
            "timings": dict(self.timings),
            "ranges": ranges_to_dict(self.ranges),
            "paired": None if self.paired is None else self.paired.to_dict(),
            "timed": None if self.timed is None else self.timed.to_dict(),
            "latency_class": self.latency_class,
            "class_reused": self.class_reused,
            "latency_record": None if self.latency_record is None else dict(self.latency_record),
            "timing_facts": dict(self.timing_facts),
            "subset": None if self.subset is None else self.subset.to_dict(),
            "early_stop": None if self.early_stop is None else self.early_stop.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], per_image: Any = None) -> TrialOutcome:
        """Inverse of :meth:`to_full_dict`; ``per_image``: the evaluation's per-image results, read separately.

        Raises ``ValueError`` for anything else (another format, a missing part); callers
        that read untrusted files also compare the result's :meth:`to_full_dict` with
        the input, which refuses unknown keys and mistyped values.
        """
        if not isinstance(data, Mapping) or data.get("format") != OUTCOME_FORMAT:
            raise ValueError(f"not a {OUTCOME_FORMAT} object")
        paired, subset, stop, timed = data["paired"], data["subset"], data["early_stop"], data["timed"]
        return cls(
            config=TrialConfig.from_dict(data["config"]),
            deployable=Path(data["deployable"]),
            build=BuildResult.from_dict(data["build"]),
            latency=LatencyStats.from_dict(data["latency"]),
            evaluation=EvaluationResult.from_dict(data["evaluation"], per_image),
            timings={str(k): float(v) for k, v in dict(data["timings"]).items()},
            ranges=ranges_from_dict(dict(data["ranges"])),
            paired=None if paired is None else PairedLatency.from_dict(paired),
            timed=None if timed is None else ControlledTiming.from_dict(timed),
            latency_class=None if data["latency_class"] is None else str(data["latency_class"]),
            class_reused=bool(data["class_reused"]),
            latency_record=None if data["latency_record"] is None else dict(data["latency_record"]),
            timing_facts=dict(data["timing_facts"]),
            subset=None if subset is None else _fidelity.SubsetFigures.from_dict(subset),
            early_stop=None if stop is None else _fidelity.StopDecision.from_dict(stop),
        )


class TrialPipeline(ArtifactPipeline):
    """One study trial: :class:`ArtifactPipeline` plus latency and accuracy.

    With a :class:`TimingPlan`, every candidate is timed against the FP32 model,
    built once per worker and kept loaded beside it (same process, same session
    options, same input), in interleaved rounds: drift on a shared machine cancels
    in the per-round ratio. Without one, latency is timed alone (``latency_settings``).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        info: ModelInfo,
        backend: Backend,
        evaluator: Evaluator,
        thresholds: CalibrationRanges | None,
        latency_settings: LatencySettings,
        latency_batch: int = 1,
        timing: TimingPlan | None = None,
        predictor: LatencyPredictor | None = None,
        subset: _fidelity.SubsetPlan | None = None,
    ) -> None:
        super().__init__(model, info, backend, thresholds)
        self.predictor = predictor
        """When set, trials are not timed; their latency record comes from it (see ``_predicted``)."""
        self.evaluator = evaluator
        self.subset = subset
        """The fixed subset a searched trial scores first (None: every image at once)."""
        self.latency_settings = latency_settings
        self.latency_batch = latency_batch
        self.timing = timing
        self._reference: Runner | None = None
        self._reference_artifact: Path | None = None
        self._reference_dir: tempfile.TemporaryDirectory[str] | None = None
        self._reference_owner: int | None = None
        self._control_artifact: Path | None = None

    @property
    def timed_here(self) -> bool:
        """Trials are timed on this machine (paired with FP32), not given a predictor's figure."""
        return self.timing is not None and self.predictor is None

    def reference_artifact(self) -> Path:
        """The FP32 model's built artifact, built once per worker.

        The trial server builds it before forking, so every trial child loads it
        instead of building it again (that build was most of the isolation overhead).
        """
        if self._reference_artifact is None:
            out_dir = self.reference_dir()
            config = TrialConfig.uniform(self.info.layer_names, Precision.FP32)
            # The all-FP32 deployable is an unmodified copy of the model (emit_deployable_onnx),
            # so it is saved as is: no placement to plan for the reference.
            deployable = save_model(self.model, out_dir / DEPLOYABLE_NAME)
            self._reference_artifact = self.build(deployable, out_dir, config).artifact
        return self._reference_artifact

    def reference_dir(self) -> Path:
        """The folder the FP32 reference is built into, made (and later deleted) by the calling process."""
        if self._reference_dir is None:
            self._reference_dir = tempfile.TemporaryDirectory(prefix="sensisearch-fp32-")
            self._reference_owner = os.getpid()
        return Path(self._reference_dir.name)

    def control_artifact(self) -> Path:
        """The A/A control: the all-FP32 configuration built exactly as a trial is (``emit`` then ``build``
        into a trial-like folder, same backend, same session options), built once per worker."""
        if self._control_artifact is None:
            out_dir = self.reference_dir() / "control"
            config = TrialConfig.uniform(self.info.layer_names, Precision.FP32)
            deployable, _ = self.emit(config, out_dir)
            self._control_artifact = self.build(deployable, out_dir, config).artifact
        return self._control_artifact

    def adopt_reference(self, artifact: Path, control: Path | None = None) -> None:
        """Use ``artifact`` (built in :meth:`reference_dir` by a forked child) as the FP32 reference
        (and ``control`` as the A/A control's artifact)."""
        if not Path(artifact).is_file():
            raise RuntimeError(f"the FP32 reference {artifact} was not built")
        self._reference_artifact = Path(artifact)
        if control is not None and Path(control).is_file():
            self._control_artifact = Path(control)

    def reference_runner(self) -> Runner:
        """The FP32 model's artifact, loaded on first use and kept loaded for this worker's lifetime."""
        if self._reference is None:
            self._reference = self.backend.load(self.reference_artifact())
        return self._reference

    def close(self) -> None:
        if self._reference is not None:
            self._reference.close()
            self._reference = None
        # Only the process that built the reference deletes it: a forked trial child shares its parent's.
        if self._reference_dir is not None and self._reference_owner == os.getpid():
            self._reference_dir.cleanup()
            self._reference_dir = None
            self._reference_artifact = None
            self._control_artifact = None

    def timing_feeds(self) -> Mapping[str, Any]:
        batch = self.timing.batch if self.timing is not None else self.latency_batch
        return self.evaluator.latency_feeds(batch)

    def arm(self, runner: Runner, feeds: Mapping[str, Any]) -> Callable[[], object]:
        """The callable that times one run of ``runner`` for this plan's objective."""
        if self.timing is not None and self.timing.objective == "throughput":
            return runner.throughput_arm(feeds)
        return runner.timing_arm(feeds)

    def time_paired(self, runner: Runner, artifact: Path | None = None) -> ControlledTiming:
        """``runner`` interleaved with the FP32 reference (and the A/A control) on the same input.

        Every timed session comes from the backend's :meth:`~Backend.timing_backend`; where that
        sets sessions up differently from evaluation (ONNX Runtime leaves a core free), the
        candidate is timed as ``artifact`` loaded afresh, not as the evaluation ``runner``.

        The reference is loaded for this timing and closed after it, like the candidate
        and the control: a session kept loaded for the worker's lifetime differs from a
        fresh one in more than precision (its age, its memory, when its thread pool was
        made), and such differences are what an A/A control off 1.00 shows. When the
        control's CI misses 1.00 (beyond its tolerance) the timing is repeated
        (``control_repeats``); if it stays off, the candidate's figure is divided by it and
        marked corrected."""
        assert self.timing is not None
        feeds = self.timing_feeds()
        plan = self.timing
        timing = self.backend.timing_backend()
        reference = timing.load(self.reference_artifact())
        control = timing.load(self.control_artifact()) if plan.control else None
        candidate = self._timing_session(timing, artifact)
        try:
            arms = {REFERENCE_ARM: self.arm(reference, feeds), CANDIDATE_ARM: self.arm(candidate or runner, feeds)}
            if control is not None:
                arms[CONTROL_ARM] = self.arm(control, feeds)
            settings = dataclasses.replace(plan.settings, runs_per_round=runs_per_round(arms))
            attempts = 0
            while True:
                attempts += 1
                timed = time_interleaved(arms, REFERENCE_ARM, settings, load=plan.load)
                checked = None if control is None else control_result(timed[CONTROL_ARM])
                if checked is None or checked.ok or attempts > plan.control_repeats:
                    break
                log.info("A/A control %.3fx [%.3f, %.3f] is off 1.00: timing again", checked.ratio, *checked.ci95)
                settings = dataclasses.replace(settings, seed=settings.seed + 1)
        finally:
            for opened in (reference, control, candidate):
                if opened is not None:
                    opened.close()
        paired = timed[CANDIDATE_ARM]
        ratios = [r / c for r, c in zip(timed[REFERENCE_ARM].candidate_times_ms, paired.candidate_times_ms) if c > 0]
        fixed = checked is not None and not checked.ok
        if fixed:
            assert checked is not None
            paired = corrected(paired, checked)
            ratios = [r / checked.ratio for r in ratios]
        return ControlledTiming(paired, settings.runs_per_round, tuple(ratios), checked, fixed, attempts)

    def _timing_session(self, timing: Backend, artifact: Path | None) -> Runner | None:
        """``artifact`` loaded afresh for timing where the backend sets timing sessions up unlike evaluation
        ones (None: time the evaluation runner itself)."""
        return timing.load(artifact) if artifact is not None and self.backend.separate_timing_sessions else None

    def time_against(self, runner: Runner, artifact: Path, baseline: Path, max_seconds: float) -> PairedLatency:
        """``runner`` (built as ``artifact``) interleaved with the ``baseline`` artifact, with this plan's
        objective, batch and load policy, for at most ``max_seconds``: its speed-up over the baseline
        (a screening timing, e.g. a sensitivity probe's against all-INT8; no A/A control)."""
        assert self.timing is not None
        plan = self.timing
        feeds = self.timing_feeds()
        timing = self.backend.timing_backend()
        against = timing.load(baseline)
        candidate = self._timing_session(timing, artifact)
        try:
            arms = {"baseline": self.arm(against, feeds), CANDIDATE_ARM: self.arm(candidate or runner, feeds)}
            settings = dataclasses.replace(plan.settings, runs_per_round=runs_per_round(arms),
                                           max_seconds=min(plan.settings.max_seconds, max_seconds))
            return time_interleaved(arms, "baseline", settings, load=plan.load)[CANDIDATE_ARM]
        finally:
            for opened in (against, candidate):
                if opened is not None:
                    opened.close()

    def latency_class_key(self, config: TrialConfig) -> str:
        """The key of ``config``'s latency class: its Q/DQ tensors (and whose scale each reuses) and its
        per-layer precisions under this backend's profile. Calibration is left out: it changes the
        numbers in the Q/DQ nodes, not the graph the backend builds. The timing sessions' thread count is part
        of it: a speed-up is a property of the session as much as of the graph (digits all-INT8 over FP32: 2.9x
        with 1 thread, 1.7-2.3x with 2 on a 2-core machine), so a study resumed or shared by a worker with
        other threads times its classes afresh instead of pooling unlike figures."""
        placement = self.plan(config)
        payload = {
            "profile": placement.profile.name,
            "qdq": sorted([a.tensor, a.params_from or ""] for a in placement.activations),
            "int8": sorted(layer.name for layer in placement.int8_layers),
            "fp16": sorted(layer.name for layer in placement.fp16_layers),
            "precisions": sorted(config.to_dict().get("precisions", {}).items()),
            "batch": None if self.timing is None else [self.timing.objective, self.timing.batch],
        }
        threads = self.backend.describe().get("timing_threads")
        if threads is not None:  # backends without a thread setting (TensorRT) keep the keys they had
            payload["timing_threads"] = threads
        return class_key(payload)

    def latency_of(self, runner: Runner, reference_ms: float | None = None, artifact: Path | None = None) -> dict[str, Any]:
        """A latency record for any loaded artifact (e.g. a reference quantizer's): paired with FP32 when
        the study times that way, so its speed-up is comparable with the trials'."""
        if self.timing is None:
            return runner.measure_latency(self.timing_feeds(), self.latency_settings).to_dict()
        timed = self.time_paired(runner, artifact)
        ms = timed.paired.reference_median_ms if reference_ms is None else reference_ms
        return {**paired_latency_record(timed.paired, ms, self.timing.objective, self.timing.batch, timed.block),
                "control": timed.control_dict()}

    def predicted_record(self, config: TrialConfig) -> dict[str, Any]:
        """The trial's latency record from the predictor (no timing, no CI)."""
        from sensisearch.study.trial._predicted import predicted_latency_record

        assert self.predictor is not None
        batch = self.timing.batch if self.timing is not None else self.latency_batch
        objective = self.timing.objective if self.timing is not None else "latency"
        return predicted_latency_record(self.predictor, config.precisions, objective, batch)

    def run(
        self, config: TrialConfig, out_dir: Path, reference_ms: float | None = None,
        early_stop: _fidelity.EarlyStopSnapshot | None = None, known_latency: Mapping[str, Any] | None = None,
    ) -> TrialOutcome:
        """``reference_ms``: the study's FP32 reference latency (None: this trial's own paired FP32 median,
        which is how the FP32 baseline trial fixes it). ``early_stop``: score the study's subset first and
        stop after it when the trial is clearly out (None, e.g. for baselines: every image at once).
        ``known_latency``: its latency class's pooled figure (a ``PairedLatency`` dict): the trial is not
        timed and reports that figure (a calibration-only variant of a placement already timed)."""
        phases = Phases()
        deployable, ranges = self.emit(config, out_dir, phases)
        with phases("build"):
            build = self.build(deployable, out_dir, config)
        with phases("load"):
            runner = self.backend.load(build.artifact)
        paired: PairedLatency | None = None
        timed: ControlledTiming | None = None
        block = 1
        facts: dict[str, Any] = {}
        key = None if self.predictor is not None or self.timing is None else self.latency_class_key(config)
        with runner:
            with phases("latency"):
                if self.predictor is not None:
                    # The target's latency is predicted, not timed here (see _predicted).
                    predicted = self.predicted_record(config)
                    latency = LatencyStats(predicted["median_ms"], predicted["median_ms"], predicted["median_ms"],
                                           predicted["median_ms"], 0, predicted["batch_size"])
                elif self.timing is None:
                    latency = runner.measure_latency(self.timing_feeds(), self.latency_settings)
                elif known_latency is not None:
                    paired = PairedLatency.from_dict(known_latency)
                    block = int(known_latency.get("runs_per_round", 1))
                    ms = paired.candidate_median_ms
                    latency = LatencyStats(ms, ms, ms, ms, 0, self.timing.batch)
                else:
                    timed = self.time_paired(runner, build.artifact)
                    paired, block = timed.paired, timed.block
                    facts = runner.timing_facts()
                    latency = LatencyStats.from_samples(paired.candidate_times_ms, self.timing.batch)
            staged: _fidelity.StagedEvaluation | None = None
            with phases("evaluate"):
                if early_stop is not None and self.subset is not None:
                    # Timed above, before evaluation; a predicted speed-up has no CI, so it is its own bound.
                    upper = predicted["speedup"] if self.predictor is not None else (
                        None if paired is None else paired.speedup_ci95[1]
                    )
                    staged = _fidelity.evaluate_staged(self.evaluator, runner, self.subset, early_stop, upper)
                    evaluation = staged.evaluation
                else:
                    evaluation = self.evaluator.evaluate(runner)
        record = None
        if self.predictor is not None:
            record = predicted
        if paired is not None and self.timing is not None:
            reference_ms = paired.reference_median_ms if reference_ms is None else reference_ms
            record = paired_latency_record(paired, reference_ms, self.timing.objective, self.timing.batch, block)
            record["control"] = None if timed is None else timed.control_dict()
            record["latency_class"] = key
            record["class_reused"] = known_latency is not None
        requested = {p.value: len(config.layers_with(p)) for p in Precision}
        log.info(
            "%s=%.3f median=%.3fms%s (layers asked %s, ran %s)",
            evaluation.metric, evaluation.value, latency.median_ms if record is None else record["median_ms"],
            "" if paired is None else f" speed-up {paired.speedup:.3f}x [{paired.speedup_ci95[0]:.3f}, {paired.speedup_ci95[1]:.3f}]",
            requested, dict(build.layer_precisions),
        )
        return TrialOutcome(
            config=config,
            deployable=deployable,
            build=build,
            latency=latency,
            evaluation=evaluation,
            timings=phases.seconds,
            # Every tensor's range, not only this placement's: the record then rebuilds the configuration for
            # any backend, and results rewritten from the records (`report`, another worker) match the study's.
            ranges=self.ranges_for(config, every_tensor=True) if config.uses_int8 else ranges,
            paired=paired,
            latency_record=record,
            timing_facts=facts,
            timed=timed,
            latency_class=key,
            class_reused=known_latency is not None,
            subset=None if staged is None else staged.subset,
            early_stop=None if staged is None else staged.stop,
        )
