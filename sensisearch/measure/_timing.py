"""Paired, interleaved latency: speed-ups that survive a noisy machine.

On a shared machine absolute latency drifts (the same FP32 model measured 14 ms
then 19 ms a minute later here), but the ratio of two models timed in the same
round barely moves, because whatever slows the machine slows both. So every arm
(a zero-argument callable running one inference) is timed in rounds: each round
runs every arm once (or a small block) in a freshly shuffled order, and the
arm's speed-up in that round is reference time / arm time of the same round.
The reported speed-up is the median over rounds, with a bootstrap CI; the raw
medians are kept for reference but are not what a comparison should use.

The same function serves a trial against FP32 (two arms) and the verification
tournament (FP32, all-INT8 and every front member).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sensisearch.measure._bootstrap import bootstrap_ci
from sensisearch.measure._load import (
    LoadPolicy,
    LoadRecord,
    LoadSample,
    LoadWindow,
    pinned,
    wait_for_quiet,
)
from sensisearch.measure._machine import LoadMonitor, MachineLoad

if TYPE_CHECKING:
    from collections.abc import Sequence

MIN_ROUNDS_FOR_CI = 3
"""The time cap never stops timing before this many rounds: fewer have no spread."""


@dataclass(frozen=True)
class PairedTimingSettings:
    """When interleaved timing stops. The verify tournament passes larger values."""

    warmup_runs: int = 5
    """Untimed runs of every arm before the first round (allocations, caches, thread pools)."""
    min_rounds: int = 20
    max_rounds: int = 500
    runs_per_round: int = 1
    """Runs of an arm back to back within a round (its time is their mean); 1 for models over ~1 ms."""
    target_ci_width: float = 0.05
    """Stop once every arm's 95% CI of the speed-up is narrower than this fraction of the speed-up."""
    max_seconds: float = 3.0
    """Hard cap on timed rounds (after at least 3 rounds), whatever the CI."""
    check_every: int = 10
    """Rounds between CI checks once ``min_rounds`` are done (a check costs a bootstrap)."""
    n_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_rounds < 1 or self.max_rounds < self.min_rounds:
            raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {self.min_rounds}, {self.max_rounds}")
        if self.runs_per_round < 1 or self.warmup_runs < 0 or self.check_every < 1:
            raise ValueError("runs_per_round and check_every must be >= 1, warmup_runs >= 0")
        if self.target_ci_width <= 0 or self.max_seconds <= 0:
            raise ValueError("target_ci_width and max_seconds must be positive")


