"""Liveness, readiness, the restart promise and the security headers."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx

from tests.conftest import LiveServer, create_user, load_message, make_settings, sign_in


def test_readyz_reports_the_loaded_model(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["quantization"] == "nf4" and body["device"] == "cpu"
    assert body["quantized_layers"] == 16 and body["demo_model"] is True
    assert body["served_model_name"] == server.settings.model_name


def test_every_page_carries_the_security_headers(server: LiveServer) -> None:
    for path in ("/login", "/healthz", "/static/css/app.css"):
        headers = httpx.get(f"{server.url}{path}").headers
        assert "script-src 'self'" in headers["content-security-policy"], path
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "same-origin"
    page = httpx.get(f"{server.url}/login").text
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "no inline script"
    assert " style=" not in page and "<style" not in page and " on" not in re.sub(r'"[^"]*"', "", page)


def test_a_restart_keeps_every_message_and_marks_the_cut_reply(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = make_settings(tmp_path, tiny_model_dir, max_new_tokens=4000)
    first = LiveServer(settings).start()
    create_user(settings, "restart@example.com")
    member = sign_in(first, "restart@example.com")
    conversation = member.start_chat("A question asked just before a restart")
    page = member.get(f"/c/{conversation}").text
    reply = re.findall(r'id="msg-([0-9a-f-]{36})" class="message assistant', page)[-1]
    member.client.close()
    time.sleep(1.0)
    first.stop()  # a planned restart mid-reply
    cut = load_message(settings, reply)
    assert cut.status.value == "interrupted" and len(cut.content) > 0

    second = LiveServer(settings).start()
    try:
        member = sign_in(second, "restart@example.com")
        page = member.get(f"/c/{conversation}").text
        assert "A question asked just before a restart" in page
        assert "Interrupted: the server stopped before the reply was finished." in page
        assert load_message(settings, reply).content == cut.content
        member.client.close()
    finally:
        second.stop()
