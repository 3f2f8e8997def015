"""Which TensorRT is installed, and which NVIDIA GPU (if any) is usable here.

Three flavors share one code path (see ``shared/docs/tensorrt-notes.md``):

* ``trt10``: ``import tensorrt`` with weak typing still available
  (``BuilderFlag.FP16`` exists); sensisearch always builds strongly typed.
* ``trt11``: ``import tensorrt`` without the weak-typing flags (every network is
  strongly typed).
* ``rtx``: ``import tensorrt_rtx`` (TensorRT for RTX): builds engines ahead of
  time without a GPU (default targets SM80/86/89/120), runs only on a GPU,
  refuses Hopper (compute capability 9.0), timing-cache calls are no-ops.

The flavor is found by import and feature probes, not by version numbers. The
GPU probe talks to the CUDA *driver* through ``ctypes`` (``libcuda.so.1`` /
``nvcuda.dll``): it needs no Python package and works with any driver version;
whether cuda-python's runtime (what the engine runner uses) works is reported
separately. Nothing here shells out to ``nvidia-smi``.
"""

from __future__ import annotations

import ctypes
import importlib
import platform
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import Any

from sensisearch.errors import SensisearchError

BACKEND_NAMES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
"""sensisearch backend name -> Python module."""

RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")
"""Compute capabilities a TensorRT-RTX engine targets when none is set
(TensorRT-RTX docs, "CPU-Only AOT": "8.0, 8.6, 8.9, 12.0, and later")."""
RTX_UNSUPPORTED = ("9.0",)
"""Compute capabilities TensorRT-RTX refuses to run on (Hopper)."""

# CUdevice_attribute values (cuda.h).
_CU_ATTR_CC_MAJOR = 75
_CU_ATTR_CC_MINOR = 76


# --------------------------------------------------------------------------- TensorRT flavor


@dataclass(frozen=True)
class TensorRTFeatures:
    """What the installed module offers, found by probing attributes."""

    strongly_typed_flag: bool
    """``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists (10.x, 11.x, RTX)."""
    weak_typing_flags: bool
    """``BuilderFlag.FP16`` exists: weak typing still available (10.x only)."""
    aot_compute_capabilities: bool
    """``IBuilderConfig.set_compute_capability`` exists (RTX ahead-of-time targets)."""
    engine_validity: bool
    """``Runtime.get_engine_validity`` exists (RTX; needs a driver to answer)."""
    device_memory_size_v2: bool
    timing_cache_effective: bool
    """False on TensorRT-RTX, where timing-cache calls are accepted but do nothing."""

    def to_dict(self) -> dict[str, bool]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TensorRTFlavor:
    backend: str
    """sensisearch backend name: ``tensorrt`` or ``tensorrt-rtx``."""
    module_name: str
    kind: str
    """``trt10``, ``trt11`` or ``rtx``."""
    version: str
    parser_version: str | None
    features: TensorRTFeatures
    module: ModuleType = field(repr=False, compare=False)

    @property
    def is_rtx(self) -> bool:
        return self.kind == "rtx"

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "module": self.module_name,
            "kind": self.kind,
            "version": self.version,
            "onnx_parser_version": self.parser_version,
            "features": self.features.to_dict(),
        }


def flavor_from_module(trt: ModuleType, module_name: str) -> TensorRTFlavor:
    """Describe an imported TensorRT module (``tensorrt`` or ``tensorrt_rtx``) by probing it."""
    builder_flag = getattr(trt, "BuilderFlag", None)
    creation_flag = getattr(trt, "NetworkDefinitionCreationFlag", None)
    config_cls = getattr(trt, "IBuilderConfig", None)
    runtime_cls = getattr(trt, "Runtime", None)
    engine_cls = getattr(trt, "ICudaEngine", None)
    rtx = module_name == "tensorrt_rtx"
    features = TensorRTFeatures(
        strongly_typed_flag=hasattr(creation_flag, "STRONGLY_TYPED"),
        weak_typing_flags=hasattr(builder_flag, "FP16"),
        aot_compute_capabilities=hasattr(config_cls, "set_compute_capability") and hasattr(trt, "ComputeCapability"),
        engine_validity=hasattr(runtime_cls, "get_engine_validity"),
        device_memory_size_v2=hasattr(engine_cls, "device_memory_size_v2"),
        timing_cache_effective=not rtx,
    )
    if rtx:
        kind = "rtx"
    else:
        kind = "trt10" if features.weak_typing_flags else "trt11"
    parser_version = None
    getter = getattr(trt, "get_nv_onnx_parser_version", None)
    if callable(getter):
        try:
            parser_version = str(getter())
        except Exception:  # pragma: no cover - informational only
            parser_version = None
    return TensorRTFlavor(
        backend="tensorrt-rtx" if rtx else "tensorrt",
        module_name=module_name,
        kind=kind,
        version=str(getattr(trt, "__version__", "unknown")),
        parser_version=parser_version,
        features=features,
        module=trt,
    )


