"""Many workers on one study on a real PostgreSQL server (the ``postgres_server`` fixture).

Workers are real ``python -m sensisearch`` processes on the digits example; the
storage is read back with Optuna and checked with plain SQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import sys
import time
import uuid
from pathlib import Path

import optuna
import psycopg
import pytest
from sqlalchemy.engine import make_url

from sensisearch.study.run._identity import effective_config_key
from sensisearch.study.store._record import TrialRecord
from sensisearch.study.store._worker import SETTINGS_ATTR, prune_artifacts, trials_to_keep
from study.trial.test_isolation import _alive

# Whole studies in subprocesses (minutes): left out of the quick lowest-versions CI run.
pytestmark = pytest.mark.slow

from conftest import REPO
TESTS = REPO / "tests"
# Small and quick: 300 evaluation images, one calibration count, short timing.
# Plain TPE: these tests count distinct configurations against --budget, which the default guided study
# shares with its sensitivity probes.
DIGITS = ["--example", "digits", "--latency-seconds", "0.05", "--sample-counts", "64", "--eval-limit", "300",
          "--sampler", "tpe", "--search", "full"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(TESTS), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


# Workers write to files, not pipes: they wait for one another (a baseline another worker
# runs), so reading one worker's pipe to the end while another's fills up would deadlock the test.
_LOGS: dict[int, tuple[Path, Path]] = {}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    logs = tuple(Path(tempfile.mkstemp(prefix="sensisearch-worker-", suffix=f".{kind}")[1]) for kind in ("out", "err"))
    with logs[0].open("w") as out, logs[1].open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sensisearch", *args], env=env or _env(),
            stdout=out, stderr=err, text=True, start_new_session=True,
        )
    _LOGS[proc.pid] = logs  # type: ignore[assignment]
    return proc


def _stderr(proc: subprocess.Popen[str]) -> str:
    return _LOGS[proc.pid][1].read_text()


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:
    proc.wait(timeout=timeout)
    out, err = (path.read_text() for path in _LOGS[proc.pid])
    return proc.returncode, out, err


def _fresh_database(server) -> str:  # noqa: ANN001 - conftest.PostgresServer
    return server.create_database("w" + uuid.uuid4().hex[:12])


def _load(url: str, name: str) -> optuna.Study:
    from sensisearch.study.store._storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(url, 30))


def _wait_for_settings(url: str, name: str, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    """Until the first worker has made the study (and stored its settings)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, _stderr(proc)
        try:
            if SETTINGS_ATTR in _load(url, name).user_attrs:
                return
        except KeyError:
            pass
        time.sleep(0.5)
    raise AssertionError("the study was not created in time")


