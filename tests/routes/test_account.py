"""Sessions and API keys a person can see and end (/account), and an admin's "sign out everywhere".

Real cookies against a live server: a revoked session, or every session of a user, lets no one in
from the very next request; a revoked API key is refused at once; idle sessions end after
SESSION_IDLE_HOURS. Another person's session or key is a 404 and stays alive.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import AuthSession, User, utcnow
from tests import test_browser
from tests.conftest import PASSWORD, LiveServer, Member, create_user, make_settings, sign_in, with_db


def signed_in(member: Member) -> bool:
    """Whether the member's cookie still opens the chat (a page, as a browser asks for it)."""
    return member.get("/").status_code == 200


def api_works(server: LiveServer, key: str) -> bool:
    response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    return response.status_code == 200


def session_rows(page: str) -> dict[str, str]:
    """The account page's sessions: id -> the row's text."""
    return dict(re.findall(r'<tr id="session-(\d+)">(.*?)</tr>', page, re.DOTALL))


def new_person(server: LiveServer, *, admin: bool = False) -> str:
    email = f"account-{uuid.uuid4().hex[:8]}@example.com"
    create_user(server.settings, email, admin=admin)
    return email


def test_people_see_their_sessions_and_end_one(server: LiveServer) -> None:
    email = new_person(server)
    desk, laptop = sign_in(server, email), sign_in(server, email)
    page = desk.get("/account")
    assert page.status_code == 200 and email in page.text
    rows = session_rows(page.text)
    assert len(rows) == 2 and all("127.0.0.1" in row and "password" in row for row in rows.values())
    (current,) = [number for number, row in rows.items() if "this browser" in row]
    (other,) = set(rows) - {current}

    # Another person cannot end it (nor learn it exists).
    stranger = sign_in(server, new_person(server))
    assert stranger.post(f"/account/sessions/{other}/revoke").status_code == 404
    assert signed_in(laptop)

    ended = desk.client.post(f"/account/sessions/{other}/revoke", data={"csrf_token": desk.csrf})
    assert ended.status_code == 303 and ended.headers["location"] == "/account"
    assert not signed_in(laptop)  # the very next request
    assert laptop.get("/").headers["location"] == "/login?next=/"
    assert signed_in(desk)
    assert set(session_rows(desk.get("/account").text)) == {current}
    assert desk.post(f"/account/sessions/{other}/revoke").status_code == 404  # ended already

    # Ending this browser's own session signs it out here.
    out = desk.client.post(f"/account/sessions/{current}/revoke", data={"csrf_token": desk.csrf})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert not signed_in(desk)
    for member in (desk, laptop, stranger):
        member.client.close()


def test_sign_out_everywhere_ends_every_session_but_keeps_api_keys(server: LiveServer) -> None:
    email = new_person(server)
    first, second = sign_in(server, email), sign_in(server, email)
    made = first.client.post("/account/api-keys", data={"csrf_token": first.csrf, "name": "laptop"})
    assert made.status_code == 201
    key = re.search(r'<code id="new-key">(pgpt-[^<]+)</code>', made.text)
    assert key and api_works(server, key.group(1))
    assert key.group(1) not in first.get("/account").text  # shown once

    out = first.client.post("/account/sign-out-everywhere", data={"csrf_token": first.csrf})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert "pgpt_session=" in out.headers["set-cookie"]
    assert not signed_in(first) and not signed_in(second)
    assert api_works(server, key.group(1))
    first.client.close()
    second.client.close()


def test_people_revoke_their_api_keys_and_the_next_request_is_refused(server: LiveServer) -> None:
    email = new_person(server)
    member = sign_in(server, email)
    made = member.client.post("/account/api-keys", data={"csrf_token": member.csrf, "name": "ci"})
    key = re.search(r'<code id="new-key">(pgpt-[^<]+)</code>', made.text)
    key_id = re.search(r'action="/account/api-keys/(\d+)/revoke"', made.text)
    assert key and key_id and api_works(server, key.group(1))
    assert "ci</td>" in member.get("/account").text

    other = sign_in(server, new_person(server))
    assert other.post(f"/account/api-keys/{key_id.group(1)}/revoke").status_code == 404
    assert api_works(server, key.group(1))

    revoked = member.client.post(
        f"/account/api-keys/{key_id.group(1)}/revoke", data={"csrf_token": member.csrf}
    )
    assert revoked.status_code == 303
    assert not api_works(server, key.group(1))
    assert "No API keys." in member.get("/account").text
    refused = member.client.post("/account/api-keys", data={"csrf_token": member.csrf, "name": "x" * 101})
    assert refused.status_code == 422
    member.client.close()
    other.client.close()


