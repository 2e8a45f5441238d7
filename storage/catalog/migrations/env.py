"""Alembic environment: runs against the engine the Catalog hands over (no alembic.ini)."""

from __future__ import annotations

from alembic import context

from storage.catalog.models import Base

config = context.config
target_metadata = Base.metadata
engine = config.attributes["engine"]

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
