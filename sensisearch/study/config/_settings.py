"""Study settings: a few nested records, filled from a TOML study file and CLI flags.

Every flag has a same-named key in the study file (dashes become underscores),
so ``sensisearch run studies/digits.toml --budget 40`` is the file with one
value overridden. Relative paths in a study file are relative to that file.

The settings are one :class:`StudySettings` of eight records (``data``,
``search``, ``backend``, ``measurement``, ``acceptance``, ``execution``,
``storage``, ``report``). Each record documents its fields and validates
itself; a field keeps its flag's name, so a flag, a study-file key and a field
are one name, unique across the records. One serializer writes and reads them:
:meth:`StudySettings.to_dict` (nested, JSON-ready) and
:meth:`StudySettings.from_dict` (nested, flat as stored by earlier releases, or
a mix, as study files with and without tables are).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Mapping

from sensisearch.backends.factory import BackendSettings
from sensisearch.errors import SensisearchError
from sensisearch.quantize.config import CalibrationAlgorithm, Precision
from sensisearch.quantize.profiles import PROFILES

PATH_FIELDS = ("model", "calib_data", "eval_data", "annotations", "out", "cache_dir", "latency_table")
LIST_FIELDS = ("precisions", "algorithms", "sample_counts", "percentiles", "mean", "std", "shapes")

# the allowed values of the input flags (also the CLI's choices).
INPUT_CHOICES: dict[str, tuple[str, ...]] = {
    "preprocess": ("yolo", "imagenet", "raw"),
    "channel_order": ("rgb", "bgr"),
    "layout": ("nchw", "nhwc"),
    "letterbox": ("yolov5", "ultralytics"),
}
SAMPLERS = ("guided", "tpe", "random", "nsga2", "seeded")
SEARCHES = ("full", "topk", "groups")
BIAS_CORRECTION = ("auto", "search", "on", "off")
# What `run` does with no search flags: the strategy that measured best (benchmarks/search_quality.py).
DEFAULT_SAMPLER = "guided"
DEFAULT_SEARCH = "groups"
# What a stored study that records no sampler or search was run with: the defaults of the releases
# before the guided one, so resuming it keeps proposing the way it started.
LEGACY_SAMPLER = "tpe"
LEGACY_SEARCH = "full"


def _finite(flag: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise SensisearchError(f"{flag} {value}: must be a finite number")


# ---------------------------------------------------------------------------- the records
@dataclass
class DataSettings:
    """The model, its data, and how images become its input and its score."""

    model: Path | None = None
    """FP32 ONNX model (``--model``); None: the ``example``'s."""
    example: str | None = None
    """Bundled example (e.g. ``digits``) that fills in whatever model, data, mean and std are not given."""
    calib_data: Path | None = None
    """Calibration data (no labels needed); None: the example's, else the evaluation data."""
    eval_data: Path | None = None
    """Evaluation data: ImageFolder dir, .npz (images, labels), idx folder, or Ultralytics dataset .yaml."""
    annotations: Path | None = None
    """COCO instances JSON of a detector's evaluation images."""
    task: str = "auto"
    """classification, detection, or auto (detected from the model)."""
    evaluator: str | None = None
    """The user's evaluation function ``MODULE:FUNCTION(runner) -> float | dict``; None: the task's own."""
    metric: str | None = None
    """Metric to optimize (top1, top5; mAP50-95, mAP50 for detectors); None: the evaluator's first."""
    preprocess: str | None = None
    """yolo, imagenet or raw; None: yolo for detectors, raw for classifiers."""
    mean: list[float] | None = None
    """Per-channel mean after pixel/255; None: the example's, else 0."""
    std: list[float] | None = None
    """Per-channel std after pixel/255; None: the example's, else 1."""
    channel_order: str = "rgb"
    """rgb or bgr: the channel order the model takes."""
    layout: str | None = None
    """nchw or nhwc; None: from the model input's shape."""
    letterbox: str | None = None
    """Detectors: yolov5 or ultralytics resize rules; None: the output layout's own."""
    iou: float | None = None
    """Detector NMS IoU; None: the output layout's own default (YOLOv5 0.6, YOLOv8/YOLO11 0.7)."""
    batch_size: int | None = None
    """Evaluation batch of a dynamic-batch model; None: 64 for classifiers, 8 for detectors."""
    eval_limit: int | None = None
    """Evaluate on the first N samples only (quick studies); None: all."""
    calib_limit: int | None = None
    """Calibrate on the first N samples only; None: all."""
    cache_dir: Path | None = None
    """Calibration and preprocessed-tensor cache; None: ``<out>/cache``."""

    def validate(self) -> None:
        if self.model is None and self.example is None:
            raise SensisearchError("no model given: pass --model FILE.onnx, --example digits, or a study file")
        if self.batch_size is not None and self.batch_size <= 0:
            raise SensisearchError("--latency-batch and --batch-size must be positive")
        for name, choices in INPUT_CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in choices:
                flag = "--" + name.replace("_", "-")
                raise SensisearchError(f"{flag} {value}: use one of {', '.join(choices)} (study file key '{name}')")
        _finite("--iou", self.iou)
        if self.std is not None and any(not math.isfinite(v) or v <= 0 for v in self.std):
            raise SensisearchError(f"--std {self.std}: every std must be > 0 (inputs are divided by it)")
        if self.mean is not None and any(not math.isfinite(v) for v in self.mean):
            raise SensisearchError(f"--mean {self.mean}: must be finite numbers")
        for flag, limit in (("--eval-limit", self.eval_limit), ("--calib-limit", self.calib_limit)):
            if limit is not None and limit < 1:
                raise SensisearchError(f"{flag} {limit}: must be at least 1 sample (leave it out to use all)")
        if self.iou is not None and not 0 < self.iou <= 1:
            raise SensisearchError(f"--iou {self.iou}: an IoU threshold is in (0, 1], e.g. 0.6")


