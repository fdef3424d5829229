"""The container's entrypoint (scripts/entrypoint.sh), run as the image runs it, against a real
PostgreSQL: it waits for the database, applies the migrations, serves, and /readyz answers; a
production install with a missing or placeholder SECRET_KEY never gets that far."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from app.migrate import MIGRATION_LOCK_KEY
from tests.conftest import POSTGRES_ADMIN_URL, free_port, new_postgres_database

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "scripts" / "entrypoint.sh"


def container_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The environment the compose file gives the app, pointed at this machine."""
    unset = ("DATABASE_URL", "SECRET_KEY", "MODEL_ID")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        PYTHON=sys.executable,
        ENVIRONMENT="production",
        SECRET_KEY=secrets.token_hex(32),
        DATA_DIR=str(tmp_path / "data"),
        HOST="127.0.0.1",
        DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        DATABASE_WAIT_SECONDS="20",
    )
    env.update(overrides)
    return env


def run_entrypoint(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], cwd=tmp_path, env=container_env(tmp_path, **env),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_serve_waits_for_the_database_migrates_and_becomes_ready(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The database does not exist yet when the container starts: the entrypoint waits for it."""
    with new_postgres_database() as existing:
        pass  # a name PostgreSQL has just dropped: the server answers, the database does not
    name = existing.rsplit("/", 1)[1]
    port = free_port()
    env = container_env(tmp_path, DATABASE_URL=existing, MODEL_ID=str(tiny_model_dir), PORT=str(port))
    process = subprocess.Popen(
        [str(ENTRYPOINT)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout or []), daemon=True)
    reader.start()
    try:
        time.sleep(2)
        assert process.poll() is None, "".join(output)  # still waiting, not failed
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        deadline = time.monotonic() + 120
        ready = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert ready is not None and ready.status_code == 200, "".join(output)
        assert ready.json()["status"] == "ready"
        with psycopg.connect(existing) as conn:
            version = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            tables = {row[0] for row in rows}
        assert version is not None and {"users", "conversations", "messages", "adapters"} <= tables
        assert any("waiting for the database" in line for line in output), "".join(output)
    finally:
        process.terminate()
        process.wait(30)
        reader.join(5)
        if process.stdout:
            process.stdout.close()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    # SIGTERM (docker stop): uvicorn shuts down cleanly, then exits by the signal it was sent.
    assert process.returncode in (0, -15), "".join(output)
    assert "Application shutdown complete" in "".join(output)


def test_migrate_alone_and_a_database_that_never_answers(tmp_path: Path) -> None:
    with new_postgres_database() as url:
        migrated = run_entrypoint(tmp_path, "migrate", DATABASE_URL=url, MODEL_ID="/models/falcon-7b")
        assert migrated.returncode == 0, migrated.stderr
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    nobody = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    started = time.monotonic()
    waited = run_entrypoint(
        tmp_path, "migrate", DATABASE_URL=nobody, MODEL_ID="/m", DATABASE_WAIT_SECONDS="2"
    )
    assert waited.returncode == 1
    assert "did not answer within 2 s" in waited.stderr
    assert 2 <= time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (None, "SECRET_KEY must be set in production"),
        ("change-me-to-the-output-of-openssl-rand-hex-32", "SECRET_KEY is a placeholder"),
        ("x" * 40, "SECRET_KEY is a placeholder"),
    ],
)
def test_production_refuses_a_missing_or_placeholder_secret_before_touching_the_database(
    tmp_path: Path, secret: str | None, message: str
) -> None:
    nobody = f"postgresql://postgres@127.0.0.1:{free_port()}/none"  # would wait, were it reached
    env = {"SECRET_KEY": secret} if secret is not None else {}
    process = subprocess.run(
        [str(ENTRYPOINT)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in container_env(tmp_path, DATABASE_URL=nobody, MODEL_ID="/m", **env).items()
             if secret is not None or k != "SECRET_KEY"},
    )  # fmt: skip
    assert process.returncode == 2
    assert message in process.stderr
    assert secret is None or secret not in process.stderr  # a secret is never echoed
    assert not (tmp_path / "data").exists()


def test_replicas_migrating_at_once_take_turns(tmp_path: Path) -> None:
    """Every replica runs the migrations at start: a second one waits on the advisory lock while the
    first holds it, then finds the schema at head."""
    with new_postgres_database() as url, psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        process = subprocess.Popen(
            [str(ENTRYPOINT), "migrate"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=container_env(tmp_path, DATABASE_URL=url, MODEL_ID="/m"), text=True,
        )  # fmt: skip
        time.sleep(3)
        assert process.poll() is None  # blocked behind the lock
        tables = holder.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'alembic_version'")
        assert tables.fetchone() == (0,)
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        _, errors = process.communicate(timeout=60)
        assert process.returncode == 0, errors
        assert holder.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
