"""Build a ``.plan`` from a deployable ONNX: one strongly typed path for TensorRT 10/11 and RTX.

Precision comes only from the ONNX (Q/DQ for INT8 layers, Cast + float16
weights for FP16 layers); no precision flags are set. Builder settings:
workspace limit, builder optimization level, DETAILED profiling verbosity (so
the engine inspector can say which kernels ran INT8), optimization profiles for
dynamic inputs, a timing cache shared by every build of a study, and for
TensorRT-RTX the ahead-of-time compute-capability targets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from sensisearch.backends.base import BuildResult
from sensisearch.backends.tensorrt.flavor import RTX_DEFAULT_TARGETS, MachineInfo, TensorRTFlavor
from sensisearch.backends.tensorrt.network import (
    NetworkPrecisions,
    ParsedNetwork,
    network_precisions,
    parse_onnx,
    precision_problems,
)
from sensisearch.backends.tensorrt.sidecar import (
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    write_bytes_atomic,
    write_sidecar,
)
from sensisearch.errors import SensisearchError
from sensisearch.fileio import sha256_file

log = logging.getLogger(__name__)

PRECISION_SOURCE_NETWORK = "network tensor types before the build (CPU-side check; the engine inspector needs a GPU)"
PRECISION_SOURCE_INSPECTOR = "engine inspector (kernels TensorRT picked)"


# --------------------------------------------------------------------------- optimization profiles


@dataclass(frozen=True)
class ProfileShape:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def _dims(text: str, flag: str) -> tuple[int, ...]:
    parts = text.strip().lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise SensisearchError(f"{flag}: {text!r} is not a shape like 1x3x640x640") from None
    if not dims or min(dims) <= 0:
        raise SensisearchError(f"{flag}: {text!r} must have positive dimensions, like 1x3x640x640")
    return dims


def parse_shapes(specs: str | Sequence[str] | None, flag: str = "--shapes") -> dict[str, ProfileShape]:
    """``name:MIN/OPT/MAX`` strings (dims joined by ``x``) -> profile shape per input.

    ``"input:1x1x32x32/8x1x32x32/64x1x32x32"``; one shape ``"images:1x3x640x640"``
    means min = opt = max. Several inputs: a list, or one string separated by
    commas or spaces. Input names may contain ``:`` (the last one separates).
    """
    if specs is None:
        return {}
    items: list[str] = []
    for spec in [specs] if isinstance(specs, str) else list(specs):
        items += [s for s in str(spec).replace(",", " ").split() if s]
    out: dict[str, ProfileShape] = {}
    for item in items:
        name, sep, shapes = item.rpartition(":")
        if not sep or not name:
            raise SensisearchError(f"{flag} {item}: expected NAME:MIN/OPT/MAX, e.g. input:1x3x224x224/8x3x224x224/32x3x224x224")
        parts = shapes.split("/")
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3:
            raise SensisearchError(f"{flag} {item}: give one shape or three (MIN/OPT/MAX) separated by '/'")
        mn, opt, mx = (_dims(p, f"{flag} {item}") for p in parts)
        if not len(mn) == len(opt) == len(mx):
            raise SensisearchError(f"{flag} {item}: MIN, OPT and MAX must have the same rank")
        if any(a > b for a, b in zip(mn, opt)) or any(a > b for a, b in zip(opt, mx)):
            raise SensisearchError(f"{flag} {item}: need MIN <= OPT <= MAX in every dimension")
        if name in out:
            raise SensisearchError(f"{flag}: input {name!r} given twice")
        out[name] = ProfileShape(mn, opt, mx)
    return out


def resolve_profile(
    inputs: Sequence[tuple[str, Sequence[int]]],
    explicit: Mapping[str, ProfileShape],
    opt_batch: int = 1,
    max_batch: int = 64,
    flag: str = "--shapes",
) -> dict[str, ProfileShape]:
    """Profile shape of every network input (shape with -1 for dynamic dimensions).

    An input named in ``explicit`` uses that (static dimensions must agree); a
    static input uses its shape; an input whose only dynamic dimension is the
    first (batch) gets ``1 / opt_batch / max_batch``; anything else must be given.
    """
    names = [n for n, _ in inputs]
    unknown = sorted(set(explicit) - set(names))
    if unknown:
        raise SensisearchError(f"{flag}: no input named {', '.join(unknown)} (inputs: {', '.join(names)})")
    if not 1 <= opt_batch <= max_batch:
        raise SensisearchError(f"batch sizes: need 1 <= opt batch ({opt_batch}) <= max batch ({max_batch})")
    out: dict[str, ProfileShape] = {}
    for name, shape in inputs:
        shape = tuple(int(d) for d in shape)
        if name in explicit:
            ps = explicit[name]
            if len(ps.min) != len(shape):
                raise SensisearchError(f"{flag} {name}: rank {len(ps.min)} but the input has rank {len(shape)} {list(shape)}")
            for i, d in enumerate(shape):
                if d >= 0 and not (ps.min[i] == ps.opt[i] == ps.max[i] == d):
                    raise SensisearchError(f"{flag} {name}: dimension {i} is fixed to {d} in the model {list(shape)}")
            out[name] = ps
            continue
        dynamic = [i for i, d in enumerate(shape) if d < 0]
        if not dynamic:
            out[name] = ProfileShape(shape, shape, shape)
        elif dynamic == [0]:
            rest = shape[1:]
            out[name] = ProfileShape((1, *rest), (opt_batch, *rest), (max_batch, *rest))
        else:
            example = "x".join(str(d if d > 0 else 1) for d in shape)
            raise SensisearchError(
                f"{flag}: input {name} has dynamic dimensions {dynamic} {list(shape)}; give {flag} {name}:MIN/OPT/MAX, "
                f"e.g. {name}:{example}/{example}/{example}"
            )
    return out


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BuilderSettings:
    workspace_mb: int | None = None
    """Workspace memory-pool limit in MiB; None keeps TensorRT's default (all device memory)."""
    opt_level: int = 3
    """``builder_optimization_level`` 0..5 (TensorRT's default 3)."""
    shapes: Mapping[str, ProfileShape] = field(default_factory=dict)
    """Explicit optimization-profile shapes (``--shapes``); other inputs: static shape or batch defaults."""
    opt_batch: int = 1
    """Batch the kernels are tuned for when the batch is dynamic (the latency batch)."""
    max_batch: int = 64
    """Largest batch a dynamic-batch engine accepts (at least the evaluation batch)."""
    profiles: int = 1
    """Copies of the optimization profile (one per concurrent execution context in throughput mode)."""
    compute_capabilities: tuple[str, ...] = ()
    """TensorRT-RTX ahead-of-time targets (``"8.6"``, ``"SM89"``, ``"current"``); empty = its default."""
    detailed_profiling: bool = True

    def validate(self, flavor: TensorRTFlavor | None = None) -> None:
        if not 0 <= self.opt_level <= 5:
            raise SensisearchError(f"--opt-level {self.opt_level}: TensorRT's builder optimization level is 0..5")
        if self.workspace_mb is not None and self.workspace_mb <= 0:
            raise SensisearchError(f"--workspace-mb {self.workspace_mb}: must be positive")
        if self.profiles < 1:
            raise SensisearchError(f"profiles {self.profiles}: need at least one optimization profile")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise SensisearchError(f"batch sizes: need 1 <= opt batch ({self.opt_batch}) <= max batch ({self.max_batch})")
        if self.compute_capabilities and flavor is not None and not flavor.features.aot_compute_capabilities:
            raise SensisearchError(
                f"--compute-capabilities: {flavor.module_name} {flavor.version} has no ahead-of-time targets "
                "(only TensorRT-RTX does); it builds for the GPU it runs on"
            )
        for cc in self.compute_capabilities:
            _cc_enum_name(cc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workspace_mb": self.workspace_mb,
            "opt_level": self.opt_level,
            "shapes": {k: v.to_dict() for k, v in self.shapes.items()},
            "opt_batch": self.opt_batch,
            "max_batch": self.max_batch,
            "profiles": self.profiles,
            "compute_capabilities": list(self.compute_capabilities),
            "profiling_verbosity": "DETAILED" if self.detailed_profiling else "LAYER_NAMES_ONLY",
            "strongly_typed": True,
        }


