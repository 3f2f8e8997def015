"""Do a study's verified speed figures survive a busy core? Verified speed-ups against a quiet re-measurement.

Runs the bundled digits study and a short YOLOv5n study (``shared/data``), each
twice: once as the machine is, once with one busy core this benchmark starts
itself (a subprocess spinning on one core; it stops itself after
``--load-seconds`` even if this script dies). After each study, with that load
gone, every verified front member and the winner is timed again, independently
of the study's code: a hand-written loop that alternates FP32 and the candidate
in random order for ``--rounds`` rounds (fresh ONNX Runtime sessions, same
session options and input), median of the per-round ratios; five such re-timings a
second apart, and their median is the reference (all five are printed). It prints, per
configuration, the quiet run's and the loaded run's verified speed-ups side by
side with their re-measurements, the A/A controls (in-study and per verify round)
and the load record (what load-aware timing saw, retried and kept under load).

Goal (printed, never asserted): every verified front member within 5% of its quiet
re-measurement, in both runs, and the same winner. On a shared machine the
"quiet" run and the re-measurement carry the other jobs' noise too: run it on an
otherwise idle machine for numbers to quote. ``--smoke`` (about 2 minutes on a
quiet 2-core machine) only shows the benchmark runs end to end: its studies and
timings are too short for its figures to mean anything.

    python benchmarks/measurement_noise.py [--smoke] [--only digits|yolo] [--digits-budget 12] [--yolo-budget 5]
"""

from __future__ import annotations

import argparse
import json
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
from sensisearch.measure import LoadRecord
from sensisearch.study import (
    VERIFY_SUMMARY_ATTR,
    baseline,
    load_run_settings,
    open_study,
    pareto_front,
    prepare,
    records,
)

BUSY_CORE = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"
"""One core spinning for argv[1] seconds, then exiting on its own: bounded even if the benchmark is killed."""


class BusyCore:
    """One busy subprocess on one core from ``delay`` to ``delay + seconds`` after start (a neighbour job)."""

    def __init__(self, delay: float, seconds: float) -> None:
        self.delay, self.seconds = delay, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.window: tuple[float, float] | None = None

    def _run(self) -> None:
        if self._stop.wait(self.delay):
            return
        proc = subprocess.Popen([sys.executable, "-c", BUSY_CORE, str(self.seconds)])
        began = time.monotonic()
        if not self._stop.wait(self.seconds):
            proc.wait()
        else:
            proc.terminate()
            proc.wait()
        self.window = (began - self._started, time.monotonic() - self._started)

    def __enter__(self) -> BusyCore:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_study(args: list[str], out: Path, load: BusyCore | None) -> float:
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
    backend = OnnxRuntimeBackend().timing_backend()  # sessions set up as the study times them
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


def _config_key(r) -> str:
    """A configuration, run-independent: trial numbers differ between the quiet and the loaded run."""
    config = None if r.config is None else r.config.to_dict()
    return r.baseline or json.dumps({"p": r.precisions, "c": None if config is None else config["calibration"]}, sort_keys=True)


def _load_text(load: LoadRecord | None) -> str:
    if load is None:
        return "no load record"
    before = "n/a" if load.before is None else load.before.verdict
    others = load.max_others_busy_cores
    return (f"before {before}, {len(load.during)} blocks on cores {list(load.cores) or 'unpinned'}, "
            f"{load.retried_blocks} re-timed, {load.loaded_blocks} kept under load, "
            f"others' busy cores max {'n/a' if others is None else f'{others:.2f}'}")