@dataclass
class SearchSettings:
    """What the study searches, how many trials, and how it picks them."""

    budget: int = 50
    """Total finished trials in the study; re-running resumes up to it."""
    seed: int = 0
    """Sampler and calibration-order seed."""
    precisions: list[Precision] | None = None
    """Precisions a layer may take; None: the backend's."""
    algorithms: list[CalibrationAlgorithm] = field(default_factory=lambda: list(CalibrationAlgorithm))
    """Calibration algorithms to search."""
    sample_counts: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    """Calibration sample counts to search (capped by the data)."""
    percentiles: list[float] = field(default_factory=lambda: [99.9, 99.99, 99.999])
    """Clip percentiles of percentile calibration."""
    default_algorithm: CalibrationAlgorithm = CalibrationAlgorithm.MINMAX
    """The algorithm of the baselines and the sensitivity probes."""
    profile: str | None = None
    """Quantization profile of the deployable ONNX (tensorrt, onnxruntime-cpu); None: the backend's own."""
    sampler: str | None = None
    """guided (sensitivity seeds, boundary search, multi-objective TPE, local search), tpe, random, nsga2,
    or seeded (TPE after the sensitivity seeds). None: a stored study's own sampler when resuming one
    (a study stored without one was made when TPE was the default), else :data:`DEFAULT_SAMPLER`."""
    search: str | None = None
    """full (every layer a parameter), topk (the ``top_k`` most sensitive layers free, the rest INT8) or
    groups (one parameter per fusion group, :func:`sensisearch.quantize.fusion_groups`).
    None: like ``sampler``, the stored study's, else :data:`DEFAULT_SEARCH`."""
    top_k: int = 8
    """Layers ``search = "topk"`` leaves free."""
    bias_correction: str = "auto"
    """auto (searched by the guided study, off otherwise), search, on or off: fold each INT8 layer's mean
    output shift on calibration data into its bias (a calibration choice, kept only where it helps)."""
    fidelity_subset: float | None = None
    """Images a searched trial scores first: a count (>= 1) or a fraction (< 1) of the evaluation set;
    None or 0: off (the default; see ``study/trial/_fidelity.py`` for the measurement behind it)."""

    def validate(self) -> None:
        if self.budget <= 0:
            raise SensisearchError(f"--budget {self.budget}: must be a positive number of trials")
        if not self.sample_counts or min(self.sample_counts) <= 0:
            raise SensisearchError(f"--sample-counts {self.sample_counts}: give positive sample counts")
        for p in self.percentiles:
            if not 0 < p <= 100:
                raise SensisearchError(f"--percentiles {p}: must be in (0, 100]")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise SensisearchError(f"--sampler {self.sampler}: use one of {', '.join(SAMPLERS)}")
        if self.search is not None and self.search not in SEARCHES:
            raise SensisearchError(f"--search {self.search}: use one of {', '.join(SEARCHES)}")
        if self.bias_correction not in BIAS_CORRECTION:
            raise SensisearchError(f"--bias-correction {self.bias_correction}: use one of {', '.join(BIAS_CORRECTION)}")
        if self.top_k <= 0:
            raise SensisearchError(f"--top-k {self.top_k}: must be a positive number of layers")
        if self.profile is not None and self.profile not in PROFILES:
            raise SensisearchError(f"--profile {self.profile}: use one of {', '.join(PROFILES)}")
        if self.precisions is not None:
            if not self.precisions:
                raise SensisearchError("--precisions: give at least one of int8, fp16, fp32")
            if set(self.precisions) == {Precision.FP32}:
                raise SensisearchError("--precisions fp32: nothing to search (FP32 is always measured as the reference); add int8 or fp16")
        if not self.algorithms:
            raise SensisearchError("--algorithms: give at least one of minmax, entropy, percentile, mse, mixed")
        if not self.percentiles:
            raise SensisearchError("--percentiles: give at least one clip percentile, e.g. 99.99")
        _check_image_count("--fidelity-subset", self.fidelity_subset)


