"""Schema migrations: old databases keep working, and concurrent starts migrate once.

`fixtures/schema_0001.db` was made by the first schema (revision 0001: `db.upgrade(engine,
"0001")`, then one conversation with two messages and one ledger row, journal mode DELETE so
that it is one file). It is never modified: tests migrate a copy.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from app import db
from app.services.conversations import Conversations
from app.services.ledger import Ledger
from tests.conftest import REPO

pytest_plugins = ["tests.postgres"]

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "schema_0001.db"
HEAD = "0002"
STARTERS = 6


def _first_schema_database(database_url: str, tmp_path: Path) -> sa.Engine:
    """A database at revision 0001 holding the fixture's rows: the file itself on SQLite, its
    rows copied into a PostgreSQL database migrated to 0001 otherwise."""
    if database_url.startswith("sqlite"):
        copy = tmp_path / "old.db"
        shutil.copy(FIXTURE, copy)
        return db.create_engine(f"sqlite:///{copy}")
    engine = db.create_engine(database_url)
    db.upgrade(engine, "0001")
    source = sqlite3.connect(f"file:{FIXTURE}?mode=ro", uri=True)
    source.row_factory = sqlite3.Row
    with engine.begin() as connection:
        for table in ("conversations", "messages", "ledger"):
            rows = [dict(row) for row in source.execute(f"SELECT * FROM {table} ORDER BY rowid")]
            connection.execute(db.metadata.tables[table].insert(), _typed(table, rows))
    source.close()
    return engine


def _typed(table: str, rows: list[dict]) -> list[dict]:
    """SQLite's text and integers as the column types (timestamps are naive UTC there); the
    serial keys are left to PostgreSQL's sequences, which count on from them as they would."""
    columns = db.metadata.tables[table].columns
    for row in rows:
        for name in [name for name in row if columns[name].autoincrement is True]:
            del row[name]
        for name, value in row.items():
            if isinstance(columns[name].type, db.UtcDateTime):
                row[name] = dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)
            elif isinstance(columns[name].type, sa.Date):
                row[name] = dt.date.fromisoformat(value)
            elif isinstance(columns[name].type, sa.Boolean):
                row[name] = bool(value)
    return rows


def _index_names(engine: sa.Engine, table: str) -> set[str]:
    return {index["name"] for index in sa.inspect(engine).get_indexes(table)}


def test_a_database_of_the_first_schema_migrates_and_keeps_its_rows(database_url, tmp_path):
    engine = _first_schema_database(database_url, tmp_path)
    assert db.schema_revision(engine) == "0001"
    assert "ix_conversations_client" in _index_names(engine, "conversations")

    db.upgrade(engine)

    assert db.schema_revision(engine) == HEAD
    indexes = _index_names(engine, "conversations")
    assert "ix_conversations_client_updated_at_id" in indexes
    assert "ix_conversations_client" not in indexes
    conversation = Conversations(engine).get("alice", "fixtureConversation0001")
    assert conversation["title"] == "Fixture: 你好"
    assert conversation["system"] == "Be brief."
    assert conversation["created_at"] == "2025-01-15T10:00:00.000000Z"
    assert [(m["role"], m["content"], m["partial"]) for m in conversation["messages"]] == [
        ("user", "Hello, 世界", False),
        ("assistant", "Hi! 你好", True),
    ]
    # The old database takes new rows, and its ledger row still counts.
    Conversations(engine).add_message("alice", "fixtureConversation0001", "user", "Still here?")
    clock = lambda: dt.datetime(2025, 1, 20, 12, tzinfo=dt.UTC)  # noqa: E731
    usage = Ledger(engine, clock=clock).usage("alice", days=30)
    assert usage["data"] == [
        {
            "date": "2025-01-15",
            "model": "gpt-4o-mini",
            "requests": 1,
            "prompt_tokens": 12,
            "completion_tokens": 5,
            "total_tokens": 17,
            "cost_usd": 0.000005,
        }
    ]
    assert (
        Ledger(engine).record(
            request_id="fixture-request-1",
            client="alice",
            model="gpt-4o-mini",
            endpoint="/chat",
            prompt_tokens=1,
            completion_tokens=1,
        )
        is False
    )  # its exactly-once key survived the migration
    engine.dispose()


def test_schema_revision_names_the_newest_migration():
    # A start compares the database with this constant instead of asking Alembic.
    assert ScriptDirectory(str(db.MIGRATIONS)).get_heads() == [db.SCHEMA_REVISION]


# One process starting the service: whether it had to import Alembic.
START_PROBE = (
    "import sys; from app import db; db.upgrade(db.create_engine(sys.argv[1])); "
    "print('alembic' in sys.modules)"
)


def test_only_a_start_that_migrates_imports_alembic(database_url):
    def start() -> str:
        return subprocess.run(
            [sys.executable, "-c", START_PROBE, database_url],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
            timeout=60,
        ).stdout.strip()

    engine = db.create_engine(database_url)
    assert db.schema_revision(engine) is None  # a new database
    assert start() == "True"
    assert db.schema_revision(engine) == HEAD
    assert start() == "False"
    engine.dispose()


def test_the_migrated_schema_is_exactly_the_tables_the_code_uses(engine):
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), db.metadata) == []


def test_upgrading_a_current_database_changes_nothing(engine):
    db.upgrade(engine)
    db.upgrade(engine)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [
            (HEAD,)
        ]


def test_a_database_from_a_newer_version_is_refused_with_a_clear_error(database_url):
    engine = db.create_engine(database_url)
    db.upgrade(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(RuntimeError, match="newer version of the service"):
        db.upgrade(engine)
    engine.dispose()


def _start(database_url: str, barrier, results) -> None:
    """One process starting the service: its own engine, then the migration."""
    engine = db.create_engine(database_url)
    barrier.wait(timeout=20)
    try:
        db.upgrade(engine)
        results.put("ok")
    except Exception as exc:  # reported to the test, which shows it
        results.put(f"{type(exc).__name__}: {exc}")
    finally:
        engine.dispose()


def test_several_processes_starting_at_once_migrate_an_empty_database_once(database_url):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(STARTERS), context.Queue()
    starters = [
        context.Process(target=_start, args=(database_url, barrier, results))
        for _ in range(STARTERS)
    ]
    for process in starters:
        process.start()
    for process in starters:
        process.join(timeout=60)
    assert [results.get(timeout=5) for _ in starters] == ["ok"] * STARTERS
    assert [process.exitcode for process in starters] == [0] * STARTERS

    engine = db.create_engine(database_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [
            (HEAD,)
        ]
        assert compare_metadata(MigrationContext.configure(connection), db.metadata) == []
    engine.dispose()
