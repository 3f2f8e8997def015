"""What one trial stores in the Optuna storage, as one typed record.

The runner writes a :class:`TrialRecord` with :meth:`TrialRecord.to_attrs` and
everything that reads results back (front, winner, report, progress) gets it
from :meth:`TrialRecord.from_trial`. The user-attribute keys live only here.

Adding a field is one change: declare it below with ``_attr(KEY, default)``.
Attributes missing from a trial (written by an older version, or a failed
trial) read back as the field's default.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, TypedDict

from sensisearch.quantize.config import TrialConfig
from sensisearch.study.store._timing import PREDICTED_SOURCES, PairedTiming, PredictionCheck, Verification

if TYPE_CHECKING:
    import optuna

# User-attribute keys: private to this module.
_BASELINE_ATTR = "baseline"
_ERROR_ATTR = "error"
_KEY = "attr"  # dataclass field metadata: the user-attribute key of a stored field
# Field metadata of a typed part: its class, which has ``to_dict`` and ``from_dict``.
_CODEC = "codec"
# Study user attributes (one per study, shared by all workers).
_REFERENCE_MS_STUDY_ATTR = "reference_ms"
_FP32_PER_IMAGE_STUDY_ATTR = "fp32_per_image"
# Optuna refuses to update a finished trial, so the verify tournament's figures
# live in one study attribute: {trial number: Verification.to_dict()}.
_VERIFIED_STUDY_ATTR = "verified_trials"
# Stage 2's predicted (or in-study) vs verified speed-ups (``PredictionCheck.to_dict()``).
_PREDICTION_CHECK_STUDY_ATTR = "prediction_check"
VERIFY_SUMMARY_ATTR = "verify_summary"
"""How the verify tournament went: its rounds, A/A controls, load, and what it left unverified."""
# The scores on the images --holdout kept from the search: {trial number: HoldoutScore.to_dict()}.
_HOLDOUT_STUDY_ATTR = "holdout_scores"


@dataclass(frozen=True)
class HoldoutScore:
    """A trial scored on the evaluation images ``--holdout`` kept from the search."""

    value: float
    """The metric on the held-out images, in points."""
    reference_value: float
    """FP32's metric on the same images."""
    images: int
    drop_ci95: tuple[float, float] | None = None
    """Paired bootstrap 95% CI over the held-out images of the drop; None when the metric has no per-image form."""

    @property
    def drop(self) -> float:
        return self.reference_value - self.value

    def fails(self, max_drop: float) -> bool:
        """Significantly more than ``max_drop`` below FP32 here: the drop's CI lies wholly above it (the point
        estimate where there is no CI).

        Why not the point estimate: the held-out images are few too (CIs of +-1.5 points on 40 COCO images),
        and passing over every trial whose point estimate crosses the bound, then taking the next one that
        does not, selects on the held-out images' noise just as the search did on its own images. Measured
        (``benchmarks/peers.py --holdout 40``): that rule took a 50/60 trial at +0.31 on the study's 40 held-out
        images that lost 2.03 [+1.09, +3.97] on 58 others. Only clear failures are passed over, as only clear
        speed-ups win (the speed-up CI's lower bound)."""
        bound = max_drop + 1e-9
        return (self.drop_ci95[0] if self.drop_ci95 is not None else self.drop) > bound

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value, "reference_value": self.reference_value, "drop": self.drop, "images": self.images,
            "drop_ci95": None if self.drop_ci95 is None else [self.drop_ci95[0], self.drop_ci95[1]],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HoldoutScore:
        ci = data.get("drop_ci95")
        return cls(float(data["value"]), float(data["reference_value"]), int(data["images"]),
                   None if ci is None else (float(ci[0]), float(ci[1])))


