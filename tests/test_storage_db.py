"""The database layer: where it lives, how connections are set up, readiness, and gevent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from flask import Flask

from app import db
from app.settings import Settings

if TYPE_CHECKING:
    from tests.postgres import Cluster

pytest_plugins = ["tests.postgres"]

REPO = Path(__file__).resolve().parent.parent


def test_default_sqlite_database_is_created_under_instance_on_first_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = db.create_engine(Settings().database_url)
    db.upgrade(engine)
    engine.dispose()
    assert (tmp_path / "instance" / "chatproxy.db").is_file()


def test_sqlite_connections_use_wal_a_busy_timeout_and_foreign_keys(tmp_path):
    engine = db.create_engine(f"sqlite:///{tmp_path / 'chatproxy.db'}")
    with engine.connect() as connection:
        pragma = lambda name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("busy_timeout") == db.SQLITE_BUSY_TIMEOUT_MS
        assert pragma("foreign_keys") == 1
    engine.dispose()


@pytest.mark.parametrize(
    ("database_url", "driver"),
    [
        ("postgresql://u:p@db.internal:5432/chat", "postgresql+psycopg"),
        ("postgres://u:p@db.internal/chat", "postgresql+psycopg"),
        ("postgresql+psycopg://u@db.internal/chat", "postgresql+psycopg"),
        ("sqlite:///instance/chatproxy.db", "sqlite"),
    ],
)
def test_postgresql_urls_use_psycopg_3(database_url, driver):
    assert db.engine_url(database_url).drivername == driver


def test_other_databases_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="unsupported database 'mysql'"):
        db.create_engine("mysql://u@localhost/chat")


def test_ping_is_true_while_the_database_answers(engine):
    assert db.ping(engine) is True


def test_ping_is_false_when_the_database_is_down():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # nothing listens once the socket closes
    engine = db.create_engine(f"postgresql://nobody:none@127.0.0.1:{closed_port}/none")
    assert db.ping(engine) is False


def test_init_app_migrates_and_keeps_the_engine(database_url):
    app = Flask(__name__)
    app.config["SETTINGS"] = Settings(database_url=database_url)
    engine = db.init_app(app)
    assert app.extensions["db"] is engine
    assert db.schema_revision(engine) == "0002"
    assert db.ping(engine)
    engine.dispose()


def test_autocommit_work_leaves_pooled_connections_transactional(engine):
    # A fresh engine used by one caller at a time: its pool holds one connection, reused below.
    engine = db.create_engine(engine.url.render_as_string(hide_password=False))
    with db.autocommit(engine).connect() as connection:
        connection.execute(sa.select(db.ledger.c.id)).all()
    with engine.connect() as connection:
        connection.execute(
            db.conversations.insert(),
            {
                "id": "rolled-back",
                "client": "alice",
                "title": "t",
                "model": "m",
                "created_at": db.utc_now(),
                "updated_at": db.utc_now(),
            },
        )
        connection.rollback()
    with engine.connect() as connection:
        assert connection.execute(sa.select(db.conversations.c.id)).all() == []
    assert engine.pool.checkedin() == 1
    engine.dispose()


def test_text_postgresql_refuses_is_made_storable():
    assert db.clean_text("a\x00b") == "a\ufffdb"
    assert db.clean_text("lone \ud800 surrogate") == "lone ? surrogate"
    assert db.clean_text("你好") == "你好"


# Imports psycopg before gevent patches, as a preloaded app would: the engine must still let
# other greenlets run while a query waits on the server.
GEVENT_PROBE = textwrap.dedent(
    """
    import sys, time
    import psycopg  # noqa: F401 - before the patch, on purpose
    from gevent import monkey
    monkey.patch_all()
    import gevent
    import sqlalchemy as sa
    from app import db

    engine = db.create_engine(sys.argv[1])
    ticks = 0

    def tick():
        global ticks
        while True:
            gevent.sleep(0.02)
            ticks += 1

    def query():
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_sleep(0.4)"))

    gevent.spawn(tick)
    started = time.monotonic()
    gevent.joinall([gevent.spawn(query) for _ in range(4)], raise_error=True)
    print(f"{time.monotonic() - started:.2f} {ticks}")
    """
)


def test_postgresql_queries_do_not_block_the_gevent_worker(postgres: Cluster):
    result = subprocess.run(
        [sys.executable, "-c", GEVENT_PROBE, postgres.url("postgres")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    elapsed, ticks = result.stdout.split()
    # Four 0.4 s queries at once take 0.4 s, not 1.6 s, and the ticker kept running meanwhile.
    assert float(elapsed) < 1.2, result.stdout
    assert int(ticks) >= 10, result.stdout


def test_a_forked_child_opens_its_own_connections(engine):
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    assert engine.pool.checkedin() == 1
    pid = os.fork()
    if pid == 0:  # the child: the pool it inherited is empty, its parent's socket untouched
        os._exit(0 if engine.pool.checkedin() == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert db.ping(engine)