@lru_cache(maxsize=None)
def _import(module_name: str) -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, OSError (missing CUDA libs), ...
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if not hasattr(module, "Builder"):
        return None, f"module {module_name} has no Builder (not TensorRT?)"
    return module, None


def import_error(backend: str) -> str | None:
    """Why ``backend``'s module does not import (None when it does)."""
    return _import(BACKEND_NAMES[backend])[1]


def detect_flavor(prefer: str | None = None) -> TensorRTFlavor | None:
    """The TensorRT flavor to use, or None when none imports.

    ``prefer``: ``"tensorrt"`` or ``"tensorrt-rtx"`` looks only at that module;
    None tries ``tensorrt`` first, then ``tensorrt_rtx``.
    """
    if prefer is not None and prefer not in BACKEND_NAMES:
        raise SensisearchError(f"--backend {prefer}: unknown TensorRT flavor (use tensorrt or tensorrt-rtx)")
    for backend in ([prefer] if prefer else list(BACKEND_NAMES)):
        module, _ = _import(BACKEND_NAMES[backend])
        if module is not None:
            return flavor_from_module(module, BACKEND_NAMES[backend])
    return None


def available_flavors() -> list[TensorRTFlavor]:
    return [f for f in (detect_flavor(b) for b in BACKEND_NAMES) if f is not None]


def require_flavor(prefer: str | None = None) -> TensorRTFlavor:
    """Like :func:`detect_flavor` but raises a one-line error saying what to install."""
    flavor = detect_flavor(prefer)
    if flavor is not None:
        return flavor
    if prefer == "tensorrt-rtx":
        why = import_error("tensorrt-rtx")
        raise SensisearchError(
            f"--backend tensorrt-rtx: module tensorrt_rtx does not import ({why}); pip install -e '.[tensorrt-rtx]'"
        )
    if prefer == "tensorrt":
        why = import_error("tensorrt")
        raise SensisearchError(f"--backend tensorrt: module tensorrt does not import ({why}); pip install -e '.[tensorrt]'")
    raise SensisearchError(
        "--backend tensorrt: neither tensorrt nor tensorrt_rtx imports; pip install -e '.[tensorrt]' "
        "(or '.[tensorrt-rtx]' for GeForce/RTX PRO cards)"
    )


# --------------------------------------------------------------------------- GPU and driver


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str
    """``"major.minor"``, e.g. ``"8.6"``."""
    total_memory_mb: int | None = None

    @property
    def sm(self) -> str:
        """``SM86`` style name of the compute capability."""
        return "SM" + self.compute_capability.replace(".", "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "compute_capability": self.compute_capability,
            "total_memory_mb": self.total_memory_mb,
        }


@dataclass(frozen=True)
class DriverInfo:
    """What the CUDA driver says (through ctypes), plus cuda-python's runtime view."""

    loaded: bool
    """The driver library loaded and ``cuInit`` succeeded."""
    version: str | None
    """Highest CUDA version the driver supports, e.g. ``"13.0"``."""
    gpus: tuple[GpuInfo, ...] = ()
    error: str | None = None
    cuda_python: str | None = None
    """cuda-python (cuda-bindings) version, None when not installed."""
    cuda_runtime: str | None = None
    """CUDA runtime version cuda-python was built against, e.g. ``"13.0"``."""
    runtime_error: str | None = None
    """Why cuda-python's runtime cannot reach a device (None when it can)."""
    pycuda: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "version": self.version,
            "gpus": [g.to_dict() for g in self.gpus],
            "error": self.error,
            "cuda_python": self.cuda_python,
            "cuda_runtime": self.cuda_runtime,
            "runtime_error": self.runtime_error,
            "pycuda": self.pycuda,
        }


