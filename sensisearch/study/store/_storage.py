"""Open the study storage (SQLite, PostgreSQL, MySQL) safely, before any long work.

Overnight studies run one worker per GPU, often on several hosts, all sharing one
Optuna RDB storage. This module is the one place that

- masks credentials: a storage URL is only ever shown through :func:`mask_url`;
- checks the URL, the driver and the connection right away, so a typo, a missing
  driver, a refused connection or a wrong password is one :class:`SensisearchError`
  line naming ``--storage`` before calibration starts;
- sizes the connection pool for many workers and survives the table-creation race
  of several workers starting together on a fresh database.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

import optuna
import sqlalchemy.event
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from sensisearch.errors import SensisearchError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Engine

log = logging.getLogger(__name__)

STORAGE_FLAG = "--storage"
HEARTBEAT_FLAG = "--heartbeat-seconds"

# How often a heartbeat-stale trial is queued again: once covers a killed worker;
# a configuration that kills its worker every time must not loop forever.
STALE_TRIAL_MAX_RETRY = 1

# Per-process pool for servers (PostgreSQL, MySQL). Optuna uses one session per
# thread: the worker's main thread plus its heartbeat thread, hence 2 kept open;
# a short burst may open a few more. With N workers the server sees about 2N
# connections, well under PostgreSQL's default max_connections=100 for a GPU farm.
POOL_SIZE = 2
POOL_MAX_OVERFLOW = 3
# Overnight, idle connections get cut by firewalls, NAT and server restarts:
# pre-ping replaces a dead connection instead of failing the trial, and recycling
# after an hour keeps connections younger than typical idle cut-offs.
POOL_RECYCLE_SECONDS = 3600
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10
# SQLite serialises writers with a file lock; several local workers must wait for
# it rather than fail with "database is locked" (Python's default wait is 5 s).
SQLITE_LOCK_TIMEOUT_SECONDS = 60

# Workers starting together on a fresh database race to create Optuna's tables
# (IntegrityError / "already exists"); the loser retries after the winner is done.
CREATE_ATTEMPTS = 4

# Drivers this module knows how to check and tune, by dialect. The module imported
# is what SQLAlchemy's dialect imports; the extra is how a user installs it.
POSTGRES_DRIVERS = {"psycopg": "psycopg", "psycopg2": "psycopg2"}
KNOWN_DIALECTS = ("sqlite", "postgresql", "mysql")
MYSQL_DRIVER_MODULES = {"mysqldb": "MySQLdb", "pymysql": "pymysql", "mysqlconnector": "mysql.connector"}
# Query-string parameters that carry a password (libpq accepts ?password=...).
PASSWORD_QUERY_KEYS = ("password", "passwd", "pwd")
MASK = "***"


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``; safe to print, log and store.

    URLs SQLAlchemy parses are rendered by it (password hidden, also a
    ``?password=`` query parameter); anything else goes through a conservative
    fallback that masks everything between the user name and the last ``@``.
    """
    text = str(url)
    head, sep, rest = text.partition("://")
    authority = rest.split("/", 1)[0] if sep else ""
    # An unencoded "@" inside the password makes SQLAlchemy split at the first "@"
    # and show the password's tail as the host: mask up to the last "@" instead.
    ambiguous = rest.count("@") > 1 or authority.count("@") > 1
    if not ambiguous:
        try:
            parsed = make_url(text)
        except (sqlalchemy.exc.ArgumentError, ValueError, TypeError):
            parsed = None
        if parsed is not None:
            hidden = {key: MASK for key in parsed.query if key.lower() in PASSWORD_QUERY_KEYS}
            if hidden:
                parsed = parsed.update_query_dict(hidden)
            return parsed.render_as_string(hide_password=True).replace(quote(MASK, safe=""), MASK)
    return _mask_unparsed(text)


def _mask_unparsed(text: str) -> str:
    """Fallback for strings SQLAlchemy cannot parse: mask userinfo's password and ``password=`` values."""
    head, sep, rest = text.partition("://")
    if sep and "@" in rest:
        userinfo, host = rest.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + MASK
        text = f"{head}{sep}{userinfo}@{host}"
    keys = "|".join(PASSWORD_QUERY_KEYS)
    return re.sub(rf"(?i)\b({keys})=[^&\s]*", rf"\1={MASK}", text)


