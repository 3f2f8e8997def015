"""Study storage against a real PostgreSQL server (and SQLite): opening, masking, workers, heartbeats.

The server is the session's throwaway PostgreSQL (``postgres_server`` in
conftest.py). Counts are checked against the database itself with plain SQL
(psycopg), independently of Optuna's own bookkeeping.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import psycopg
import pytest
from sqlalchemy.engine import make_url

from sensisearch.errors import SensisearchError
from sensisearch.study import mask_url, open_storage

from conftest import REPO

if TYPE_CHECKING:
    from conftest import PostgresServer

# A child process that opens the storage the way a worker does and runs trials.
WORKER = textwrap.dedent(
    """
    import sys, time, optuna
    from sensisearch.study import open_storage

    url, study_name, n_trials, start_at, heartbeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    time.sleep(max(0.0, start_at - time.time()))  # all workers hit the database together
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, heartbeat)
    study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True)
    study.optimize(lambda t: (t.suggest_float("x", -10, 10) - 2) ** 2, n_trials=n_trials)
    """
)

# A worker that announces its running trial and then hangs, to be killed with SIGKILL.
HANGING_WORKER = textwrap.dedent(
    """
    import sys, time, optuna
    from sensisearch.study import open_storage

    storage = open_storage(sys.argv[1], 1)
    study = optuna.load_study(storage=storage, study_name=sys.argv[2])

    def objective(trial):
        trial.suggest_float("x", -10, 10)
        trial.suggest_int("layers", 1, 64)
        print("RUNNING", trial.number, flush=True)
        time.sleep(600)

    study.optimize(objective, n_trials=1)
    """
)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_workers(url: str, study_name: str, workers: int, n_trials: int) -> None:
    start_at = time.time() + 2.0  # past every child's import time, so they really start together
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, study_name, str(n_trials), str(start_at), "5"],
            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(workers)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err


def sql_rows(server: PostgresServer, database: str, query: str, *params: object) -> list[tuple]:
    """Plain SQL on the server, as the test user: the independent view of what Optuna stored."""
    with psycopg.connect(host=str(server.root), user=server.user, password=server.password, dbname=database) as conn:
        return conn.execute(query, params).fetchall()


def assert_one_line(exc: SensisearchError) -> str:
    message = str(exc)
    assert "\n" not in message and message.strip() == message
    return message


# --- mask_url --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:secretpw@127.0.0.1:1/db", "postgresql://u:***@127.0.0.1:1/db"),
        ("postgresql+psycopg2://u:secretpw@db.example:5432/s", "postgresql+psycopg2://u:***@db.example:5432/s"),
        ("mysql://root:secretpw@127.0.0.1:3306/optuna", "mysql://root:***@127.0.0.1:3306/optuna"),
        ("mysql+pymysql://root:secretpw@h/optuna?charset=utf8mb4", "mysql+pymysql://root:***@h/optuna?charset=utf8mb4"),
        ("sqlite:////tmp/runs/study.db", "sqlite:////tmp/runs/study.db"),
        ("sqlite:///study.db", "sqlite:///study.db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        # Percent-encoded special characters (the right way to write them).
        ("postgresql://u:s3cret%3Ap%40ss%2Fw0rd@h/db", "postgresql://u:***@h/db"),
        # Unencoded "@" and "/" in the password: must not leak the part after the first "@".
        ("postgresql://u:secret@pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:sec/ret@h/db", "postgresql://u:***@h/db"),
        # libpq also takes the password as a query parameter.
        ("postgresql://u@h/db?password=secretpw&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
        # Not parsable by SQLAlchemy: fallback masking, other text unchanged.
        ("notaurl", "notaurl"),
        ("weird scheme://u:secretpw@h/db", "weird scheme://u:***@h/db"),
    ],
)
def test_mask_url(url: str, expected: str) -> None:
    masked = mask_url(url)
    assert masked == expected
    assert "secret" not in masked and "p%40ss" not in masked


def test_mask_url_keeps_everything_but_the_password() -> None:
    url = "postgresql+psycopg://worker:pw%40x@gpu-host-3:6543/studies?sslmode=require"
    original, masked = make_url(url), make_url(mask_url(url))
    assert masked.password == "***"
    assert (masked.drivername, masked.username, masked.host, masked.port, masked.database, dict(masked.query)) == (
        original.drivername, original.username, original.host, original.port, original.database, dict(original.query)
    )


# --- bad input: one line, names the flag ------------------------------------------

def test_not_a_url_is_one_line_naming_storage() -> None:
    with pytest.raises(SensisearchError) as info:
        open_storage("notaurl", 5)
    message = assert_one_line(info.value)
    assert message.startswith("--storage notaurl:") and "sqlite:///" in message


def test_sqlite_in_missing_folder_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(SensisearchError) as info:
        open_storage(f"sqlite:///{missing / 'study.db'}", 5)
    message = assert_one_line(info.value)
    assert message.startswith("--storage sqlite:///") and f"folder {missing} does not exist" in message
    assert not missing.exists()  # nothing was created on the way


def test_unknown_scheme_and_driver_are_refused() -> None:
    with pytest.raises(SensisearchError, match=r"^--storage redis://h/0: unsupported database 'redis'"):
        open_storage("redis://h/0", 5)
    with pytest.raises(SensisearchError, match=r"unsupported PostgreSQL driver 'asyncpg'") as info:
        open_storage("postgresql+asyncpg://u:secretpw@h/db", 5)
    assert "secretpw" not in str(info.value)


@pytest.mark.parametrize("heartbeat", [0, -3, 1.5])
def test_bad_heartbeat_blames_its_own_flag(heartbeat: object, tmp_path: Path) -> None:
    with pytest.raises(SensisearchError) as info:
        open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat)  # type: ignore[arg-type]
    message = assert_one_line(info.value)
    assert message.startswith(f"--heartbeat-seconds {heartbeat}:") and "--storage" not in message
    assert not (tmp_path / "study.db").exists()


def test_missing_driver_says_what_to_install() -> None:
    if _importable("MySQLdb"):
        pytest.skip("mysqlclient is installed here")
    with pytest.raises(SensisearchError) as info:
        open_storage("mysql://root:secretpw@127.0.0.1:1/optuna", 5)
    message = assert_one_line(info.value)
    assert "secretpw" not in message and "mysql://root:***@127.0.0.1:1/optuna" in message and "pip install" in message


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --- SQLite -------------------------------------------------------------------------

def test_sqlite_two_workers_started_together_on_a_fresh_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run_workers(url, "shared", workers=2, n_trials=4)
    study = optuna.load_study(storage=open_storage(url, 5), study_name="shared")
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.COMPLETE) == 8


# --- PostgreSQL: connection problems ----------------------------------------------

def test_wrong_password_is_masked_and_says_what_to_do(postgres_server: PostgresServer) -> None:
    url = postgres_server.url("sensisearch", password="wrongSecret99")
    with pytest.raises(SensisearchError) as info:
        open_storage(url, 5)
    message = assert_one_line(info.value)
    assert "wrongSecret99" not in message
    assert message.startswith(f"--storage {mask_url(url)}:")
    assert "authentication failed" in message and "check the user and password" in message


def test_missing_database(postgres_server: PostgresServer) -> None:
    url = postgres_server.url("no_such_db")
    with pytest.raises(SensisearchError) as info:
        open_storage(url, 5)
    message = assert_one_line(info.value)
    assert "database does not exist" in message and postgres_server.password not in message


def test_refused_port_is_one_masked_line() -> None:
    # A port nobody listens on: bind to get a free one, then close it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://u:secretpw@127.0.0.1:{port}/db"
    with pytest.raises(SensisearchError) as info:
        open_storage(url, 5)
    message = assert_one_line(info.value)
    assert message.startswith(f"--storage postgresql://u:***@127.0.0.1:{port}/db:")
    assert "secretpw" not in message and "connection refused" in message and "check the host and port" in message


def test_silent_server_fails_by_connect_timeout() -> None:
    """A server that accepts TCP but never answers (a hung host) must not hang the worker."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever reads
        port = silent.getsockname()[1]
        with pytest.raises(SensisearchError) as info:
            open_storage(f"postgresql://u:secretpw@127.0.0.1:{port}/db", 5, connect_timeout_seconds=2)
    message = assert_one_line(info.value)
    assert "did not answer in time" in message and "secretpw" not in message


