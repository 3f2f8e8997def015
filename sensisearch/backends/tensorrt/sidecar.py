"""The JSON written next to every ``.plan`` and the check that a plan fits this machine.

A TensorRT plan runs only with the exact TensorRT version that built it, on the
same GPU compute capability (in practice the same GPU model) and OS; a
TensorRT-RTX plan runs on the compute capabilities it was built for, with the
same TensorRT-RTX release. Loading a plan that does not fit must fail with a
clear message, not inside TensorRT, so every plan gets a sidecar
``<plan>.json`` recording how and for what it was built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from sensisearch.backends.tensorrt.flavor import RTX_DEFAULT_TARGETS, RTX_UNSUPPORTED, MachineInfo
from sensisearch.errors import SensisearchError
from sensisearch.fileio import read_json, sha256_file, write_bytes_atomic

SIDECAR_FORMAT = "sensisearch-tensorrt-plan"
SIDECAR_VERSION = 1
REBUILD = "rebuild it on this machine with `sensisearch build --config <config.json> --backend {backend}`"


def sidecar_path(plan: str | Path) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def write_sidecar(plan: str | Path, data: Mapping[str, Any]) -> Path:
    path = sidecar_path(plan)
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode())
    return path


def read_sidecar(plan: str | Path) -> dict[str, Any]:
    path = sidecar_path(plan)
    backend = "tensorrt"
    if not path.is_file():
        raise SensisearchError(f"{plan}: no sidecar {path.name} next to the plan, so it cannot be checked; {REBUILD.format(backend=backend)}")
    data = read_json(path, f"{path} (sidecar)", REBUILD.format(backend=backend))
    validate_sidecar(data, path)
    return data


def validate_sidecar(data: Any, where: str | Path = "sidecar") -> None:
    """Structure check: the fields :func:`check_sidecar` relies on are present."""
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise SensisearchError(f"{where}: not a sensisearch plan sidecar; {REBUILD.format(backend='tensorrt')}")
    if data.get("format_version") != SIDECAR_VERSION:
        raise SensisearchError(
            f"{where}: sidecar format {data.get('format_version')} is not {SIDECAR_VERSION}; {REBUILD.format(backend='tensorrt')}"
        )
    missing = [k for k in ("tensorrt", "target", "platform", "plan", "onnx", "builder", "profiles") if k not in data]
    trt = data.get("tensorrt") or {}
    missing += [f"tensorrt.{k}" for k in ("backend", "module", "version") if k not in trt]
    if missing:
        raise SensisearchError(f"{where}: sidecar lacks {', '.join(missing)}; {REBUILD.format(backend=trt.get('backend', 'tensorrt'))}")


def _targets(data: Mapping[str, Any]) -> tuple[list[str], bool]:
    target = data.get("target") or {}
    aot = target.get("aot_compute_capabilities")
    if aot:
        return [str(c) for c in aot], bool(target.get("aot_default", False))
    return list(RTX_DEFAULT_TARGETS), True


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def check_sidecar(sidecar: Mapping[str, Any] | str | Path, machine: MachineInfo, plan: str | Path | None = None) -> None:
    """Raise a one-line :class:`SensisearchError` (ending in how to rebuild) when the plan
    the sidecar describes cannot run on ``machine``; return None when it fits.

    ``sidecar``: the parsed JSON, or the path of the plan (its sidecar is read).
    ``plan``: when given, its sha256 must be the one recorded (the sidecar belongs to it).
    """
    if not isinstance(sidecar, Mapping):
        plan = plan or Path(sidecar)
        sidecar = read_sidecar(sidecar)
    else:
        validate_sidecar(sidecar)
    built = sidecar["tensorrt"]
    backend = built["backend"]
    rebuild = REBUILD.format(backend=backend)
    name = Path(plan).name if plan else sidecar["plan"].get("file", "plan")
    if plan is not None:
        recorded = sidecar["plan"].get("sha256")
        if recorded and Path(plan).is_file() and sha256_file(plan) != recorded:
            raise SensisearchError(f"{name}: the plan was replaced after its sidecar was written (sha256 differs); {rebuild}")
    flavor = machine.flavor
    if flavor is None:
        raise SensisearchError(f"{name}: built with {built['module']} {built['version']}, which does not import here; {rebuild}")
    if flavor.module_name != built["module"]:
        raise SensisearchError(
            f"{name}: built with {built['module']} {built['version']} but this machine uses {flavor.module_name} {flavor.version}; {rebuild}"
        )
    if flavor.version != built["version"]:
        raise SensisearchError(
            f"{name}: built with {built['module']} {built['version']}, this machine has {flavor.version} "
            f"(plans only run on the exact version that built them); {rebuild}"
        )
    gpu = machine.gpu
    if gpu is None:
        raise SensisearchError(f"{name}: no NVIDIA GPU here ({machine.driver.error or 'none found'}); TensorRT plans only run on a GPU")
    if flavor.is_rtx:
        if gpu.compute_capability in RTX_UNSUPPORTED:
            raise SensisearchError(
                f"{name}: TensorRT-RTX does not run on {gpu.name} (compute capability {gpu.compute_capability}); use --backend tensorrt"
            )
        targets, default = _targets(sidecar)
        ok = gpu.compute_capability in targets
        if not ok and default:  # "8.0, 8.6, 8.9, 12.0, and later"
            ok = _cc_tuple(gpu.compute_capability) > max(_cc_tuple(t) for t in targets)
        if not ok:
            raise SensisearchError(
                f"{name}: built for compute capabilities {', '.join(targets)}, this GPU ({gpu.name}) is "
                f"{gpu.compute_capability}; {rebuild}"
            )
        return
    target = (sidecar.get("target") or {}).get("gpu") or {}
    if str(target.get("compute_capability")) != gpu.compute_capability:
        raise SensisearchError(
            f"{name}: built on {target.get('name', '?')} (compute capability {target.get('compute_capability', '?')}), "
            f"this GPU is {gpu.name} ({gpu.compute_capability}); {rebuild}"
        )
    if target.get("name") and target["name"] != gpu.name:
        raise SensisearchError(
            f"{name}: built and tuned on {target['name']}, this GPU is {gpu.name} (kernels were timed on another model); {rebuild}"
        )
    platform = sidecar.get("platform") or {}
    if platform.get("os") not in (None, machine.os) or platform.get("arch") not in (None, machine.arch):
        raise SensisearchError(
            f"{name}: built on {platform.get('os')}/{platform.get('arch')}, this machine is {machine.os}/{machine.arch}; {rebuild}"
        )