def open_storage(
    url: str,
    heartbeat_seconds: int,
    *,
    connect_timeout_seconds: int = DEFAULT_CONNECT_TIMEOUT_SECONDS,
) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats, connected and checked now.

    A worker that dies (kill -9, lost host) stops sending heartbeats; after
    ``2 * heartbeat_seconds`` any worker sharing the storage marks its trial FAILED
    and queues the same configuration again (:data:`STALE_TRIAL_MAX_RETRY` times).

    ``postgresql://`` uses psycopg 3 when it is installed (the ``postgres`` extra).
    Every problem a user can fix (bad URL, missing folder or driver, refused
    connection, wrong password, missing database, outdated schema) raises one
    :class:`SensisearchError` line naming ``--storage`` with the password masked.
    """
    if isinstance(heartbeat_seconds, bool) or not isinstance(heartbeat_seconds, int) or heartbeat_seconds < 1:
        raise SensisearchError(
            f"{HEARTBEAT_FLAG} {heartbeat_seconds}: must be a whole number of seconds >= 1 "
            "(workers report they are alive this often; a dead worker's trial is retried after twice that)"
        )
    parsed = _parse(url)
    masked = mask_url(url)
    dialect = parsed.get_backend_name()
    if dialect == "sqlite":
        _check_sqlite_path(parsed, masked)
    else:
        parsed = _choose_driver(parsed, masked)
    engine_kwargs = _engine_kwargs(parsed, connect_timeout_seconds)
    # Only the driver is changed; passwords with special characters must survive.
    final_url = parsed.render_as_string(hide_password=False)
    secrets = _secrets(url, parsed)

    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            # Heartbeats have been "experimental" in Optuna since 2.8 and are what
            # its docs recommend for this; the warning says nothing to our users.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # The constructor connects, creates the tables if missing and
                # checks the schema version: that is the "check right away".
                storage = optuna.storages.RDBStorage(
                    final_url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_seconds,
                    grace_period=2 * heartbeat_seconds,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=STALE_TRIAL_MAX_RETRY
                    ),
                )
        except ImportError as exc:
            raise SensisearchError(f"{STORAGE_FLAG} {masked}: {_driver_hint(parsed)}") from exc
        except RuntimeError as exc:
            # Raised by Optuna's schema check: the storage was made by another Optuna version.
            raise SensisearchError(
                f"{STORAGE_FLAG} {masked}: {_scrub(_first_line(exc), secrets)}; "
                f"upgrade it with: optuna storage upgrade --storage URL"
            ) from exc
        except sqlalchemy.exc.DBAPIError as exc:
            reason, advice, is_race = _classify(exc, parsed)
            if is_race and attempt < CREATE_ATTEMPTS:
                log.debug("storage %s: creating tables raced another worker (%s); retrying", masked, reason)
                # Jitter so two losers do not collide again.
                time.sleep(0.2 * attempt + random.uniform(0, 0.3))
                continue
            raise SensisearchError(
                f"{STORAGE_FLAG} {masked}: cannot open the study storage ({_scrub(reason, secrets)}); {advice}"
            ) from exc
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise SensisearchError(
                f"{STORAGE_FLAG} {masked}: cannot open the study storage ({_scrub(_first_line(exc), secrets)}); "
                "check the URL"
            ) from exc
        if dialect == "sqlite":
            serialize_sqlite_transactions(storage.engine)
        log.info("study storage %s opened (heartbeat every %d s)", masked, heartbeat_seconds)
        return storage
    raise AssertionError("unreachable: the last attempt returns or raises")


def serialize_sqlite_transactions(engine: Engine) -> None:
    """Make every SQLite transaction ``BEGIN IMMEDIATE`` (two workers on one SQLite file).

    Python's sqlite3 starts a transaction only at the first write, so Optuna's
    read-then-update of a WAITING trial is not atomic: two processes both read it
    as WAITING and both run it ("Cannot tell a COMPLETE trial"). Taking the write
    lock at BEGIN serialises them; SQLAlchemy documents this recipe for pysqlite.
    """
    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection):  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed


def _parse(url: str) -> URL:
    masked = mask_url(url)
    example = "sqlite:///runs/study.db or postgresql://user:password@host:5432/dbname"
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, TypeError) as exc:
        raise SensisearchError(f"{STORAGE_FLAG} {masked}: not a database URL; give one like {example}") from exc
    if parsed.get_backend_name() not in KNOWN_DIALECTS:
        raise SensisearchError(
            f"{STORAGE_FLAG} {masked}: unsupported database '{parsed.get_backend_name()}'; "
            f"use sqlite, postgresql or mysql, e.g. {example}"
        )
    return parsed


def _check_sqlite_path(parsed: URL, masked: str) -> None:
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return  # in-memory (tests) or a URI filename, which SQLite itself checks
    path = Path(database).expanduser()
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise SensisearchError(
            f"{STORAGE_FLAG} {masked}: folder {folder} does not exist; create it or point the URL at an existing folder"
        )
    if path.is_dir():
        raise SensisearchError(f"{STORAGE_FLAG} {masked}: {path} is a folder; give a file name such as {path / 'study.db'}")
    target = path if path.exists() else folder
    if not os.access(target, os.W_OK):
        raise SensisearchError(f"{STORAGE_FLAG} {masked}: {target} is not writable; choose a folder you can write to")


def _module_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _choose_driver(parsed: URL, masked: str) -> URL:
    """Plain ``postgresql://`` -> psycopg 3 when installed; check an explicit driver is known."""
    dialect, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if dialect != "postgresql":
        return parsed
    explicit = "+" in parsed.drivername
    if not explicit:
        # SQLAlchemy's default for postgresql:// is psycopg2, which the postgres
        # extra does not install; psycopg 3 is the maintained driver.
        if _module_installed("psycopg"):
            return parsed.set(drivername="postgresql+psycopg")
        if _module_installed("psycopg2"):
            return parsed
        raise SensisearchError(f"{STORAGE_FLAG} {masked}: {_driver_hint(parsed)}")
    if driver not in POSTGRES_DRIVERS:
        raise SensisearchError(
            f"{STORAGE_FLAG} {masked}: unsupported PostgreSQL driver '{driver}'; "
            "use postgresql:// (psycopg 3), postgresql+psycopg:// or postgresql+psycopg2://"
        )
    if not _module_installed(POSTGRES_DRIVERS[driver]):
        raise SensisearchError(f"{STORAGE_FLAG} {masked}: {_driver_hint(parsed)}")
    return parsed


