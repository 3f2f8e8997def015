"""Load sensing, core picking, pinning, load-aware paired timing and the A/A control (issue: measure19).

Robust on a 2-core CI machine shared with other jobs: the real-load tests only
assert what a hog makes certain (its core is busy, waiting gives up in bounded
time); timing assertions are limited to the A/A control holding 1.00.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sensisearch.measure import (
    LoadPolicy,
    LoadRecord,
    PairedLatency,
    PairedTimingSettings,
    aa_control,
    control_ok,
    corrected,
    corrected_speedup,
    least_busy_cores,
    parse_loadavg,
    parse_proc_stat,
    pinned,
    sample_load,
    thread_affinities,
    time_interleaved,
    wait_for_quiet,
)
from sensisearch.measure._load import (
    LoadSample,
    busy_fractions,
    free_cores,
    load_sample_between,
    parse_thread_siblings,
    steal_fraction,
)

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "sensisearch" / "examples" / "digits" / "digits_resnet.onnx"

STAT_A = """cpu  1000 0 500 8000 100 0 0 0 0 0
cpu0 900 0 400 3000 50 0 0 0 0 0
cpu1 100 0 100 5000 50 0 0 0 0 0
intr 123 0 0
ctxt 456
btime 1700000000
processes 789
procs_running 3
procs_blocked 0
"""
# Later: cpu0 ran 90 user + 5 system + 5 steal (100 busy, 0 idle), cpu1 10 busy and 90 idle; 5 steal in 200.
STAT_B = """cpu  1095 0 510 8090 100 0 0 5 0 0
cpu0 990 0 405 3000 50 0 0 5 0 0
cpu1 105 0 105 5090 50 0 0 0 0 0
procs_running 1
"""


def test_parse_proc_stat_and_loadavg_on_fixed_text() -> None:
    a, b = parse_proc_stat(STAT_A), parse_proc_stat(STAT_B)
    assert sorted(a.cores) == [0, 1] and a.procs_running == 3 and b.procs_running == 1
    assert a.cores[0].busy == 1300 and a.cores[0].idle == 3050
    busy = busy_fractions(a, b)
    assert busy[0] == pytest.approx(1.0) and busy[1] == pytest.approx(0.1)
    assert steal_fraction(a, b) == pytest.approx(5 / 200)
    assert parse_loadavg("1.52 0.80 0.31 3/412 9123\n") == (1.52, 3)
    sample = load_sample_between(a, b, window_s=0.5, loadavg_text="1.52 0.80 0.31 3/412 9123", own_cpu_s=0.25)
    assert sample.load1 == 1.52 and sample.runnable == 1  # procs_running of the later read wins
    assert sample.busy_cores == pytest.approx(1.1)
    assert sample.others_busy_cores() == pytest.approx(1.1 - 0.5)  # our 0.25 s CPU in a 0.5 s window
    assert LoadSample.from_dict(sample.to_dict()).busy == pytest.approx(sample.busy, abs=1e-4)
    with pytest.raises(ValueError):
        parse_proc_stat("intr 1 2 3\n")
    # Short lines (old kernels without steal) count the missing fields as 0.
    assert parse_proc_stat("cpu 1 2 3 4\ncpu0 1 2 3 4\n").total.steal == 0


def test_core_picking_and_siblings() -> None:
    busy = {0: 0.9, 1: 0.05, 2: 0.0, 3: 0.5}
    assert least_busy_cores(busy, 2) == (1, 2)
    assert least_busy_cores(busy, 1, allowed=[0, 3]) == (3,)
    assert least_busy_cores(busy, 9) == (0, 1, 2, 3)
    assert free_cores(busy, 0.25) == (1, 2)
    siblings = parse_thread_siblings({0: "0,2", 1: "1,3", 2: "0,2", 3: "1-3"})
    assert siblings == {0: 0, 1: 1, 2: 0, 3: 1}
    # 2 and 1 are the least busy, then 2's sibling 0 is skipped for 3 (another physical core)... both free ones differ.
    assert least_busy_cores({0: 0.0, 1: 0.3, 2: 0.0, 3: 0.2}, 2, siblings={0: 0, 1: 1, 2: 0, 3: 1}) == (0, 3)
    with pytest.raises(ValueError):
        least_busy_cores(busy, 0)


def test_wait_for_quiet_policy_with_fake_samples() -> None:
    def fake(seq: list[dict[int, float]]):
        it = iter(seq)
        return lambda w: LoadSample(None, None, next(it), 0.0, w)

    t = [0.0]
    clock = lambda: t[0]

    def sleep(s: float) -> None:
        t[0] += s

    busy, idle = {0: 1.0, 1: 1.0}, {0: 0.0, 1: 0.9}
    v = wait_for_quiet(1, 5.0, sampler=fake([busy, busy, idle]), clock=clock, sleep=sleep, allowed=[0, 1])
    assert v.verdict == "quiet" and v.cores == (0,) and v.attempts == 3
    t[0] = 0.0
    v = wait_for_quiet(2, 1.0, sampler=fake([idle] * 20), clock=clock, sleep=sleep, allowed=[0, 1])
    assert v.verdict == "loaded" and v.cores == (0, 1) and not v.quiet and v.waited_s <= 1.0
    v = wait_for_quiet(1, 1.0, sampler=lambda w: None, allowed=[0, 1])
    assert v.verdict == "unknown" and v.quiet


def test_block_judgement_counts_only_others() -> None:
    policy = LoadPolicy(needed_cores=1, busy_threshold=0.25)
    # Pinned to core 0, our own process ran 0.95 of the window there: not loaded.
    ours = LoadSample(None, None, {0: 0.97, 1: 0.9}, 0.0, 1.0, own_cpu_s=0.95)
    assert not policy.block_loaded(ours, (0,))
    # Someone else also ran 0.5 of a core on it: loaded.
    assert policy.block_loaded(LoadSample(None, None, {0: 1.0, 1: 0.0}, 0.0, 1.0, own_cpu_s=0.5), (0,))
    # Unpinned on 2 cores needing 1: one spare core absorbs another job.
    assert not policy.block_loaded(LoadSample(None, None, {0: 1.0, 1: 1.0}, 0.0, 1.0, own_cpu_s=1.0), ())
    assert policy.block_loaded(LoadSample(None, None, {0: 1.0, 1: 1.0}, 0.0, 1.0, own_cpu_s=0.5), ())
    assert not policy.block_loaded(None, ())


HOG = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@pytest.fixture
def hogs():
    """Start busy-loop processes pinned to given cores (bounded in time), killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(cores: list[int], seconds: float = 20.0) -> None:
        for core in cores:
            p = subprocess.Popen([sys.executable, "-c", HOG.format(seconds=seconds)])
            procs.append(p)
            os.sched_setaffinity(p.pid, {core})

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