def _check_image_count(flag: str, value: float | None) -> None:
    """A number of evaluation images: None (default), 0 (off), a fraction in (0, 1) or a whole number of images."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SensisearchError(
            f"{flag} {value}: give a number of images (e.g. 40), a fraction of them (e.g. 0.25), or 0 to turn it off"
        )
    if value >= 1 and value != int(value):
        raise SensisearchError(f"{flag} {value}: a number of images must be whole (or give a fraction below 1)")


@dataclass
class BackendOptions:
    """The backend that builds and runs the trials, its builder flags, and where latency comes from.

    (Named ``BackendOptions`` beside :class:`~sensisearch.backends.factory.BackendSettings`, which
    :meth:`backend_settings` derives from it.)
    """

    backend: str = "auto"
    """auto (TensorRT if an engine can run here, else onnxruntime), onnxruntime, tensorrt, tensorrt-rtx."""
    threads: int | None = None
    """ONNX Runtime intra-op threads; None: cores, at most 4."""
    shapes: list[str] | None = None
    """TensorRT optimization profile, ``name:MIN/OPT/MAX``; None: from the model."""
    workspace_mb: int | None = None
    """TensorRT builder workspace limit in MiB; None: TensorRT's."""
    opt_level: int = 3
    """TensorRT builder optimization level 0-5."""
    latency_batch: int = 1
    """The batch latency is measured at (TensorRT's profile OPT)."""
    latency_table: Path | None = None
    """Per-layer latency table measured on the target (``sensisearch latency-table``): trials take their
    latency from it instead of being timed here. None: timed here, or the labelled MAC estimate when
    ``profile`` is another backend's."""

    def validate(self) -> None:
        if self.latency_batch <= 0:
            raise SensisearchError("--latency-batch and --batch-size must be positive")
        if self.threads is not None and self.threads <= 0:
            raise SensisearchError(f"--threads {self.threads}: must be positive")
        if not 0 <= self.opt_level <= 5:
            raise SensisearchError(f"--opt-level {self.opt_level}: must be 0-5")
        if self.workspace_mb is not None and self.workspace_mb <= 0:
            raise SensisearchError(f"--workspace-mb {self.workspace_mb}: must be positive")

    def backend_settings(self, eval_batch: int | None = None) -> BackendSettings:
        """What :func:`~sensisearch.backends.factory.choose_backend` builds from; ``eval_batch`` is the data's batch size."""
        return BackendSettings(
            name=self.backend, threads=self.threads, shapes=None if self.shapes is None else tuple(self.shapes),
            workspace_mb=self.workspace_mb, opt_level=self.opt_level,
            latency_batch=self.latency_batch, eval_batch=eval_batch or 1,
        )


