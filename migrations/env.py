"""Alembic environment: migrates the database the app is configured for, or the URL a caller sets."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from app.config import get_settings, sync_database_url
from app.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or sync_database_url(get_settings().sqlalchemy_url)


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection") or create_engine(url)
    if hasattr(connectable, "connect"):
        with connectable.connect() as connection:
            _run(connection)
        connectable.dispose()
    else:
        _run(connectable)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    # Batch mode lets SQLite (which cannot ALTER most things) take the same migrations.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
