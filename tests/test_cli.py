"""The management CLI bootstraps an install; bad configuration stops it with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai

from tests.conftest import LiveServer, make_settings


def cli(*args: str, data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    environment.update(DATA_DIR=str(data_dir), **env)
    return subprocess.run(
        [sys.executable, "-m", "app", *args], capture_output=True, text=True, env=environment, timeout=120
    )


def test_create_user_and_api_key_then_use_the_key(tmp_path: Path, tiny_model_dir: Path) -> None:
    created = cli("create-user", "--email", "Admin@Example.com", "--password", "s3cret-pass", "--admin",
                  data_dir=tmp_path)  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "created admin admin@example.com" in created.stdout
    again = cli("create-user", "--email", "admin@example.com", "--password", "s3cret-pass", data_dir=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr
    short = cli("create-user", "--email", "b@example.com", "--password", "short", data_dir=tmp_path)
    assert short.returncode == 1 and "at least 8 characters" in short.stderr
    unknown = cli("create-api-key", "--email", "nobody@example.com", data_dir=tmp_path)
    assert unknown.returncode == 1 and "no user with the email" in unknown.stderr

    issued = cli("create-api-key", "--email", "admin@example.com", data_dir=tmp_path)
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip()
    assert key.startswith("pgpt-") and len(key) > 40
    assert key not in (tmp_path / "private-gpt.db").read_bytes().decode("latin-1")  # only its hash is stored

    live = LiveServer(make_settings(tmp_path, tiny_model_dir, secret_key=None)).start()
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list()] == [live.settings.model_name]
    finally:
        live.stop()


def test_invalid_settings_stop_with_a_message_naming_them(tmp_path: Path) -> None:
    result = cli("migrate", data_dir=tmp_path, QUANTIZATION="nf5", PORT="99999")
    assert result.returncode == 2
    assert "QUANTIZATION: Input should be 'nf4', 'fp4', 'int8' or 'none' (got 'nf5')" in result.stderr
    assert "PORT: Input should be less than or equal to 65535" in result.stderr
    assert "Traceback" not in result.stderr
    production = cli("migrate", data_dir=tmp_path, ENVIRONMENT="production")
    assert production.returncode == 2 and "SECRET_KEY must be set in production" in production.stderr
    database = cli("migrate", data_dir=tmp_path, DATABASE_URL="mysql://x")
    assert (
        database.returncode == 2
        and "DATABASE_URL: must start with sqlite:/// or postgresql://" in database.stderr
    )


def test_set_password_signs_the_user_out_everywhere(tmp_path: Path) -> None:
    from app.auth import service as auth
    from app.config import Settings
    from app.models import ApiKey
    from tests.conftest import with_db

    created = cli("create-user", "--email", "joe@example.com", "--password", "first-pass", data_dir=tmp_path)
    assert created.returncode == 0, created.stderr
    key = cli("create-api-key", "--email", "joe@example.com", data_dir=tmp_path).stdout.strip()
    short = cli("set-password", "--email", "joe@example.com", "--password", "short", data_dir=tmp_path)
    assert short.returncode == 1 and "at least 8 characters" in short.stderr
    unknown = cli(
        "set-password", "--email", "nobody@example.com", "--password", "long enough", data_dir=tmp_path
    )
    assert unknown.returncode == 1 and "no user with the email" in unknown.stderr

    changed = cli(
        "set-password", "--email", "joe@example.com", data_dir=tmp_path, PGPT_PASSWORD="second-pass"
    )
    assert changed.returncode == 0, changed.stderr
    assert "sessions and API keys are revoked" in changed.stdout
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]

    async def check(db: Any) -> None:
        assert await auth.resolve_api_key(db, key=key, secret=settings.secret()) is None
        assert (await db.get(ApiKey, 1)).revoked_at is not None
        assert await auth.authenticate(db, email="joe@example.com", password="first-pass") is None
        assert await auth.authenticate(db, email="joe@example.com", password="second-pass") is not None

    with_db(settings, check)


def test_an_api_key_can_have_a_rate_limit_of_its_own(tmp_path: Path) -> None:
    from app.config import Settings
    from app.models import ApiKey
    from tests.conftest import with_db

    assert (
        cli(
            "create-user", "--email", "ann@example.com", "--password", "long enough", data_dir=tmp_path
        ).returncode
        == 0
    )
    negative = cli(
        "create-api-key", "--email", "ann@example.com", "--rate-limit-per-minute", "-1", data_dir=tmp_path
    )
    assert negative.returncode == 1 and "--rate-limit-per-minute must be 0 or more" in negative.stderr
    for limit in ("5", None):
        extra = ("--rate-limit-per-minute", limit) if limit else ()
        issued = cli("create-api-key", "--email", "ann@example.com", *extra, data_dir=tmp_path)
        assert issued.returncode == 0, issued.stderr
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]

    async def limits(db: Any) -> list[int | None]:
        from sqlalchemy import select

        return list((await db.scalars(select(ApiKey.rate_limit_per_minute).order_by(ApiKey.id))).all())

    assert with_db(settings, limits) == [5, None]  # None: API_KEY_RATE_LIMIT_PER_MINUTE
