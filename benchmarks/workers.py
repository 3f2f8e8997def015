"""Many workers on PostgreSQL, and what trial isolation costs, on the bundled digits example.

Prints (never asserts):

1. the overhead of child-process isolation per trial, as a share of trial time
   (the same configurations in the worker and through the trial server; goal <= 5%),
   and the trial server's one-off start-up per worker;
2. the per-trial storage overhead on PostgreSQL against SQLite (an objective that
   only stores a real trial's record, so the difference is the database);
3. trials per minute with 1, 2 and 4 workers (``sensisearch run`` + ``worker``
   processes) sharing one study on PostgreSQL.

PostgreSQL: ``--storage URL`` (an empty database), else a throwaway server is
started the way the tests do (needs initdb/pg_ctl, as installed by ``.ci/run``).

    python benchmarks/workers.py [--trials 8] [--workers 1,2,4] [--budget 12] [--storage URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna

from sensisearch.quantize.config import Precision
from sensisearch.study import IsolatedTrialRunner, IsolationSettings, child_settings
from sensisearch.study import open_storage
from sensisearch.study import prepare
from sensisearch.study import merge_settings

REPO = Path(__file__).resolve().parents[1]
DIGITS = ["--example", "digits", "--latency-seconds", "0.2", "--sample-counts", "64,128"]


def isolation_overhead(trials: int, root: Path) -> None:
    settings = merge_settings({}, {"example": "digits", "out": root / "iso", "latency_seconds": 0.2, "sample_counts": [64, 128]}, None)
    ctx = prepare(settings)
    configs = [ctx.space.uniform(p) for p in (Precision.FP32, Precision.INT8)] * ((trials + 1) // 2)
    configs = configs[:trials]
    ctx.pipeline.run(configs[0], root / "warm")  # first-run costs (ORT init, page cache) out of both figures
    started = time.perf_counter()
    runner = IsolatedTrialRunner(child_settings(ctx), IsolationSettings(), ctx.out)
    runner.start()
    startup = time.perf_counter() - started
    in_process, isolated = [], []
    # Alternate so machine load drifts hit both arms alike.
    for i, config in enumerate(configs):
        t0 = time.perf_counter()
        ctx.pipeline.run(config, root / f"in-{i}")
        in_process.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        runner.run(config, root / f"iso-{i}")
        isolated.append(time.perf_counter() - t0)
    runner.close()
    a, b = statistics.median(in_process), statistics.median(isolated)
    print(f"isolation: trial median {a:.3f} s in the worker, {b:.3f} s in a child process: "
          f"overhead {b - a:+.3f} s = {100 * (b - a) / a:+.1f}% of trial time (goal <= 5%); "
          f"trial server start-up {startup:.2f} s once per worker")


def storage_overhead(pg_url: str, sqlite_url: str, trials: int) -> None:
    attrs = {  # the size of a real trial's record: config of 10 layers, metrics, latency, timings
        "config": {"precisions": {f"layer{i}": "int8" for i in range(10)}, "calibration": {"algorithm": "minmax", "samples": 128}},
        "metrics": {"top1": 93.5}, "latency": {"median_ms": 0.2, "p90_ms": 0.25, "runs": 500},
        "timings": {k: 0.1 for k in ("thresholds", "emit", "build", "load", "latency", "evaluate")},
        "host": "bench", "device": "CPU bench",
    }

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        for i in range(10):
            trial.suggest_categorical(f"layer{i}", ["int8", "fp32"])
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return 1.0, 1.0

    figures = {}
    for label, url in (("SQLite", sqlite_url), ("PostgreSQL", pg_url)):
        study = optuna.create_study(storage=open_storage(url, 30), study_name=f"overhead-{uuid.uuid4().hex[:6]}",
                                    directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
        t0 = time.perf_counter()
        study.optimize(objective, n_trials=trials)
        figures[label] = (time.perf_counter() - t0) / trials
    print("storage: per trial " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in figures.items())
          + f" (PostgreSQL - SQLite: {1000 * (figures['PostgreSQL'] - figures['SQLite']):+.1f} ms)")


def trials_per_minute(pg_url: str, workers: int, budget: int, root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    name = f"bench-{workers}-{uuid.uuid4().hex[:6]}"
    base = [sys.executable, "-m", "sensisearch"]
    # The study is made (and calibrated) first, so the figure is trials, not start-up.
    subprocess.run([*base, "run", *DIGITS, "--budget", "1", "--storage", pg_url, "--study-name", name,
                    "--out", str(root / name / "w0")], env=env, check=True, capture_output=True)
    study = optuna.load_study(study_name=name, storage=open_storage(pg_url, 30))
    settings = study.user_attrs["settings"]  # StudySettings.to_dict(): nested by record
    settings["search"]["budget"] = budget
    study.set_user_attr("settings", settings)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*base, "worker", "--storage", pg_url, "--study-name", name, "--out", str(root / name / f"w{i}")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(workers)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed: {err}")
    seconds = time.perf_counter() - t0
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished()) - 1
    print(f"{workers} worker(s): {done} trials in {seconds:.1f} s = {60 * done / seconds:.1f} trials/min (incl. each worker's start-up)")


def _throwaway_postgres() -> tuple[object, str]:
    sys.path.insert(0, str(REPO / "tests"))
    import shutil

    from conftest import PostgresServer, postgres_bin_dir  # the tests' throwaway server

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL here: pass --storage URL, or install it (.ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="sensisearch-pg-"))
    run_as = "postgres" if os.geteuid() == 0 else None
    if run_as:
        shutil.chown(root, run_as, run_as)
    server = PostgresServer(bin_dir=bin_dir, root=root, run_as=run_as)
    server.start()
    return server, server.url("sensisearch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per arm for the isolation overhead")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--budget", type=int, default=12, help="trials per worker-count run")
    parser.add_argument("--storage", help="an empty PostgreSQL database URL (default: a throwaway server)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        isolation_overhead(args.trials, root)
        if args.storage:
            pg_url = args.storage
        else:
            server, pg_url = _throwaway_postgres()
        try:
            storage_overhead(pg_url, f"sqlite:///{root / 'overhead.db'}", 30)
            for n in [int(v) for v in args.workers.split(",")]:
                trials_per_minute(pg_url, n, args.budget, root)
        finally:
            if server is not None:
                server.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
