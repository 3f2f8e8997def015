"""Study settings: one dataclass, filled from a TOML study file and CLI flags.

Every flag has a same-named key in the study file (dashes become underscores),
so ``sensisearch run studies/digits.toml --budget 40`` is the file with one
value overridden. Relative paths in a study file are relative to that file.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sensisearch.backends.factory import BackendSettings
from sensisearch.errors import SensisearchError
from sensisearch.quantize.config import CalibrationAlgorithm, Precision
from sensisearch.quantize.profiles import PROFILES

PATH_FIELDS = ("model", "calib_data", "eval_data", "annotations", "out", "cache_dir", "latency_table")
LIST_FIELDS = ("precisions", "algorithms", "sample_counts", "percentiles", "mean", "std", "shapes")


@dataclass
class StudySettings:
    model: Path | None = None
    example: str | None = None
    calib_data: Path | None = None
    eval_data: Path | None = None
    annotations: Path | None = None
    out: Path | None = None
    storage: str | None = None
    study_name: str | None = None
    budget: int = 50
    seed: int = 0
    max_drop: float = 1.0
    metric: str | None = None
    task: str = "auto"
    evaluator: str | None = None
    backend: str = "auto"
    threads: int | None = None
    precisions: list[Precision] | None = None
    algorithms: list[CalibrationAlgorithm] = field(default_factory=lambda: list(CalibrationAlgorithm))
    sample_counts: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    percentiles: list[float] = field(default_factory=lambda: [99.9, 99.99, 99.999])
    default_algorithm: CalibrationAlgorithm = CalibrationAlgorithm.MINMAX
    mean: list[float] | None = None
    """Per-channel mean after pixel/255; None: the example's, else 0."""
    std: list[float] | None = None
    """Per-channel std after pixel/255; None: the example's, else 1."""
    batch_size: int | None = None
    """Evaluation batch of a dynamic-batch model; None: 64 for classifiers, 8 for detectors."""
    latency_batch: int = 1
    latency_seconds: float | None = None
    """Old name of ``timing_max_seconds`` (kept so older study files and scripts still work)."""
    eval_limit: int | None = None
    calib_limit: int | None = None
    max_class_drop: float | None = None
    iou: float | None = None
    """Detector NMS IoU; None: the output layout's own default (YOLOv5 0.6, YOLOv8/YOLO11 0.7)."""
    cache_dir: Path | None = None
    shapes: list[str] | None = None
    workspace_mb: int | None = None
    opt_level: int = 3
    heartbeat_seconds: int = 30
    compare_ort_quantizer: bool = False
    # --- the inputs users already have (preprocessing presets, YOLOv8 letterbox)
    preprocess: str | None = None
    """yolo, imagenet or raw; None: yolo for detectors, raw for classifiers."""
    channel_order: str = "rgb"
    layout: str | None = None
    """nchw or nhwc; None: from the model input's shape."""
    letterbox: str | None = None
    """Detectors: yolov5 or ultralytics resize rules; None: the output layout's own."""
    # Sensitivity-guided search.
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
    bias_correction: str = "auto"
    """auto (searched by the guided study, off otherwise), search, on or off: fold each INT8 layer's mean
    output shift on calibration data into its bias (a calibration choice, kept only where it helps)."""
    # Many workers, isolated trials, bounded disk.
    isolation: str = "process"
    """``process``: each trial's build, timing and evaluation run in a child process; ``none``: in the worker."""
    build_timeout: float = 1800.0
    """Seconds a trial may spend before its engine is loaded (thresholds, emit, build)."""
    eval_timeout: float = 3600.0
    """Seconds a trial may spend from loading its engine to the end of evaluation."""
    keep_artifacts: int | None = 10
    """Keep the large files of the top-k trials by metric (plus front, baselines, winner); None keeps all."""
    # Measurements you can ship on: paired timing, verification, winner rule, accuracy CIs.
    objective: str = "latency"
    """"latency" (ms per batch at ``latency_batch``) or "throughput" (images/s at ``throughput_batch``)."""
    throughput_batch: int | None = None
    """Batch for ``objective = "throughput"``; None: the TensorRT profile's opt shape, else 8."""
    timing_target_ci: float = 0.05
    """Stop a trial's paired timing once the speed-up's 95% CI is narrower than this fraction."""
    timing_max_seconds: float | None = None
    """Cap on a trial's paired timing (default 3 s, or ``latency_seconds`` when only that is given)."""
    verify: bool = True
    """Re-time FP32, all-INT8, the front and its noise band in one tournament after the last trial."""
    verify_seconds: float = 30.0
    min_speedup: float = 1.0
    """The winner's verified speed-up CI lower bound must exceed this."""
    min_class_instances: int = 10
    """``max_class_drop`` judges only classes with at least this many ground-truth instances."""
    drop_resamples: int = 200
    """Bootstrap resamples for a trial's accuracy-drop CI (the verify step uses 5x more)."""
    # the target's latency, predicted away from the target.
    latency_table: Path | None = None
    """Per-layer latency table measured on the target (``sensisearch latency-table``): trials take their
    latency from it instead of being timed here. None: timed here, or the labelled MAC estimate when
    ``profile`` is another backend's."""
    # Multi-fidelity (study/_fidelity.py): score a fixed subset first, stop clearly dominated trials.
    fidelity_subset: float | None = None
    """Images a searched trial scores first: a count (>= 1) or a fraction (< 1) of the evaluation set;
    None or 0: off (the default; see ``study/_fidelity.py`` for the measurement behind it)."""

    @property
    def timing_seconds(self) -> float:
        """The effective per-trial timing cap: ``timing_max_seconds``, else the old ``latency_seconds``, else 3 s."""
        if self.timing_max_seconds is not None:
            return self.timing_max_seconds
        return self.latency_seconds if self.latency_seconds is not None else 3.0

    def validate_measurement(self) -> None:
        """The measurement flags (called from :meth:`validate`)."""
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
        if self.min_speedup <= 0:
            raise SensisearchError(f"--min-speedup {self.min_speedup}: must be positive (1.0: faster than FP32)")
        if self.min_class_instances < 1:
            raise SensisearchError(f"--min-class-instances {self.min_class_instances}: must be at least 1")
        if self.drop_resamples < 10:
            raise SensisearchError(f"--drop-resamples {self.drop_resamples}: use at least 10 (200 is the default)")

    def validate(self) -> None:
        if self.budget <= 0:
            raise SensisearchError(f"--budget {self.budget}: must be a positive number of trials")
        if self.model is None and self.example is None:
            raise SensisearchError("no model given: pass --model FILE.onnx, --example digits, or a study file")
        if self.max_drop < 0:
            raise SensisearchError(f"--max-drop {self.max_drop}: must be >= 0 (points of the metric)")
        if self.latency_batch <= 0 or (self.batch_size is not None and self.batch_size <= 0):
            raise SensisearchError("--latency-batch and --batch-size must be positive")
        if not self.sample_counts or min(self.sample_counts) <= 0:
            raise SensisearchError(f"--sample-counts {self.sample_counts}: give positive sample counts")
        for p in self.percentiles:
            if not 0 < p <= 100:
                raise SensisearchError(f"--percentiles {p}: must be in (0, 100]")
        if self.threads is not None and self.threads <= 0:
            raise SensisearchError(f"--threads {self.threads}: must be positive")
        validate_input_choices(self)
        validate_search_settings(self)
        if self.isolation not in ("process", "none"):
            raise SensisearchError(f"--isolation {self.isolation}: use process (default) or none")
        for flag, seconds in (("--build-timeout", self.build_timeout), ("--eval-timeout", self.eval_timeout)):
            if not seconds > 0:
                raise SensisearchError(f"{flag} {seconds}: must be a positive number of seconds")
        if isinstance(self.keep_artifacts, str):
            # "all" (flag or study file) keeps every trial's artifacts.
            if self.keep_artifacts.strip().lower() == "all":
                self.keep_artifacts = None
            elif self.keep_artifacts.strip().isdigit():
                self.keep_artifacts = int(self.keep_artifacts)
            else:
                raise SensisearchError(f"--keep-artifacts {self.keep_artifacts}: give a number of trials, or all")
        if self.keep_artifacts is not None and self.keep_artifacts < 0:
            raise SensisearchError(f"--keep-artifacts {self.keep_artifacts}: give a number of trials >= 0, or all")
        self.validate_measurement()
        validate_ranges(self)
        validate_fidelity_settings(self)

    def backend_settings(self) -> BackendSettings:
        return BackendSettings(
            name=self.backend, threads=self.threads, shapes=None if self.shapes is None else tuple(self.shapes),
            workspace_mb=self.workspace_mb, opt_level=self.opt_level,
            latency_batch=self.latency_batch, eval_batch=self.batch_size or 1,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, list):
                value = [v.value if hasattr(v, "value") else v for v in value]
            elif hasattr(value, "value"):
                value = value.value
            out[f.name] = value
        return out


