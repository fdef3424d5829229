"""Apply the Alembic migrations: `python -m app migrate` (and `make run` does it for you).

Several server processes may start at once against one PostgreSQL database (replicas behind a
proxy, each running its migrations at start): they take turns through an advisory lock, so the
first one migrates and the others find the schema at head.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from app.config import sync_database_url

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"
# pg_advisory_lock's key for "migrations running": any constant no other code uses.
MIGRATION_LOCK_KEY = 0x70677074  # "pgpt"

log = logging.getLogger(__name__)


def alembic_config(database_url: str) -> Config:
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("sqlalchemy.url", sync_database_url(database_url).replace("%", "%%"))
    return config


def upgrade_database(database_url: str, revision: str = "head") -> None:
    """Bring the schema to `revision`; a no-op when it is already there."""
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        command.upgrade(alembic_config(database_url), revision)
        return
    engine = create_engine(sync_database_url(database_url))
    try:
        with engine.connect() as lock:
            # Session-level lock on its own connection: held across Alembic's transactions, released
            # when this connection closes (also when the process dies mid-migration).
            lock.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                command.upgrade(alembic_config(database_url), revision)
            finally:
                lock.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
    finally:
        engine.dispose()


def wait_for_database(database_url: str, *, timeout: float = 60.0, interval: float = 1.0) -> bool:
    """Wait until the database accepts a connection and answers a query (a container's database
    may still be starting); False, with the last error logged, after `timeout` seconds."""
    if database_url.startswith("sqlite"):
        return True  # a file: nothing to wait for
    engine = create_engine(sync_database_url(database_url), connect_args={"connect_timeout": 5})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return True
            except OperationalError as error:
                if time.monotonic() >= deadline:
                    host = engine.url.render_as_string(hide_password=True)
                    log.error("the database %s did not answer within %.0f s: %s", host, timeout, error.orig)
                    return False
                log.info("waiting for the database: %s", str(error.orig).strip().splitlines()[0])
                time.sleep(interval)
    finally:
        engine.dispose()
