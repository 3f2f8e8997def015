"""Shared fixtures.

Real data lives outside the repo: ``SENSISEARCH_SHARED_DATA`` (default
``<repo>/../shared/data``). Tests that need it skip with the reason when it is
missing, so a user's checkout without it still runs the rest.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
"""The tests folder: ``tests/data`` and the test backends a trial child imports live here."""


def shared_data_dir() -> Path:
    return Path(os.environ.get("SENSISEARCH_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def require_shared(*parts: str) -> Path:
    """Path inside the shared data folder, or skip the test saying what is missing."""
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: set SENSISEARCH_SHARED_DATA to the shared/data folder (see README)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return require_shared("mnist")


@pytest.fixture(scope="session")
def yolo_model() -> Path:
    return require_shared("yolov5n.onnx")


@pytest.fixture(scope="session")
def coco_dev() -> Path:
    return require_shared("coco-dev")


# --- PostgreSQL (issue 12): a throwaway server for the study-storage tests ---------

REQUIRE_POSTGRES_ENV = "SENSISEARCH_REQUIRE_POSTGRES"


def postgres_bin_dir() -> Path | None:
    """Folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<major>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]), reverse=True)
    return debian[0].parent if debian else None


@dataclass
class PostgresServer:
    """A PostgreSQL server on a unix socket in a private temp folder (no TCP at all)."""

    bin_dir: Path
    root: Path
    run_as: str | None
    superuser_password: str = field(default_factory=lambda: secrets.token_hex(12))
    user: str = "sensisearch"
    password: str = "s3cret:p@ss/w0rd"  # special characters: URLs must encode them, logs must mask them

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _command(self, *args: str) -> list[str]:
        # initdb and the server refuse to run as root: drop to the postgres user.
        return ["runuser", "-u", self.run_as, "--", *args] if self.run_as else list(args)

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        if self.run_as:
            shutil.chown(pwfile, self.run_as)
        subprocess.run(
            self._command(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                          "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-sync"),
            check=True, capture_output=True, text=True,
        )
        # No TCP listener (listen_addresses=''): the socket lives in root, nothing else sees it.
        options = f"-k {self.root} -c listen_addresses='' -c fsync=off -c max_connections=60"
        subprocess.run(
            self._command(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.root / "log"),
                          "-o", options, "-w", "-t", "60", "start"),
            check=True, capture_output=True, text=True,
        )
        import psycopg  # the postgres extra, installed with dev

        with psycopg.connect(host=str(self.root), user="postgres", password=self.superuser_password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    psycopg.sql.Identifier(self.user), psycopg.sql.Literal(self.password)
                )
            )
        self.create_database("sensisearch")

    def stop(self) -> None:
        subprocess.run(
            self._command(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"),
            check=False, capture_output=True,
        )

    def create_database(self, name: str) -> str:
        """A new empty database owned by the test user; returns its URL (password URL-encoded)."""
        import psycopg

        with psycopg.connect(host=str(self.root), user="postgres", password=self.superuser_password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    psycopg.sql.Identifier(name), psycopg.sql.Identifier(self.user)
                )
            )
        return self.url(name)

    def url(self, database: str, password: str | None = None) -> str:
        secret = quote(self.password if password is None else password, safe="")
        return f"postgresql://{self.user}:{secret}@/{database}?host={quote(str(self.root), safe='/')}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session; skipped only when no PostgreSQL is installed.

    Under ``SENSISEARCH_REQUIRE_POSTGRES=1`` (set by .ci/run, which installs it) a
    missing server fails instead, so CI cannot silently skip these tests.
    """
    required = os.environ.get(REQUIRE_POSTGRES_ENV) == "1"
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        reason = "PostgreSQL not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin)"
        if required:
            pytest.fail(f"{reason}, but {REQUIRE_POSTGRES_ENV}=1")
        pytest.skip(reason)
    run_as = None
    if os.geteuid() == 0:
        run_as = "postgres"
        try:
            pwd.getpwnam(run_as)
        except KeyError:
            pytest.fail("running as root needs a 'postgres' user for initdb (the Debian postgresql package creates it)")
    # Not under pytest's tmp dir: that is private to root, and the server runs as postgres.
    # Short path too: a unix socket path must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="sensisearch-pg-"))
    if run_as:
        shutil.chown(root, run_as, run_as)
    server = PostgresServer(bin_dir=bin_dir, root=root, run_as=run_as)
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {exc.stderr or exc.stdout} {log}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL (with password) of a database on the throwaway server, shared by the session."""
    return postgres_server.url("sensisearch")


# --------------------------------------------------------------------------- YOLOv5n on coco-dev, once per session
@pytest.fixture(scope="session")
def coco_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("coco-cache")


@pytest.fixture(scope="session")
def coco_evaluator(yolo_model: Path, coco_dev: Path, coco_cache: Path):  # noqa: ANN201 - CocoDetectionEvaluator
    """The detector evaluator exactly as `sensisearch run` builds it from its flags."""
    from sensisearch.evaluation.detection import CocoDetectionEvaluator
    from sensisearch.study.config._settings import StudySettings
    from sensisearch.study.config._inputs import build_evaluation, resolve_inputs

    settings = StudySettings(
        model=yolo_model, eval_data=coco_dev / "images", annotations=coco_dev / "instances.json", cache_dir=coco_cache
    )
    resolved = resolve_inputs(settings)
    setup = build_evaluation(resolved.settings, resolved.input_spec, resolved.model, coco_cache, False)
    assert setup.task == "detection" and isinstance(setup.evaluator, CocoDetectionEvaluator)
    return setup.evaluator


@pytest.fixture(scope="session")
def yolo_fp32_predictions(coco_evaluator, yolo_model: Path):  # noqa: ANN001, ANN201 - DetectionPredictions
    """All 170 images through FP32 YOLOv5n on ONNX Runtime, once per test session."""
    from sensisearch.backends.onnxruntime import OnnxRuntimeBackend

    with OnnxRuntimeBackend().load(yolo_model) as runner:
        return coco_evaluator.predict(runner)


SHARED_DATA_FIXTURES = frozenset({"shared_data", "mnist_dir", "yolo_model", "coco_dev", "coco_evaluator", "yolo_fp32_predictions", "coco_cache"})
SERVICE_FIXTURES = frozenset({"postgres_server", "postgres_url"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Label what a test needs beyond the repo: ``tests/integration/`` (shared data, PostgreSQL or a
    browser), and, elsewhere, tests whose fixtures read the shared data or start a service. The pure
    tests are then ``-m "not integration and not shared_data and not service"``."""
    integration = TESTS / "integration"
    for item in items:
        if integration in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
        names = set(getattr(item, "fixturenames", ()))
        if names & SHARED_DATA_FIXTURES:
            item.add_marker(pytest.mark.shared_data)
        if names & SERVICE_FIXTURES:
            item.add_marker(pytest.mark.service)