def _driver_hint(parsed: URL) -> str:
    dialect, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if dialect == "postgresql" and driver == "psycopg2" and "+" in parsed.drivername:
        return "the psycopg2 driver is not installed; pip install psycopg2-binary, or use postgresql:// (psycopg 3)"
    if dialect == "postgresql":
        return "no PostgreSQL driver is installed; install the postgres extra: pip install 'sensisearch[postgres]'"
    module = MYSQL_DRIVER_MODULES.get(driver, driver)
    return f"the MySQL driver '{driver}' (module {module}) is not installed; install it, e.g. pip install pymysql and use mysql+pymysql://"


def _engine_kwargs(parsed: URL, connect_timeout_seconds: int) -> dict[str, object]:
    dialect, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if dialect == "sqlite":
        return {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_SECONDS}}
    kwargs: dict[str, object] = {
        "pool_pre_ping": True,
        "pool_size": POOL_SIZE,
        "max_overflow": POOL_MAX_OVERFLOW,
        "pool_recycle": POOL_RECYCLE_SECONDS,
    }
    # Without a connect timeout an unreachable (firewalled) server hangs a worker
    # for minutes in the kernel's TCP retries before any message.
    if dialect == "postgresql":
        # libpq's own parameter (psycopg 2 and 3); it treats values below 2 as 2.
        kwargs["connect_args"] = {"connect_timeout": connect_timeout_seconds, "application_name": "sensisearch"}
    elif dialect == "mysql" and driver in ("mysqldb", "pymysql"):
        kwargs["connect_args"] = {"connect_timeout": connect_timeout_seconds}
    return kwargs


def _secrets(url: str, parsed: URL) -> list[str]:
    """Every spelling of the password that could appear in a driver's message."""
    found = {parsed.password or ""}
    found |= {str(value) for key, value in parsed.query.items() if key.lower() in PASSWORD_QUERY_KEYS}
    found |= {quote(item, safe="") for item in list(found)} | {unquote(item) for item in list(found)}
    return sorted((item for item in found if item), key=len, reverse=True)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# (pattern in the driver's message, short reason, what to do). First match wins.
_CONNECTION_PROBLEMS = (
    (r"password authentication failed|access denied|authentication failed|no password supplied",
     "authentication failed", "check the user and password in the URL"),
    (r"database \S+ does not exist|unknown database",
     "the database does not exist", "create it first (e.g. createdb NAME) or fix the database name in the URL"),
    (r"timeout expired|timed out|connection timeout",
     "the server did not answer in time", "check the host and port, the firewall, and that the server is running"),
    (r"connection refused|can't connect|could not connect|no such file or directory|is the server running",
     "connection refused", "check the host and port and that the server is running"),
    (r"could not translate host name|name or service not known|unknown host|nodename nor servname",
     "unknown host", "check the host name in the URL"),
    (r"unable to open database file",
     "SQLite cannot open the file", "check the path and that the folder is writable"),
    (r"role \S+ does not exist",
     "the user does not exist", "check the user name in the URL"),
)
# What two workers creating the same tables at once look like, per database.
_RACE_PATTERNS = r"already exists|duplicate key|unique constraint|database is locked|deadlock detected"


def _classify(exc: sqlalchemy.exc.DBAPIError, parsed: URL) -> tuple[str, str, bool]:
    """(reason, advice, is_creation_race) for a driver error."""
    message = str(exc.orig) if exc.orig is not None else str(exc)
    lowered = message.lower()
    if not exc.connection_invalidated:
        if isinstance(exc, sqlalchemy.exc.IntegrityError) or re.search(_RACE_PATTERNS, lowered):
            return _first_line(exc.orig or exc), "another process may be creating the tables; retry", True
    for pattern, reason, advice in _CONNECTION_PROBLEMS:
        if re.search(pattern, lowered):
            return reason, advice, False
    return _first_line(exc.orig or exc), "check the URL and that the database server is running", False