@dataclass(frozen=True)
class PairedLatency:
    """One arm's latency paired against the reference arm timed in the same rounds."""

    speedup: float
    """Median over rounds of reference time / this arm's time (> 1: faster than the reference)."""
    speedup_ci95: tuple[float, float]
    """Percentile-bootstrap CI of that median, over rounds."""
    ratio_iqr: float
    """Interquartile range of the per-round ratios: how noisy a single round was."""
    candidate_median_ms: float
    reference_median_ms: float
    candidate_p90_ms: float
    reference_p90_ms: float
    rounds: int
    seconds: float
    """Wall time of the whole timing (warm-up included), shared by all arms of one call."""
    stopped_by: str
    """``"ci"`` (target width reached), ``"max_rounds"`` or ``"max_seconds"``."""
    candidate_times_ms: tuple[float, ...]
    """This arm's time per round in ms (0.1 µs resolution), for latency distributions."""
    load: MachineLoad | None = None
    load_record: LoadRecord | None = None
    """Load-aware timing only (``time_interleaved(..., load=LoadPolicy(...))``): load before and
    during, blocks retried, whether the figure was finally taken under load."""

    @property
    def relative_ci_width(self) -> float:
        lo, hi = self.speedup_ci95
        return (hi - lo) / self.speedup

    def median_ms_for(self, reference_ms: float) -> float:
        """Drift-free latency: a fixed reference latency (the study's FP32 figure) over this speed-up."""
        return reference_ms / self.speedup

    def to_dict(self) -> dict[str, Any]:
        return {
            "speedup": self.speedup,
            "speedup_ci95": [self.speedup_ci95[0], self.speedup_ci95[1]],
            "ratio_iqr": self.ratio_iqr,
            "candidate_median_ms": self.candidate_median_ms,
            "reference_median_ms": self.reference_median_ms,
            "candidate_p90_ms": self.candidate_p90_ms,
            "reference_p90_ms": self.reference_p90_ms,
            "rounds": self.rounds,
            "seconds": self.seconds,
            "stopped_by": self.stopped_by,
            "candidate_times_ms": list(self.candidate_times_ms),
            "load": None if self.load is None else self.load.to_dict(),
            "load_record": None if self.load_record is None else self.load_record.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairedLatency:
        lo, hi = data["speedup_ci95"]
        load = data.get("load")
        record = data.get("load_record")
        return cls(
            speedup=float(data["speedup"]),
            speedup_ci95=(float(lo), float(hi)),
            ratio_iqr=float(data["ratio_iqr"]),
            candidate_median_ms=float(data["candidate_median_ms"]),
            reference_median_ms=float(data["reference_median_ms"]),
            candidate_p90_ms=float(data["candidate_p90_ms"]),
            reference_p90_ms=float(data["reference_p90_ms"]),
            rounds=int(data["rounds"]),
            seconds=float(data["seconds"]),
            stopped_by=str(data["stopped_by"]),
            candidate_times_ms=tuple(float(v) for v in data.get("candidate_times_ms", ())),
            load=None if load is None else MachineLoad.from_dict(load),
            load_record=None if record is None else LoadRecord.from_dict(record),
        )


def paired_ratios(reference_times: Sequence[float] | np.ndarray, candidate_times: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-round speed-ups: reference time / candidate time of the same round."""
    return np.asarray(reference_times, dtype=np.float64) / np.asarray(candidate_times, dtype=np.float64)


def _ci_is_narrow(ratios: np.ndarray, settings: PairedTimingSettings, seed: int) -> bool:
    lo, hi = bootstrap_ci(ratios, np.median, settings.n_resamples, settings.confidence, seed)
    return (hi - lo) / float(np.median(ratios)) <= settings.target_ci_width


def _one_round(
    arms: Mapping[str, Callable[[], object]], names: list[str], rng: np.random.Generator, block: int,
    clock: Callable[[], float], times: dict[str, list[float]],
) -> None:
    """Every arm once (a block of ``block`` runs each), in a fresh shuffled order; appends each arm's time."""
    for j in rng.permutation(len(names)):
        fn = arms[names[j]]
        own_ms = 0.0
        self_timed = True
        t0 = clock()
        for _ in range(block):
            result = fn()
            if type(result) is float:
                own_ms += result
            else:
                self_timed = False
        elapsed = clock() - t0
        # An arm that times itself (a GPU run timed with CUDA events) returns its
        # own milliseconds as a float; the host clock would add launch and sync overhead.
        times[names[j]].append((own_ms / 1e3 if self_timed else elapsed) / block)


def time_interleaved(
    arms: Mapping[str, Callable[[], object]],
    reference: str,
    settings: PairedTimingSettings | None = None,
    clock: Callable[[], float] = time.perf_counter,
    rng: np.random.Generator | None = None,
    load: LoadPolicy | None = None,
) -> dict[str, PairedLatency]:
    """Time every arm interleaved with ``reference``; returns each arm's :class:`PairedLatency`.

    ``arms`` maps a name to a zero-argument callable running one inference on
    fixed inputs (e.g. ``runner.timing_arm(feeds)``); a callable that returns a
    Python ``float`` reports its own elapsed milliseconds (CUDA events), used
    instead of ``clock``. ``reference`` is one of
    its names (its own entry has speed-up 1). ``clock`` returns seconds; tests
    inject a simulated one. Stops when ``min_rounds`` are done and every arm's
    CI is narrower than ``target_ci_width``, at ``max_rounds``, or after
    ``max_seconds``.

    ``load`` (a :class:`~sensisearch.measure.LoadPolicy`; None keeps the plain timing):
    wait (bounded) for ``needed_cores`` free cores, pin every thread to them, and time
    in blocks of about ``block_seconds``; a block during which other processes were
    busier than the spare cores allow is discarded and re-timed (``max_retries`` in
    all), then kept and marked. Each arm's :attr:`PairedLatency.load_record` says what
    happened. Pass a real clock with it (blocks are measured against /proc).
    """
    settings = settings or PairedTimingSettings()
    if reference not in arms:
        raise ValueError(f"reference arm {reference!r} is not among the arms {sorted(arms)}")
    rng = rng if rng is not None else np.random.default_rng(settings.seed)
    names = list(arms)
    others = [n for n in names if n != reference]
    times: dict[str, list[float]] = {n: [] for n in names}

    monitor = LoadMonitor().start()
    t_begin = clock()
    gc_was_enabled = gc.isenabled()
    # As timeit does: a cyclic-GC pass landing inside one arm's run would be charged to it alone.
    gc.disable()
    record: LoadRecord | None = None
    try:
        if load is None:
            rounds, stopped_by = _plain_rounds(arms, names, reference, others, settings, clock, rng, times)
        else:
            rounds, stopped_by, record = _load_aware_rounds(arms, names, reference, others, settings, clock, rng, times, load)
    finally:
        if gc_was_enabled:
            gc.enable()
    seconds = clock() - t_begin
    load_seen = monitor.stop()

    ref_ms = np.asarray(times[reference]) * 1e3
    results: dict[str, PairedLatency] = {}
    for name in names:
        arm_ms = np.asarray(times[name]) * 1e3
        ratios = paired_ratios(ref_ms, arm_ms)
        q25, q75 = np.percentile(ratios, [25, 75])
        results[name] = PairedLatency(
            speedup=float(np.median(ratios)),
            speedup_ci95=bootstrap_ci(ratios, np.median, settings.n_resamples, settings.confidence, settings.seed),
            ratio_iqr=float(q75 - q25),
            candidate_median_ms=float(np.median(arm_ms)),
            reference_median_ms=float(np.median(ref_ms)),
            candidate_p90_ms=float(np.percentile(arm_ms, 90)),
            reference_p90_ms=float(np.percentile(ref_ms, 90)),
            rounds=rounds,
            seconds=float(seconds),
            stopped_by=stopped_by,
            candidate_times_ms=tuple(np.round(arm_ms, 4).tolist()),
            load=load_seen,
            load_record=record,
        )
    return results


def _stop_check(
    times: dict[str, list[float]], reference: str, others: list[str], settings: PairedTimingSettings
) -> bool:
    ref = np.asarray(times[reference])
    return all(_ci_is_narrow(paired_ratios(ref, times[n]), settings, settings.seed) for n in others)


def _plain_rounds(
    arms: Mapping[str, Callable[[], object]], names: list[str], reference: str, others: list[str],
    settings: PairedTimingSettings, clock: Callable[[], float], rng: np.random.Generator, times: dict[str, list[float]],
) -> tuple[int, str]:
    for name in names:
        for _ in range(settings.warmup_runs):
            arms[name]()
    t_rounds = clock()
    stopped_by = "max_rounds"
    rounds = 0
    last_check = 0
    while rounds < settings.max_rounds:
        _one_round(arms, names, rng, settings.runs_per_round, clock, times)
        rounds += 1
        if rounds >= MIN_ROUNDS_FOR_CI and clock() - t_rounds >= settings.max_seconds:
            stopped_by = "max_seconds"
            break
        # Checks at least ``check_every`` and at least 20% more rounds apart: a check is a
        # bootstrap over all rounds so far, and a fixed cadence made long timings mostly checks.
        due = rounds == settings.min_rounds or rounds - last_check >= max(settings.check_every, last_check // 5)
        if rounds >= settings.min_rounds and due:
            last_check = rounds
            if _stop_check(times, reference, others, settings):
                stopped_by = "ci"
                break
    return rounds, stopped_by


def _load_aware_rounds(
    arms: Mapping[str, Callable[[], object]], names: list[str], reference: str, others: list[str],
    settings: PairedTimingSettings, clock: Callable[[], float], rng: np.random.Generator,
    times: dict[str, list[float]], policy: LoadPolicy,
) -> tuple[int, str, LoadRecord]:
    """Rounds in blocks of about ``policy.block_seconds``, each judged by the load during it."""
    before = wait_for_quiet(policy.needed_cores, policy.max_wait_s, policy.busy_threshold, policy.window_s)
    cores = before.cores if (policy.pin and before.verdict != "unknown") else ()
    during: list[LoadSample] = []
    retried = loaded = 0
    rounds = 0
    kept_seconds = 0.0
    stopped_by = "max_rounds"
    last_check = 0
    with pinned(cores):
        # Warm-up after pinning: ORT's pool threads then first run where they will be timed.
        for name in names:
            for _ in range(settings.warmup_runs):
                arms[name]()
        while rounds < settings.max_rounds:
            block_times: dict[str, list[float]] = {n: [] for n in names}
            window = LoadWindow().start()
            t0 = clock()
            n_block = 0
            while rounds + n_block < settings.max_rounds:
                _one_round(arms, names, rng, settings.runs_per_round, clock, block_times)
                n_block += 1
                if clock() - t0 >= policy.block_seconds:
                    break
            elapsed = clock() - t0
            sample = window.stop()
            is_loaded = policy.block_loaded(sample, cores)
            if is_loaded and retried < policy.max_retries:
                retried += 1
                wait_for_quiet(policy.needed_cores, policy.retry_wait_s, policy.busy_threshold, policy.window_s,
                               allowed=cores or None)
                continue
            loaded += int(is_loaded)
            if sample is not None:
                during.append(sample)
            for n in names:
                times[n].extend(block_times[n])
            rounds += n_block
            kept_seconds += elapsed
            if rounds >= MIN_ROUNDS_FOR_CI and kept_seconds >= settings.max_seconds:
                stopped_by = "max_seconds"
                break
            due = rounds - last_check >= max(settings.check_every, last_check // 5)
            if rounds >= settings.min_rounds and due:
                last_check = rounds
                if _stop_check(times, reference, others, settings):
                    stopped_by = "ci"
                    break
    record = LoadRecord(before=before, during=tuple(during), cores=tuple(cores), retried_blocks=retried, loaded_blocks=loaded)
    return rounds, stopped_by, record