@dataclass
class MeasurementSettings:
    """Measurements you can ship on: the objective, paired timing, the verify tournament, accuracy CIs."""

    objective: str = "latency"
    """"latency" (ms per batch at ``latency_batch``) or "throughput" (images/s at ``throughput_batch``)."""
    throughput_batch: int | None = None
    """Batch for ``objective = "throughput"``; None: the TensorRT profile's opt shape, else 8."""
    timing_target_ci: float = 0.05
    """Stop a trial's paired timing once the speed-up's 95% CI is narrower than this fraction."""
    timing_max_seconds: float | None = None
    """Cap on a trial's paired timing (default 3 s, or ``latency_seconds`` when only that is given)."""
    latency_seconds: float | None = None
    """Old name of ``timing_max_seconds`` (kept so older study files and scripts still work)."""
    verify: bool = True
    """Re-time FP32, all-INT8, the front and its noise band in one tournament after the last trial."""
    verify_seconds: float = 30.0
    """Cap on the verify tournament's timed rounds."""
    drop_resamples: int = 200
    """Bootstrap resamples for a trial's accuracy-drop CI (the verify step uses 5x more)."""

    @property
    def timing_seconds(self) -> float:
        """The effective per-trial timing cap: ``timing_max_seconds``, else the old ``latency_seconds``, else 3 s."""
        if self.timing_max_seconds is not None:
            return self.timing_max_seconds
        return self.latency_seconds if self.latency_seconds is not None else 3.0

    def validate(self) -> None:
        if self.objective not in ("latency", "throughput"):
            raise SensisearchError(f"--objective {self.objective}: use latency or throughput")
        if self.throughput_batch is not None and self.throughput_batch <= 0:
            raise SensisearchError(f"--throughput-batch {self.throughput_batch}: must be a positive batch size")
        if not 0 < self.timing_target_ci < 1:
            raise SensisearchError(f"--timing-target-ci {self.timing_target_ci}: give a relative CI width in (0, 1), e.g. 0.05")
        for flag, seconds in (("--timing-max-seconds", self.timing_max_seconds), ("--latency-seconds", self.latency_seconds),
                              ("--verify-seconds", self.verify_seconds)):
            if seconds is not None and not seconds > 0:
                raise SensisearchError(f"{flag} {seconds}: must be > 0 (seconds of timed rounds)")
        if self.drop_resamples < 10:
            raise SensisearchError(f"--drop-resamples {self.drop_resamples}: use at least 10 (200 is the default)")
        _finite("--latency-seconds", self.latency_seconds)


@dataclass
class AcceptanceSettings:
    """The winner rule: which trials are feasible and which one may ship."""

    max_drop: float = 1.0
    """Allowed metric drop vs FP32, in points."""
    max_class_drop: float | None = None
    """Detectors: a trial is infeasible if any class AP drops more (points); None: not judged."""
    min_class_instances: int = 10
    """``max_class_drop`` judges only classes with at least this many ground-truth instances."""
    min_speedup: float = 1.0
    """The winner's verified speed-up CI lower bound must exceed this."""
    holdout: float | None = None
    """Evaluation images the search never sees (a count, or a fraction below 1): trials score on the
    others, and the front and the winner are confirmed on these afterwards (:mod:`sensisearch.study.review`);
    a winner whose drop CI there lies wholly above ``max_drop`` is passed over. None or 0: off."""

    def validate(self) -> None:
        _check_image_count("--holdout", self.holdout)
        if self.max_drop < 0:
            raise SensisearchError(f"--max-drop {self.max_drop}: must be >= 0 (points of the metric)")
        if self.min_speedup <= 0:
            raise SensisearchError(f"--min-speedup {self.min_speedup}: must be positive (1.0: faster than FP32)")
        if self.min_class_instances < 1:
            raise SensisearchError(f"--min-class-instances {self.min_class_instances}: must be at least 1")
        _finite("--max-drop", self.max_drop)
        _finite("--max-class-drop", self.max_class_drop)
        if self.max_class_drop is not None and self.max_class_drop < 0:
            raise SensisearchError(f"--max-class-drop {self.max_class_drop}: must be >= 0 (points)")


