"""The chat over its HTML routes, against a live server with the real tiny NF4 model."""

from __future__ import annotations

import html
import re
import time

import httpx

from tests.conftest import LiveServer, Member, elements, load_message, wait_for_message, with_db
from tests.routes.sse import read_events


def reply_id(page: str) -> str:
    """The id of the newest assistant message on a page or partial."""
    ids = re.findall(r'id="msg-([0-9a-f-]{36})" class="message assistant', page)
    assert ids, page
    return ids[-1]


def stream_url(conversation: str, message: str) -> str:
    return f"/c/{conversation}/messages/{message}/stream"


def test_a_streamed_chat_is_stored_and_rendered(server: LiveServer, member_factory) -> None:
    member: Member = member_factory(server)
    conversation = member.start_chat("What is the **expense** policy?")
    page = member.get(f"/c/{conversation}").text
    message = reply_id(page)
    with member.client.stream("GET", stream_url(conversation, message)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        events = list(read_events(response))
    tokens = [e for e in events if e.event == "token"]
    assert tokens and events[-1].event == "done" and events[-1].data == "complete"
    ids = [int(e.id or 0) for e in events]
    assert ids == sorted(set(ids)), "every event has its own, increasing id"
    streamed = html.unescape("".join(e.data for e in tokens))
    stored = wait_for_message(server.settings, message)
    assert stored.content == streamed
    assert (stored.status.value, stored.finish_reason, stored.completion_tokens) == ("complete", "length", 48)
    assert stored.prompt_tokens > 10 and stored.duration_ms > 0 and stored.time_to_first_token_ms is not None
    # The finished message is served as rendered Markdown, and the page lists the conversation.
    final = member.get(f"/c/{conversation}/messages/{message}").text
    assert 'class="content markdown"' in final and "sse-connect" not in final
    page = member.get(f"/c/{conversation}").text
    assert "What is the **expense** policy?" in page  # the user's text, shown as typed
    assert f'href="/c/{conversation}"' in page


def test_reconnecting_with_last_event_id_loses_and_repeats_nothing(
    long_server: LiveServer, member_factory
) -> None:
    member: Member = member_factory(long_server)
    conversation = member.start_chat("Tell me about parental leave")
    message = reply_id(member.get(f"/c/{conversation}").text)
    first: list[str] = []
    with member.client.stream("GET", stream_url(conversation, message)) as response:
        for event in read_events(response):
            first.append(event.data)
            last_id = event.id
            if len(first) == 5:
                break  # the connection drops mid-reply
    time.sleep(0.5)  # the reply goes on while nobody listens
    # A reloaded page shows the text so far and resumes after its last event.
    page = member.get(f"/c/{conversation}").text
    after = re.search(rf"{stream_url(conversation, message)}\?after=(\d+)", page)
    assert after and int(after.group(1)) > int(last_id or 0)
    member.post(f"/c/{conversation}/messages/{message}/stop")
    with member.client.stream(
        "GET", stream_url(conversation, message), headers={"Last-Event-ID": str(last_id)}
    ) as response:
        rest = [e for e in read_events(response)]
    assert rest[-1].event == "done" and rest[-1].data == "stopped"
    streamed = html.unescape("".join(first) + "".join(e.data for e in rest if e.event == "token"))
    stored = wait_for_message(long_server.settings, message)
    assert stored.content == streamed and len(streamed) > 50


def test_stop_keeps_the_partial_reply_and_frees_the_engine(long_server: LiveServer, member_factory) -> None:
    member: Member = member_factory(long_server)
    conversation = member.start_chat("Explain the travel policy in detail")
    message = reply_id(member.get(f"/c/{conversation}").text)
    time.sleep(0.5)
    assert long_server.services.engine.load()["running"] == 1
    response = member.post(f"/c/{conversation}/messages/{message}/stop")
    assert response.status_code == 204
    # Stop returns once the model has let go of the reply and it is stored.
    assert long_server.services.engine.load() == {"running": 0, "waiting": 0}
    stored = load_message(long_server.settings, message)
    assert stored.status.value == "stopped" and stored.content
    assert 0 < stored.completion_tokens < 4000
    page = member.get(f"/c/{conversation}").text
    assert "Stopped." in page and "sse-connect" not in page


def test_regenerate_replaces_the_last_reply(server: LiveServer, member_factory) -> None:
    member: Member = member_factory(server)
    conversation = member.start_chat("Hello")
    first = reply_id(member.get(f"/c/{conversation}").text)
    wait_for_message(server.settings, first)
    response = member.post(f"/c/{conversation}/messages/{first}/regenerate")
    assert response.status_code == 200
    second = reply_id(response.text)
    assert second != first and "sse-connect" in response.text
    wait_for_message(server.settings, second)
    assert load_message(server.settings, first) is None
    page = member.get(f"/c/{conversation}").text
    assert page.count('class="message assistant') == 1 and page.count('class="message user') == 1


def test_a_conversation_continues_with_its_history(server: LiveServer, member_factory) -> None:
    member: Member = member_factory(server)
    conversation = member.start_chat("First question")
    wait_for_message(server.settings, reply_id(member.get(f"/c/{conversation}").text))
    response = member.post(f"/c/{conversation}/messages", data={"message": "Second question"})
    assert response.status_code == 200 and "Second question" in response.text
    second = wait_for_message(server.settings, reply_id(response.text))
    first = load_message(
        server.settings, reply_id(member.get(f"/c/{conversation}").text.split("Second question")[0])
    )
    assert second.prompt_tokens > first.prompt_tokens  # the history went into the prompt


def test_rename_and_delete(server: LiveServer, member_factory) -> None:
    member: Member = member_factory(server)
    conversation = member.start_chat("Rename me")
    wait_for_message(server.settings, reply_id(member.get(f"/c/{conversation}").text))
    response = member.post(f"/c/{conversation}/rename", data={"title": "  Travel   questions "})
    assert response.status_code == 200 and ">Travel questions</a>" in response.text
    response = member.post(f"/c/{conversation}/rename", data={"title": "   "})
    assert response.status_code == 400 and "The title is empty" in response.text
    assert response.headers["HX-Retarget"] == "#notice"
    response = member.post(
        f"/c/{conversation}/delete", headers={"HX-Current-URL": f"{server.url}/c/{conversation}"}
    )
    assert response.headers["HX-Redirect"] == "/"
    assert member.get(f"/c/{conversation}").status_code == 404


def test_another_users_conversation_does_not_exist_for_them(server: LiveServer, member_factory) -> None:
    alice: Member = member_factory(server)
    bob: Member = member_factory(server)
    conversation = alice.start_chat("Alice's private question")
    message = reply_id(alice.get(f"/c/{conversation}").text)
    wait_for_message(server.settings, message)
    base = f"/c/{conversation}"
    for url in (base, f"{base}/rename", f"{base}/messages/{message}", stream_url(conversation, message)):
        assert bob.get(url).status_code == 404, url
    for url in (f"{base}/messages", f"{base}/rename", f"{base}/messages/{message}/stop",
                f"{base}/messages/{message}/regenerate", f"{base}/delete"):  # fmt: skip
        assert bob.post(url, data={"message": "mine now", "title": "mine"}).status_code == 404, url
    assert "Alice's private question" not in bob.get("/").text
    assert alice.get(base).status_code == 200  # still there, untouched
    assert load_message(server.settings, message).status.value == "complete"


def test_state_changes_need_the_sessions_csrf_token(server: LiveServer, member_factory) -> None:
    alice: Member = member_factory(server)
    bob: Member = member_factory(server)
    count = lambda: alice.get("/").text.count('<li id="conv-')  # noqa: E731
    before = count()
    no_token = alice.client.post("/c", data={"message": "hi"})
    wrong_token = alice.client.post("/c", data={"message": "hi"}, headers={"X-CSRF-Token": bob.csrf})
    wrong_origin = alice.post("/c", data={"message": "hi"}, headers={"Origin": "https://evil.example"})
    assert [r.status_code for r in (no_token, wrong_token, wrong_origin)] == [403, 403, 403]
    assert count() == before
    form_token = alice.client.post("/c", data={"message": "hi", "csrf_token": alice.csrf})
    assert form_token.status_code == 303  # a plain form with the token in a field works


def test_anonymous_visitors_are_sent_to_sign_in(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as anonymous:
        response = anonymous.get("/c/00000000-0000-0000-0000-000000000000")
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next=")
        assert anonymous.post("/c", data={"message": "hi"}).status_code == 401
        assert anonymous.get("/", headers={"HX-Request": "true"}).headers["HX-Redirect"] == "/login?next=/"


def test_model_output_with_html_and_markdown_renders_inert(server: LiveServer, member_factory) -> None:
    member: Member = member_factory(server)
    conversation = member.start_chat("Show me some HTML")
    message = reply_id(member.get(f"/c/{conversation}").text)
    wait_for_message(server.settings, message)
    payload = (
        "<script>window.pwned=1</script><img src=x onerror=alert(1)> [click](javascript:alert(1)) "
        '<a href="javascript:alert(2)">x</a> ![i](x" onerror="alert(3)) <svg onload=alert(4)>\n\n'
        "| a | b |\n|---|---|\n| <iframe src=//evil> | **bold** |\n\n```\n<script>alert(5)</script>\n```"
    )

    async def store(db) -> None:  # type: ignore[no-untyped-def]
        from app.models import Message

        stored = await db.get(Message, __import__("uuid").UUID(message))
        stored.content = payload  # as if the model had written it
        await db.commit()

    with_db(server.settings, store)
    page = member.get(f"/c/{conversation}").text
    body = page.split('id="transcript"', 1)[1].split('id="composer"', 1)[0]
    tags = elements(body)
    assert not {tag for tag, _ in tags} & {"script", "img", "svg", "iframe"}
    assert not [(tag, name) for tag, attrs in tags for name, _ in attrs if name.startswith("on")]
    assert not [
        value for _, attrs in tags for name, value in attrs if name == "href" and "javascript" in value
    ]
    assert "<table>" in body and "<strong>bold</strong>" in body and "&lt;script&gt;alert(5)" in body


def test_refused_sends_say_why_and_store_nothing(long_server: LiveServer, member_factory) -> None:
    member: Member = member_factory(long_server)
    conversation = member.start_chat("First")
    message = reply_id(member.get(f"/c/{conversation}").text)
    empty = member.post(f"/c/{conversation}/messages", data={"message": " \n "})
    assert empty.status_code == 400 and "The message is empty." in empty.text
    too_long = member.post(f"/c/{conversation}/messages", data={"message": "x" * 40_000})
    assert too_long.status_code == 400 and "the limit is 32000" in too_long.text
    busy = member.post(f"/c/{conversation}/messages", data={"message": "Second"})
    assert busy.status_code == 409 and "still being written" in busy.text
    assert member.post(f"/c/{conversation}/messages/{message}/stop").status_code == 204
    page = member.get(f"/c/{conversation}").text
    assert page.count('class="message user') == 1 and "Second" not in page