def test_an_admin_signs_a_user_out_everywhere(server: LiveServer) -> None:
    admin = sign_in(server, new_person(server, admin=True))
    email = new_person(server)
    phone, desk = sign_in(server, email), sign_in(server, email)
    user = with_db(server.settings, lambda db: db.scalar(select(User).where(User.email == email)))
    page = admin.get("/admin/users")
    assert f'hx-post="/admin/users/{user.id}" hx-vals=\'{{"action": "sign-out"}}\'' in page.text
    answer = admin.post(f"/admin/users/{user.id}", data={"action": "sign-out"})
    assert answer.status_code == 200 and email in answer.text
    assert not signed_in(phone) and not signed_in(desk)
    again = sign_in(server, email)  # they can sign in again
    assert signed_in(again)
    # A plain user cannot do it to someone else.
    assert phone.post(f"/admin/users/{user.id}", data={"action": "sign-out"}).status_code in (401, 403)
    for member in (admin, phone, desk, again):
        member.client.close()


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("idle"), tiny_model_dir, session_idle_hours=2)
    live = LiveServer(settings).start()
    yield live
    live.stop()


def test_an_idle_session_ends_and_a_used_one_lives_on(idle_server: LiveServer) -> None:
    email = new_person(idle_server)
    idle, busy = sign_in(idle_server, email), sign_in(idle_server, email)

    def age(hours: float, *, of: Member) -> None:
        """Make the member's session look last used `hours` ago."""
        csrf = of.csrf

        async def change(db: AsyncSession) -> None:
            when = utcnow() - timedelta(hours=hours)
            await db.execute(
                update(AuthSession).where(AuthSession.csrf_token == csrf).values(last_seen_at=when)
            )
            await db.commit()

        with_db(idle_server.settings, change)

    age(2.1, of=idle)
    age(1.9, of=busy)
    assert not signed_in(idle)
    assert signed_in(busy)
    # That request counted as use: another 1.9 hours later it is still alive.
    last_seen = with_db(
        idle_server.settings,
        lambda db: db.scalar(select(AuthSession.last_seen_at).where(AuthSession.csrf_token == busy.csrf)),
    )
    recent = (utcnow() - timedelta(minutes=5)).replace(tzinfo=None)  # SQLite's are naive UTC
    assert last_seen is not None and last_seen.replace(tzinfo=None) > recent
    assert len(session_rows(busy.get("/account").text)) == 1  # the idle one is not listed
    idle.client.close()
    busy.client.close()


browser = test_browser.browser  # the Chromium fixture, shared


@pytest.mark.browser
def test_the_account_page_in_chromium(server: LiveServer, browser: Any) -> None:
    """Make a key, end the other browser's session, then sign out everywhere, by clicking."""
    email = new_person(server)
    laptop = sign_in(server, email)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(f"{server.url}/login")
        page.fill("input[name=email]", email)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{server.url}/")
        page.click("a[href='/account']")
        page.wait_for_url(f"{server.url}/account")
        assert page.locator("table.sessions tbody tr").count() == 2

        page.fill("input[name=name]", "notebook")
        page.click("text=Create an API key")
        key = page.locator("#new-key").inner_text()
        assert key.startswith("pgpt-") and api_works(server, key)
        page.goto(f"{server.url}/account")  # shown once
        assert page.locator("#new-key").count() == 0 and "notebook" in page.content()

        page.locator("table.sessions tbody tr", has_not_text="this browser").locator("text=End").click()
        page.wait_for_url(f"{server.url}/account")
        assert page.locator("table.sessions tbody tr").count() == 1
        assert not signed_in(laptop)

        page.click("text=Sign out everywhere")
        page.wait_for_url(f"{server.url}/login")
        page.goto(f"{server.url}/")
        assert "/login" in page.url
        assert api_works(server, key)
    finally:
        context.close()
        laptop.client.close()