class LatencyRecord(TypedDict, total=False):
    """``LatencyStats.to_dict()`` as stored: milliseconds per batch."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    batch_size: int
    objective: str
    """"latency" or "throughput": what the paired timing measured (ms per batch of ``batch_size``)."""
    reference_ms: float
    """The study's FP32 reference latency: ``median_ms`` is it over the paired speed-up."""
    images_per_second: float
    # Latency from a predictor (``_predicted.predicted_latency_record``), not timed.
    source: str
    """"paired" (timed here), "table" or "estimate" (predicted; see ``label``)."""
    label: str
    unit: str
    """"ms", or a relative cost for the estimate: ``median_ms`` is then in that unit."""
    speedup: float
    # In-study timing's A/A control and load (``TrialPipeline.run``), and its latency class.
    control: dict[str, Any] | None
    """The A/A control of this timing (``ControlledTiming.control_dict()``); None: timed without one."""
    under_load: bool
    """The timing finished under load (see ``LoadRecord.under_load``)."""
    latency_class: str | None
    class_reused: bool
    """True: not timed, its latency class's settled figure was reused."""


class WorstClass(TypedDict):
    """The class that fell most below FP32 (``--max-class-drop``), in points."""

    name: str | None
    drop: float


def _attr(key: str, default: Any = None, codec: type | None = None) -> Any:
    """A field stored under user attribute ``key``; mutable defaults are copied per record.

    With ``codec`` the field holds that class (default None) and is stored as its ``to_dict()``.
    """
    metadata = {_KEY: key} if codec is None else {_KEY: key, _CODEC: codec}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _stored(f: dataclasses.Field[Any], value: Any) -> Any:
    codec = f.metadata.get(_CODEC)
    return value.to_dict() if codec is not None else copy.deepcopy(value)


def _loaded(f: dataclasses.Field[Any], raw: Any) -> Any:
    codec = f.metadata.get(_CODEC)
    return codec.from_dict(raw) if codec is not None else copy.deepcopy(raw)