def _cuda_version(value: int) -> str:
    return f"{value // 1000}.{(value % 1000) // 10}"


def _driver_library() -> Any:
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    raise OSError("; ".join(errors))  # noqa: TRY003


def probe_driver(lib: Any = None) -> tuple[bool, str | None, tuple[GpuInfo, ...], str | None]:
    """``(loaded, driver CUDA version, GPUs, error)`` from the CUDA driver API.

    ``lib`` is the loaded driver library (a ``ctypes.CDLL``); tests pass a fake.
    """
    if lib is None:
        try:
            lib = _driver_library()
        except OSError:
            lib_name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
            return False, None, (), f"no NVIDIA driver ({lib_name} not found)"
    rc = lib.cuInit(0)
    version = ctypes.c_int(0)
    driver_version = _cuda_version(version.value) if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 else None
    if rc != 0:
        return False, driver_version, (), f"NVIDIA driver present but cuInit failed (CUresult {rc}: no usable GPU)"
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        return True, driver_version, (), f"cuDeviceGetCount failed (CUresult {rc})"
    gpus = []
    for i in range(count.value):
        dev = ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(dev), i) != 0:
            continue
        name = ctypes.create_string_buffer(256)
        lib.cuDeviceGetName(name, 256, dev)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC_MAJOR, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC_MINOR, dev)
        mem = ctypes.c_size_t(0)
        total = None
        getter = getattr(lib, "cuDeviceTotalMem_v2", None)
        if getter is not None and getter(ctypes.byref(mem), dev) == 0:
            total = int(mem.value // (1 << 20))
        gpus.append(GpuInfo(i, name.value.decode(errors="replace"), f"{major.value}.{minor.value}", total))
    error = None if gpus else "NVIDIA driver loaded but it reports no GPU"
    return True, driver_version, tuple(gpus), error


def probe_cuda_python() -> tuple[str | None, str | None, str | None]:
    """``(cuda-python version, CUDA runtime version, runtime error)``."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 / 13.x
    except Exception:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # cuda-python < 13
        except Exception:
            return None, None, "cuda-python is not installed (pip install cuda-python)"
    version = None
    try:
        from importlib.metadata import version as dist_version

        for dist in ("cuda-bindings", "cuda-python"):
            try:
                version = dist_version(dist)
                break
            except Exception:
                continue
    except Exception:  # pragma: no cover
        version = None
    runtime = None
    err, value = cudart.cudaRuntimeGetVersion()
    if int(err) == 0:
        runtime = _cuda_version(int(value))
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        return version or "unknown", runtime, f"cuda-python runtime cannot reach a GPU ({name})"
    if int(count) == 0:
        return version or "unknown", runtime, "cuda-python runtime sees no GPU"
    return version or "unknown", runtime, None


def probe_cuda_python_isolated(timeout: float = 60.0) -> tuple[str | None, str | None, str | None]:
    """:func:`probe_cuda_python` in a separate Python process.

    ``cudaGetDeviceCount`` initialises CUDA in the calling process, and a process
    that initialised CUDA must not fork children that use it (CUDA is not
    fork-safe). The study's trial server probes the machine, then forks one child
    per trial that builds and runs engines: so the probe runs elsewhere.
    """
    import json
    import subprocess
    import sys

    code = (
        "import json; from sensisearch.backends.tensorrt.flavor import probe_cuda_python; "
        "print(json.dumps(probe_cuda_python()))"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False)
        version, runtime, error = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return None, None, f"probing cuda-python in a subprocess failed ({type(exc).__name__})"
    return version, runtime, error


def probe_pycuda() -> str | None:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("pycuda")
    except Exception:
        return None


@lru_cache(maxsize=1)
def probe_gpu_driver() -> DriverInfo:
    """Driver, GPUs and GPU runtime bindings of this machine (cached per process)."""
    loaded, version, gpus, error = probe_driver()
    cp_version, runtime, runtime_error = probe_cuda_python_isolated()
    return DriverInfo(
        loaded=loaded,
        version=version,
        gpus=gpus,
        error=error,
        cuda_python=cp_version,
        cuda_runtime=runtime,
        runtime_error=runtime_error,
        pycuda=probe_pycuda(),
    )


# --------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class MachineInfo:
    """Everything a plan's sidecar is checked against."""

    flavor: TensorRTFlavor | None
    driver: DriverInfo
    device: int = 0
    os: str = field(default_factory=lambda: sys.platform)
    arch: str = field(default_factory=lambda: platform.machine().lower())

    @property
    def gpu(self) -> GpuInfo | None:
        for gpu in self.driver.gpus:
            if gpu.index == self.device:
                return gpu
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "flavor": None if self.flavor is None else self.flavor.to_dict(),
            "driver": self.driver.to_dict(),
            "device": self.device,
            "os": self.os,
            "arch": self.arch,
        }


