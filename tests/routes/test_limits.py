"""Rate limits and the daily token quota on a live server, in the chat and the API, and the admin
usage page's figures against what was sent.

Limits are set per user by an admin on /admin/users, as in production. The per-minute window is the
calendar minute, so tests that count requests start early in a minute (`fresh_minute`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from tests.conftest import (
    LiveServer,
    Member,
    create_api_key,
    load_message,
    make_settings,
    wait_for_message,
    with_db,
)
from tests.routes.test_chat import reply_id


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("limits"), tiny_model_dir, max_new_tokens=6)
    live = LiveServer(settings).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def page_admin(limits_server: LiveServer) -> Iterator[Member]:
    from tests.conftest import create_user, sign_in

    create_user(limits_server.settings, "usage-admin@example.com", admin=True)
    admin = sign_in(limits_server, "usage-admin@example.com")
    yield admin
    admin.client.close()


def user_id(server: LiveServer, email: str) -> int:
    from app.auth.service import get_user_by_email

    async def find(db: AsyncSession) -> int:
        user = await get_user_by_email(db, email)
        assert user is not None
        return user.id

    return with_db(server.settings, find)


def set_limits(
    admin: Member, server: LiveServer, email: str, per_minute: str = "", tokens: str = ""
) -> httpx.Response:
    data = {"rate_limit_per_minute": per_minute, "daily_token_quota": tokens}
    response = admin.post(f"/admin/users/{user_id(server, email)}/limits", data=data)
    assert response.status_code == 200, response.text
    return response


def fresh_minute(needed_s: float = 20) -> None:
    """Wait for the next minute if fewer than `needed_s` seconds are left in this one."""
    left = 60 - time.time() % 60
    if left < needed_s:
        time.sleep(left + 0.2)


def api(server: LiveServer, email: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=create_api_key(server.settings, email), max_retries=0
    )


def ask(client: openai.OpenAI, server: LiveServer) -> Any:
    return client.chat.completions.create(
        model=server.settings.model_name,
        messages=[{"role": "user", "content": "How many days of leave?"}],
        max_tokens=4,
    )


def stored(server: LiveServer, email: str) -> tuple[int, int]:
    """The user's conversations and messages in the database."""
    from app.models import Conversation, Message, User

    async def count(db: AsyncSession) -> tuple[int, int]:
        mine = select(Conversation.id).join(User).where(User.email == email)
        conversations = await db.scalar(select(func.count()).select_from(mine.subquery()))
        messages = await db.scalar(
            select(func.count()).select_from(Message).where(Message.conversation_id.in_(mine))
        )
        return int(conversations or 0), int(messages or 0)

    return with_db(server.settings, count)


def test_admin_sets_a_users_limits_on_the_users_page(
    limits_server: LiveServer, page_admin: Member, member_factory
) -> None:
    member = member_factory(limits_server)
    page = page_admin.get("/admin/users").text
    assert 'name="rate_limit_per_minute"' in page and 'placeholder="unlimited"' in page

    saved = set_limits(page_admin, limits_server, member.email, per_minute="30", tokens="50,000")
    uid = user_id(limits_server, member.email)
    row = re.search(rf'<tr id="user-{uid}">.*?</tr>', saved.text, re.S)
    assert row and 'value="30"' in row.group(0) and 'value="50000"' in row.group(0)
    for bad, field in (("-1", "Requests per minute"), ("ten", "Requests per minute")):
        refused = page_admin.post(
            f"/admin/users/{uid}/limits", data={"rate_limit_per_minute": bad, "daily_token_quota": ""}
        )
        assert refused.status_code == 422 and f"{field} must be a whole number" in refused.text
        assert refused.headers["HX-Retarget"] == "#notice"
    assert page_admin.post("/admin/users/999999/limits", data={}).status_code == 404

    from app.models import AuditEvent, User

    async def read(db: AsyncSession) -> tuple[Any, ...]:
        user = await db.get(User, uid)
        assert user is not None
        event = await db.scalar(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1))
        assert event is not None
        return user.rate_limit_per_minute, user.daily_token_quota, event.action, event.target, event.details

    assert with_db(limits_server.settings, read) == (
        30, 50_000, "user.limits", member.email,
        {"rate_limit_per_minute": 30, "daily_token_quota": 50_000,
         "previous": {"rate_limit_per_minute": None, "daily_token_quota": None}},
    )  # fmt: skip
    set_limits(page_admin, limits_server, member.email)  # back to the settings' (unlimited here)
    assert with_db(limits_server.settings, read)[:2] == (None, None)