def _cc_enum_name(cc: str) -> str:
    text = str(cc).strip().upper()
    if text == "CURRENT":
        return "CURRENT"
    text = text.removeprefix("SM").replace(".", "")
    if not text.isdigit():
        raise SensisearchError(f"--compute-capabilities {cc}: expected e.g. 8.6, SM89 or current")
    return f"SM{text}"


def _cc_dotted(enum_name: str) -> str:
    digits = enum_name.removeprefix("SM")
    return f"{digits[:-1]}.{digits[-1]}"


# --------------------------------------------------------------------------- timing cache


class TimingCache:
    """One timing cache per study: loaded before each build, merged back after, saved atomically.

    The file holds TensorRT's serialized cache; ``<file>.json`` records the
    TensorRT module, version and GPU it belongs to (a cache from another version
    or GPU is ignored and replaced). Within a process the same ``ITimingCache``
    object is attached to every build; across processes (parallel trials, later
    runs) the file is re-read and combined under a lock before each save.
    On TensorRT-RTX the calls are accepted but are no-ops (it does no kernel
    timing ahead of time); the file is still written so the study layout is the same.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._cache: Any = None
        self._owner: Any = None  # the config that created the cache (keep it alive)
        self.loaded_bytes = 0
        self.saved_bytes = 0

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    @staticmethod
    def _identity(flavor: TensorRTFlavor, machine: MachineInfo | None) -> dict[str, Any]:
        gpu = machine.gpu if machine is not None else None
        return {
            "module": flavor.module_name,
            "version": flavor.version,
            "gpu": None if gpu is None else gpu.name,
            "compute_capability": None if gpu is None else gpu.compute_capability,
        }

    def _read(self, flavor: TensorRTFlavor, machine: MachineInfo | None) -> bytes:
        if not self.path.is_file():
            return b""
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        if meta != self._identity(flavor, machine):
            log.info("timing cache %s belongs to %s; starting a new one", self.path, meta)
            return b""
        return self.path.read_bytes()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as fh:
            try:
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - Windows: no cross-process lock
                pass
            yield

    def attach(self, config: Any, flavor: TensorRTFlavor, machine: MachineInfo | None = None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # RTX: "no-ops in TensorRT-RTX"
            with self._locked():
                blob = self._read(flavor, machine)
            self.loaded_bytes = len(blob)
            if self._cache is None:
                self._cache = config.create_timing_cache(blob)
                self._owner = config
            elif blob:
                self._cache.combine(config.create_timing_cache(blob), False)
            if not config.set_timing_cache(self._cache, False):
                raise SensisearchError(f"{self.path}: TensorRT rejected the timing cache; delete the file and rerun")

    def save(self, config: Any, flavor: TensorRTFlavor, machine: MachineInfo | None = None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cache = config.get_timing_cache() or self._cache
            with self._locked():
                blob = self._read(flavor, machine)
                if blob:  # another process saved meanwhile: merge its entries
                    cache.combine(config.create_timing_cache(blob), False)
                data = bytes(memoryview(cache.serialize()))
                write_bytes_atomic(self.path, data)
                write_bytes_atomic(self.meta_path, (json.dumps(self._identity(flavor, machine)) + "\n").encode())
        self.saved_bytes = len(data)


# --------------------------------------------------------------------------- build


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def configure(
    parsed: ParsedNetwork, settings: BuilderSettings, profile: Mapping[str, ProfileShape], timing_cache: TimingCache | None,
    machine: MachineInfo | None,
) -> Any:
    """The builder config for ``parsed``: plain documented calls, no precision flags."""
    flavor = parsed.flavor
    trt = flavor.module
    config = parsed.builder.create_builder_config()
    if settings.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mb) << 20)
    config.builder_optimization_level = int(settings.opt_level)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED if settings.detailed_profiling else trt.ProfilingVerbosity.LAYER_NAMES_ONLY
    if any(d < 0 for _, shape in parsed.inputs() for d in shape):
        for _ in range(settings.profiles):
            p = parsed.builder.create_optimization_profile()
            for name, ps in profile.items():
                p.set_shape(name, ps.min, ps.opt, ps.max)
            config.add_optimization_profile(p)
    if settings.compute_capabilities:
        config.num_compute_capabilities = len(settings.compute_capabilities)
        for i, cc in enumerate(settings.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, _cc_enum_name(cc)), i)
    if timing_cache is not None:
        timing_cache.attach(config, flavor, machine)
    return config


def aot_targets(flavor: TensorRTFlavor, settings: BuilderSettings, machine: MachineInfo | None) -> tuple[list[str] | None, bool]:
    """``(compute capabilities the plan targets, whether that is RTX's default)``; None for full TensorRT."""
    if not flavor.is_rtx:
        return None, False
    if not settings.compute_capabilities:
        return list(RTX_DEFAULT_TARGETS), True
    out = []
    for cc in settings.compute_capabilities:
        name = _cc_enum_name(cc)
        if name == "CURRENT":
            gpu = machine.gpu if machine is not None else None
            out.append(gpu.compute_capability if gpu is not None else "current")
        else:
            out.append(_cc_dotted(name))
    return out, False


def _profile_list(profile: Mapping[str, ProfileShape], copies: int, dynamic: bool) -> list[dict[str, Any]]:
    if not dynamic:
        return [{name: ps.to_dict() for name, ps in profile.items()}]
    return [{name: ps.to_dict() for name, ps in profile.items()} for _ in range(copies)]


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    flavor: TensorRTFlavor,
    settings: BuilderSettings = BuilderSettings(),
    *,
    timing_cache: TimingCache | None = None,
    machine: MachineInfo | None = None,
    layer_names: Iterable[str] | None = None,
    trial_config: Mapping[str, Any] | None = None,
) -> BuildResult:
    """Parse, check the tensor types, build, write ``plan_path`` and its sidecar atomically.

    Raises :class:`SensisearchError` (one line) on parse errors (naming the ONNX
    node), a build that returns None, or running out of memory.
    """
    onnx_path = Path(onnx_path)
    plan_path = Path(plan_path)
    settings.validate(flavor)
    t0 = time.perf_counter()
    parsed = parse_onnx(onnx_path, flavor)
    profile = resolve_profile(parsed.inputs(), settings.shapes, settings.opt_batch, settings.max_batch)
    precisions: NetworkPrecisions = network_precisions(parsed, layer_names)
    config = configure(parsed, settings, profile, timing_cache, machine)
    prepare_seconds = time.perf_counter() - t0  # parse + type check + config + timing-cache load
    logger = parsed.logger
    mark = logger.mark()
    t1 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            plan = parsed.builder.build_serialized_network(parsed.network, config)
    except MemoryError as exc:
        raise SensisearchError(f"{onnx_path}: out of memory while building the engine; lower --workspace-mb or the profile's max shapes") from exc
    except Exception as exc:  # TensorRT raises RuntimeError/TypeError with its own text
        text = _one_line(exc)
        if "memory" in text.lower():
            raise SensisearchError(f"{onnx_path}: out of memory while building the engine ({text}); lower --workspace-mb or max shapes") from exc
        raise SensisearchError(f"{onnx_path}: TensorRT build failed ({text})") from exc
    build_seconds = time.perf_counter() - t1
    if plan is None:
        why = logger.last_error(mark) or "no error message"
        hint = "; lower --workspace-mb or the profile's max shapes" if "memory" in why.lower() else ""
        raise SensisearchError(f"{onnx_path}: TensorRT returned no engine ({why}){hint}")
    data = bytes(memoryview(plan))
    del plan
    if not data:
        raise SensisearchError(f"{onnx_path}: TensorRT returned an empty engine ({logger.last_error(mark) or 'no error message'})")
    if timing_cache is not None:
        timing_cache.save(config, flavor, machine)
    write_bytes_atomic(plan_path, data)
    targets, default_targets = aot_targets(flavor, settings, machine)
    gpu = machine.gpu if machine is not None else None
    dynamic = any(d < 0 for _, shape in parsed.inputs() for d in shape)
    counts = precisions.counts()
    problems = None
    if trial_config is not None and isinstance(trial_config.get("precisions"), Mapping):
        problems = precision_problems(precisions, trial_config["precisions"])
        if problems:
            log.warning("%s: network typing differs from the configuration: %s", onnx_path, "; ".join(problems[:3]))
    sidecar = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "plan": {"file": plan_path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "tensorrt": flavor.to_dict(),
        "target": {
            "gpu": None if gpu is None else gpu.to_dict(),
            "aot_compute_capabilities": targets,
            "aot_default": default_targets,
        },
        "driver": {
            "cuda_driver": machine.driver.version if machine is not None else None,
            "cuda_runtime": machine.driver.cuda_runtime if machine is not None else None,
            "cuda_python": machine.driver.cuda_python if machine is not None else None,
        },
        "platform": {"os": machine.os if machine is not None else None, "arch": machine.arch if machine is not None else None},
        "builder": settings.to_dict(),
        "profiles": _profile_list(profile, settings.profiles, dynamic),
        "inputs": [{"name": n, "shape": list(s)} for n, s in parsed.inputs()],
        "outputs": [{"name": n, "shape": list(s)} for n, s in parsed.outputs()],
        "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        "trial_config": dict(trial_config) if trial_config is not None else None,
        "network_precisions": dict(precisions.layers),
        "precision_problems": problems,
        "build_seconds": round(build_seconds, 4),
        "prepare_seconds": round(prepare_seconds, 4),
        "timing_cache": None
        if timing_cache is None
        else {"path": str(timing_cache.path), "effective": flavor.features.timing_cache_effective, "loaded_bytes": timing_cache.loaded_bytes, "saved_bytes": timing_cache.saved_bytes},
    }
    side = write_sidecar(plan_path, sidecar)
    details = {
        "flavor": flavor.backend,
        "tensorrt_version": flavor.version,
        "plan_bytes": len(data),
        "sidecar": str(side),
        "prepare_seconds": prepare_seconds,
        "build_seconds": build_seconds,
        "profiles": sidecar["profiles"],
        "precision_source": PRECISION_SOURCE_NETWORK,
        "network_precisions": dict(precisions.layers),
        "precision_problems": problems,
        "aot_compute_capabilities": targets,
        "builder_warnings": logger.warnings(mark)[-5:],
    }
    log.debug("built %s in %.2fs (%d bytes): %s", plan_path, build_seconds, len(data), counts)
    return BuildResult(artifact=plan_path, seconds=prepare_seconds + build_seconds, layer_precisions=counts, details=details)
