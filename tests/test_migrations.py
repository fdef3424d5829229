"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

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


def test_every_migration_upgrades_from_the_one_before_and_downgrades_one_step(database_url: str) -> None:
    """An upgrade path from every earlier release: empty -> 0001 -> ... -> head, one revision at a
    time, each one's downgrade tried on the way (down one step, then up again). The schema at head
    is then what the models describe, and head downgrades one step cleanly."""
    from alembic.script import ScriptDirectory

    config = alembic_config(async_database_url(database_url))
    revisions = [r.revision for r in reversed(list(ScriptDirectory.from_config(config).walk_revisions()))]
    assert len(revisions) >= 5 and revisions[0] == "0001"
    engine = create_engine(sync_url(database_url))
    try:
        for revision in revisions:
            command.upgrade(config, revision)
            command.downgrade(config, "-1")
            command.upgrade(config, revision)
            with engine.connect() as conn:
                assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == revision
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        command.downgrade(config, "-1")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == revisions[-2]
    finally:
        engine.dispose()


def test_sign_in_migration_keeps_existing_users_and_sessions_usable(database_url: str) -> None:
    """0003 on a database with users: they stay approved password users, their sessions password ones."""
    from sqlalchemy import text

    config = alembic_config(async_database_url(database_url))
    command.upgrade(config, "0002")
    engine = create_engine(sync_url(database_url))
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO users (id, email, password_hash, role, is_active, created_at) "
                    "VALUES (1, 'old@example.com', 'x', 'user', true, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO auth_sessions (id, token_hash, user_id, csrf_token, created_at, expires_at) "
                    "VALUES (1, 'h', 1, 'c', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
        upgrade_database(async_database_url(database_url))
        with engine.connect() as conn:
            user = conn.execute(
                text("SELECT is_approved, display_name, groups, source, last_sign_in_at FROM users")
            ).one()
            assert (bool(user[0]), user[1], user[3], user[4]) == (True, "", "password", None)
            assert user[2] in ([], "[]")  # JSON: a list on PostgreSQL, its text on SQLite
            assert conn.execute(text("SELECT method FROM auth_sessions")).scalar_one() == "password"
        command.downgrade(config, "0002")  # and back, keeping the rows
        with engine.connect() as conn:
            assert conn.execute(text("SELECT email FROM users")).scalar_one() == "old@example.com"
    finally:
        engine.dispose()


def test_limits_migration_keeps_adapters_open_to_everyone_and_users_on_the_settings(
    database_url: str,
) -> None:
    """0004 on a database with an adapter, a user and a key: the adapter stays open to everyone, and
    the user and key follow the settings' limits (no overrides)."""
    from sqlalchemy import text

    config = alembic_config(async_database_url(database_url))
    command.upgrade(config, "0003")
    engine = create_engine(sync_url(database_url))
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO users (id, email, password_hash, role, is_active, created_at) "
                    "VALUES (1, 'old@example.com', 'x', 'user', true, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, created_at) "
                    "VALUES (1, 1, 'script', 'pgpt-x', 'h', CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO adapters (id, name, is_default, created_at) "
                    "VALUES (1, 'finance', false, CURRENT_TIMESTAMP)"
                )
            )
        upgrade_database(async_database_url(database_url))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT allowed_groups FROM adapters")).scalar_one() in ([], "[]")
            user = conn.execute(text("SELECT rate_limit_per_minute, daily_token_quota FROM users")).one()
            assert tuple(user) == (None, None)
            assert conn.execute(text("SELECT rate_limit_per_minute FROM api_keys")).scalar_one() is None
        command.downgrade(config, "0003")  # and back, keeping the rows
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM adapters")).scalar_one() == "finance"
    finally:
        engine.dispose()