def test_over_the_rate_limit_the_api_answers_429_with_retry_after(
    limits_server: LiveServer, page_admin: Member, member_factory
) -> None:
    member = member_factory(limits_server)
    set_limits(page_admin, limits_server, member.email, per_minute="2")
    client = api(limits_server, member.email)
    fresh_minute()
    ask(client, limits_server)
    ask(client, limits_server)
    with pytest.raises(openai.RateLimitError) as refused:
        ask(client, limits_server)
    response = refused.value.response
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
    assert error["message"].startswith("Too many requests: your limit is 2 requests a minute; try again in ")
    assert [m.id for m in client.models.list()] == [
        limits_server.settings.model_name
    ]  # not a request for a reply

    # Another user is not affected.
    other = member_factory(limits_server)
    set_limits(page_admin, limits_server, other.email, per_minute="2")
    assert ask(api(limits_server, other.email), limits_server).choices


def test_over_the_rate_limit_the_chat_says_so_and_stores_nothing(
    limits_server: LiveServer, page_admin: Member, member_factory
) -> None:
    member = member_factory(limits_server)
    set_limits(page_admin, limits_server, member.email, per_minute="1")
    fresh_minute()
    conversation = member.start_chat("First question")
    reply = reply_id(member.get(f"/c/{conversation}").text)
    wait_for_message(limits_server.settings, reply)
    before = stored(limits_server, member.email)
    assert before == (1, 2)

    for url, data in (
        (f"/c/{conversation}/messages", {"message": "Second question"}),
        ("/c", {"message": "A new conversation"}),
        (f"/c/{conversation}/messages/{reply}/regenerate", None),
    ):
        refused = member.post(url, data=data)
        assert refused.status_code == 429, (url, refused.text)
        assert refused.headers["HX-Retarget"] == "#notice" and 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "Not sent: Too many requests: your limit is 1 request a minute; try again in " in refused.text
        assert stored(limits_server, member.email) == before, url
    assert load_message(limits_server.settings, reply).status.value == "complete"  # regenerate kept it


def test_when_the_daily_quota_is_spent_the_api_and_the_chat_refuse_until_midnight(
    limits_server: LiveServer, page_admin: Member, member_factory
) -> None:
    member = member_factory(limits_server)
    set_limits(page_admin, limits_server, member.email, tokens="5")
    client = api(limits_server, member.email)
    first = ask(client, limits_server)  # admitted with 0 of 5 used; it uses more than 5
    assert first.usage.total_tokens > 5

    with pytest.raises(openai.RateLimitError) as refused:
        ask(client, limits_server)
    response = refused.value.response
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    assert abs(int(response.headers["Retry-After"]) - (midnight - now).total_seconds()) < 30
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "daily_token_quota_exceeded")
    used = first.usage.total_tokens
    assert error["message"].startswith(f"You have used {used} tokens today, your daily quota is 5 tokens; ")
    assert "it renews at 00:00 UTC, in " in error["message"]

    refused_chat = member.post("/c", data={"message": "Still there?"})
    assert refused_chat.status_code == 429 and "your daily quota is 5 tokens" in refused_chat.text
    assert stored(limits_server, member.email) == (0, 0)

    set_limits(page_admin, limits_server, member.email, tokens="0")  # an admin lifts it: unlimited
    assert ask(client, limits_server).choices


