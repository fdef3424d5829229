"""Two server processes on one PostgreSQL database and one adapter store serve the same registry,
and count the same limits.

A change made through either process is served by the other within a few seconds: each polls the
registry's revision counter (REGISTRY_POLL_SECONDS). Requests through either count against one rate
limit, in the database.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import build_adapter, free_port, new_postgres_database, zip_directory

pytestmark = pytest.mark.slow


def wait_ready(url: str, process: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stdout.read() if process.stdout else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready after {timeout} s")


def models(url: str, key: str) -> set[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    return {m.id for m in client.models.list()}


def ask(url: str, key: str, model: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Where do I send invoices?"}],
        max_tokens=24,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def converge(condition, timeout: float = 15.0) -> float:  # type: ignore[no-untyped-def]
    """Seconds until `condition()` holds."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no convergence within {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - started


@pytest.fixture
def two_servers(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[str, str, str]]:
    with serving_two(tmp_path, tiny_model_dir) as servers:
        yield servers


@contextlib.contextmanager
def serving_two(tmp_path: Path, tiny_model_dir: Path, **settings: str) -> Iterator[tuple[str, str, str]]:
    """Two `python -m app serve` processes on one new PostgreSQL database (with `settings` in their
    environment); yields their URLs and an admin's API key."""
    with new_postgres_database() as database:
        env = {
            **os.environ,
            "DATABASE_URL": database,
            "DATA_DIR": str(tmp_path / "shared"),
            "MODEL_ID": str(tiny_model_dir),
            "DEVICE": "cpu",
            "SECRET_KEY": "convergence-test-secret-" + "y" * 16,
            "REGISTRY_POLL_SECONDS": "1",
            **settings,
        }
        run = lambda *args: subprocess.run(  # noqa: E731
            [sys.executable, "-m", "app", *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        run("create-user", "--email", "ops@example.com", "--password", "ops-password", "--admin")
        key = run("create-api-key", "--email", "ops@example.com").stdout.strip()
        processes, urls = [], []
        try:
            for _ in range(2):
                port = free_port()
                process = subprocess.Popen(
                    [sys.executable, "-m", "app", "serve"], env={**env, "PORT": str(port)},
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )  # fmt: skip
                processes.append(process)
                urls.append(f"http://127.0.0.1:{port}")
            for url, process in zip(urls, processes, strict=True):
                wait_ready(url, process)
            yield urls[0], urls[1], key
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(30)
                if process.stdout is not None:
                    process.stdout.close()


def test_a_change_through_one_server_is_served_by_the_other(
    two_servers, tiny_model_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    first, second, key = two_servers
    headers = {"Authorization": f"Bearer {key}"}
    archive = zip_directory(
        build_adapter(tiny_model_dir, tmp_path / "finance", seed=5), tmp_path / "finance.zip"
    )
    with archive.open("rb") as file:
        response = httpx.post(
            f"{first}/api/admin/adapters/finance/versions", headers=headers,
            files={"file": ("finance.zip", file, "application/zip")}, timeout=120,
        )  # fmt: skip
    assert response.status_code == 201, response.text
    assert "finance" in models(first, key)  # the process that took the upload serves it at once
    waited = converge(lambda: "finance" in models(second, key))
    assert waited < 10
    assert ask(second, key, "finance") == ask(first, key, "finance")  # one adapter, one output

    # And back: disabling through the second server stops the first serving it.
    assert (
        httpx.post(f"{second}/api/admin/adapters/finance/versions/1/disable", headers=headers).status_code
        == 200
    )
    converge(lambda: "finance" not in models(first, key))
    with pytest.raises(openai.NotFoundError):
        ask(first, key, "finance")


def test_both_servers_count_one_rate_limit_and_one_usage(tiny_model_dir: Path, tmp_path: Path) -> None:
    with serving_two(tmp_path, tiny_model_dir, RATE_LIMIT_PER_MINUTE="3") as (first, second, key):
        if 60 - time.time() % 60 < 25:  # the window is the calendar minute: start early in one
            time.sleep(60 - time.time() % 60 + 0.2)
        admitted, refused = [], []
        request = {
            "model": str(tiny_model_dir),
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3,
        }
        for url in (first, second) * 3:
            response = httpx.post(
                f"{url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json=request,
                timeout=60,
            )
            (admitted if response.status_code == 200 else refused).append(response)
        assert len(admitted) == 3 and len(refused) == 3, [r.status_code for r in refused]
        assert {r.status_code for r in refused} == {429}
        assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in refused)
        tokens = sum(r.json()["usage"]["total_tokens"] for r in admitted)
        for url in (first, second):  # the same figures through either
            report = httpx.get(f"{url}/api/admin/usage", headers={"Authorization": f"Bearer {key}"}).json()
            assert [(r["requests_today"], r["tokens_today"]) for r in report] == [(3, tokens)]
