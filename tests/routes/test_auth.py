"""Sign-in and sign-out: wrong passwords, the login form's CSRF cookie, revocation, safe redirects."""

from __future__ import annotations

import re

import httpx

from tests.conftest import PASSWORD, LiveServer, create_user, sign_in


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
