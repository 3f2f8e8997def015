"""``sensisearch doctor``: what is usable on this machine, said truthfully.

Reports the TensorRT flavors that import (and why the others do not), the
NVIDIA driver and GPUs (through the CUDA driver library, no nvidia-smi),
cuda-python / pycuda, ONNX Runtime, Optuna, and for every backend whether it
can BUILD artifacts here and whether it can RUN them.
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from sensisearch.backends.tensorrt.flavor import (
    BACKEND_NAMES,
    MachineInfo,
    can_build,
    can_run_on,
    detect_flavor,
    import_error,
    probe_gpu_driver,
)


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _onnxruntime() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except Exception as exc:  # pragma: no cover - a core dependency
        return {"version": None, "error": f"{type(exc).__name__}: {exc}", "providers": []}
    return {"version": ort.__version__, "providers": list(ort.get_available_providers())}


def doctor_report(device: int = 0) -> dict[str, Any]:
    """Everything ``sensisearch doctor`` prints, as a JSON-able dict."""
    driver = probe_gpu_driver()
    flavors: dict[str, Any] = {}
    backends: dict[str, Any] = {}
    ort = _onnxruntime()
    ort_ok = ort.get("version") is not None
    backends["onnxruntime"] = {
        "build": ort_ok,
        "run": ort_ok,
        "reason": f"ONNX Runtime {ort.get('version')} on the CPU" if ort_ok else ort.get("error"),
    }
    for backend in BACKEND_NAMES:
        flavor = detect_flavor(backend)
        if flavor is None:
            flavors[backend] = {"installed": False, "error": import_error(backend)}
            backends[backend] = {"build": False, "run": False, "reason": f"{BACKEND_NAMES[backend]} does not import"}
            continue
        flavors[backend] = {"installed": True, **flavor.to_dict()}
        build_ok, build_why = can_build(flavor, driver)
        run_ok, run_why = can_run_on(MachineInfo(flavor=flavor, driver=driver, device=device))
        backends[backend] = {"build": build_ok, "build_reason": build_why, "run": run_ok, "reason": run_why}
    runners = [b for b in BACKEND_NAMES if backends[b]["run"]]
    if runners:
        verdict = f"TensorRT engines can run here with: {', '.join(runners)}"
    else:
        why = driver.error or driver.runtime_error or "no usable NVIDIA GPU"
        if not any(f.get("installed") for f in flavors.values()):
            why = "neither tensorrt nor tensorrt_rtx is installed" + ("" if driver.gpus else f" and {why}")
        verdict = f"No backend can run a TensorRT engine on this machine ({why}); ONNX Runtime (CPU) runs the study"
    builders = [b for b in BACKEND_NAMES if backends[b]["build"]]
    return {
        "python": sys.version.split()[0],
        "platform": f"{sys.platform} {platform.machine().lower()}",
        "tensorrt": flavors,
        "driver": driver.to_dict(),
        "onnxruntime": ort,
        "onnx": _dist_version("onnx"),
        "optuna": _dist_version("optuna"),
        "numpy": _dist_version("numpy"),
        "backends": backends,
        "can_build_tensorrt": builders,
        "can_run_tensorrt": runners,
        "verdict": verdict,
    }


def format_doctor(report: dict[str, Any]) -> str:
    """Plain text for the terminal."""
    lines = [f"sensisearch doctor — Python {report['python']} on {report['platform']}", ""]
    lines.append("TensorRT:")
    for backend, info in report["tensorrt"].items():
        if info.get("installed"):
            extra = f" (kind {info['kind']}, ONNX parser {info.get('onnx_parser_version')})"
            lines.append(f"  {backend:<13} {info['module']} {info['version']}{extra}")
        else:
            lines.append(f"  {backend:<13} not installed ({info.get('error')})")
    drv = report["driver"]
    lines.append("")
    lines.append("NVIDIA GPU:")
    if drv["gpus"]:
        for gpu in drv["gpus"]:
            mem = f", {gpu['total_memory_mb']} MiB" if gpu.get("total_memory_mb") else ""
            lines.append(f"  [{gpu['index']}] {gpu['name']} — compute capability {gpu['compute_capability']}{mem}")
    else:
        lines.append(f"  none ({drv.get('error') or 'no GPU reported'})")
    lines.append(f"  driver: {'CUDA ' + drv['version'] if drv.get('version') else 'not found'}")
    cp = drv.get("cuda_python")
    runtime = f", CUDA runtime {drv['cuda_runtime']}" if drv.get("cuda_runtime") else ""
    status = f" — {drv['runtime_error']}" if cp and drv.get("runtime_error") else ""
    lines.append(f"  cuda-python: {cp + runtime + status if cp else 'not installed'}")
    lines.append(f"  pycuda: {drv.get('pycuda') or 'not installed'}")
    lines.append("")
    ort = report["onnxruntime"]
    lines.append(f"ONNX Runtime: {ort.get('version')} (providers: {', '.join(ort.get('providers') or []) or 'none'})")
    lines.append(f"ONNX: {report.get('onnx')}   Optuna: {report.get('optuna')}   NumPy: {report.get('numpy')}")
    lines.append("")
    lines.append("Backends:              build  run")
    for backend, info in report["backends"].items():
        b = "yes" if info["build"] else "no"
        r = "yes" if info["run"] else "no"
        lines.append(f"  {backend:<20} {b:<6} {r:<4} {info.get('reason') or ''}")
        if info.get("build_reason") and info["build"] != info["run"]:
            lines.append(f"  {'':<20} {'':<11} build: {info['build_reason']}")
    lines.append("")
    lines.append(report["verdict"])
    return "\n".join(lines)


def main() -> int:  # pragma: no cover - the CLI wires its own entry point
    print(format_doctor(doctor_report()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