def _coerce(name: str, value: Any, base: Path | None) -> Any:
    if value is None:
        return None
    if name in PATH_FIELDS:
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else (base / path)
    if name == "precisions":
        try:
            return [Precision(str(v).lower()) for v in value]
        except ValueError as exc:
            raise SensisearchError(f"--precisions {value}: use int8, fp16, fp32") from exc
    if name == "algorithms":
        try:
            return [CalibrationAlgorithm(str(v).lower()) for v in value]
        except ValueError as exc:
            raise SensisearchError(f"--algorithms {value}: use minmax, entropy, percentile, mse, mixed") from exc
    if name == "default_algorithm":
        return CalibrationAlgorithm(str(value).lower())
    if name == "sample_counts":
        return [int(v) for v in value]
    if name in ("percentiles", "mean", "std"):
        return [float(v) for v in value]
    if name in INPUT_CHOICES:
        return str(value).lower()
    return value


# the allowed values of the input flags (also the CLI's choices).
INPUT_CHOICES: dict[str, tuple[str, ...]] = {
    "preprocess": ("yolo", "imagenet", "raw"),
    "channel_order": ("rgb", "bgr"),
    "layout": ("nchw", "nhwc"),
    "letterbox": ("yolov5", "ultralytics"),
}


def validate_input_choices(settings: StudySettings) -> None:
    """One line naming the flag (or study-file key) whose value is not one of its choices."""
    for name, choices in INPUT_CHOICES.items():
        value = getattr(settings, name)
        if value is not None and value not in choices:
            flag = "--" + name.replace("_", "-")
            raise SensisearchError(f"{flag} {value}: use one of {', '.join(choices)} (study file key '{name}')")


