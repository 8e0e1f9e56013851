"""Alembic environment: runs the store's migrations on the connection `dragonrec.store.migrate` hands over."""

from __future__ import annotations

from alembic import context

from dragonrec.store.models import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic` run by hand: there is no connection to borrow
    raise RuntimeError("run the store's migrations through dragonrec.store.migrate.upgrade(url)")
# render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds the table instead.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
