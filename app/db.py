"""The database: one SQLAlchemy engine per process, the tables, and their migrations.

SQLAlchemy Core rather than the ORM: the services read and write a few flat rows and hand them
straight to JSON, so an identity map, sessions and lazy loading would only add state to keep in
step with gevent's greenlets; the one statement that matters most, the ledger's exactly-once
insert, is dialect-specific SQL (`ON CONFLICT DO NOTHING`) that Core writes directly.

SQLite is the default (`sqlite:///instance/chatproxy.db`, relative to the working directory);
`postgresql://…` serves several machines. The tables below are the schema's head; Alembic
migrations in `app/migrations/versions/` bring any older database up to it at start-up, under a
lock, so that several workers or machines starting at once migrate it exactly once. A database
already at the head is recognised without Alembic, which is imported only to migrate (it would
add ~10 MB to every worker).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import selectors
import sqlite3
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

log = logging.getLogger("chatproxy")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The newest revision in migrations/versions/ (a test compares it with Alembic's head).
SCHEMA_REVISION = "0002"
SQLITE_BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another's lock before failing
POSTGRES_CONNECT_TIMEOUT = 10  # seconds
# pg_advisory_xact_lock key held while migrating: any constant the service owns ("chatprox").
MIGRATION_LOCK_KEY = 0x63686174_70726F78

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)


class UtcDateTime(sa.TypeDecorator):
    """An aware UTC datetime on both databases (SQLite has no time zones, so it stores naive UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: timestamps must be aware (UTC)")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# SQLite only makes an INTEGER PRIMARY KEY autoincrement; PostgreSQL gets a 64-bit serial.
AutoIncrementKey = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("client", sa.Text, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("system", sa.Text),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    # Added by revision 0002: a client's newest conversations, and the listing's keyset cursor.
    sa.Index(None, "client", "updated_at", "id"),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column(
        "seq", AutoIncrementKey, primary_key=True, autoincrement=True
    ),  # the order of a conversation
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column(
        "conversation_id",
        sa.String(32),
        sa.ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("partial", sa.Boolean, nullable=False, default=False),
    sa.Column("model", sa.Text),
    sa.Column("prompt_tokens", sa.Integer),
    sa.Column("completion_tokens", sa.Integer),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Index(None, "conversation_id", "seq"),
)

ledger = sa.Table(
    "ledger",
    metadata,
    sa.Column("id", AutoIncrementKey, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.Text, nullable=False, unique=True),  # the exactly-once key
    sa.Column("client", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("endpoint", sa.Text, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("total_tokens", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("estimated", sa.Boolean, nullable=False),
    sa.Column("partial", sa.Boolean, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("day", sa.Date, nullable=False),  # the UTC date of created_at, for aggregation
    sa.Index(None, "client", "day"),
)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def clean_text(value: str) -> str:
    """`value` as both databases store it: PostgreSQL refuses NUL, and neither takes a lone
    surrogate (which a JSON body's `\\ud800` decodes to)."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def engine_url(database_url: str) -> URL:
    """`DATABASE_URL` as SQLAlchemy takes it: plain `postgresql://` (and Heroku-style
    `postgres://`) use psycopg 3, the driver this project installs."""
    if database_url.startswith("postgres://"):
        database_url = "postgresql://" + database_url.removeprefix("postgres://")
    url = make_url(database_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url


def create_engine(database_url: str) -> Engine:
    """The process's engine for `database_url`; a SQLite file's directory is created if missing."""
    url = engine_url(database_url)
    if url.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url)
    elif url.get_backend_name() == "postgresql":
        engine = _postgres_engine(url)
    else:
        raise ValueError(
            f"unsupported database {url.get_backend_name()!r}: use sqlite or postgresql"
        )
    _forget_connections_after_fork(engine)
    return engine


def autocommit(engine: Engine) -> Engine:
    """`engine` for work whose statements each stand alone (reads, one-statement writes):
    PostgreSQL then runs them without BEGIN and COMMIT/ROLLBACK round trips (-60 µs CPU and
    -270 µs wall per ledger row, measured under gevent), and nothing changes for them, since its
    READ COMMITTED gives each statement its own snapshot anyway. SQLite gets `engine` itself:
    pysqlite already begins only before a write, and its switch to autocommit costs a PRAGMA per
    checkout (+70 µs per ledger row)."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or (url.query.get("mode") == "memory")


def _sqlite_engine(url: URL) -> Engine:
    if _is_memory(url):
        # One shared connection, or each connection would see its own empty database.
        engine = sa.create_engine(
            url, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url)

    @sa.event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        # busy_timeout first: switching to WAL waits for other processes' locks like any write.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        _use_wal(cursor)  # readers never block the writer
        cursor.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; safe with WAL
        cursor.execute("PRAGMA foreign_keys = ON")  # for ON DELETE CASCADE
        cursor.close()

    return engine


def _use_wal(cursor: sqlite3.Cursor) -> None:
    """Switches the database file to WAL once; later connections find it so.

    The switch needs the file to itself, and SQLite answers "database is locked" at once rather
    than wait when several processes open a new database together: they retry until one wins.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _postgres_engine(url: URL) -> Engine:
    _make_psycopg_cooperative()
    return sa.create_engine(
        url,
        pool_pre_ping=True,  # a server restarted since the last request costs a reconnect, not a 500
        # Per worker process: statements are short, and workers x 15 must stay under the
        # server's max_connections (100 by default).
        pool_size=5,
        max_overflow=10,
        connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT},
    )


def _make_psycopg_cooperative() -> None:
    """Keeps psycopg 3 from blocking gevent's event loop.

    psycopg chooses how to wait for the server when it is imported: its C `wait_c` calls
    poll() directly and would stall every greenlet of the worker for the whole query. It picks a
    pure-Python wait that goes through the (patched) `select` module only when gevent patched
    before psycopg was imported. This repeats that choice now, so that the order of imports (a
    preloaded app, a tool importing psycopg early) does not matter.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("select"):
        return
    from psycopg import waiting

    wait_c = getattr(waiting, "wait_c", None)
    if wait_c is not None and waiting.wait is wait_c:
        waiting.wait = waiting.wait_poll if hasattr(waiting, "wait_poll") else waiting.wait_selector
    # wait_conn() (connecting) uses the selector class bound at psycopg's import.
    waiting.DefaultSelector = selectors.DefaultSelector


def _forget_connections_after_fork(engine: Engine) -> None:
    """A forked child must open its own connections, never reuse its parent's sockets."""
    ref = weakref.ref(engine)

    def _after_fork() -> None:
        forked = ref()
        if forked is not None:
            forked.dispose(close=False)

    os.register_at_fork(after_in_child=_after_fork)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrates the database to `revision`, once, however many processes start at the same time.

    A database already at the head is left alone without importing Alembic. Otherwise the whole
    upgrade is one transaction that first takes a lock the other starters wait on: on PostgreSQL
    an advisory lock, on SQLite the database's write lock (`BEGIN IMMEDIATE`). A starter that
    gets the lock second finds the schema current and has nothing to do.
    """
    if revision == "head" and schema_revision(engine) == SCHEMA_REVISION:
        return
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            with connection.begin():
                connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
                _run_alembic(connection, revision)
        elif engine.dialect.name == "sqlite":
            _upgrade_sqlite(connection, revision)
        else:
            with connection.begin():
                _run_alembic(connection, revision)


def _upgrade_sqlite(connection: sa.Connection, revision: str) -> None:
    # Python's sqlite3 begins transactions lazily and never before DDL; take over so that the
    # schema change is one transaction that starts with the write lock.
    dbapi_connection = connection.connection.dbapi_connection
    isolation_level = dbapi_connection.isolation_level
    dbapi_connection.isolation_level = None
    try:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            _run_alembic(connection, revision)
        except BaseException:
            connection.rollback()
            raise
        connection.commit()
    finally:
        dbapi_connection.isolation_level = isolation_level


def _run_alembic(connection: sa.Connection, revision: str) -> None:
    """Alembic on `connection`, inside the caller's transaction (env.py sees it and joins it)."""
    from alembic import command
    from alembic.config import Config
    from alembic.util import CommandError

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    try:
        command.upgrade(config, revision)
    except CommandError as exc:
        raise RuntimeError(
            f"cannot migrate the database: {exc} (is it from a newer version of the service?)"
        ) from exc


# Alembic's bookkeeping table, read directly; not in `metadata`, which holds the service's tables.
_alembic_version = sa.table("alembic_version", sa.column("version_num"))


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, None before the first migration.

    Read with SQLAlchemy so that a start with a current database need not import Alembic.
    """
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(sa.select(_alembic_version.c.version_num)).scalar_one_or_none()


def ping(engine: Engine) -> bool:
    """Whether the database answers now, for `/readyz`."""
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        return True
    except SQLAlchemyError as exc:
        log.warning("database ping failed: %s", exc.__class__.__name__)
        return False


def init_app(app: Flask) -> Engine:
    """Opens the database named by `SETTINGS.database_url`, migrates it, and keeps the engine
    in `app.extensions["db"]`."""
    settings = app.config["SETTINGS"]
    engine = create_engine(settings.database_url)
    upgrade(engine)
    app.extensions["db"] = engine
    return engine