@dataclass
class ExecutionSettings:
    """How trials run: isolation, time limits, heartbeats, and the disk they may keep."""

    isolation: str = "process"
    """``process``: each trial's build, timing and evaluation run in a child process; ``none``: in the worker."""
    build_timeout: float = 1800.0
    """Seconds a trial may spend before its engine is loaded (thresholds, emit, build)."""
    eval_timeout: float = 3600.0
    """Seconds a trial may spend from loading its engine to the end of evaluation."""
    keep_artifacts: int | None = 10
    """Keep the large files of the top-k trials by metric (plus front, baselines, winner); None keeps all
    (given as ``"all"``, and serialized so: a stored None would read back as the default)."""
    heartbeat_seconds: int = 30
    """Worker heartbeat; a dead worker's trial is retried after twice this."""

    def validate(self) -> None:
        if self.isolation not in ("process", "none"):
            raise SensisearchError(f"--isolation {self.isolation}: use process (default) or none")
        for flag, seconds in (("--build-timeout", self.build_timeout), ("--eval-timeout", self.eval_timeout)):
            if not seconds > 0:
                raise SensisearchError(f"{flag} {seconds}: must be a positive number of seconds")
        if isinstance(self.keep_artifacts, str):
            # "all" (flag, study file or stored settings) keeps every trial's artifacts.
            if self.keep_artifacts.strip().lower() == "all":
                self.keep_artifacts = None
            elif self.keep_artifacts.strip().isdigit():
                self.keep_artifacts = int(self.keep_artifacts)
            else:
                raise SensisearchError(f"--keep-artifacts {self.keep_artifacts}: give a number of trials, or all")
        if self.keep_artifacts is not None and self.keep_artifacts < 0:
            raise SensisearchError(f"--keep-artifacts {self.keep_artifacts}: give a number of trials >= 0, or all")
        if isinstance(self.heartbeat_seconds, bool) or self.heartbeat_seconds < 1:
            raise SensisearchError(f"--heartbeat-seconds {self.heartbeat_seconds}: must be a whole number of seconds >= 1")


@dataclass
class StorageSettings:
    """Where the study and its results live."""

    out: Path | None = None
    """Output folder; None: ``runs/<model stem>``."""
    storage: str | None = None
    """Optuna storage URL; None: the SQLite file ``<out>/study.db``."""
    study_name: str | None = None
    """Study name in the storage; None: the model's stem."""

    def validate(self) -> None:
        """Nothing to check before the storage is opened (:func:`~sensisearch.study.store.open_storage` does)."""


@dataclass
class ReportSettings:
    """Extras of the report."""

    compare_ort_quantizer: bool = False
    """Also score ONNX Runtime ``quantize_static`` (minmax, percentile 99.99) beside the front."""

    def validate(self) -> None:
        """Nothing to check: a flag."""