@pytest.mark.skipif(not Path("/proc/stat").exists() or not hasattr(os, "sched_setaffinity"), reason="needs Linux /proc")
def test_hog_is_seen_busy_and_wait_for_quiet_gives_up(hogs) -> None:
    cores = sorted(os.sched_getaffinity(0))
    hogs(cores)  # every core we may use spins
    time.sleep(0.3)
    sample = sample_load(0.5)
    assert sample is not None
    assert all(sample.busy[c] > 0.6 for c in cores), sample.busy
    assert sample.runnable is not None and sample.runnable >= len(cores)
    started = time.monotonic()
    verdict = wait_for_quiet(1, max_wait_s=1.5, window_s=0.2)
    assert verdict.verdict == "loaded"
    assert time.monotonic() - started < 1.5 + 1.0  # bounded: the last sample may end just past the limit
    assert len(verdict.cores) == 1


def _task_cores() -> dict[int, frozenset[int]]:
    return thread_affinities()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity")
def test_pinning_moves_every_thread_and_ort_threads_inherit() -> None:
    ort = pytest.importorskip("onnxruntime")
    original = os.sched_getaffinity(0)
    target = (min(original),)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    before_tids = set(_task_cores())
    early = ort.InferenceSession(str(DIGITS), options, providers=["CPUExecutionProvider"])  # pool exists before pinning
    early_threads = set(_task_cores()) - before_tids
    assert early_threads, "ORT created no intra-op thread"
    with pinned(target, all_threads=False):
        # Only the calling thread moves: the existing ORT pool keeps its mask.
        masks = _task_cores()
        assert masks[threading_native_id()] == frozenset(target)
        assert all(masks[t] == frozenset(original) for t in early_threads if t in masks)
    with pinned(target):
        masks = _task_cores()
        assert all(m == frozenset(target) for m in masks.values())
        late = ort.InferenceSession(str(DIGITS), options, providers=["CPUExecutionProvider"])
        late_threads = set(_task_cores()) - set(masks)
        # A session created while pinned: its pool threads inherit the pinned mask.
        assert late_threads and all(_task_cores()[t] == frozenset(target) for t in late_threads)
    after = _task_cores()
    assert all(after[t] == frozenset(original) for t in early_threads | {threading_native_id()} if t in after)
    # Threads born inside the block keep the mask they inherited (Linux semantics, documented in pinned()).
    assert all(after[t] == frozenset(target) for t in late_threads if t in after)
    del early, late