def report(name: str, condition: str, out: Path, rounds: int, elapsed: float, load: BusyCore | None) -> dict:
    ctx = prepare(load_run_settings(out), reviewing=True)
    study = open_study(ctx)
    recs = records(study)
    fp32 = baseline(recs, "fp32")
    front = pareto_front(recs)
    winner_cfg = json.loads((out / "winner" / "config.json").read_text())
    winner = next(r for r in recs if r.number == winner_cfg["trial"])
    feeds = dict(ctx.pipeline.timing_feeds())
    rows = {r.number: r for r in front if r.is_verified}
    if winner.is_verified:
        rows[winner.number] = winner
    window = "" if load is None or load.window is None else f", one core busy from {load.window[0]:.0f} s to {load.window[1]:.0f} s"
    print(f"\n{name}, {condition} ({elapsed:.0f} s{window}); winner: trial {winner.number} ({winner_cfg['status']})")
    # The A/A control and the load record: what the timing itself saw.
    controls = sorted(float(r.latency["control"]["ratio"]) for r in recs if r.state == "COMPLETE" and r.latency.get("control"))
    if controls:
        print(f"  A/A control in-study: median {controls[len(controls) // 2]:.3f}x over {len(controls)} timings "
              f"(range {controls[0]:.3f}-{controls[-1]:.3f}x)")
    loaded = [r.number for r in recs if r.state == "COMPLETE" and r.latency.get("under_load")]
    print(f"  in-study figures taken under load: {loaded or 'none'}")
    summary = study.user_attrs.get(VERIFY_SUMMARY_ATTR) or {}
    for i, rnd in enumerate(summary.get("rounds", []), start=1):
        c = rnd.get("control")
        control = "no A/A control" if not c else f"A/A control {c['ratio']:.3f}x [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
        print(f"  verify round {i}: arms {rnd['arms']}, {rnd['rounds']} rounds, {control}, under load: {rnd.get('under_load')}")
    if summary.get("unverified"):
        print(f"  not verified (round cap): {summary['unverified']}")
    print(f"  {'trial':>9} {'role':>7} {'verified':>26} {'in-study':>8} {'re-measured':>11} {'diff':>7}  load record of the verified timing")
    figures: dict[str, dict] = {}
    worst = 0.0
    for number, r in sorted(rows.items(), key=lambda kv: kv[1].median_ms or 0.0):
        role = "winner" if number == winner.number else "front"
        if r.baseline == "fp32":
            remeasured, spread = 1.0, ""
        else:
            # Five independent re-timings a second apart, their median the reference: on a shared VM a re-timing
            # falls into a disturbed second now and then like any timing (digits in one process: 2.400, 2.747,
            # 2.455, 2.849, 2.867, 2.610x; in the next: 2.846-2.890x throughout).
            tries = []
            for k in range(5):
                time.sleep(1.0)
                tries.append(remeasure(Path(fp32.artifact), Path(r.artifact), feeds, rounds, seed=number + 1000 * k)[0])
            tries.sort()
            remeasured, spread = tries[2], f" (re-timings {', '.join(f'{t:.3f}' for t in tries)}x)"
        lo, hi = r.speedup_ci95 or (float("nan"), float("nan"))
        diff = (r.speedup - remeasured) / remeasured
        worst = max(worst, abs(diff))
        label = f"{number}" + (f" ({r.baseline})" if r.baseline else "")
        tag = "v" if r.is_verified else " "
        load_record = None if r.verified is None else r.verified.load_record
        print(f"  {label:>9} {role:>7} {r.speedup:>7.3f}x [{lo:.3f}, {hi:.3f}] {tag} {r.paired_speedup or float('nan'):>7.3f}x "
              f"{remeasured:>10.3f}x {100 * diff:>+6.1f}%  {_load_text(load_record)}{spread}")
        figures[_config_key(r)] = {"label": label, "verified": r.speedup, "remeasured": remeasured}
    unverified = [r.number for r in front if not r.is_verified]
    if unverified:
        print(f"  front members without a verified figure (not compared): {unverified}")
    print(f"  worst |verified - quiet re-measurement| / re-measurement: {100 * worst:.1f}% (goal: within 5%)")
    calibration = None if winner.config is None else winner.config.calibration
    return {"trial": winner.number, "qualified": winner_cfg["status"] == "qualified",
            "int8_layers": sorted(k for k, v in winner.precisions.items() if v == "int8"),
            "calibration": (None, None) if calibration is None else (calibration.algorithm.value, calibration.samples),
            "worst": worst, "figures": figures}