# --- PostgreSQL: real studies ------------------------------------------------------

def test_postgres_open_uses_psycopg3_and_logs_masked(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="sensisearch"):
        storage = open_storage(postgres_url, 5)
    assert storage.engine.dialect.driver == "psycopg"
    # Pooled for long runs: dead connections replaced, a hung server fails within the timeout.
    assert storage.engine_kwargs["pool_pre_ping"] is True
    assert storage.engine_kwargs["connect_args"]["connect_timeout"] > 0
    assert mask_url(postgres_url) in caplog.text
    assert postgres_server.password not in caplog.text and "s3cret" not in caplog.text
    # The tables exist right after opening: the connection was made and checked.
    tables = {row[0] for row in sql_rows(postgres_server, "sensisearch", "SELECT tablename FROM pg_tables")}
    assert {"studies", "trials", "trial_heartbeats", "alembic_version"} <= tables


def test_postgres_two_workers_share_one_study(postgres_server: PostgresServer) -> None:
    database = "two_workers"
    url = postgres_server.create_database(database)
    optuna.create_study(storage=open_storage(url, 5), study_name="shared")
    run_workers(url, "shared", workers=2, n_trials=5)

    study = optuna.load_study(storage=open_storage(url, 5), study_name="shared")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 10
    assert sorted(t.number for t in study.trials) == list(range(10))
    for trial in complete:
        assert trial.value == pytest.approx((trial.params["x"] - 2) ** 2)
    # The database's own count, not Optuna's.
    [(count,)] = sql_rows(postgres_server, database, "SELECT count(*) FROM trials WHERE state = 'COMPLETE'")
    assert count == 10