def merge_settings(file_values: Mapping[str, Any], flag_values: Mapping[str, Any], base: Path | None) -> StudySettings:
    """Study-file values, overridden by flags that were given (not None)."""
    known = {f.name for f in dataclasses.fields(StudySettings)}
    values: dict[str, Any] = {}
    for key, value in file_values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise SensisearchError(f"study file: unknown key '{key}' (known: {', '.join(sorted(known))})")
        if value is None:
            continue  # settings stored in a study (JSON) mark "not given" as null; a TOML file cannot
        check_file_type(key, name, value)
        values[name] = _coerce(name, value, base)
    for name, value in flag_values.items():
        if value is not None:
            values[name] = _coerce(name, value, None)
    settings = StudySettings(**values)
    settings.validate()
    return settings


def read_study_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SensisearchError(f"study file {path}: no such file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SensisearchError(f"study file {path}: not valid TOML ({exc})") from exc
    # Tables are only for grouping in the file; flatten them to flag names.
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


# ---------------------------------------------------------------------------- every input validated
# Study-file keys by the TOML type they need (flags are typed by argparse already).
# Derived from the dataclass's annotations, so a new setting is checked without a list to keep up to date.
def _fields_annotated(*kinds: str) -> tuple[str, ...]:
    return tuple(
        f.name for f in dataclasses.fields(StudySettings)
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


def validate_ranges(settings: StudySettings) -> None:
    """Values that parse but make no sense: one line naming the flag."""
    def finite(flag: str, value: float | None) -> None:
        if value is not None and not math.isfinite(value):
            raise SensisearchError(f"{flag} {value}: must be a finite number")

    for flag, value in (("--max-drop", settings.max_drop), ("--latency-seconds", settings.latency_seconds),
                        ("--iou", settings.iou), ("--max-class-drop", settings.max_class_drop)):
        finite(flag, value)
    if settings.std is not None and any(not math.isfinite(v) or v <= 0 for v in settings.std):
        raise SensisearchError(f"--std {settings.std}: every std must be > 0 (inputs are divided by it)")
    if settings.mean is not None and any(not math.isfinite(v) for v in settings.mean):
        raise SensisearchError(f"--mean {settings.mean}: must be finite numbers")
    for flag, limit in (("--eval-limit", settings.eval_limit), ("--calib-limit", settings.calib_limit)):
        if limit is not None and limit < 1:
            raise SensisearchError(f"{flag} {limit}: must be at least 1 sample (leave it out to use all)")
    if settings.latency_seconds is not None and settings.latency_seconds <= 0:
        raise SensisearchError(f"--latency-seconds {settings.latency_seconds}: must be > 0 (seconds of timed runs per trial)")
    if settings.iou is not None and not 0 < settings.iou <= 1:
        raise SensisearchError(f"--iou {settings.iou}: an IoU threshold is in (0, 1], e.g. 0.6")
    if settings.max_class_drop is not None and settings.max_class_drop < 0:
        raise SensisearchError(f"--max-class-drop {settings.max_class_drop}: must be >= 0 (points)")
    if isinstance(settings.heartbeat_seconds, bool) or settings.heartbeat_seconds < 1:
        raise SensisearchError(f"--heartbeat-seconds {settings.heartbeat_seconds}: must be a whole number of seconds >= 1")
    if not 0 <= settings.opt_level <= 5:
        raise SensisearchError(f"--opt-level {settings.opt_level}: must be 0-5")
    if settings.workspace_mb is not None and settings.workspace_mb <= 0:
        raise SensisearchError(f"--workspace-mb {settings.workspace_mb}: must be positive")
    if settings.precisions is not None:
        if not settings.precisions:
            raise SensisearchError("--precisions: give at least one of int8, fp16, fp32")
        if set(settings.precisions) == {Precision.FP32}:
            raise SensisearchError("--precisions fp32: nothing to search (FP32 is always measured as the reference); add int8 or fp16")
    if not settings.algorithms:
        raise SensisearchError("--algorithms: give at least one of minmax, entropy, percentile, mse, mixed")
    if not settings.percentiles:
        raise SensisearchError("--percentiles: give at least one clip percentile, e.g. 99.99")


SAMPLERS = ("guided", "tpe", "random", "nsga2", "seeded")
SEARCHES = ("full", "topk", "groups")
BIAS_CORRECTION = ("auto", "search", "on", "off")


def bias_choices(settings: StudySettings) -> tuple[bool, ...]:
    """The bias-correction choices a study's INT8 trials take (auto: searched by the guided study only,
    so a study made before it keeps its search space)."""
    mode = settings.bias_correction
    if mode == "auto":
        mode = "search" if settings.sampler == "guided" else "off"
    return {"search": (False, True), "on": (True,), "off": (False,)}[mode]
# What `run` does with no search flags: the strategy that measured best (benchmarks/search_quality.py).
DEFAULT_SAMPLER = "guided"
DEFAULT_SEARCH = "groups"
# What a stored study that records no sampler or search was run with: the defaults of the releases
# before the guided one, so resuming it keeps proposing the way it started.
LEGACY_SAMPLER = "tpe"
LEGACY_SEARCH = "full"


def resolve_search(settings: StudySettings, stored: Mapping[str, Any] | None) -> StudySettings:
    """``settings`` with sampler and search decided: given ones win, then a stored study's, then the defaults.

    ``stored``: the settings a stored study recorded (None: there is no stored study yet).
    """
    if settings.sampler is not None and settings.search is not None:
        return settings
    if stored is None and settings.precisions is not None and Precision.INT8 not in settings.precisions:
        # No INT8 to rank layers by: nothing for the sensitivity probes to measure.
        sampler, search = LEGACY_SAMPLER, DEFAULT_SEARCH
    elif stored is None:
        sampler, search = DEFAULT_SAMPLER, DEFAULT_SEARCH
    else:
        sampler, search = stored.get("sampler") or LEGACY_SAMPLER, stored.get("search") or LEGACY_SEARCH
    resolved = dataclasses.replace(settings, sampler=settings.sampler or sampler, search=settings.search or search)
    validate_search_settings(resolved)
    return resolved


def validate_search_settings(settings: StudySettings) -> None:
    if settings.sampler is not None and settings.sampler not in SAMPLERS:
        raise SensisearchError(f"--sampler {settings.sampler}: use one of {', '.join(SAMPLERS)}")
    if settings.search is not None and settings.search not in SEARCHES:
        raise SensisearchError(f"--search {settings.search}: use one of {', '.join(SEARCHES)}")
    if settings.bias_correction not in BIAS_CORRECTION:
        raise SensisearchError(f"--bias-correction {settings.bias_correction}: use one of {', '.join(BIAS_CORRECTION)}")
    if settings.top_k <= 0:
        raise SensisearchError(f"--top-k {settings.top_k}: must be a positive number of layers")
    if settings.profile is not None and settings.profile not in PROFILES:
        raise SensisearchError(f"--profile {settings.profile}: use one of {', '.join(PROFILES)}")


def validate_fidelity_settings(settings: StudySettings) -> None:
    """``--fidelity-subset``: None (default), 0 (off), a fraction in (0, 1) or a whole number of images."""
    value = settings.fidelity_subset
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SensisearchError(
            f"--fidelity-subset {value}: give a number of images (e.g. 40), a fraction of them (e.g. 0.25), or 0 to turn it off"
        )
    if value >= 1 and value != int(value):
        raise SensisearchError(f"--fidelity-subset {value}: a number of images must be whole (or give a fraction below 1)")
