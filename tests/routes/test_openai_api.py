"""The OpenAI-compatible API, driven by the official `openai` client against a live server."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import LiveServer, create_api_key


@pytest.fixture
def client(server: LiveServer, member_factory) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    member = member_factory(server)
    key = create_api_key(server.settings, member.email)
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_models_lists_the_served_model(client: openai.OpenAI, server: LiveServer) -> None:
    models = list(client.models.list())
    base = server.settings.model_name
    assert models[0].id == base
    # Then the adapters published on this shared server by other tests, if any ran first: each one
    # ready, and derived from the base.
    served = server.services.catalog.ready_names(None)
    assert all(m.id in served and getattr(m, "parent", None) == base for m in models[1:])


def test_streamed_completion_parses_with_the_official_client(
    client: openai.OpenAI, server: LiveServer
) -> None:
    chunks = list(
        client.chat.completions.create(
            model=server.settings.model_name,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
            stream=True,
            max_tokens=20,
            temperature=0,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    # Greedy, so the same request without streaming gives the same text.
    whole = client.chat.completions.create(
        model=server.settings.model_name,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=20,
        temperature=0,
    )
    assert whole.choices[0].message.content == content and len(content) > 0
    assert whole.usage is not None and whole.usage.completion_tokens == 20
    assert whole.choices[0].finish_reason == "length"


def test_stop_and_seed_are_honoured(client: openai.OpenAI, server: LiveServer) -> None:
    def ask(**kwargs: object) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=server.settings.model_name,
            messages=[{"role": "user", "content": "Hi"}],
            **kwargs,  # type: ignore[arg-type]
        )

    first = ask(max_tokens=30, temperature=1.0, seed=42).choices[0].message.content or ""
    assert ask(max_tokens=30, temperature=1.0, seed=42).choices[0].message.content == first
    stop = first[10:14]
    stopped = ask(max_tokens=30, temperature=1.0, seed=42, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == first[: first.index(stop)]


def test_errors_come_in_openai_shape(client: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.code == "model_not_found" and "gpt-4" in missing.value.message
    with pytest.raises(openai.BadRequestError, match="at most 4096"):
        client.chat.completions.create(
            model=server.settings.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=100_000
        )
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=server.settings.model_name, messages=[])
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="pgpt-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        bad_key.models.list()
    # Only the Authorization header carries a key: another header is no way in.
    key = client.api_key
    response = httpx.get(f"{server.url}/v1/models", headers={"x-api-key": key})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_a_client_that_hangs_up_frees_the_model(client: openai.OpenAI, server: LiveServer) -> None:
    engine = server.services.engine
    url, headers = f"{server.url}/v1/chat/completions", {"Authorization": f"Bearer {client.api_key}"}
    body = {
        "model": server.settings.model_name,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4000,
    }

    def wait_until_idle() -> dict[str, int]:
        # A stream's first line (its role) can leave before the engine admits the request: it may
        # still be queued when the client hangs up, and is dropped when its turn comes.
        deadline = time.monotonic() + 10
        while any(engine.load().values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return engine.load()

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, headers=headers, json=body, timeout=1.0)
    assert wait_until_idle() == {"running": 0, "waiting": 0}
    with httpx.stream("POST", url, headers=headers, json={**body, "stream": True}, timeout=10) as response:
        assert next(response.iter_lines()).startswith("data: ")
    assert wait_until_idle() == {"running": 0, "waiting": 0}


def test_a_request_without_a_system_message_gets_the_servers_system_prompt(
    client: openai.OpenAI, server: LiveServer
) -> None:
    """As the chat always sends SYSTEM_PROMPT (the demo adapter learnt with it), so does the API when
    the request has no system message of its own; one it sends replaces it."""

    def ask(messages: list[dict[str, str]]) -> tuple[int, str]:
        reply = client.chat.completions.create(
            model=server.settings.model_name,
            messages=messages,
            max_tokens=8,
            temperature=0,  # type: ignore[arg-type]
        )
        assert reply.usage is not None
        return reply.usage.prompt_tokens, reply.choices[0].message.content or ""

    question = {"role": "user", "content": "What is the travel policy?"}
    assert server.settings.system_prompt
    bare = ask([question])
    assert bare == ask([{"role": "system", "content": server.settings.system_prompt}, question])
    own = ask([{"role": "system", "content": "Be brief."}, question])
    assert own[0] < bare[0]  # the short system message instead of SYSTEM_PROMPT, not as well


def test_a_server_keeping_dequantized_weights_answers_as_the_4bit_one(
    server: LiveServer,
    member_factory,
    tmp_path,
    tiny_model_dir,  # type: ignore[no-untyped-def]
) -> None:
    """KEEP_DEQUANTIZED_WEIGHTS=true reaches the engine, and greedy replies do not change."""
    from tests.conftest import make_settings

    dequantized = LiveServer(make_settings(tmp_path, tiny_model_dir, keep_dequantized_weights=True)).start()
    try:
        layers = [
            m for m in dequantized.services.engine.model.model.modules() if hasattr(m, "dequantized_weight")
        ]
        assert layers, "the engine kept the copy"
        replies = []
        for live in (server, dequantized):
            member = member_factory(live)
            client = openai.OpenAI(
                base_url=f"{live.url}/v1", api_key=create_api_key(live.settings, member.email), max_retries=0
            )
            reply = client.chat.completions.create(
                model=live.settings.model_name,
                messages=[{"role": "user", "content": "What is the leave policy?"}],
                max_tokens=24,
                temperature=0,
            )
            replies.append(reply.choices[0].message.content)
    finally:
        dequantized.stop()
    assert replies[0] == replies[1] and replies[0]