def test_postgres_fresh_database_two_workers_race_to_create_tables(postgres_server: PostgresServer) -> None:
    """Two runs started together on an empty database: both must get a storage (no IntegrityError)."""
    for attempt in range(3):  # several fresh databases: the race window is narrow
        database = f"fresh_race_{attempt}"
        url = postgres_server.create_database(database)
        run_workers(url, "shared", workers=2, n_trials=2)
        [(count,)] = sql_rows(postgres_server, database, "SELECT count(*) FROM trials WHERE state = 'COMPLETE'")
        assert count == 4


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # fail_stale_trials
def test_postgres_killed_worker_trial_is_failed_and_requeued(postgres_server: PostgresServer) -> None:
    database = "heartbeat"
    url = postgres_server.create_database(database)
    optuna.create_study(storage=open_storage(url, 1), study_name="overnight")

    worker = subprocess.Popen(
        [sys.executable, "-c", HANGING_WORKER, url, "overnight"],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = worker.stdout.readline()
        assert line.startswith("RUNNING"), worker.stderr.read()
        number = int(line.split()[1])
        # Kill only once the worker's heartbeat is in the database, as on a real host.
        deadline = time.monotonic() + 60
        while not sql_rows(postgres_server, database, "SELECT 1 FROM trial_heartbeats"):
            assert time.monotonic() < deadline, "no heartbeat recorded"
            time.sleep(0.2)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.communicate(timeout=60)
    assert worker.returncode == -signal.SIGKILL

    study = optuna.load_study(storage=open_storage(url, 1), study_name="overnight")
    killed = study.trials[number]
    assert killed.state == optuna.trial.TrialState.RUNNING  # nobody has noticed yet
    deadline = time.monotonic() + 60
    while study._storage.get_trial(killed._trial_id).state == optuna.trial.TrialState.RUNNING:
        assert time.monotonic() < deadline, "the stale trial was never failed"
        time.sleep(0.5)  # the grace period is 2 heartbeats
        optuna.storages.fail_stale_trials(study)

    trials = study.get_trials(deepcopy=False)
    assert trials[number].state == optuna.trial.TrialState.FAIL
    waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(waiting) == 1
    assert waiting[0].params == killed.params
    assert waiting[0].system_attrs["failed_trial"] == number
    [(state,)] = sql_rows(postgres_server, database, "SELECT state FROM trials WHERE number = %s", number)
    assert state == "FAIL"

    # The next worker runs the queued configuration, not a new one.
    study.optimize(lambda t: t.suggest_float("x", -10, 10) + t.suggest_int("layers", 1, 64), n_trials=1)
    rerun = study.trials[waiting[0].number]
    assert rerun.state == optuna.trial.TrialState.COMPLETE and rerun.params == killed.params