@dataclass(frozen=True)
class TrialRecord:
    """Everything one trial stores; ``number``, ``state``, ``value`` and ``feasible`` come from Optuna itself."""

    number: int
    state: str = "RUNNING"
    value: float | None = None
    feasible: bool = True
    baseline: str | None = _attr(_BASELINE_ATTR)
    """None for a searched trial, else "fp32", "int8" or "fp16"."""
    metric: str | None = _attr("metric")
    metrics: dict[str, float] = _attr("metrics", {})
    latency: LatencyRecord = _attr("latency", {})
    config: TrialConfig | None = _attr("config", None, TrialConfig)
    """What the trial asked for; None for a trial that recorded none (a failure, an older version)."""
    artifact: str | None = _attr("artifact")
    deployable: str | None = _attr("deployable")
    trial_json: str | None = _attr("trial_json")
    layer_precisions: dict[str, int] = _attr("layer_precisions", {})
    """Layers per precision that really ran as such in the built artifact."""
    timings: dict[str, float] = _attr("timings", {})
    per_class: dict[str, float] | None = _attr("per_class")
    worst_class: WorstClass | None = _attr("worst_class")
    error: str | None = _attr(_ERROR_ATTR)
    # Fields shared by the measurement, integrity, worker and review features:
    # declared here once so each of them reads and writes the same keys.
    paired: PairedTiming | None = _attr("paired", None, PairedTiming)
    """In-study paired timing against FP32 (with the runner's timing facts); None: not timed paired."""
    verified: PairedTiming | None = _attr("verified", None, PairedTiming)
    """The same figures from the verify tournament (plus ``median_ms`` and ``backend``), when it ran."""
    drop_ci95: list[float] | None = _attr("drop_ci95")
    """Paired bootstrap 95% CI over images of the metric drop vs FP32, in points ([lo, hi])."""
    per_class_instances: dict[str, int] | None = _attr("per_class_instances")
    class_guard_skipped: list[str] = _attr("class_guard_skipped", [])
    """Classes ``--max-class-drop`` did not judge (fewer instances than the minimum)."""
    duplicate_of: int | None = _attr("duplicate_of")
    """Trial number whose identical configuration this proposal repeats (not built, not counted)."""
    host: str | None = _attr("host")
    device: str | None = _attr("device")
    seed: str | None = _attr("seed")
    """Name of the sensitivity seed this enqueued trial is (e.g. "int8 minus top-3"), else None."""
    per_image: str | None = _attr("per_image")
    """Path of ``trials/NNNN/per_image.npz`` (correctness or COCO matches per image), for drop CIs."""
    drop_within_noise: bool | None = _attr("drop_within_noise")
    """True when ``drop_ci95`` holds 0: the data cannot tell this trial's accuracy from FP32's."""
    verified_drop_ci95: list[float] | None = None
    """The verify step's drop CI (more resamples); read from the study, never a trial attribute."""
    holdout: HoldoutScore | None = None
    """Its score on the images ``--holdout`` kept from the search; read from the study, never a trial attribute."""
    # One study, one experiment: how the budget treated this trial.
    config_key: str | None = _attr("config_key")
    """``effective_config_key`` of its configuration: equal keys build the same model."""
    role: str | None = _attr("role")
    """"evaluate", "duplicate", "over_budget" or "interrupted" (see ``study._budget``); None: undecided."""
    # Multi-fidelity (``study._fidelity``): subset first, stopped early when clearly out.
    subset: dict[str, Any] | None = _attr("subset")
    """Figures on the fixed evaluation subset scored first: images, of, value, FP32's value on them,
    drop and its 95% CI (None when the point estimate already ruled a stop out), seconds
    (``SubsetFigures.to_dict()``); None when evaluated all at once."""
    stopped_early: str | None = _attr("stopped_early")
    """Why the trial was stopped after the subset (state PRUNED, counted in the budget, never on the front)."""
    environmental: str | None = _attr("environmental")
    """Why the machine failed this trial (disk full, storage lost, library missing): not its own error, so
    it is not counted against the budget and is queued again (see ``study.config._faults``)."""
    latency_class: str | None = _attr("latency_class")
    """Key of its placement's latency class (``store._classes``): members share one speed figure."""

    # ------------------------------------------------------------------ storage
    def to_attrs(self) -> dict[str, Any]:
        """The user attributes to set on the trial; fields at their default are not written (they read back as it)."""
        attrs: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            key = f.metadata.get(_KEY)
            if key is None:
                continue
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                attrs[key] = _stored(f, value)
        return attrs

    @classmethod
    def from_attrs(cls, number: int, attrs: Mapping[str, Any], **trial_fields: Any) -> TrialRecord:
        """A record from stored user attributes (missing ones give the defaults); ``trial_fields``: state, value, feasible."""
        # An empty typed part ({}) is what older versions wrote for "none": it reads as None.
        stored = {
            f.name: _loaded(f, attrs[f.metadata[_KEY]])
            for f in dataclasses.fields(cls)
            if _KEY in f.metadata and attrs.get(f.metadata[_KEY]) is not None
            and not (_CODEC in f.metadata and not attrs[f.metadata[_KEY]])
        }
        return cls(number=number, **trial_fields, **stored)

    @classmethod
    def from_trial(cls, trial: optuna.trial.FrozenTrial, study_attrs: Mapping[str, Any] | None = None) -> TrialRecord:
        """``study_attrs`` (the study's user attributes) add the verify tournament's figures, when it ran."""
        record = cls.from_attrs(
            trial.number,
            trial.user_attrs,
            state=trial.state.name,
            value=trial.values[0] if trial.values else None,
            # Optuna: trial.set_constraint(key, value); feasible iff every value <= 0.
            feasible=all(v <= 0 for v in trial.constraints.values()),
        )
        entry = read_verified(study_attrs or {}).get(trial.number)
        record = record if entry is None else record.with_verification(entry)
        held = read_holdout(study_attrs or {}).get(trial.number)
        return record if held is None else dataclasses.replace(record, holdout=held)

    def fails_holdout(self, max_drop: float) -> bool:
        """Scored on the held-out images and significantly more than ``max_drop`` points below FP32 there."""
        return self.holdout is not None and self.holdout.fails(max_drop)

    def with_verification(self, entry: Verification) -> TrialRecord:
        """This record with a verify-tournament entry (see :func:`verified_attrs`)."""
        drop = entry.drop_ci95
        return dataclasses.replace(self, verified=entry.timing, verified_drop_ci95=None if drop is None else list(drop))

    def with_class_figure(self, figure: Mapping[str, Any]) -> TrialRecord:
        """This record reporting its latency class's pooled figure (``LatencyClass.figure()``) instead of its own timing."""
        if self.paired is None or not figure.get("speedup"):
            return self
        paired = self.paired.with_class_figure(figure)
        latency = dict(self.latency)
        reference_ms = latency.get("reference_ms")
        if reference_ms is not None:
            latency["median_ms"] = float(reference_ms) / paired.speedup
        return dataclasses.replace(self, paired=paired, latency=latency)  # type: ignore[arg-type]

    @staticmethod
    def baseline_attrs(name: str) -> dict[str, Any]:
        """User attributes that mark an enqueued trial as the all-``name`` baseline."""
        return {_BASELINE_ATTR: name}

    @classmethod
    def attr_key(cls, field_name: str) -> str:
        """The user-attribute key of a stored field (to set one attribute as soon as it is known)."""
        return next(f.metadata[_KEY] for f in dataclasses.fields(cls) if f.name == field_name)

    @staticmethod
    def recorded_error(trial: optuna.trial.FrozenTrial) -> str | None:
        """The error a trial recorded itself; None for one failed by a heartbeat (its worker died)."""
        return trial.user_attrs.get(_ERROR_ATTR)

    # ------------------------------------------------------------------ views
    @property
    def median_ms(self) -> float | None:
        """The latency the front and the winner use: verified when the tournament ran, else in-study."""
        if self.verified is not None and self.verified.median_ms is not None:
            return float(self.verified.median_ms)
        return self.latency.get("median_ms")

    @property
    def in_study_ms(self) -> float | None:
        """The in-study figure (Optuna's second objective), shown beside the verified one."""
        return self.latency.get("median_ms")

    @property
    def drop_ci(self) -> tuple[float, float] | None:
        """95% CI of the drop vs FP32 (points): the verify step's when it ran, else the trial's."""
        ci = self.verified_drop_ci95 or self.drop_ci95
        return None if ci is None else (float(ci[0]), float(ci[1]))

    @property
    def timing(self) -> PairedTiming | None:
        """The best timing evidence: the verify tournament's figures, else the in-study paired ones."""
        return self.verified if self.verified is not None else self.paired

    @property
    def speedup(self) -> float | None:
        """Speed-up vs FP32: verified when available, else paired, else predicted (no CI; see :attr:`speedup_source`)."""
        timing = self.timing
        return timing.speedup if timing is not None else self.predicted_speedup

    # Latency predicted (latency table or MAC estimate) instead of timed.
    @property
    def latency_source(self) -> str:
        """"table" or "estimate" (predicted), "paired" (timed with FP32), or "unpaired" (older studies)."""
        return str(self.latency.get("source") or ("paired" if self.paired is not None else "unpaired"))

    @property
    def is_predicted(self) -> bool:
        return self.latency_source in PREDICTED_SOURCES

    @property
    def predicted_speedup(self) -> float | None:
        """The predictor's speed-up vs all-FP32 (None when the trial was timed)."""
        return self.latency.get("speedup") if self.is_predicted else None

    @property
    def in_study_speedup(self) -> float | None:
        """The speed-up the study itself recorded: paired or predicted (not the verified one)."""
        return self.paired_speedup if self.paired_speedup is not None else self.predicted_speedup

    @property
    def speedup_source(self) -> str:
        """Where :attr:`speedup` comes from: "verified", "paired", "table" or "estimate"."""
        if self.is_verified:
            return "verified"
        return self.latency_source

    @property
    def speedup_ci95(self) -> tuple[float, float] | None:
        timing = self.timing
        return None if timing is None else timing.speedup_ci95

    @property
    def paired_speedup(self) -> float | None:
        """The in-study paired speed-up (not the verified one)."""
        return None if self.paired is None else self.paired.speedup

    @property
    def paired_ci(self) -> tuple[float, float] | None:
        return None if self.paired is None else self.paired.speedup_ci95

    @property
    def is_verified(self) -> bool:
        return self.verified is not None

    @property
    def precisions(self) -> dict[str, str]:
        """Layer -> "int8"/"fp16"/"fp32" as the configuration asked, in graph order ({} without a configuration)."""
        return {} if self.config is None else {name: p.value for name, p in self.config.precisions.items()}

    def requested_counts(self) -> dict[str, int]:
        """Layers per precision the configuration asked for (``layer_precisions`` is what ran)."""
        counts = {"int8": 0, "fp16": 0, "fp32": 0}
        for p in self.precisions.values():
            counts[p] = counts.get(p, 0) + 1
        return counts

    @property
    def calibration_text(self) -> str:
        """``entropy n=256`` (``percentile n=256 p=99.99``) when the configuration uses INT8, else ""."""
        if self.config is None or not self.config.uses_int8:
            return ""
        cal = self.config.calibration
        text = f"{cal.algorithm.value} n={cal.samples}"
        if cal.algorithm.value == "percentile":
            text += f" p={cal.percentile}"
        return text

    def to_dict(self, reference: float | None) -> dict[str, Any]:
        """One ``pareto.json`` entry; ``reference`` is the FP32 value the drop is measured from."""
        ci = self.drop_ci
        paired = {} if self.paired is None else self.paired.summary_dict()
        verified = {} if self.verified is None else self.verified.summary_dict()
        return {
            "number": self.number,
            "baseline": self.baseline,
            "metric": self.metric,
            "value": self.value,
            "drop": None if reference is None or self.value is None else reference - self.value,
            "drop_ci95": None if ci is None else [ci[0], ci[1]],
            "drop_within_noise": None if ci is None else bool(ci[0] <= 0.0 <= ci[1]),
            "median_ms": self.median_ms,
            "verified": self.is_verified,
            "speedup": self.speedup,
            # "verified", "paired", or a predictor's source; its label says what a predicted figure is.
            "speedup_source": self.speedup_source,
            "speedup_label": self.latency.get("label") if self.speedup_source in PREDICTED_SOURCES else None,
            "speedup_ci95": None if self.speedup_ci95 is None else list(self.speedup_ci95),
            "latency": {**self.latency, "paired": paired, **({"verified": verified} if verified else {})},
            "config": {} if self.config is None else self.config.to_dict(),
            "artifact": self.artifact,
            "deployable_onnx": self.deployable,
            "layers_requested": self.requested_counts(),
            "layers_run": self.layer_precisions,
            "holdout": None if self.holdout is None else self.holdout.to_dict(),
        }


