"""Is the machine quiet enough to time on? Load sensing from /proc, core picking, pinning.

A paired ratio cancels drift that slows both arms alike, but not load that
comes and goes *within* a round (another job grabbing a core for 5 ms lands on
one arm only), and not a session whose threads share a core with a neighbour.
This module measures, over a short window:

- ``load1`` and the runnable count (``/proc/loadavg``, ``procs_running`` of ``/proc/stat``);
- each core's busy fraction and the steal fraction (``/proc/stat`` deltas);

and offers :func:`least_busy_cores`, :func:`wait_for_quiet` (wait, bounded, until
the cores a session needs are free, else the verdict ``"loaded"``) and
:func:`pinned` (the whole process, every thread, on chosen cores for a block).

The parsers take the /proc text as input, so they are tested on fixed strings;
only :func:`read_proc_stat`, :func:`sample_load` and :func:`pinned` touch the OS.
Where /proc is absent (not Linux) samples are None and callers time as before.

A core counts as busy when it is not idle: user, nice, system, irq, softirq and
steal (a vCPU whose time the hypervisor gave away is no more ours than one another
process holds). Jiffies are 10 ms (USER_HZ 100), so a window shorter than ~0.1 s
says little; :data:`DEFAULT_WINDOW_S` is 0.2 s.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

PROC = Path("/proc")
DEFAULT_WINDOW_S = 0.2
DEFAULT_BUSY_THRESHOLD = 0.25
"""A core another process keeps busier than this fraction of the window is not free."""

Verdict = Literal["quiet", "loaded", "unknown"]


@dataclass(frozen=True)
class CpuTimes:
    """Jiffies of one ``cpu`` line of /proc/stat, folded into what timing cares about."""

    busy: int
    """user + nice + system + irq + softirq + steal (guest time is already inside user/nice)."""
    idle: int
    """idle + iowait."""
    steal: int

    @property
    def total(self) -> int:
        return self.busy + self.idle


@dataclass(frozen=True)
class ProcStat:
    """The parts of one /proc/stat read that load sensing uses."""

    total: CpuTimes
    cores: Mapping[int, CpuTimes]
    procs_running: int | None


def parse_cpu_line(fields: Sequence[str]) -> CpuTimes:
    """``cpuN user nice system idle iowait irq softirq steal ...`` (missing trailing fields count 0)."""
    values = [int(v) for v in fields[1:9]] + [0] * max(0, 9 - len(fields))
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    return CpuTimes(busy=user + nice + system + irq + softirq + steal, idle=idle + iowait, steal=steal)


def parse_proc_stat(text: str) -> ProcStat:
    """Aggregate and per-core times and ``procs_running`` from /proc/stat text."""
    total: CpuTimes | None = None
    cores: dict[int, CpuTimes] = {}
    running: int | None = None
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        key = parts[0]
        if key == "cpu":
            total = parse_cpu_line(parts)
        elif key.startswith("cpu") and key[3:].isdigit():
            cores[int(key[3:])] = parse_cpu_line(parts)
        elif key == "procs_running" and len(parts) > 1:
            running = int(parts[1])
    if total is None:
        raise ValueError("no aggregate 'cpu' line in /proc/stat text")
    return ProcStat(total=total, cores=cores, procs_running=running)


def parse_loadavg(text: str) -> tuple[float, int | None]:
    """(1-minute load average, runnable scheduling entities) from /proc/loadavg text, e.g. ``0.22 0.12 0.05 2/113 8797``."""
    parts = text.split()
    load1 = float(parts[0])
    runnable: int | None = None
    if len(parts) > 3 and "/" in parts[3]:
        runnable = int(parts[3].split("/")[0])
    return load1, runnable


def busy_fractions(before: ProcStat, after: ProcStat) -> dict[int, float]:
    """Each core's busy fraction between two reads (cores with no ticks in between: 0)."""
    out: dict[int, float] = {}
    for core, end in after.cores.items():
        start = before.cores.get(core)
        if start is None:
            continue
        d_total = end.total - start.total
        out[core] = 0.0 if d_total <= 0 else min(1.0, max(0.0, (end.busy - start.busy) / d_total))
    return out