def threading_native_id() -> int:
    import threading

    return threading.get_native_id()


def test_load_aware_timing_records_load_and_stays_backwards_compatible() -> None:
    arms = {"ref": lambda: sum(range(3000)), "fast": lambda: sum(range(1500))}
    settings = PairedTimingSettings(warmup_runs=1, min_rounds=20, max_rounds=200, max_seconds=0.6, target_ci_width=0.5)
    plain = time_interleaved(arms, "ref", settings)
    assert plain["fast"].load_record is None
    policy = LoadPolicy(needed_cores=1, max_wait_s=1.0, block_seconds=0.1, max_retries=2, retry_wait_s=0.3)
    timed = time_interleaved(arms, "ref", settings, load=policy)
    record = timed["fast"].load_record
    assert isinstance(record, LoadRecord) and record.before is not None
    assert record.retried_blocks <= 2 and len(record.during) >= 1
    assert timed["fast"].rounds >= 3 and timed["fast"].speedup > 1.2
    assert os.sched_getaffinity(0) == set(plain_affinity())  # restored after the pinned timing
    again = PairedLatency.from_dict(timed["fast"].to_dict())
    assert again.load_record is not None and again.load_record.to_dict() == record.to_dict()


def plain_affinity() -> set[int]:
    return set(range(os.cpu_count() or 1)) & set(os.sched_getaffinity(0))


def test_control_ok_and_correction() -> None:
    assert control_ok(1.01, (0.99, 1.03))
    assert control_ok(1.015, (1.01, 1.02))  # CI misses 1 but within 2%
    assert not control_ok(1.17, (1.15, 1.20))
    assert corrected_speedup(2.34, 1.17) == pytest.approx(2.0)
    p = PairedLatency(2.34, (2.2, 2.5), 0.1, 1.0, 2.34, 1.1, 2.5, 30, 1.0, "ci", (1.0,) * 30)
    c = corrected(p, 1.17)
    assert c.speedup == pytest.approx(2.0) and c.speedup_ci95 == pytest.approx((2.2 / 1.17, 2.5 / 1.17))


def test_aa_control_on_digits_is_one(tmp_path: Path) -> None:
    """The FP32 reference against a second FP32 copy built the way trials are: 1.00 within its CI."""
    pytest.importorskip("onnxruntime")
    from sensisearch.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend()
    ref_artifact = backend.build(DIGITS, tmp_path / "reference").artifact
    control_artifact = backend.build(DIGITS, tmp_path / "control").artifact
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)}
    settings = PairedTimingSettings(min_rounds=100, max_rounds=3000, max_seconds=4.0, target_ci_width=0.03)
    policy = LoadPolicy(needed_cores=backend.threads, max_wait_s=3.0, max_retries=4)
    with backend.load(ref_artifact) as ref, backend.load(control_artifact) as control:
        results = []
        for _ in range(3):  # a neighbour's burst on a shared CI machine: retry, never assert timings
            result = aa_control(ref.timing_arm(feeds), control.timing_arm(feeds), settings, load=policy, tolerance=0.03)
            results.append(result)
            if result.ok:
                break
    summary = [(r.ratio, r.ci95, r.paired.load_record.to_dict()["under_load"]) for r in results]  # type: ignore[union-attr]
    if not result.ok and all(r.paired.load_record is not None and r.paired.load_record.under_load for r in results):
        # The timing itself says it is not to be trusted: other jobs held the cores throughout.
        pytest.skip(f"every A/A attempt was taken under load (others held the cores): {summary}")
    assert result.ok, summary
