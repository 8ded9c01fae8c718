"""Alembic's entry point: runs the migrations on the connection `app.db.upgrade` hands over.

That connection is already inside a transaction holding the migration lock, so Alembic joins it
rather than committing on its own. New revisions are written by hand in `versions/`: copy the
newest, set `down_revision` to its `revision`, set `app.db.SCHEMA_REVISION` to the new revision
(a start at that revision skips Alembic), and change `app.db`'s tables to match; the storage
tests check both: the head against `SCHEMA_REVISION`, the migrated schema against
`app.db.metadata` on both databases.
"""

from alembic import context

from app.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with app.db.upgrade(engine), which provides a connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite alters tables by copying them ("batch" mode); PostgreSQL alters them in place.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