# --------------------------------------------------------------------------- study attributes
def reference_ms_attrs(reference_ms: float) -> dict[str, Any]:
    """Study attributes fixing the FP32 reference latency (set once, by the FP32 baseline trial)."""
    return {_REFERENCE_MS_STUDY_ATTR: float(reference_ms)}


def read_reference_ms(study_attrs: Mapping[str, Any]) -> float | None:
    value = study_attrs.get(_REFERENCE_MS_STUDY_ATTR)
    return None if value is None else float(value)


def fp32_per_image_attrs(encoded: str) -> dict[str, Any]:
    """Study attributes holding FP32's per-image results (base64), so every worker can compute drops."""
    return {_FP32_PER_IMAGE_STUDY_ATTR: encoded}


def read_fp32_per_image(study_attrs: Mapping[str, Any]) -> str | None:
    return study_attrs.get(_FP32_PER_IMAGE_STUDY_ATTR)


def verified_attrs(entries: Mapping[int, Verification]) -> dict[str, Any]:
    """The study attribute of the verify tournament: one :class:`Verification` per trial it covered."""
    return {_VERIFIED_STUDY_ATTR: {str(n): e.to_dict() for n, e in entries.items()}}


def read_verified(study_attrs: Mapping[str, Any]) -> dict[int, Verification]:
    return {int(n): Verification.from_dict(e) for n, e in (study_attrs.get(_VERIFIED_STUDY_ATTR) or {}).items()}


def holdout_attrs(scores: Mapping[int, HoldoutScore]) -> dict[str, Any]:
    """The study attribute of the held-out scores: one :class:`HoldoutScore` per trial scored there."""
    return {_HOLDOUT_STUDY_ATTR: {str(n): e.to_dict() for n, e in scores.items()}}


def read_holdout(study_attrs: Mapping[str, Any]) -> dict[int, HoldoutScore]:
    return {int(n): HoldoutScore.from_dict(e) for n, e in (study_attrs.get(_HOLDOUT_STUDY_ATTR) or {}).items()}


def prediction_check_attrs(check: PredictionCheck) -> dict[str, Any]:
    """The study attribute of stage 2's comparison."""
    return {_PREDICTION_CHECK_STUDY_ATTR: check.to_dict()}


def read_prediction_check(study_attrs: Mapping[str, Any]) -> PredictionCheck | None:
    value = study_attrs.get(_PREDICTION_CHECK_STUDY_ATTR)
    return None if value is None else PredictionCheck.from_dict(value)
