"""Alembic's entry point for imagegate's ledger: runs on the connection that ``imagegate.migrations``
hands over (it holds the upgrade lock and the transaction), never on one of its own."""

from __future__ import annotations

from alembic import context

from imagegate.migrations import schema

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("imagegate's ledger migrations run through `imagegate db upgrade` (imagegate.migrations), "
                       "which passes them a locked connection; plain `alembic` commands are not wired here")
context.configure(
    connection=connection,
    target_metadata=schema(),
    # SQLite cannot ALTER most things: migrations written with op.batch_alter_table copy the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
