"""scripts/backup.sh and scripts/restore.sh round-trip a populated instance: users, API keys,
conversations and an adapter published into the registry, on SQLite and PostgreSQL. The restored
instance then serves that adapter to that key."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import MetaData, create_engine, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings, async_database_url, sync_database_url
from app.migrate import upgrade_database
from tests.conftest import (
    PASSWORD,
    LiveServer,
    build_adapter,
    create_api_key,
    create_user,
    make_settings,
    new_postgres_database,
    with_db,
)

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def empty_database(kind: str, directory: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{directory}/private-gpt.db"
    else:
        with new_postgres_database() as url:
            yield url


def script(name: str, *args: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ADAPTER_STORE")}
    env.update(DATABASE_URL=settings.database_url, DATA_DIR=str(settings.data_dir))
    return subprocess.run(
        [str(ROOT / "scripts" / name), *args], env=env, capture_output=True, text=True, timeout=120
    )


def populate(settings: Settings, tiny_model_dir: Path, adapter_dir: Path) -> str:
    """Two users, an API key, a conversation with an exchange, and a published default adapter."""
    from app.chat.conversations import add_exchange, create_conversation
    from app.models import User
    from training.publish import publish_adapter

    create_user(settings, "boss@example.com", admin=True)
    create_user(settings, "jane@example.com")
    key = create_api_key(settings, "jane@example.com")

    async def converse(db: AsyncSession) -> None:
        jane = await db.scalar(select(User).where(User.email == "jane@example.com"))
        assert jane is not None
        conversation = await create_conversation(db, user=jane, title="Leave policy", adapter_name="policies")
        _, reply = await add_exchange(db, conversation=conversation, user_text="How many days of leave?")
        reply.content = "Twenty-five days a year."
        await db.commit()

    with_db(settings, converse)
    build_adapter(tiny_model_dir, adapter_dir)
    asyncio.run(
        publish_adapter(adapter_dir, name="policies", settings=settings, by="boss@example.com", default=True)
    )
    return key


def every_row(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_engine(sync_database_url(async_database_url(url)))
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as conn:
            return {
                name: sorted((tuple(row) for row in conn.execute(table.select())), key=repr)
                for name, table in metadata.tables.items()
            }
    finally:
        engine.dispose()


def store_files(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".incoming" not in path.parts
    }


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_backup_and_restore_round_trip_a_populated_instance(
    kind: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with empty_database(kind, tmp_path / "old") as old_url, empty_database(kind, tmp_path / "new") as new_url:
        old = make_settings(tmp_path / "old", tiny_model_dir, old_url)
        new = make_settings(tmp_path / "new", tiny_model_dir, new_url)
        upgrade_database(old.sqlalchemy_url)
        key = populate(old, tiny_model_dir, tmp_path / "adapter")

        backed_up = script("backup.sh", str(tmp_path / "backups"), settings=old)
        assert backed_up.returncode == 0, backed_up.stderr
        backup = Path(backed_up.stdout.strip().splitlines()[-1])
        assert "adapter store: 1 adapter versions" in backed_up.stdout
        assert {p.name for p in backup.iterdir()} >= {"adapters.tar"}

        restored = script("restore.sh", str(backup), settings=new)
        assert restored.returncode == 0, restored.stderr
        upgrade_database(new.sqlalchemy_url)  # as the entrypoint does after a restore: nothing to do

        before, after = every_row(old.sqlalchemy_url), every_row(new.sqlalchemy_url)
        assert after == before
        assert (
            len(before["users"]) == 2
            and len(before["messages"]) == 2
            and len(before["adapter_versions"]) == 1
        )
        files = store_files(new.adapter_store_dir)
        assert files == store_files(old.adapter_store_dir)
        assert any(name.endswith("adapter_model.safetensors") for name in files)

        # A second restore over the now-populated instance is refused unless forced.
        again = script("restore.sh", str(backup), settings=new)
        assert again.returncode == 1 and ("pass --force" in again.stderr)
        forced = script("restore.sh", "--force", str(backup), settings=new)
        assert forced.returncode == 0, forced.stderr
        assert every_row(new.sqlalchemy_url) == before and store_files(new.adapter_store_dir) == files

        # The restored instance signs Jane in, knows her key, and serves the adapter from the store.
        from app.auth import service as auth

        jane = with_db(new, lambda db: auth.authenticate(db, email="jane@example.com", password=PASSWORD))
        assert jane is not None
        live = LiveServer(new).start()
        try:
            answer = httpx.post(
                f"{live.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "policies", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"].startswith("policies")
        finally:
            live.stop()


def test_restore_refuses_a_backup_of_the_other_database_kind(tmp_path: Path, tiny_model_dir: Path) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    subprocess.run(["tar", "-cf", str(backup / "adapters.tar"), "--files-from", "/dev/null"], check=True)
    (backup / "database.sqlite").write_bytes(b"")
    settings = make_settings(tmp_path, tiny_model_dir, "postgresql://postgres@127.0.0.1:5432/none")
    refused = script("restore.sh", str(backup), settings=settings)
    assert refused.returncode == 1 and "holds no PostgreSQL dump" in refused.stderr
    missing = script("restore.sh", str(tmp_path), settings=settings)
    assert missing.returncode == 1 and "is not a backup" in missing.stderr