def _counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Searched configurations that were built and evaluated to the end: what --budget counts.

    Baselines come on top; repeats (``duplicate_of``), over-budget proposals and trials
    failed by a heartbeat (no error of their own) are not evaluations.
    """
    out = []
    for t in study.get_trials(deepcopy=False):
        record = TrialRecord.from_trial(t)
        if record.baseline is not None or record.duplicate_of is not None or record.trial_json is None:
            continue
        if t.state == optuna.trial.TrialState.COMPLETE or (t.state == optuna.trial.TrialState.FAIL and record.error is not None):
            out.append(t)
    return out


@pytest.fixture(scope="module")
def three_workers(postgres_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:  # noqa: ANN001
    """One `run` that makes the study, then two `worker`s joining it (each with its own --out, as on other hosts)."""
    url = _fresh_database(postgres_server)
    root = tmp_path_factory.mktemp("workers")
    name = "digits-shared"
    budget = 10
    first = _cli("run", *DIGITS, "--budget", str(budget), "--storage", url, "--study-name", name,
                 "--out", str(root / "a"), "--seed", "5", "--heartbeat-seconds", "5")
    _wait_for_settings(url, name, first)
    others = [_cli("worker", "--storage", url, "--study-name", name, "--out", str(root / host)) for host in ("b", "c")]
    results = [_finish(p) for p in (first, *others)]
    return {"url": url, "name": name, "budget": budget, "root": root, "results": results}


def test_three_workers_share_one_study(three_workers: dict[str, object], postgres_server) -> None:  # noqa: ANN001
    for code, out, err in three_workers["results"]:  # type: ignore[attr-defined]
        assert code == 0, err
        assert "Traceback" not in err
    url, name, budget = three_workers["url"], three_workers["name"], three_workers["budget"]
    study = _load(url, name)  # type: ignore[arg-type]
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.WAITING not in states
    assert len(_counted(study)) >= budget  # type: ignore[operator]
    # Every worker ran trials, and each trial says where.
    evaluated = [t for t in study.trials if TrialRecord.from_trial(t).trial_json]
    workers_dirs = {Path(t.user_attrs["trial_json"]).parents[2].name for t in evaluated}
    assert len(workers_dirs) >= 2
    for t in evaluated:
        record = TrialRecord.from_trial(t)
        assert record.host == os.uname().nodename and record.device and record.device.startswith("CPU ")
    # Independent view: plain SQL on the server sees the same finished trials.
    with psycopg.connect(host=str(postgres_server.root), user=postgres_server.user, password=postgres_server.password,
                         dbname=make_url(url).database) as conn:  # type: ignore[arg-type]
        rows = conn.execute("SELECT state, count(*) FROM trials GROUP BY state").fetchall()
    assert dict(rows) == {s.name: states.count(s) for s in set(states)}
    # The stored settings are what a worker needs, with the password masked.
    stored = study.user_attrs[SETTINGS_ATTR]
    assert stored["search"]["budget"] == budget and stored["storage"]["storage"].count("***") == 1
    assert postgres_server.password not in json.dumps(stored)


def test_three_workers_reach_exactly_the_budget_of_distinct_configurations(three_workers: dict[str, object]) -> None:
    study = _load(three_workers["url"], three_workers["name"])  # type: ignore[arg-type]
    counted = _counted(study)
    assert len(counted) == three_workers["budget"]
    keys = {effective_config_key(TrialRecord.from_trial(t).config) for t in counted}
    assert len(keys) == len(counted)


def test_report_from_storage_equals_what_a_worker_wrote(three_workers: dict[str, object], tmp_path: Path) -> None:
    url, name, root = three_workers["url"], three_workers["name"], three_workers["root"]
    # A worker started after the budget is met runs nothing and writes the results from the storage.
    code, _, err = _finish(_cli("worker", "--storage", url, "--study-name", name, "--out", str(root / "a")))  # type: ignore[arg-type]
    assert code == 0, err
    code, _, err = _finish(_cli("report", "--storage", url, "--study-name", name, "--out", str(tmp_path)))  # type: ignore[arg-type]
    assert code == 0, err
    assert (tmp_path / "pareto.json").read_bytes() == (root / "a" / "pareto.json").read_bytes()  # type: ignore[operator]
    assert (tmp_path / "pareto.csv").read_bytes() == (root / "a" / "pareto.csv").read_bytes()  # type: ignore[operator]
    mine = json.loads((tmp_path / "winner" / "config.json").read_text())
    theirs = json.loads((root / "a" / "winner" / "config.json").read_text())  # type: ignore[operator]
    assert mine["trial"] == theirs["trial"] and mine["thresholds"] == theirs["thresholds"]
    assert "## Disk" in (tmp_path / "report.md").read_text()


def test_killed_worker_trial_is_retried_by_another_and_nothing_is_left(postgres_server, tmp_path: Path) -> None:  # noqa: ANN001
    url = _fresh_database(postgres_server)
    name = "digits-kill"
    action = tmp_path / "action"
    action.write_text("hang@int8")  # the all-INT8 baseline's build hangs: the worker is mid-trial
    env = _env(SENSISEARCH_TEST_BACKEND="isolation_backends:MisbehavingBackend", SENSISEARCH_TEST_ACTION_FILE=str(action))
    first = _cli("run", *DIGITS, "--budget", "3", "--storage", url, "--study-name", name, "--out", str(tmp_path / "a"),
                 "--heartbeat-seconds", "1", "--seed", "2", env=env)
    grandchild_file = tmp_path / "a" / "trials" / "0001" / "grandchild.pid"
    deadline = time.monotonic() + 300
    while not grandchild_file.is_file():
        assert time.monotonic() < deadline and first.poll() is None, _stderr(first)
        time.sleep(0.2)
    time.sleep(0.5)
    running = [t for t in _load(url, name).trials if t.state == optuna.trial.TrialState.RUNNING]
    assert [t.number for t in running] == [1]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=600)
    grandchild = int(grandchild_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the killed worker's trial left its build running"

    action.write_text("")  # the retry builds normally
    time.sleep(2.5)  # past the grace period (2 x heartbeat)
    code, _, err = _finish(_cli("worker", "--storage", url, "--study-name", name, "--out", str(tmp_path / "b"), env=env))
    assert code == 0, err
    study = _load(url, name)
    recs = [TrialRecord.from_trial(t) for t in study.trials]
    stale = recs[1]
    assert stale.state == "FAIL" and stale.error is None  # failed by the heartbeat, not by itself
    # Optuna's retry: a new trial with the same parameters, pointing at the stale one.
    retried = [t for t in study.trials[2:] if t.params == study.trials[1].params]
    assert len(retried) == 1 and retried[0].system_attrs.get("failed_trial") == 1
    again = TrialRecord.from_trial(retried[0])
    assert again.state == "COMPLETE" and again.baseline == "int8" and again.value is not None
    assert len(_counted(study)) >= 3 and all(r.state != "RUNNING" for r in recs)


@pytest.mark.parametrize("problem", ["wrong-password", "unreachable"])
@pytest.mark.parametrize("command", ["run", "worker"])
def test_bad_storage_is_one_masked_line_before_any_work(postgres_server, tmp_path: Path, problem: str, command: str) -> None:  # noqa: ANN001
    secret = "n0t-the:p@ss"
    if problem == "wrong-password":
        url = postgres_server.url("sensisearch", password=secret)
    else:
        from urllib.parse import quote

        url = f"postgresql://someone:{quote(secret, safe='')}@/sensisearch?host={tmp_path / 'no-server'}"
    out = tmp_path / "out"
    args = ["run", *DIGITS, "--out", str(out)] if command == "run" else ["worker", "--out", str(out)]
    code, stdout, err = _finish(_cli(*args, "--storage", url, "--study-name", "x"), timeout=120)
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    text = " ".join(err.split())
    assert "Traceback" not in err and "--storage" in text and "***" in text
    assert secret not in err and "n0t-the" not in err
    assert len(lines) <= 2  # one message (rich may wrap it at the terminal width)
    assert ("authentication failed" if problem == "wrong-password" else "connection refused") in text
    assert not (out / "cache").exists()  # nothing was calibrated


def test_trials_to_keep_and_prune(tmp_path: Path) -> None:
    def rec(number: int, value: float, ms: float, baseline: str | None = None, state: str = "COMPLETE") -> TrialRecord:
        return TrialRecord(number, state=state, value=value, baseline=baseline, latency={"median_ms": ms})

    recs = [
        rec(0, 90.0, 1.0, "fp32"), rec(1, 80.0, 0.5, "int8"),
        rec(2, 89.5, 0.6),  # the winner (within 1 point of FP32, faster): on the front
        rec(3, 89.9, 0.9),  # on the front
        rec(4, 85.0, 0.95),  # dominated, 4th best metric
        rec(5, 70.0, 2.0),  # dominated, worst
        rec(6, 0.0, 0.0, state="FAIL"),
        rec(7, 0.0, 0.0, state="RUNNING"),
    ]
    assert trials_to_keep(recs, None, 1.0) is None
    assert trials_to_keep(recs, 0, 1.0) == {0, 1, 2, 3, 7}
    assert trials_to_keep(recs, 5, 1.0) == {0, 1, 2, 3, 4, 7}
    trials = tmp_path / "trials"
    for r in recs:
        folder = trials / f"{r.number:04d}"
        folder.mkdir(parents=True)
        (folder / "trial.json").write_text("{}")
        (folder / "deployable.onnx").write_bytes(b"x" * 1000)
        (folder / "engine.plan").write_bytes(b"y" * 500)
    freed = prune_artifacts(trials, recs, 0, 1.0)
    assert freed == 3 * 1500
    for r in recs:
        left = sorted(p.name for p in (trials / f"{r.number:04d}").iterdir())
        pruned = r.number in (4, 5, 6)
        assert left == (["trial.json"] if pruned else ["deployable.onnx", "engine.plan", "trial.json"])
