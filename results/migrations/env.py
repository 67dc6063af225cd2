"""Alembic environment: the store passes its open connection in ``config.attributes["connection"]``."""

from alembic import context

from results.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through results.store.Store (it provides the connection)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
