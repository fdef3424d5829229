"""Security headers on every answer: pages, API, errors (404, 500, refusals) and static files.

Every GET route of the app's router is sent to a live server as a signed-in admin and as a
stranger; each answer must carry the Content-Security-Policy (no inline script, no framing),
X-Content-Type-Options, Referrer-Policy and X-Frame-Options. With COOKIE_SECURE (a site reached
over HTTPS) answers also carry Strict-Transport-Security and every cookie is Secure.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import Request

from tests.conftest import PASSWORD, LiveServer, create_api_key, create_user, make_settings, sign_in
from tests.routes.test_authorization_matrix import app_routes


def assert_secure(response: httpx.Response, *, hsts: bool = False) -> None:
    where = f"{response.request.method} {response.request.url.path}: {response.status_code}"
    headers = response.headers
    policy = headers.get("content-security-policy", "")
    directives = {}
    for part in filter(None, (part.strip() for part in policy.split(";"))):
        name, _, value = part.partition(" ")
        directives[name] = value
    assert directives.get("script-src") == "'self'", where  # no 'unsafe-inline', no other origin
    assert directives.get("frame-ancestors") == "'none'", where
    assert directives.get("object-src") == "'none'", where
    assert headers.get("x-content-type-options") == "nosniff", where
    assert headers.get("referrer-policy") == "same-origin", where
    assert headers.get("x-frame-options") == "DENY", where
    assert ("strict-transport-security" in headers) is hsts, where
    if hsts:
        assert headers["strict-transport-security"].startswith("max-age=31536000"), where


@pytest.fixture(scope="module")
def boom_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    """A server with one extra route that fails, for the 500 page."""
    live = LiveServer(make_settings(tmp_path_factory.mktemp("headers"), tiny_model_dir)).start()

    async def boom(request: Request) -> None:
        raise RuntimeError("a bug, for the test")

    live.app.add_api_route("/boom", boom)
    live.app.add_api_route("/v1/boom", boom)
    yield live
    live.stop()


def test_every_get_route_and_every_error_carries_the_headers(boom_server: LiveServer) -> None:
    email = "headers-admin@example.com"
    create_user(boom_server.settings, email, admin=True)
    key = create_api_key(boom_server.settings, email)
    admin = sign_in(boom_server, email)
    values = {"path": "css/app.css", "conversation_id": admin.start_chat("Hello")}
    routes = sorted(path for method, path in app_routes(boom_server.app) if method == "GET")
    assert "/static/{path}" in routes and "/admin/audit/export" in routes
    seen = set()
    stranger = httpx.Client(base_url=boom_server.url)
    for path in routes:
        url = re.sub(r"{(\w+)}", lambda m: values.get(m.group(1), "1"), path)
        if url.endswith("/stream") or url.endswith("/boom"):
            continue  # an event stream that stays open, and the failures: below
        for client, headers in (
            (admin.client, {"Authorization": f"Bearer {key}", "Accept": "text/html"}),
            (stranger, {"Accept": "text/html"}),
        ):
            response = client.get(url, headers=headers, timeout=60)
            assert_secure(response)
            seen.add(response.status_code)
    stranger.close()
    assert {200, 303, 401, 404} <= seen, seen

    with httpx.Client(base_url=boom_server.url, timeout=60) as stranger:
        for url, status in (
            ("/no-such-page", 404),
            ("/v1/no-such-endpoint", 404),
            ("/static/no-such-file.css", 404),
            ("/boom", 500),
            ("/v1/boom", 500),
        ):
            # uvicorn closes the connection after an unhandled error: one of its own for each.
            response = httpx.get(f"{boom_server.url}{url}", headers={"Accept": "text/html"})
            assert response.status_code == status, url
            assert_secure(response)
        page = stranger.get("/no-such-page", headers={"Accept": "text/html"})
        assert "<script>" not in page.text and "text/html" in page.headers["content-type"]
        assert_secure(stranger.post("/v1/chat/completions", json={}))  # 401
        assert_secure(stranger.post("/login", content=b"x" * (2 << 20)))  # refused by a middleware: 413
    with admin.client.stream(
        "GET", f"/c/{values['conversation_id']}/messages/1/stream", headers={"Accept": "text/event-stream"}
    ) as stream:
        assert_secure(stream)
    admin.client.close()


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("https"), tiny_model_dir, cookie_secure=True)
    live = LiveServer(settings).start()
    yield live
    live.stop()


def test_with_cookie_secure_answers_send_hsts_and_cookies_are_secure(https_server: LiveServer) -> None:
    email = "secure@example.com"
    create_user(https_server.settings, email)
    with httpx.Client(base_url=https_server.url, timeout=60) as browser:
        form = browser.get("/login")
        assert_secure(form, hsts=True)
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token
        # A Secure cookie is not sent back over plain HTTP (the test's): sent by hand, as over HTTPS.
        login_cookie = form.cookies["pgpt_login_csrf"]
        signed_in = browser.post(
            "/login",
            data={"email": email, "password": PASSWORD, "csrf_token": token.group(1)},
            headers={"Cookie": f"pgpt_login_csrf={login_cookie}"},
        )
        assert signed_in.status_code == 303
        assert_secure(signed_in, hsts=True)
        cookies = signed_in.headers.get_list("set-cookie") + form.headers.get_list("set-cookie")
        assert any(c.startswith("pgpt_session=") for c in cookies)
        for cookie in cookies:
            flags = [flag.strip().lower() for flag in cookie.split(";")]
            assert "secure" in flags and "httponly" in flags, cookie
        assert_secure(browser.get("/healthz"), hsts=True)
        assert_secure(browser.get("/no-such-page"), hsts=True)
