"""Sign-in and sign-out: wrong passwords, the login form's CSRF cookie, revocation, safe redirects."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import AuditEvent
from tests.conftest import PASSWORD, LiveServer, create_user, make_settings, sign_in, with_db


def login_form(client: httpx.Client) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert match
    return match.group(1)


def test_wrong_password_and_unknown_email_look_the_same(server: LiveServer) -> None:
    create_user(server.settings, "known@example.com")
    with httpx.Client(base_url=server.url) as client:
        answers = []
        for email, password in (("known@example.com", "wrong password"), ("nobody@example.com", PASSWORD)):
            response = client.post(
                "/login", data={"email": email, "password": password, "csrf_token": login_form(client)}
            )
            answers.append((response.status_code, "Wrong email or password." in response.text))
            assert "pgpt_session" not in response.cookies
        assert answers == [(401, True), (401, True)]


def test_the_login_form_needs_its_own_csrf_token(server: LiveServer) -> None:
    create_user(server.settings, "csrf-login@example.com")
    with httpx.Client(base_url=server.url) as client:
        login_form(client)
        response = client.post(
            "/login", data={"email": "csrf-login@example.com", "password": PASSWORD, "csrf_token": "forged"}
        )
        assert response.status_code == 403 and "expired" in response.text
        assert "pgpt_session" not in response.cookies


def test_sign_out_revokes_the_session_on_the_server(server: LiveServer) -> None:
    create_user(server.settings, "leaver@example.com")
    member = sign_in(server, "leaver@example.com")
    cookie = member.client.cookies.get("pgpt_session")
    assert member.get("/").status_code == 200
    response = member.client.post("/logout", data={"csrf_token": member.csrf})
    assert response.status_code == 303 and response.headers["location"] == "/login"
    with httpx.Client(base_url=server.url, cookies={"pgpt_session": cookie or ""}) as replay:
        assert replay.get("/").status_code == 303  # the old cookie no longer signs anyone in
    member.client.close()


def test_next_only_leads_back_into_this_site(server: LiveServer) -> None:
    create_user(server.settings, "next@example.com")
    for target, expected in (("/c/abc", "/c/abc"), ("https://evil.example/", "/"), ("//evil.example", "/")):
        with httpx.Client(base_url=server.url) as client:
            token = login_form(client)
            response = client.post(
                "/login",
                data={"email": "next@example.com", "password": PASSWORD, "csrf_token": token, "next": target},
            )
            assert response.headers["location"] == expected, target


def test_failed_sign_ins_pause_that_email_from_that_address_only(
    database_url: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """After SIGN_IN_FAILURE_LIMIT failures an email is refused from that address (the password
    unchecked, nothing audited) with 429 + Retry-After; its owner elsewhere still signs in; an address
    spraying many emails is refused after ten times the limit."""
    settings = make_settings(tmp_path, tiny_model_dir, database_url=database_url, sign_in_failure_limit=3)
    live = LiveServer(settings).start()
    try:
        create_user(settings, "guessed@example.com")
        attacker = {"X-Forwarded-For": "203.0.113.7"}  # the test client is a trusted proxy (127.0.0.1)
        owner = {"X-Forwarded-For": "198.51.100.20"}

        def attempt(email: str, password: str, headers: dict[str, str]) -> httpx.Response:
            with httpx.Client(base_url=live.url, headers=headers) as client:
                data = {"email": email, "password": password, "csrf_token": login_form(client)}
                return client.post("/login", data=data)

        assert [attempt("guessed@example.com", "wrong", attacker).status_code for _ in range(3)] == [401] * 3
        refused = attempt("guessed@example.com", PASSWORD, attacker)  # even the right password
        assert refused.status_code == 429 and "Too many failed sign-ins" in refused.text
        assert 0 < int(refused.headers["Retry-After"]) <= 15 * 60
        assert "pgpt_session" not in refused.cookies
        assert attempt("guessed@example.com", PASSWORD, owner).status_code == 303

        async def failures(db: AsyncSession) -> int:
            return len(
                (
                    await db.scalars(
                        select(AuditEvent).where(
                            AuditEvent.action == "sign-in.failed",
                            AuditEvent.target == "guessed@example.com",
                        )
                    )
                ).all()
            )

        assert with_db(settings, failures) == 3, "the refused attempt added no audit row"

        # Password spraying: 30 failures from one address over all emails, then every email waits.
        for i in range(27):
            assert attempt(f"sprayed{i}@example.com", "Winter2026!", attacker).status_code == 401
        assert attempt("sprayed-next@example.com", "Winter2026!", attacker).status_code == 429
        assert attempt("sprayed-next@example.com", "Winter2026!", owner).status_code == 401
    finally:
        live.stop()
