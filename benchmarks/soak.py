"""Soak: N workers on one PostgreSQL study, one killed (SIGKILL) every minute and restarted.

    python benchmarks/soak.py --trials 200 --workers 3 --minutes 30

Starts a throwaway PostgreSQL server (initdb/pg_ctl, as tests/conftest.py does),
runs ``sensisearch run`` (first worker) and ``sensisearch worker`` on the digits
example, kills a random worker every ``--kill-every`` seconds and starts it again,
and stops when the study is complete or ``--minutes`` have passed. Prints trials
per minute, the retries, and whether the invariants held: no RUNNING trial left,
no configuration evaluated twice, exactly ``--trials`` counted when complete.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import PostgresServer, postgres_bin_dir  # noqa: E402 - the tests' throwaway server

from sensisearch.study import TrialRecord, finished_count, open_storage  # noqa: E402

DIGITS = ["--example", "digits", "--latency-seconds", "0.05", "--sample-counts", "64", "--eval-limit", "300"]


@dataclass
class Worker:
    index: int
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, env: dict[str, str]) -> None:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "sensisearch", *self.argv], stdout=fh, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        self.starts += 1

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Figures:
    kills: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)


def _study(url: str, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url, 30))
    except KeyError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="the study's budget (default 200)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=60.0, help="stop after this long even if not complete")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        print("error: PostgreSQL is not installed (initdb/pg_ctl); apt-get install -y postgresql", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="sensisearch-pg-"))
    run_as = "postgres" if os.geteuid() == 0 else None
    if run_as:
        import shutil

        shutil.chown(root, run_as, run_as)
    server = PostgresServer(bin_dir=bin_dir, root=root, run_as=run_as)
    server.start()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="sensisearch-soak-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    name = "soak"
    url = server.create_database("soak")
    workers = [Worker(0, ["run", *DIGITS, "--budget", str(args.trials), "--storage", url, "--study-name", name,
                          "--out", str(work / "w0"), "--heartbeat-seconds", "5", "--no-verify"], work / "w0.log")]
    workers += [Worker(i, ["worker", "--storage", url, "--study-name", name, "--out", str(work / f"w{i}")], work / f"w{i}.log")
                for i in range(1, args.workers)]
    figures = Figures()
    started = time.monotonic()
    try:
        workers[0].start(env)
        while _study(url, name) is None or "settings" not in str(_study(url, name).user_attrs.keys()):  # type: ignore[union-attr]
            if workers[0].proc.poll() is not None:  # type: ignore[union-attr]
                print(f"error: the first worker exited; see {workers[0].log}", file=sys.stderr)
                return 1
            time.sleep(1)
        for w in workers[1:]:
            w.start(env)
        next_kill = time.monotonic() + args.kill_every
        while time.monotonic() - started < args.minutes * 60:
            study = _study(url, name)
            counted = finished_count(study) if study else 0
            figures.samples.append((time.monotonic() - started, counted))
            if all(w.proc is not None and w.proc.poll() is not None for w in workers) and counted >= args.trials:
                break
            for w in workers:  # a worker that finished or failed is started again while the study is not complete
                if w.proc is not None and w.proc.poll() is not None and counted < args.trials:
                    w.start(env)
            if time.monotonic() >= next_kill:
                victim = rng.choice(workers)
                victim.kill()
                figures.kills += 1
                victim.start(env)
                next_kill += args.kill_every
            time.sleep(2)
    finally:
        for w in workers:
            w.kill()
    minutes = (time.monotonic() - started) / 60
    study = _study(url, name)
    trials = study.get_trials(deepcopy=False) if study else []
    # A soak stopped mid-study leaves its own last kills RUNNING: fail what has no live owner, as a restart would.
    from sensisearch.study import fail_dead_owner_trials

    if study is not None:
        fail_dead_owner_trials(study)
        trials = study.get_trials(deepcopy=False)
    records = [TrialRecord.from_trial(t) for t in trials]
    counted = finished_count(study) if study else 0
    keys = [r.config_key for r in records if r.role == "evaluate" and (r.state == "COMPLETE" or (r.state == "FAIL" and r.error)
                                                                        or (r.state == "PRUNED" and r.stopped_early))]
    retries = sum(1 for t in trials if "failed_trial" in t.system_attrs)
    running = [t.number for t in trials if t.state.name == "RUNNING"]
    environmental = sum(1 for t in trials if TrialRecord.from_trial(t).environmental)
    complete = counted >= args.trials
    invariants = {
        "no RUNNING trial left": not running,
        "no configuration evaluated twice": len(keys) == len(set(keys)),
        "exactly the budget counted" if complete else "no more than the budget counted": counted == args.trials if complete else counted <= args.trials,
        "every complete trial has a role": all(r.role is not None for r in records if r.state == "COMPLETE"),
    }
    print(f"{counted}/{args.trials} configurations in {minutes:.1f} min: {counted / minutes:.2f} trials per minute "
          f"({args.workers} workers, {figures.kills} kills, {sum(w.starts for w in workers) - len(workers)} restarts)")
    print(f"retries (trials re-queued after a dead worker or an interruption): {retries}; environmental failures: {environmental}; "
          f"roles: {sum(1 for r in records if r.role == 'evaluate')} evaluate of {len(records)} trials")
    for what, held in invariants.items():
        print(f"  {'ok  ' if held else 'FAIL'} {what}")
    print(f"logs: {work}")
    server.stop()
    return 0 if all(invariants.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