# ---------------------------------------------------------------------------- the settings
@dataclass
class StudySettings:
    """Everything a study is asked to do, as one record per concern.

    Build it with :meth:`from_flat` (keywords named like the flags), :meth:`from_dict`
    (a study file's or a stored study's values) or :func:`merge_settings` (a study
    file overridden by flags); all three coerce, check and validate the same way.
    """

    data: DataSettings = field(default_factory=DataSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    backend: BackendOptions = field(default_factory=BackendOptions)
    measurement: MeasurementSettings = field(default_factory=MeasurementSettings)
    acceptance: AcceptanceSettings = field(default_factory=AcceptanceSettings)
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    report: ReportSettings = field(default_factory=ReportSettings)

    RECORDS: ClassVar[dict[str, type]] = {
        "data": DataSettings, "search": SearchSettings, "backend": BackendOptions,
        "measurement": MeasurementSettings, "acceptance": AcceptanceSettings, "execution": ExecutionSettings,
        "storage": StorageSettings, "report": ReportSettings,
    }

    def validate(self) -> None:
        """Each record checks itself; the first bad value is one line naming its flag."""
        for name in self.RECORDS:
            getattr(self, name).validate()

    def backend_settings(self) -> BackendSettings:
        return self.backend.backend_settings(eval_batch=self.data.batch_size)

    # ------------------------------------------------------------------ flat names
    def get(self, name: str) -> Any:
        """The value of the setting named like its flag (``"max_drop"``), wherever its record is."""
        return getattr(getattr(self, record_of(name)), name)

    def replace(self, **values: Any) -> StudySettings:
        """A copy with the settings named like their flags replaced (as given: neither coerced nor validated)."""
        changes: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            changes.setdefault(record_of(name), {})[name] = value
        return dataclasses.replace(
            self, **{record: dataclasses.replace(getattr(self, record), **fields) for record, fields in changes.items()}
        )

    def with_absolute_paths(self) -> StudySettings:
        """A copy with every path setting absolute (``~`` expanded), for another process or host to use as given."""
        return self.replace(**{
            name: Path(value).expanduser().resolve() for name in PATH_FIELDS if (value := self.get(name)) is not None
        })

    # ------------------------------------------------------------------ the serializer
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-ready and nested: ``{"data": {"model": "...", ...}, "search": {"budget": 50, ...}, ...}``.

        Paths become text, enums their values; ``keep_artifacts`` None is written ``"all"``.
        :meth:`from_dict` reads it back to an equal :class:`StudySettings`.
        """
        out: dict[str, dict[str, Any]] = {}
        for record in self.RECORDS:
            values = getattr(self, record)
            out[record] = {f.name: _plain(getattr(values, f.name)) for f in dataclasses.fields(values)}
        if self.execution.keep_artifacts is None:
            out["execution"]["keep_artifacts"] = "all"
        return out

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], base: Path | None = None, overrides: Mapping[str, Any] | None = None,
    ) -> StudySettings:
        """Settings from ``data`` (nested as :meth:`to_dict` writes it, flat as earlier releases stored it and as
        study files without tables are, or a mix), then ``overrides`` (flag values; None: not given), validated.

        ``data`` is checked like a study file: an unknown key or a value of the wrong type is one line naming the
        key; a None value is "not given" (the default). Relative paths in ``data`` are relative to ``base``.
        """
        values: dict[str, Any] = {}
        known = set(_RECORD_OF)
        for key, value in flat_settings(data).items():
            name = key.replace("-", "_")
            if name not in known:
                raise SensisearchError(f"study file: unknown key '{key}' (known: {', '.join(sorted(known))})")
            if value is None:
                continue  # settings stored in a study (JSON) mark "not given" as null; a TOML file cannot
            check_file_type(key, name, value)
            values[name] = _coerce(name, value, base)
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = _coerce(name, value, None)
        settings = cls().replace(**values)
        settings.validate()
        return settings

    @classmethod
    def from_flat(cls, **values: Any) -> StudySettings:
        """Settings from keywords named like the flags (``from_flat(example="digits", budget=3)``), as the flags
        would give them: coerced (text or enums, paths or text) and validated; None is "not given"."""
        return cls.from_dict({}, overrides=values)


_RECORD_OF: dict[str, str] = {
    f.name: record for record, kind in StudySettings.RECORDS.items() for f in dataclasses.fields(kind)
}
if len(_RECORD_OF) != sum(len(dataclasses.fields(kind)) for kind in StudySettings.RECORDS.values()):
    raise TypeError("a setting's name must be unique across the records (it is its flag's name)")


def record_of(name: str) -> str:
    """The record (``"acceptance"``) that holds the setting named like its flag (``"max_drop"``)."""
    try:
        return _RECORD_OF[name]
    except KeyError:
        raise SensisearchError(f"unknown setting '{name}' (known: {', '.join(sorted(_RECORD_OF))})") from None


def setting_names() -> tuple[str, ...]:
    """Every setting's name (its flag's, dashes as underscores), record by record."""
    return tuple(_RECORD_OF)


def flat_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with its tables (records of :meth:`StudySettings.to_dict`, or a study file's groups) flattened
    to flag-named keys; a key given twice keeps its last value, as in a study file."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _plain(value: Any) -> Any:
    """A setting's value as JSON: paths as text, enums as their values."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value


def _coerce(name: str, value: Any, base: Path | None) -> Any:
    if value is None:
        return None
    if name in PATH_FIELDS:
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else (base / path)
    if name == "precisions":
        try:
            return [Precision(str(_plain(v)).lower()) for v in value]
        except ValueError as exc:
            raise SensisearchError(f"--precisions {value}: use int8, fp16, fp32") from exc
    if name == "algorithms":
        try:
            return [CalibrationAlgorithm(str(_plain(v)).lower()) for v in value]
        except ValueError as exc:
            raise SensisearchError(f"--algorithms {value}: use minmax, entropy, percentile, mse, mixed") from exc
    if name == "default_algorithm":
        return CalibrationAlgorithm(str(_plain(value)).lower())
    if name == "sample_counts":
        return [int(v) for v in value]
    if name in ("percentiles", "mean", "std"):
        return [float(v) for v in value]
    if name in INPUT_CHOICES:
        return str(value).lower()
    return value


