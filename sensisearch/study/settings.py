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

PATH_FIELDS = ("model", "calib_data", "eval_data", "annotations", "out", "cache_dir")
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
    batch_size: int = 64
    latency_batch: int = 1
    latency_seconds: float = 0.5
    eval_limit: int | None = None
    calib_limit: int | None = None
    max_class_drop: float | None = None
    iou: float = 0.6
    cache_dir: Path | None = None
    shapes: list[str] | None = None
    workspace_mb: int | None = None
    opt_level: int = 3
    heartbeat_seconds: int = 30
    compare_ort_quantizer: bool = False

    def validate(self) -> None:
        if self.budget <= 0:
            raise SensisearchError(f"--budget {self.budget}: must be a positive number of trials")
        if self.model is None and self.example is None:
            raise SensisearchError("no model given: pass --model FILE.onnx, --example digits, or a study file")
        if self.max_drop < 0:
            raise SensisearchError(f"--max-drop {self.max_drop}: must be >= 0 (points of the metric)")
        if self.latency_batch <= 0 or self.batch_size <= 0:
            raise SensisearchError("--latency-batch and --batch-size must be positive")
        if not self.sample_counts or min(self.sample_counts) <= 0:
            raise SensisearchError(f"--sample-counts {self.sample_counts}: give positive sample counts")
        for p in self.percentiles:
            if not 0 < p <= 100:
                raise SensisearchError(f"--percentiles {p}: must be in (0, 100]")
        if self.threads is not None and self.threads <= 0:
            raise SensisearchError(f"--threads {self.threads}: must be positive")
        validate_ranges(self)  # issue 9

    def backend_settings(self) -> BackendSettings:
        return BackendSettings(
            name=self.backend, threads=self.threads, shapes=None if self.shapes is None else tuple(self.shapes),
            workspace_mb=self.workspace_mb, opt_level=self.opt_level,
            latency_batch=self.latency_batch, eval_batch=self.batch_size,
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
            raise SensisearchError(f"--algorithms {value}: use minmax, entropy, percentile, mse") from exc
    if name == "default_algorithm":
        return CalibrationAlgorithm(str(value).lower())
    if name == "sample_counts":
        return [int(v) for v in value]
    if name in ("percentiles", "mean", "std"):
        return [float(v) for v in value]
    return value


def merge_settings(file_values: Mapping[str, Any], flag_values: Mapping[str, Any], base: Path | None) -> StudySettings:
    """Study-file values, overridden by flags that were given (not None)."""
    known = {f.name for f in dataclasses.fields(StudySettings)}
    values: dict[str, Any] = {}
    for key, value in file_values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise SensisearchError(f"study file: unknown key '{key}' (known: {', '.join(sorted(known))})")
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


# ---------------------------------------------------------------------------- issue 9: every input validated
# Study-file keys by the TOML type they need (flags are typed by argparse already).
INT_FIELDS = ("budget", "seed", "batch_size", "latency_batch", "eval_limit", "calib_limit", "workspace_mb",
              "opt_level", "heartbeat_seconds", "threads")
FLOAT_FIELDS = ("max_drop", "latency_seconds", "max_class_drop", "iou")
BOOL_FIELDS = ("compare_ort_quantizer",)
TEXT_FIELDS = ("example", "storage", "study_name", "metric", "task", "evaluator", "backend", "default_algorithm", *PATH_FIELDS)
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
    if settings.latency_seconds <= 0:
        raise SensisearchError(f"--latency-seconds {settings.latency_seconds}: must be > 0 (seconds of timed runs per trial)")
    if not 0 < settings.iou <= 1:
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
        raise SensisearchError("--algorithms: give at least one of minmax, entropy, percentile, mse")
    if not settings.percentiles:
        raise SensisearchError("--percentiles: give at least one clip percentile, e.g. 99.99")
