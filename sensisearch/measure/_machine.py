"""What the machine was doing while we timed, and what machine it is.

Load average comes from ``os.getloadavg``; CPU steal (time a hypervisor gave
another guest) from ``/proc/stat`` deltas over the timing window. Both are
recorded with every timing so a noisy figure can be traced to a busy machine.
Where the OS does not report a figure it is None, never a guess.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROC_STAT = Path("/proc/stat")
PROC_CPUINFO = Path("/proc/cpuinfo")
# CPU flags that decide how fast INT8 runs on x86 (VNNI dot products, AMX tiles) and on Arm.
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimddp", "i8mm")


def _cpu_ticks(proc_stat: Path = PROC_STAT) -> tuple[int, int] | None:
    """(steal, total) jiffies of the aggregate ``cpu`` line, or None where /proc/stat is absent."""
    try:
        with open(proc_stat) as fh:
            first = fh.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu" or len(first) < 5:
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time
    # is already inside user/nice, so the total is the first eight fields.
    values = [int(v) for v in first[1:9]]
    steal = values[7] if len(values) >= 8 else None
    if steal is None:
        return None
    return steal, sum(values)


def _load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # not on Windows
        return None


@dataclass(frozen=True)
class MachineLoad:
    """Machine load over one timing window."""

    load_avg_1m: float | None
    """Highest 1-minute load average seen at the start or end of the window."""
    cpu_steal: float | None
    """Fraction (0..1) of CPU time stolen by the hypervisor during the window; None if not reported."""
    cpu_count: int | None = field(default_factory=os.cpu_count)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MachineLoad":
        return cls(data.get("load_avg_1m"), data.get("cpu_steal"), data.get("cpu_count"))


class LoadMonitor:
    """Samples load at :meth:`start` and :meth:`stop`; ``stop`` returns the :class:`MachineLoad`."""

    def __init__(self, proc_stat: Path = PROC_STAT) -> None:
        self._proc_stat = proc_stat
        self._ticks: tuple[int, int] | None = None
        self._load: float | None = None

    def start(self) -> "LoadMonitor":
        self._ticks = _cpu_ticks(self._proc_stat)
        self._load = _load_average()
        return self

    def stop(self) -> MachineLoad:
        end_ticks = _cpu_ticks(self._proc_stat)
        end_load = _load_average()
        steal: float | None = None
        if self._ticks is not None and end_ticks is not None:
            d_total = end_ticks[1] - self._ticks[1]
            # Jiffies are 10 ms: a window shorter than a tick has no measurable steal.
            if d_total > 0:
                steal = (end_ticks[0] - self._ticks[0]) / d_total
        loads = [v for v in (self._load, end_load) if v is not None]
        return MachineLoad(load_avg_1m=max(loads) if loads else None, cpu_steal=steal)


@dataclass(frozen=True)
class MachineIdentity:
    """The hardware a speed figure belongs to (CPU model and INT8-relevant flags; GPU for TensorRT)."""

    cpu_model: str
    cpu_count: int | None
    cpu_flags: tuple[str, ...]
    """The :data:`INT8_CPU_FLAGS` this CPU reports."""
    machine: str
    """``platform.machine()``, e.g. ``x86_64``."""
    gpu_name: str | None = None
    gpu_compute_capability: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_flags"] = list(self.cpu_flags)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MachineIdentity":
        return cls(
            cpu_model=str(data["cpu_model"]),
            cpu_count=data.get("cpu_count"),
            cpu_flags=tuple(data.get("cpu_flags", ())),
            machine=str(data.get("machine", "")),
            gpu_name=data.get("gpu_name"),
            gpu_compute_capability=data.get("gpu_compute_capability"),
        )


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(model name, flags) from ``/proc/cpuinfo`` text (x86 ``flags``, Arm ``Features``)."""
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "hardware", "processor") and model is None and not value.strip().isdigit():
            model = value.strip() or None
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def machine_identity(gpu_name: str | None = None, gpu_compute_capability: str | None = None) -> MachineIdentity:
    """This machine's CPU model, core count and INT8 flags (GPU fields are the caller's, e.g. TensorRT's)."""
    model: str | None = None
    flags: set[str] = set()
    try:
        model, flags = parse_cpuinfo(PROC_CPUINFO.read_text())
    except OSError:
        pass
    return MachineIdentity(
        cpu_model=model or platform.processor() or "unknown",
        cpu_count=os.cpu_count(),
        cpu_flags=tuple(f for f in INT8_CPU_FLAGS if f in flags),
        machine=platform.machine(),
        gpu_name=gpu_name,
        gpu_compute_capability=gpu_compute_capability,
    )