def merge_settings(file_values: Mapping[str, Any], flag_values: Mapping[str, Any], base: Path | None) -> StudySettings:
    """Study-file values (flat or in tables), overridden by flags that were given (not None)."""
    return StudySettings.from_dict(file_values, base, flag_values)


def read_study_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SensisearchError(f"study file {path}: no such file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SensisearchError(f"study file {path}: not valid TOML ({exc})") from exc
    # Tables are only for grouping in the file; flatten them to flag names.
    return flat_settings(data)


# ---------------------------------------------------------------------------- every input validated
# Study-file keys by the TOML type they need (flags are typed by argparse already).
# Derived from the records' annotations, so a new setting is checked without a list to keep up to date.
def _fields_annotated(*kinds: str) -> tuple[str, ...]:
    return tuple(
        f.name for kind in StudySettings.RECORDS.values() for f in dataclasses.fields(kind)
        if str(f.type).replace(" ", "").split("|")[0].split("[")[0] in kinds and f.name not in PATH_FIELDS
    )


INT_FIELDS = tuple(n for n in _fields_annotated("int") if n != "keep_artifacts")  # keep_artifacts also takes "all"
FLOAT_FIELDS = _fields_annotated("float")
BOOL_FIELDS = _fields_annotated("bool")
TEXT_FIELDS = (*_fields_annotated("str", "CalibrationAlgorithm"), *PATH_FIELDS)
LIST_ITEM_KINDS: dict[str, tuple[type, ...]] = {
    "sample_counts": (int,), "percentiles": (int, float), "mean": (int, float), "std": (int, float),
    "precisions": (str,), "algorithms": (str,), "shapes": (str,),
}


def check_file_type(key: str, name: str, value: Any) -> None:
    """A study-file value of the wrong TOML type is one line naming the key, e.g. ``budget = "ten"``."""
    def fail(kind: str) -> None:
        raise SensisearchError(f"study file: {key} = {value!r}: must be {kind}")

    if isinstance(value, bool) and name not in BOOL_FIELDS:
        fail("a number" if name in INT_FIELDS + FLOAT_FIELDS else "a list" if name in LIST_FIELDS else "text")
    if name in INT_FIELDS and not isinstance(value, int):
        fail("a whole number (no quotes, no decimals)")
    if name in FLOAT_FIELDS and not isinstance(value, (int, float)):
        fail("a number (no quotes)")
    if name in BOOL_FIELDS and not isinstance(value, bool):
        fail("true or false")
    if name in TEXT_FIELDS and not isinstance(value, str):
        fail("text in quotes")
    if name in LIST_FIELDS:
        kinds = LIST_ITEM_KINDS.get(name, (int, float))
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, kinds) for v in value):
            example = {"sample_counts": "[128, 256]", "precisions": '["int8", "fp32"]'}.get(name, "[...]")
            fail(f"a list, e.g. {key} = {example}")


def bias_choices(settings: StudySettings) -> tuple[bool, ...]:
    """The bias-correction choices a study's INT8 trials take (auto: searched by the guided study only,
    so a study made before it keeps its search space)."""
    mode = settings.search.bias_correction
    if mode == "auto":
        mode = "search" if settings.search.sampler == "guided" else "off"
    return {"search": (False, True), "on": (True,), "off": (False,)}[mode]


def resolve_search(settings: StudySettings, stored: Mapping[str, Any] | None) -> StudySettings:
    """``settings`` with sampler and search decided: given ones win, then a stored study's, then the defaults.

    ``stored``: the settings a stored study recorded, nested or flat (None: there is no stored study yet).
    """
    search = settings.search
    if search.sampler is not None and search.search is not None:
        return settings
    if stored is None and search.precisions is not None and Precision.INT8 not in search.precisions:
        # No INT8 to rank layers by: nothing for the sensitivity probes to measure.
        sampler, strategy = LEGACY_SAMPLER, DEFAULT_SEARCH
    elif stored is None:
        sampler, strategy = DEFAULT_SAMPLER, DEFAULT_SEARCH
    else:
        flat = flat_settings(stored)
        sampler, strategy = flat.get("sampler") or LEGACY_SAMPLER, flat.get("search") or LEGACY_SEARCH
    resolved = settings.replace(sampler=search.sampler or sampler, search=search.search or strategy)
    resolved.search.validate()
    return resolved