def usage_row(page: str, uid: int) -> dict[str, str]:
    row = re.search(rf'<tr id="usage-{uid}">(.*?)</tr>', page, re.S)
    assert row, page
    cells = re.findall(r'<td class="([a-z-]+)[^"]*">(.*?)</td>', row.group(1), re.S)
    return {name: re.sub(r"<[^>]+>", "", text).strip() for name, text in cells}


def test_the_usage_page_shows_what_each_user_sent(
    limits_server: LiveServer, page_admin: Member, member_factory
) -> None:
    member = member_factory(limits_server)
    uid = user_id(limits_server, member.email)
    assert usage_row(page_admin.get("/admin/usage").text, uid)["last-active"] == "never"
    client = api(limits_server, member.email)
    tokens = sum(ask(client, limits_server).usage.total_tokens for _ in range(2))
    streamed = client.chat.completions.create(
        model=limits_server.settings.model_name, messages=[{"role": "user", "content": "When is payday?"}],
        max_tokens=4, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    tokens += next(c.usage.total_tokens for c in list(streamed) if c.usage)
    conversation = member.start_chat("Who approves travel?")
    reply = wait_for_message(limits_server.settings, reply_id(member.get(f"/c/{conversation}").text))
    tokens += reply.prompt_tokens + reply.completion_tokens

    # A reply's tokens are added as it ends, a moment after it is stored.
    deadline = time.monotonic() + 15
    while (row := usage_row(page_admin.get("/admin/usage").text, uid))["tokens-today"] != f"{tokens:,}":
        assert time.monotonic() < deadline, (row, tokens)
        time.sleep(0.2)
    assert row["requests-today"] == row["requests-period"] == "4"
    assert row["tokens-period"] == f"{tokens:,}"
    last_active = datetime.strptime(row["last-active"], "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - last_active).total_seconds()) < 120

    admin_key = create_api_key(limits_server.settings, page_admin.email)
    report = httpx.get(
        f"{limits_server.url}/api/admin/usage", headers={"Authorization": f"Bearer {admin_key}"}
    )
    mine = next(r for r in report.json() if r["email"] == member.email)
    figures = ("requests_today", "tokens_today", "requests_30_days", "tokens_30_days")
    assert [mine[figure] for figure in figures] == [4, tokens, 4, tokens]
    assert mine["rate_limit_per_minute"] == 0 and mine["daily_token_quota"] == 0
    assert json.dumps(mine)  # plain JSON
    assert 'href="/admin/usage" aria-current="page"' in page_admin.get("/admin/usage").text


def test_an_api_key_limited_on_the_users_page_is_refused_alone(
    limits_server: LiveServer, page_admin: Member, member_factory
) -> None:
    member = member_factory(limits_server)
    limited, free = api(limits_server, member.email), api(limits_server, member.email)
    from app.models import ApiKey, User

    async def key_ids(db: AsyncSession) -> list[int]:
        query = select(ApiKey.id).join(User).where(User.email == member.email).order_by(ApiKey.id)
        return list((await db.scalars(query)).all())

    first, _ = with_db(limits_server.settings, key_ids)
    uid = user_id(limits_server, member.email)
    page = page_admin.get("/admin/users").text
    assert f'name="key_id" value="{first}"' in page
    saved = page_admin.post(
        f"/admin/users/{uid}/api-key-limit", data={"key_id": first, "rate_limit_per_minute": "1"}
    )
    assert saved.status_code == 200 and 'name="rate_limit_per_minute" inputmode="numeric"' in saved.text
    someone_elses = page_admin.post(
        f"/admin/users/{user_id(limits_server, page_admin.email)}/api-key-limit",
        data={"key_id": first, "rate_limit_per_minute": "5"},
    )
    assert someone_elses.status_code == 404

    fresh_minute()
    ask(limited, limits_server)
    with pytest.raises(openai.RateLimitError) as refused:
        ask(limited, limits_server)
    assert "this API key's limit is 1 request a minute" in refused.value.response.json()["error"]["message"]
    assert ask(free, limits_server).choices  # the user's other key goes on
