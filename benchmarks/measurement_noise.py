"""Do a study's speed figures survive a noisy machine? Reported speed-ups against a re-measurement.

Runs the bundled digits study and a short YOLOv5n study (``shared/data``), each
twice: once on a quiet machine, once with a CPU load this benchmark starts and
stops itself (one process spinning on one core for part of the study). After
each study, with the load gone, every front member and the winner is timed
again, independently of the study's code: a hand-written loop that alternates
FP32 and the candidate in random order for ``--rounds`` rounds (fresh ONNX
Runtime sessions, same session options and input), median of the per-round
ratios. It prints the reported (verified) speed-up beside that re-measurement,
and the winner of both runs.

Goal (printed, never asserted): within 5% for every point, quiet or loaded, and
the same winner in both runs. On a shared machine the figures carry the other
jobs' noise too: run it on a quiet machine for numbers to quote.

    python benchmarks/measurement_noise.py [--only digits|yolo] [--digits-budget 12] [--yolo-budget 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import optuna

from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
from sensisearch.study import load_run_settings
from sensisearch.study import baseline, pareto_front, records
from sensisearch.study import open_study, prepare


def _spin() -> None:
    while True:
        pass


class PartTimeLoad:
    """One process spinning on one core from ``delay`` to ``delay + seconds`` after start (a neighbour job)."""

    def __init__(self, delay: float, seconds: float) -> None:
        self.delay, self.seconds = delay, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.window: tuple[float, float] | None = None

    def _run(self) -> None:
        if self._stop.wait(self.delay):
            return
        proc = multiprocessing.Process(target=_spin, daemon=True)
        proc.start()
        began = time.monotonic()
        self._stop.wait(self.seconds)
        proc.terminate()
        proc.join()
        self.window = (began - self._started, time.monotonic() - self._started)

    def __enter__(self) -> "PartTimeLoad":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_study(args: list[str], out: Path, load: PartTimeLoad | None) -> float:
    command = [sys.executable, "-m", "sensisearch", "run", *args, "--out", str(out)]
    started = time.monotonic()
    if load is None:
        result = subprocess.run(command, capture_output=True, text=True)
    else:
        with load:
            result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"study failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def remeasure(fp32_artifact: Path, artifact: Path, feeds: dict, rounds: int, seed: int) -> tuple[float, float, float]:
    """Independent interleaved re-timing: (median ratio, FP32 median ms, candidate median ms).

    Deliberately not sensisearch.measure: its own loop, fresh sessions, random order per round,
    a block of runs per arm so sub-millisecond models are timed over ~2 ms.
    """
    backend = OnnxRuntimeBackend()
    with backend.load(fp32_artifact) as ref, backend.load(artifact) as cand:
        names_ref, names_cand = [o.name for o in ref.outputs], [o.name for o in cand.outputs]
        run_ref = lambda: ref._session.run(names_ref, feeds)  # noqa: E731
        run_cand = lambda: cand._session.run(names_cand, feeds)  # noqa: E731
        for _ in range(5):
            run_ref(), run_cand()
        t0 = time.perf_counter()
        run_cand()
        block = max(1, min(50, int(np.ceil(2e-3 / max(time.perf_counter() - t0, 1e-6)))))
        rng = np.random.default_rng(seed)
        ref_ms, cand_ms = [], []
        for _ in range(rounds):
            order = [(run_ref, ref_ms), (run_cand, cand_ms)]
            if rng.random() < 0.5:
                order.reverse()
            for fn, sink in order:
                t0 = time.perf_counter()
                for _ in range(block):
                    fn()
                sink.append((time.perf_counter() - t0) / block * 1e3)
    ratios = np.asarray(ref_ms) / np.asarray(cand_ms)
    return float(np.median(ratios)), float(np.median(ref_ms)), float(np.median(cand_ms))


def report(name: str, condition: str, out: Path, rounds: int, elapsed: float, load: PartTimeLoad | None) -> dict:
    ctx = prepare(load_run_settings(out))
    study = open_study(ctx)
    recs = records(study)
    fp32 = baseline(recs, "fp32")
    front = pareto_front(recs)
    winner_cfg = json.loads((out / "winner" / "config.json").read_text())
    winner = next(r for r in recs if r.number == winner_cfg["trial"])
    feeds = dict(ctx.pipeline.timing_feeds())
    rows = {r.number: r for r in front}
    rows[winner.number] = winner
    window = "" if load is None or load.window is None else f", one core busy from {load.window[0]:.0f} s to {load.window[1]:.0f} s"
    print(f"\n{name}, {condition} ({elapsed:.0f} s{window}); winner: trial {winner.number} ({winner_cfg['status']})")
    print(f"  {'trial':>9} {'role':>12} {'reported':>26} {'in-study':>8} {'re-measured':>11} {'diff':>7}")
    worst = 0.0
    for number, r in sorted(rows.items(), key=lambda kv: kv[1].median_ms or 0.0):
        role = "winner" if number == winner.number else "front"
        if r.baseline == "fp32":
            remeasured = 1.0
        else:
            remeasured, _, _ = remeasure(Path(fp32.artifact), Path(r.artifact), feeds, rounds, seed=number)
        lo, hi = r.speedup_ci95 or (float("nan"), float("nan"))
        diff = (r.speedup - remeasured) / remeasured
        worst = max(worst, abs(diff))
        tag = "v" if r.is_verified else " "
        label = f"{number}" + (f" ({r.baseline})" if r.baseline else "")
        print(f"  {label:>9} {role:>12} {r.speedup:>7.3f}x [{lo:.3f}, {hi:.3f}] {tag} {r.paired_speedup or float('nan'):>7.3f}x "
              f"{remeasured:>10.3f}x {100 * diff:>+6.1f}%")
    print(f"  worst |reported - re-measured| / re-measured: {100 * worst:.1f}% (goal: within 5%)")
    calibration = None if winner.config is None else winner.config.calibration
    return {"trial": winner.number, "qualified": winner_cfg["status"] == "qualified",
            "int8_layers": sorted(k for k, v in winner.precisions.items() if v == "int8"),
            "calibration": (None, None) if calibration is None else (calibration.algorithm.value, calibration.samples),
            "worst": worst}


def yolo_args(data: Path, work: Path, budget: int, eval_limit: int, verify_seconds: float) -> list[str]:
    coco = data / "coco-dev"
    images = json.loads((coco / "instances.json").read_text())["images"]
    calib = work / "yolo-calib"
    calib.mkdir(exist_ok=True)
    for image in images[-16:]:  # calibration images the evaluation (first eval_limit) does not use
        link = calib / image["file_name"]
        if not link.exists():
            link.symlink_to(coco / "images" / image["file_name"])
    return [
        "--model", str(data / "yolov5n.onnx"), "--eval-data", str(coco / "images"), "--annotations", str(coco / "instances.json"),
        "--calib-data", str(calib), "--budget", str(budget), "--eval-limit", str(eval_limit), "--sample-counts", "16",
        "--algorithms", "minmax,percentile", "--verify-seconds", str(verify_seconds), "--cache-dir", str(work / "cache"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["digits", "yolo"])
    parser.add_argument("--digits-budget", type=int, default=12)
    parser.add_argument("--yolo-budget", type=int, default=5)
    parser.add_argument("--yolo-eval-limit", type=int, default=40)
    parser.add_argument("--verify-seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=60, help="rounds of the independent re-measurement")
    parser.add_argument("--load-delay", type=float, default=8.0, help="seconds into the loaded study when the busy core starts")
    parser.add_argument("--load-seconds", type=float, default=30.0, help="how long the core stays busy")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = Path(os.environ.get("SENSISEARCH_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        studies = []
        if args.only in (None, "digits"):
            studies.append(("digits", ["--example", "digits", "--budget", str(args.digits_budget), "--sample-counts", "64,128,256",
                                       "--verify-seconds", str(args.verify_seconds)]))
        if args.only in (None, "yolo"):
            if not (data / "yolov5n.onnx").is_file():
                print(f"YOLOv5n study skipped: no {data / 'yolov5n.onnx'} (set SENSISEARCH_SHARED_DATA)")
            else:
                studies.append(("yolov5n", yolo_args(data, work, args.yolo_budget, args.yolo_eval_limit, args.verify_seconds)))
        print(f"load avg at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        for name, study_args in studies:
            winners = {}
            for condition in ("quiet", "loaded"):
                out = work / f"{name}-{condition}"
                load = PartTimeLoad(args.load_delay, args.load_seconds) if condition == "loaded" else None
                elapsed = run_study(study_args, out, load)
                winners[condition] = report(name, condition, out, args.rounds, elapsed, load)
            same = winners["quiet"]["int8_layers"] == winners["loaded"]["int8_layers"] and \
                winners["quiet"]["calibration"] == winners["loaded"]["calibration"]
            print(f"{name}: same winner configuration in both runs: {'yes' if same else 'no'} "
                  f"(quiet trial {winners['quiet']['trial']}, loaded trial {winners['loaded']['trial']}; "
                  f"INT8 layers {len(winners['quiet']['int8_layers'])} vs {len(winners['loaded']['int8_layers'])})")


if __name__ == "__main__":
    main()