def probe_machine(flavor: TensorRTFlavor | None = None, device: int = 0) -> MachineInfo:
    return MachineInfo(flavor=flavor, driver=probe_gpu_driver(), device=device)


def gpu_runtime_available(driver: DriverInfo) -> tuple[bool, str]:
    """Whether the engine runner has a way to allocate GPU memory and streams."""
    if driver.cuda_python is not None and driver.runtime_error is None:
        return True, f"cuda-python {driver.cuda_python}"
    if driver.pycuda is not None:
        return True, f"pycuda {driver.pycuda}"
    if driver.cuda_python is None:
        return False, "cuda-python is not installed (pip install cuda-python)"
    return False, str(driver.runtime_error)


def can_run_on(machine: MachineInfo) -> tuple[bool, str]:
    """Whether ``machine`` can deserialize and run an engine of its flavor, and why (one line)."""
    flavor = machine.flavor
    if flavor is None:
        return False, "neither tensorrt nor tensorrt_rtx imports (pip install -e '.[tensorrt]' or '.[tensorrt-rtx]')"
    driver = machine.driver
    if not driver.loaded:
        return False, f"{flavor.module_name} {flavor.version} imports, but {driver.error or 'no NVIDIA driver'}"
    gpu = machine.gpu
    if gpu is None:
        why = driver.error or f"no GPU with index {machine.device}"
        return False, f"{flavor.module_name} {flavor.version} imports, but {why}"
    if flavor.is_rtx and gpu.compute_capability in RTX_UNSUPPORTED:
        return False, (
            f"TensorRT-RTX does not run on {gpu.name} (compute capability {gpu.compute_capability}, Hopper); "
            "use --backend tensorrt"
        )
    ok, how = gpu_runtime_available(driver)
    if not ok:
        return False, f"{flavor.module_name} {flavor.version} and {gpu.name} found, but {how}"
    return True, (
        f"{flavor.module_name} {flavor.version} on {gpu.name} (compute capability {gpu.compute_capability}, "
        f"driver CUDA {driver.version}, {how})"
    )


def can_run_tensorrt(flavor: TensorRTFlavor | str | None = None, device: int = 0) -> tuple[bool, str]:
    """``(True, what)`` when a TensorRT engine can run here, else ``(False, why)``.

    ``flavor``: a detected flavor, ``"tensorrt"``/``"tensorrt-rtx"``, or None
    (whichever imports, full TensorRT first).
    """
    if isinstance(flavor, str) or flavor is None:
        requested = flavor
        flavor = detect_flavor(flavor)
        if flavor is None and requested is not None:
            module, extra = ("tensorrt_rtx", "tensorrt-rtx") if requested == "tensorrt-rtx" else ("tensorrt", "tensorrt")
            return False, f"{module} does not import (pip install -e '.[{extra}]')"
    return can_run_on(probe_machine(flavor, device))


def can_build(flavor: TensorRTFlavor | None, driver: DriverInfo) -> tuple[bool, str]:
    """Whether engines of ``flavor`` can be built here: RTX builds ahead of time on the
    CPU; full TensorRT's builder needs a GPU (it times kernels on it)."""
    if flavor is None:
        return False, "not installed"
    if flavor.is_rtx:
        return True, "TensorRT-RTX builds ahead of time without a GPU (targets SM80/86/89/120 by default)"
    if driver.gpus:
        return True, f"on {driver.gpus[0].name}"
    return False, f"{flavor.module_name} {flavor.version} imports, but its builder needs a GPU ({driver.error or 'none found'})"
