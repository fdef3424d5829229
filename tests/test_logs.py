"""Request ids and JSON logs (app/logs.py): an X-Request-ID comes back on the answer and reaches the
engine's GenerationRequest, from the API and from the chat; `LOG_FORMAT=json` makes every console
line of `python -m app serve` one JSON object carrying the request's id."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.llm.engine import GenerationRequest
from app.logs import JsonFormatter, _request_id
from tests.conftest import LiveServer, create_api_key, create_user, free_port, make_settings

HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def submitted(server: LiveServer) -> Iterator[list[GenerationRequest]]:
    """The generation requests the server's real engine is handed, in order."""
    engine = server.services.engine
    seen: list[GenerationRequest] = []
    submit = engine.submit

    def recording(request: GenerationRequest, *args: Any, **kwargs: Any) -> Any:
        seen.append(request)
        return submit(request, *args, **kwargs)

    engine.submit = recording
    yield seen
    engine.submit = submit


def test_api_request_id_is_echoed_and_reaches_the_engine(
    server: LiveServer, submitted: list[GenerationRequest]
) -> None:
    create_user(server.settings, "ids@example.com")
    key = create_api_key(server.settings, "ids@example.com")
    body = {
        "model": server.settings.model_name,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
    }
    headers = {"Authorization": f"Bearer {key}"}
    answer = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={**headers, "X-Request-ID": "lb-7f3a.42"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == "lb-7f3a.42"
    assert submitted[-1].request_id == "lb-7f3a.42"

    # No id, or one that is not a sane token (spaces, too long): a fresh one, echoed as well.
    for given in (None, "two words", "x" * 200):
        extra = {"X-Request-ID": given} if given else {}
        answer = httpx.post(
            f"{server.url}/v1/chat/completions", json=body, headers={**headers, **extra}, timeout=60
        )
        assert answer.status_code == 200
        assert HEX_ID.fullmatch(answer.headers["x-request-id"])
        assert submitted[-1].request_id == answer.headers["x-request-id"]
    # Every answer carries one, pages and refusals included.
    assert HEX_ID.fullmatch(httpx.get(f"{server.url}/healthz").headers["x-request-id"])
    assert HEX_ID.fullmatch(httpx.get(f"{server.url}/v1/models").headers["x-request-id"])  # a 401


def test_chat_message_request_id_reaches_the_engine(
    server: LiveServer, submitted: list[GenerationRequest], member_factory: Any
) -> None:
    member = member_factory(server)
    response = member.post("/c", data={"message": "Hello"}, headers={"X-Request-ID": "chat-send-1"})
    assert response.status_code == 204, response.text
    assert response.headers["x-request-id"] == "chat-send-1"
    assert submitted[-1].request_id == "chat-send-1"


def test_json_formatter_writes_one_object_with_the_request_id() -> None:
    record = logging.LogRecord("app.chat", logging.WARNING, __file__, 1, "reply %s cut", ("r1",), None)
    token = _request_id.set("req-9")
    try:
        line = JsonFormatter().format(record)
    finally:
        _request_id.reset(token)
    entry = json.loads(line)
    assert (
        entry["level"] == "WARNING" and entry["logger"] == "app.chat" and entry["message"] == "reply r1 cut"
    )
    assert entry["request_id"] == "req-9" and entry["time"].endswith("Z")
    assert "request_id" not in json.loads(JsonFormatter().format(record))  # outside a request


def test_serve_with_log_format_json(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The real server's console: every line (uvicorn's included) is JSON; the access line of a
    request carries the id it was sent with."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(
        DATA_DIR=str(tmp_path), MODEL_ID=str(tiny_model_dir), DEVICE="cpu", PORT=str(port), LOG_FORMAT="json",
        SECRET_KEY="k" + "0123456789abcdef" * 3,
    )  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", headers={"X-Request-ID": "probe-1"})
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
    finally:
        process.terminate()
        process.wait(30)
        reader.join(5)
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()
    entries = [json.loads(line) for line in lines if line.strip()]  # each line parses, or this fails
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    access = [e for e in entries if e["logger"] == "uvicorn.access" and "/readyz" in e["message"]]
    assert access and access[-1]["request_id"] == "probe-1" and " 200" in access[-1]["message"]
    assert any(e["logger"] == "app.llm.loader" for e in entries)


def test_text_is_the_default(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert make_settings(tmp_path, tiny_model_dir).log_format.value == "text"
