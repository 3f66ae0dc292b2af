"""Alembic environment for the d2l-store index.

Only online runs on a connection handed in by `d2l_store.migrate` (`config.attributes["connection"]`),
already inside the transaction that holds the migration lock, so concurrent openers serialise.
"""

from __future__ import annotations

from alembic import context

from d2l_store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("d2l-store migrations run through d2l_store.migrate.upgrade(), which passes a connection")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