def steal_fraction(before: ProcStat, after: ProcStat) -> float | None:
    d_total = after.total.total - before.total.total
    if d_total <= 0:
        return None
    return max(0.0, (after.total.steal - before.total.steal) / d_total)


@dataclass(frozen=True)
class LoadSample:
    """Machine load over one short window."""

    load1: float | None
    """1-minute load average at the end of the window."""
    runnable: int | None
    """Runnable tasks at the end of the window (``procs_running``; ours included when we run)."""
    busy: Mapping[int, float]
    """Busy fraction (0..1) of each core during the window, by core id."""
    steal: float | None
    """Fraction of all CPU time stolen by the hypervisor during the window."""
    window_s: float
    own_cpu_s: float = 0.0
    """CPU seconds this process (all its threads) used during the window."""

    def __post_init__(self) -> None:
        # Busy fractions are kept at the precision they are stored with (4 decimals), so a sample (and
        # every figure derived from it, e.g. ``LoadRecord``'s maxima) reads back from JSON exactly.
        object.__setattr__(self, "busy", {int(k): round(float(v), 4) for k, v in self.busy.items()})

    @property
    def busy_cores(self) -> float:
        """Sum of the busy fractions: how many cores' worth of work ran (ours included)."""
        return float(sum(self.busy.values()))

    def others_busy_cores(self, cores: Iterable[int] | None = None, own_on_cores: bool = True) -> float:
        """Cores' worth of work *other* processes ran on ``cores`` (all cores if None).

        Our own CPU time is subtracted when it ran on those cores (``own_on_cores``:
        all cores, or the ones we were pinned to)."""
        chosen = list(self.busy) if cores is None else [c for c in cores if c in self.busy]
        busy = sum(self.busy[c] for c in chosen)
        own = self.own_cpu_s / self.window_s if (own_on_cores and self.window_s > 0) else 0.0
        return max(0.0, busy - own)

    def to_dict(self) -> dict[str, Any]:
        return {
            "load1": self.load1,
            "runnable": self.runnable,
            "busy": {str(k): round(v, 4) for k, v in sorted(self.busy.items())},
            "steal": self.steal,
            "window_s": self.window_s,
            "own_cpu_s": self.own_cpu_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadSample:
        return cls(
            load1=data.get("load1"),
            runnable=data.get("runnable"),
            busy={int(k): float(v) for k, v in dict(data.get("busy", {})).items()},
            steal=data.get("steal"),
            window_s=float(data.get("window_s", 0.0)),
            own_cpu_s=float(data.get("own_cpu_s", 0.0)),
        )


def load_sample_between(
    before: ProcStat, after: ProcStat, window_s: float, loadavg_text: str | None = None, own_cpu_s: float = 0.0
) -> LoadSample:
    """A :class:`LoadSample` from two /proc/stat reads (and /proc/loadavg text read at the end)."""
    load1: float | None = None
    runnable = after.procs_running
    if loadavg_text is not None:
        load1, from_loadavg = parse_loadavg(loadavg_text)
        runnable = runnable if runnable is not None else from_loadavg
    return LoadSample(
        load1=load1, runnable=runnable, busy=busy_fractions(before, after), steal=steal_fraction(before, after),
        window_s=window_s, own_cpu_s=own_cpu_s,
    )


def least_busy_cores(
    busy: Mapping[int, float], n: int, allowed: Iterable[int] | None = None, siblings: Mapping[int, int] | None = None
) -> tuple[int, ...]:
    """The ``n`` least busy cores among ``allowed`` (all if None), ties broken by core id; sorted by id.

    ``siblings`` maps a logical CPU to its physical core (see :func:`parse_thread_siblings`):
    one logical CPU per physical core is taken first, since two threads of one session on
    SMT siblings share one core's units and would run slower than on two cores."""
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    allowed_set = None if allowed is None else set(allowed)
    pool = sorted((c for c in busy if allowed_set is None or c in allowed_set), key=lambda c: (busy[c], c))
    if siblings:
        seen: set[int] = set()
        first, rest = [], []
        for c in pool:
            (rest if siblings.get(c, c) in seen else first).append(c)
            seen.add(siblings.get(c, c))
        pool = first + rest
    return tuple(sorted(pool[:n]))


def parse_thread_siblings(lists: Mapping[int, str]) -> dict[int, int]:
    """Logical CPU -> physical core id (its lowest sibling), from each CPU's ``thread_siblings_list`` text (``0,8`` or ``0-1``)."""
    out: dict[int, int] = {}
    for cpu, text in lists.items():
        members: list[int] = []
        for part in text.strip().split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            members.extend(range(int(lo), int(hi or lo) + 1))
        out[cpu] = min(members) if members else cpu
    return out


def thread_siblings(sys_cpu: Path = Path("/sys/devices/system/cpu")) -> dict[int, int]:
    """This machine's logical CPU -> physical core map (empty where sysfs does not say)."""
    lists: dict[int, str] = {}
    try:
        for d in sys_cpu.iterdir():
            if d.name.startswith("cpu") and d.name[3:].isdigit():
                with contextlib.suppress(OSError):
                    lists[int(d.name[3:])] = (d / "topology" / "thread_siblings_list").read_text()
    except OSError:
        return {}
    return parse_thread_siblings(lists)


def free_cores(busy: Mapping[int, float], threshold: float = DEFAULT_BUSY_THRESHOLD, allowed: Iterable[int] | None = None) -> tuple[int, ...]:
    """Cores (among ``allowed``) whose busy fraction is at most ``threshold``."""
    allowed_set = None if allowed is None else set(allowed)
    return tuple(sorted(c for c, b in busy.items() if b <= threshold and (allowed_set is None or c in allowed_set)))


# --- what touches the OS -------------------------------------------------------------


def read_proc_stat(proc: Path = PROC) -> ProcStat | None:
    try:
        return parse_proc_stat((proc / "stat").read_text())
    except (OSError, ValueError):
        return None


def _read_loadavg(proc: Path) -> str | None:
    try:
        return (proc / "loadavg").read_text()
    except OSError:
        return None


def allowed_cores() -> tuple[int, ...]:
    """Cores this process may run on (its affinity mask), or all reported cores off Linux."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return tuple(range(os.cpu_count() or 1))


class LoadWindow:
    """Open at :meth:`start`, close at :meth:`stop` -> :class:`LoadSample` (None where /proc is absent).

    Used around a block of timed rounds: ``own_cpu_s`` is this process's CPU time
    in between (``time.process_time``: every thread, ORT's pool included)."""

    def __init__(self, proc: Path = PROC, clock: Callable[[], float] = time.perf_counter) -> None:
        self._proc, self._clock = proc, clock
        self._stat: ProcStat | None = None
        self._t0 = 0.0
        self._cpu0 = 0.0

    def start(self) -> LoadWindow:
        self._stat = read_proc_stat(self._proc)
        self._t0 = self._clock()
        self._cpu0 = time.process_time()
        return self

    def stop(self) -> LoadSample | None:
        end = read_proc_stat(self._proc)
        window = self._clock() - self._t0
        own = time.process_time() - self._cpu0
        if self._stat is None or end is None:
            return None
        return load_sample_between(self._stat, end, window, _read_loadavg(self._proc), own)


def sample_load(window_s: float = DEFAULT_WINDOW_S, proc: Path = PROC, sleep: Callable[[float], None] = time.sleep) -> LoadSample | None:
    """Load over the next ``window_s`` seconds while this process sleeps (None without /proc)."""
    window = LoadWindow(proc).start()
    sleep(window_s)
    return window.stop()


@dataclass(frozen=True)
class QuietVerdict:
    """What :func:`wait_for_quiet` found."""

    verdict: Verdict
    """``"quiet"``: ``needed_cores`` free cores were found; ``"loaded"``: not within ``max_wait_s``;
    ``"unknown"``: no /proc to tell (treat as quiet, record it)."""
    cores: tuple[int, ...]
    """The free cores to use (the least busy ``needed_cores``; on ``"loaded"``, the least busy anyway)."""
    waited_s: float
    attempts: int
    sample: LoadSample | None = None
    """The last sample taken."""

    @property
    def quiet(self) -> bool:
        return self.verdict != "loaded"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "cores": list(self.cores),
            "waited_s": self.waited_s,
            "attempts": self.attempts,
            "sample": None if self.sample is None else self.sample.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuietVerdict:
        sample = data.get("sample")
        return cls(
            verdict=data["verdict"], cores=tuple(int(c) for c in data.get("cores", ())),
            waited_s=float(data.get("waited_s", 0.0)), attempts=int(data.get("attempts", 0)),
            sample=None if sample is None else LoadSample.from_dict(sample),
        )


def wait_for_quiet(
    needed_cores: int,
    max_wait_s: float = 5.0,
    busy_threshold: float = DEFAULT_BUSY_THRESHOLD,
    window_s: float = DEFAULT_WINDOW_S,
    allowed: Iterable[int] | None = None,
    sampler: Callable[[float], LoadSample | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    backoff_s: float = 0.3,
) -> QuietVerdict:
    """Wait (at most ``max_wait_s``) until ``needed_cores`` of the ``allowed`` cores are free.

    A core is free when others kept it busy at most ``busy_threshold`` of a
    ``window_s`` sample (we sleep while sampling, so the busy time is theirs).
    Samples are retried with a ``backoff_s`` pause; after ``max_wait_s`` the
    verdict is ``"loaded"`` with the least busy cores, so the caller can still
    time, and say so. ``needed_cores`` above the allowed count is capped to it.
    """
    if needed_cores < 1:
        raise ValueError(f"need needed_cores >= 1, got {needed_cores}")
    allowed_t = tuple(sorted(allowed)) if allowed is not None else allowed_cores()
    needed = min(needed_cores, len(allowed_t))
    sampler = sampler or (lambda w: sample_load(w))
    siblings = thread_siblings()
    start = clock()
    attempts = 0
    last: LoadSample | None = None
    while True:
        attempts += 1
        last = sampler(window_s)
        waited = clock() - start
        if last is None or not last.busy:
            return QuietVerdict("unknown", allowed_t[:needed], waited, attempts, last)
        busy = {c: b for c, b in last.busy.items() if c in allowed_t}
        free = free_cores(busy, busy_threshold)
        if len(free) >= needed:
            return QuietVerdict("quiet", least_busy_cores(busy, needed, siblings=siblings), waited, attempts, last)
        if waited + backoff_s + window_s > max_wait_s:
            return QuietVerdict("loaded", least_busy_cores(busy, needed, siblings=siblings), waited, attempts, last)
        sleep(backoff_s)


# --- pinning ---------------------------------------------------------------------------


def _thread_ids(proc: Path = PROC) -> list[int]:
    try:
        return sorted(int(p.name) for p in (proc / "self" / "task").iterdir() if p.name.isdigit())
    except OSError:
        return [0]


def thread_affinities(proc: Path = PROC) -> dict[int, frozenset[int]]:
    """Every thread of this process and the cores it may run on (ORT's pool threads included)."""
    out: dict[int, frozenset[int]] = {}
    for tid in _thread_ids(proc):
        with contextlib.suppress(OSError):
            out[tid] = frozenset(os.sched_getaffinity(tid))
    return out


@contextlib.contextmanager
def pinned(cores: Iterable[int] | None, all_threads: bool = True) -> Iterator[tuple[int, ...]]:
    """Run the block with this process on ``cores``; restore every thread's affinity after.

    ``os.sched_setaffinity(0, ...)`` moves only the *calling thread* on Linux;
    threads that already exist (ONNX Runtime's intra-op pool, created with the
    session) keep their old mask. So with ``all_threads`` every thread in
    ``/proc/self/task`` is moved, and put back on exit. Threads created inside
    the block (a session opened there) inherit the pinned mask and keep it after
    the block: that is Linux's inheritance, verified in tests/test_measure_load.py.
    ``cores`` None or empty, or a platform without affinity: the block runs unpinned.
    Yields the cores actually used.
    """
    wanted = tuple(sorted(set(cores or ())))
    if not wanted or not hasattr(os, "sched_setaffinity"):
        yield ()
        return
    tids = _thread_ids() if all_threads else [0]
    saved: dict[int, set[int]] = {}
    try:
        for tid in tids:
            try:
                saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, wanted)
            except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
                saved.pop(tid, None)
        yield wanted
    finally:
        for tid, mask in saved.items():
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                os.sched_setaffinity(tid, mask)


@dataclass(frozen=True)
class LoadPolicy:
    """How load-aware paired timing guards its rounds (see :func:`sensisearch.measure.time_interleaved`)."""

    needed_cores: int = 1
    """Cores the timed sessions need: the backend's intra-op threads (one session runs at a time)."""
    busy_threshold: float = DEFAULT_BUSY_THRESHOLD
    max_wait_s: float = 5.0
    """Before timing: how long :func:`wait_for_quiet` may wait for free cores."""
    block_seconds: float = 0.25
    """Rounds are grouped into blocks of about this long; load is measured over each block
    (jiffies are 10 ms, so a single sub-ms round cannot be judged alone)."""
    max_retries: int = 3
    """A block taken under load is discarded and re-timed at most this many times in all;
    after that blocks are kept and marked as taken under load."""
    retry_wait_s: float = 1.0
    """Before re-timing a block: wait this long at most for quiet."""
    pin: bool = True
    """Pin every thread of the process to the chosen free cores for the timing."""
    window_s: float = DEFAULT_WINDOW_S

    def __post_init__(self) -> None:
        if self.needed_cores < 1 or self.max_retries < 0 or self.block_seconds <= 0:
            raise ValueError("needed_cores >= 1, max_retries >= 0 and block_seconds > 0 are required")

    def block_loaded(self, sample: LoadSample | None, cores: Sequence[int] | None) -> bool:
        """True when others ran more on the cores we timed on than the spare ones allow.

        Pinned to ``cores`` (``len(cores) >= needed_cores``): others' work there
        above ``len(cores) - needed_cores + busy_threshold`` cores' worth. Unpinned:
        the same over all cores."""
        if sample is None or not sample.busy:
            return False
        chosen = list(cores) if cores else list(sample.busy)
        others = sample.others_busy_cores(chosen)
        return others > max(0, len(chosen) - self.needed_cores) + self.busy_threshold


@dataclass(frozen=True)
class LoadRecord:
    """What load-aware timing saw: load before and during, what was retried, whether load remained."""

    before: QuietVerdict | None
    during: tuple[LoadSample, ...] = field(default_factory=tuple)
    """One sample per kept block."""
    cores: tuple[int, ...] = ()
    """Cores the process was pinned to (empty: not pinned)."""
    retried_blocks: int = 0
    """Blocks discarded because they were taken under load and re-timed."""
    loaded_blocks: int = 0
    """Kept blocks that were still taken under load (retries exhausted)."""

    @property
    def retried(self) -> bool:
        return self.retried_blocks > 0

    @property
    def under_load(self) -> bool:
        """The final figure includes rounds taken under load (or timing started on a loaded machine)."""
        return self.loaded_blocks > 0 or (self.before is not None and self.before.verdict == "loaded")

    @property
    def max_others_busy_cores(self) -> float | None:
        values = [s.others_busy_cores(self.cores or None) for s in self.during]
        return max(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": None if self.before is None else self.before.to_dict(),
            "during": [s.to_dict() for s in self.during],
            "during_max_others_busy_cores": self.max_others_busy_cores,
            "during_max_load1": max((s.load1 for s in self.during if s.load1 is not None), default=None),
            "during_max_steal": max((s.steal for s in self.during if s.steal is not None), default=None),
            "blocks": len(self.during),
            "cores": list(self.cores),
            "retried_blocks": self.retried_blocks,
            "loaded_blocks": self.loaded_blocks,
            "retried": self.retried,
            "under_load": self.under_load,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadRecord:
        before = data.get("before")
        return cls(
            before=None if before is None else QuietVerdict.from_dict(before),
            during=tuple(LoadSample.from_dict(s) for s in data.get("during", ())),
            cores=tuple(int(c) for c in data.get("cores", ())),
            retried_blocks=int(data.get("retried_blocks", 0)),
            loaded_blocks=int(data.get("loaded_blocks", 0)),
        )
