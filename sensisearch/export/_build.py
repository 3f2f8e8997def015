"""``sensisearch build --config``: remake one configuration on this machine's backend.

A winner's (or any trial's) config.json records the model path and sha256,
the precision per layer and the calibrated ranges, so nothing else is needed:
this is how users remake the winner on the production GPU. It goes through the
study's own :class:`~sensisearch.artifact.ArtifactPipeline` (plan, emit from
the recorded ranges, build), so the artifact is the one a trial would make.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sensisearch.backends.base import Backend, BuildResult
from sensisearch.errors import SensisearchError
from sensisearch.model.analysis import analyze_model
from sensisearch.quantize.config import TrialConfig
from sensisearch.artifact import ArtifactPipeline
from sensisearch.quantize.ranges import ranges_from_dict

log = logging.getLogger(__name__)


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SensisearchError(f"--config {path}: no such file (use a winner/config.json or a trial's trial.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SensisearchError(f"--config {path}: not JSON ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict) or "config" not in data:
        raise SensisearchError(f"--config {path}: no 'config' entry; pass a winner/config.json or trials/NNNN/trial.json")
    return data


def config_for_model(config_path: Path, recorded: Any, layers: list[str]) -> TrialConfig:
    """The recorded configuration, checked against the model's layers: no layer silently stays FP32."""
    try:
        config = TrialConfig.from_dict(recorded)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SensisearchError(
            f"--config {config_path}: invalid configuration ({type(exc).__name__}: {' '.join(str(exc).split())}); "
            "precisions are int8, fp16, fp32 — use a winner/config.json or trial.json as written"
        ) from exc
    missing = [name for name in layers if name not in config.precisions]
    unknown = [name for name in config.precisions if name not in layers]
    if missing or unknown:
        which = f"no precision for layer {missing[0]}" if missing else f"layer {unknown[0]} is not in the model"
        raise SensisearchError(
            f"--config {config_path}: {which} ({len(missing)} missing, {len(unknown)} unknown); "
            "use the config.json written for this model, or pass --model with the study's model"
        )
    return config


def build_from_config(config_path: Path, backend: Backend, out: Path | None = None, model: Path | None = None) -> tuple[Path, BuildResult]:
    data = read_config(config_path)
    recorded = data.get("model") or {}
    model_path = Path(model or recorded.get("path") or "")
    if not str(model_path) or not model_path.is_file():
        raise SensisearchError(f"--config {config_path}: its model {model_path or '(none recorded)'} is not here; pass --model FILE.onnx")
    info, proto = analyze_model(model_path)
    if recorded.get("sha256") and recorded["sha256"] != info.sha256:
        raise SensisearchError(
            f"--model {model_path}: sha256 {info.sha256[:12]}… differs from the configuration's model "
            f"({recorded['sha256'][:12]}…); pass the model the study ran on"
        )
    config = config_for_model(config_path, data["config"], [layer.name for layer in info.layers])
    ranges = ranges_from_dict(data.get("thresholds") or {})
    pipeline = ArtifactPipeline(proto, info, backend)
    placement = pipeline.plan(config)
    missing = pipeline.missing_ranges(placement, ranges)
    if missing:
        raise SensisearchError(
            f"--config {config_path}: no calibrated range for {len(missing)} tensors the {backend.profile.name} profile "
            f"quantizes (first: {missing[0]}); use a winner/config.json written by this version"
        )
    suffix = backend.capabilities.artifact_suffix
    out = Path(out) if out is not None else config_path.parent / f"{model_path.stem}{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sensisearch-build-", dir=out.parent) as tmp:
        onnx_path, _ = pipeline.emit(config, Path(tmp), ranges=ranges, placement=placement)
        result = pipeline.build(onnx_path, Path(tmp), config)
        # Move the artifact and anything written beside it (e.g. a .plan's sidecar JSON).
        for produced in Path(tmp).iterdir():
            if produced.name.startswith(result.artifact.name) and produced != result.artifact:
                shutil.copy2(produced, out.with_name(out.name + produced.name[len(result.artifact.name):]))
        os.replace(result.artifact, out)
    result.artifact = out
    log.info("built %s from %s in %.2f s", out, config_path, result.seconds)
    return out, result
