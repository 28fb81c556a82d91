"""Alembic's entry point: runs the migrations on the connection `i2v_daemon.queue.migrate` hands over.

That connection is already inside a transaction holding the migration lock (BEGIN IMMEDIATE on
SQLite, an advisory lock on PostgreSQL), so Alembic neither begins nor commits on its own.
"""

from __future__ import annotations

from alembic import context

from i2v_daemon.queue.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `i2v-daemon migrate` (i2v_daemon.queue.migrate), not the alembic command")

context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
