"""A throwaway PostgreSQL server for the storage tests, and the `engine` they all run on.

Test modules load this with `pytest_plugins = ["tests.postgres"]`. Once per session it creates a
cluster with Debian's `initdb` under a temporary directory, serves it on 127.0.0.1 at a free
port (and a socket in that directory), and stops it at the end. Databases are cloned from a
migrated template (`CREATE DATABASE … TEMPLATE`): `engine` is one per test module, emptied
before each test; `database_url` is a new, unmigrated one for each test. Without the server
binaries the PostgreSQL variants fail: a storage promise tested on SQLite alone is not kept
(`make test` installs the `postgresql` package).
"""

from __future__ import annotations

import glob
import itertools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from app import db

BINARIES = "/usr/lib/postgresql/*/bin"
TEMPLATE = "chatproxy_template"
SUPERUSER = "postgres"
START_ATTEMPTS = 3
DATABASES = ("sqlite", "postgresql")


def _binaries() -> Path:
    found = sorted(
        (Path(path) for path in glob.glob(BINARIES) if (Path(path) / "initdb").exists()),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
    )
    if not found:
        pytest.fail(
            f"PostgreSQL server binaries not found ({BINARIES}/initdb and pg_ctl): install "
            "Debian's postgresql package (`make test` does when run as root)",
            pytrace=False,
        )
    return found[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A PostgreSQL server owned by this test session."""

    def __init__(self, root: Path, binaries: Path) -> None:
        self.bin = binaries
        self.version = int(self.bin.parent.name) if self.bin.parent.name.isdigit() else 0
        self.root = root
        self.data = root / "data"
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        # As root, the server must run as an ordinary user: Debian's `postgres`.
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", SUPERUSER, "--"]
            shutil.chown(root, SUPERUSER, SUPERUSER)
        self._names = itertools.count(1)

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self._as_user, *args], capture_output=True, text=True, timeout=60, cwd=self.root
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(self.password)
        if self._as_user:
            shutil.chown(password_file, SUPERUSER, SUPERUSER)
        self._run(
            str(self.bin / "initdb"),
            f"--pgdata={self.data}",
            f"--username={SUPERUSER}",
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        password_file.unlink()
        for attempt in range(START_ATTEMPTS):  # another process may take the free port first
            self.port = _free_port()
            options = " ".join(
                (
                    "-c listen_addresses=127.0.0.1",
                    f"-c port={self.port}",
                    f"-c unix_socket_directories={self.root}",
                    "-c max_connections=300",
                    # A throwaway server: durability only costs time here.
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                )
            )
            try:
                self._run(
                    str(self.bin / "pg_ctl"),
                    f"--pgdata={self.data}",
                    f"--log={self.root / 'server.log'}",
                    f"--options={options}",
                    "--wait",
                    "start",
                )
                return
            except RuntimeError as exc:
                if attempt == START_ATTEMPTS - 1:
                    log = self.root / "server.log"
                    raise RuntimeError(log.read_text() if log.exists() else str(exc)) from exc

    def stop(self) -> None:
        if self.data.exists():
            try:
                self._run(
                    str(self.bin / "pg_ctl"), f"--pgdata={self.data}", "-m", "immediate", "stop"
                )
            except (RuntimeError, subprocess.TimeoutExpired):
                pass

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def execute(self, statement: str) -> None:
        """A statement outside a transaction (CREATE DATABASE cannot run in one)."""
        engine = sa.create_engine(
            db.engine_url(self.url("postgres")), poolclass=sa.pool.NullPool
        ).execution_options(isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.exec_driver_sql(statement)
        engine.dispose()

    def new_database(self, template: str = "template0") -> str:
        """A fresh database's URL: empty from `template0`, migrated from `TEMPLATE`."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        # PostgreSQL 15's default strategy WAL-logs every page of the copy: several times slower.
        strategy = " STRATEGY FILE_COPY" if self.version >= 15 else ""
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{strategy}')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """The session's PostgreSQL server, with a migrated template database."""
    binaries = _binaries()  # fails the PostgreSQL variants first thing when missing
    root = Path(tempfile.mkdtemp(prefix="chatproxy-pg-"))
    cluster = Cluster(root, binaries)
    try:
        cluster.start()
        cluster.execute(f'CREATE DATABASE "{TEMPLATE}" TEMPLATE template0')
        engine = db.create_engine(cluster.url(TEMPLATE))
        db.upgrade(engine)
        engine.dispose()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, unmigrated database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'chatproxy.db'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(scope="module", params=DATABASES)
def module_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[sa.Engine]:
    """A migrated database of each kind, shared by one test module."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "chatproxy.db"
        engine = db.create_engine(f"sqlite:///{path}")
        db.upgrade(engine)
    else:
        engine = db.create_engine(request.getfixturevalue("postgres").new_database(TEMPLATE))
    yield engine
    engine.dispose()


@pytest.fixture
def engine(module_engine: sa.Engine) -> sa.Engine:
    """A migrated database of each kind, emptied for this test."""
    with module_engine.begin() as connection:
        for table in reversed(db.metadata.sorted_tables):
            connection.execute(table.delete())
    return module_engine