def side_by_side(name: str, quiet: dict, loaded: dict) -> None:
    """Each configuration verified in either run: the quiet and the loaded run's figures in one row."""
    print(f"\n{name}: quiet and loaded side by side (verified speed-up / quiet re-measurement)")
    print(f"  {'configuration':>22} {'quiet run':>22} {'loaded run':>22}")
    for key in sorted(set(quiet["figures"]) | set(loaded["figures"]), key=lambda k: (len(k), k)):
        cells = []
        for run in (quiet, loaded):
            f = run["figures"].get(key)
            cells.append("-" if f is None else f"{f['verified']:.3f}x / {f['remeasured']:.3f}x")
        label = key if len(key) < 20 else next(run["figures"][key]["label"] for run in (quiet, loaded) if key in run["figures"])
        print(f"  {label:>22} {cells[0]:>22} {cells[1]:>22}")
    ok = quiet["worst"] <= 0.05 and loaded["worst"] <= 0.05
    print(f"  within 5% everywhere: {'yes' if ok else 'no'} (quiet worst {100 * quiet['worst']:.1f}%, loaded worst "
          f"{100 * loaded['worst']:.1f}%)")


def yolo_args(data: Path, work: Path, budget: int, eval_limit: int, verify_seconds: float, samples: int = 16) -> list[str]:
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
        "--calib-data", str(calib), "--budget", str(budget), "--eval-limit", str(eval_limit), "--sample-counts", str(samples),
        "--algorithms", "minmax,percentile", "--verify-seconds", str(verify_seconds), "--cache-dir", str(work / "cache"),
    ]


SMOKE = {"digits_budget": 2, "yolo_budget": 1, "yolo_eval_limit": 4, "verify_seconds": 2.0, "rounds": 15}
"""``--smoke``: the smallest studies that still verify a front (figures meaningless, the plumbing shown)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["digits", "yolo"])
    parser.add_argument("--smoke", action="store_true", help="tiny studies, about 2 minutes on a quiet machine: shows it runs, "
                        "its figures mean nothing")
    parser.add_argument("--digits-budget", type=int, default=12)
    parser.add_argument("--yolo-budget", type=int, default=5)
    parser.add_argument("--yolo-eval-limit", type=int, default=40)
    parser.add_argument("--verify-seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=60, help="rounds of the independent re-measurement")
    parser.add_argument("--load-delay", type=float, default=0.0, help="seconds into the loaded study when the busy core starts")
    parser.add_argument("--load-seconds", type=float, default=1800.0,
                        help="the busy core's bound: it stops when the study ends, or after this long at most")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = Path(os.environ.get("SENSISEARCH_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        studies = []
        digits = ["--example", "digits", "--budget", str(args.digits_budget), "--verify-seconds", str(args.verify_seconds)]
        digits += ["--sample-counts", "64", "--eval-limit", "300", "--latency-seconds", "0.1"] if args.smoke else \
            ["--sample-counts", "64,128,256"]
        if args.only in (None, "digits"):
            studies.append(("digits", digits))
        if args.only in (None, "yolo"):
            if not (data / "yolov5n.onnx").is_file():
                print(f"YOLOv5n study skipped: no {data / 'yolov5n.onnx'} (set SENSISEARCH_SHARED_DATA)")
            else:
                yolo = yolo_args(data, work, args.yolo_budget, args.yolo_eval_limit, args.verify_seconds, 8 if args.smoke else 16)
                studies.append(("yolov5n", yolo + (["--latency-seconds", "0.1"] if args.smoke else [])))
        print(f"load avg at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
              + ("; --smoke: figures from studies this short are not meaningful" if args.smoke else ""))
        for name, study_args in studies:
            winners = {}
            for condition in ("quiet", "loaded"):
                out = work / f"{name}-{condition}"
                load = BusyCore(args.load_delay, args.load_seconds) if condition == "loaded" else None
                elapsed = run_study(study_args, out, load)
                winners[condition] = report(name, condition, out, args.rounds, elapsed, load)
            side_by_side(name, winners["quiet"], winners["loaded"])
            same = winners["quiet"]["int8_layers"] == winners["loaded"]["int8_layers"] and \
                winners["quiet"]["calibration"] == winners["loaded"]["calibration"]
            print(f"{name}: same winner configuration in both runs: {'yes' if same else 'no'} "
                  f"(quiet trial {winners['quiet']['trial']}, loaded trial {winners['loaded']['trial']}; "
                  f"INT8 layers {len(winners['quiet']['int8_layers'])} vs {len(winners['loaded']['int8_layers'])})")
    print(f"\ntotal {time.monotonic() - started:.0f} s; load avg at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
