"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.config import async_database_url, sync_database_url
from app.migrate import alembic_config, upgrade_database
from app.models import Base


def sync_url(url: str) -> str:
    return sync_database_url(async_database_url(url))


def test_migrations_match_the_models_and_run_both_ways(database_url: str) -> None:
    upgrade_database(async_database_url(database_url))
    engine = create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert differences == [], f"models and migrations disagree; add a migration: {differences}"
            assert {"users", "conversations", "messages", "auth_sessions", "api_keys"} <= set(
                inspect(conn).get_table_names()
            )
        command.downgrade(alembic_config(async_database_url(database_url)), "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        upgrade_database(async_database_url(database_url))  # and forward again
    finally:
        engine.dispose()
