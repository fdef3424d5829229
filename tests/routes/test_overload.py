"""A full queue answers 429 with Retry-After at once, in the chat and in the API; nothing is lost."""

from __future__ import annotations

import re
from collections.abc import Iterator

import openai
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import DailyUsage, User
from tests.conftest import LiveServer, create_api_key, make_settings, with_db


def requests_counted(server: LiveServer, email: str) -> int:
    """The requests the member's limits have counted today (app.usage)."""

    async def count(db: AsyncSession) -> int:
        query = select(func.coalesce(func.sum(DailyUsage.requests), 0)).join(User).where(User.email == email)
        return int(await db.scalar(query) or 0)

    return with_db(server.settings, count)


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> Iterator[LiveServer]:  # type: ignore[no-untyped-def]
    settings = make_settings(
        tmp_path_factory.mktemp("busy"), tiny_model_dir, max_new_tokens=4000,
        max_running_generations=1, max_queued_generations=0,
    )  # fmt: skip
    live = LiveServer(settings).start()
    yield live
    live.stop()


def test_full_queue_answers_429_and_keeps_the_users_text(busy_server: LiveServer, member_factory) -> None:
    member = member_factory(busy_server)
    client = openai.OpenAI(
        base_url=f"{busy_server.url}/v1",
        api_key=create_api_key(busy_server.settings, member.email),
        max_retries=0,
    )
    conversation = member.start_chat("a long reply takes the only slot")
    page = member.get(f"/c/{conversation}").text
    reply = re.findall(r'id="msg-([0-9a-f-]{36})" class="message assistant', page)[-1]

    refused = member.post("/c", data={"message": "second question"})  # a new chat needs the model too
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "busy" in refused.text and refused.headers["HX-Retarget"] == "#notice"
    with pytest.raises(openai.RateLimitError) as api_refused:
        client.chat.completions.create(
            model=busy_server.settings.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    assert int(api_refused.value.response.headers["Retry-After"]) >= 1
    assert api_refused.value.response.json()["error"]["code"] == "server_overloaded"
    # Nothing half-stored (no empty conversation), and the running reply was not disturbed.
    assert "second question" not in member.get("/").text
    assert member.get("/").text.count('<li id="conv-') == 1
    assert busy_server.services.engine.load() == {"running": 1, "waiting": 0}
    # The server's full queue is not the member's doing: only the first chat counted against them.
    assert requests_counted(busy_server, member.email) == 1

    member.post(f"/c/{conversation}/messages/{reply}/stop")
    accepted = member.post(f"/c/{conversation}/messages", data={"message": "second question"})
    assert accepted.status_code == 200
    assert requests_counted(busy_server, member.email) == 2
    second = re.findall(r'id="msg-([0-9a-f-]{36})" class="message assistant', accepted.text)[-1]
    assert member.post(f"/c/{conversation}/messages/{second}/stop").status_code == 204
