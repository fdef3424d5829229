"""GET /metrics against a live server: real completions show up, labelled by route, behind the token."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from app.config import Settings, describe_validation_error
from tests.conftest import (
    LiveServer,
    Member,
    build_adapter,
    create_api_key,
    make_admin,
    make_settings,
    wait_for_message,
    zip_directory,
)
from tests.routes.sse import read_events
from tests.routes.test_chat import reply_id, stream_url

TOKEN = "scrape-me-" + "0123456789abcdef" * 2


class Samples(dict[tuple[str, frozenset[tuple[str, str]]], float]):
    """One scrape, parsed by prometheus_client's own parser: (sample name, labels) -> value."""

    def __call__(self, name: str, **labels: str) -> float:
        return self.get((name, frozenset(labels.items())), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self}

    def labelled(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for sample, labels in self if sample == name]


def scrape(server: LiveServer, token: str | None = TOKEN) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{server.url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = Samples()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape_until(server: LiveServer, done: Callable[[Samples], bool], timeout: float = 10) -> Samples:
    """HTTP requests are counted once their response is out, an instant after the client has it."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    """A server of its own, so counts move only with this module's requests; METRICS_TOKEN set, and
    room for one adapter, so a second one evicts the first."""
    settings = make_settings(
        tmp_path_factory.mktemp("metered"), tiny_model_dir, metrics_token=TOKEN, max_resident_adapters=1
    )
    live = LiveServer(settings).start()
    yield live
    live.stop()


@pytest.fixture
def api(metered: LiveServer, member_factory) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    member = member_factory(metered)
    key = create_api_key(metered.settings, member.email)
    return openai.OpenAI(base_url=f"{metered.url}/v1", api_key=key, max_retries=0)


def test_a_completion_is_counted_timed_and_its_tokens_added(metered: LiveServer, api: openai.OpenAI) -> None:
    route = {"method": "POST", "route": "/v1/chat/completions"}
    before = scrape(metered)
    reply = api.chat.completions.create(
        model=metered.settings.model_name,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=20,
        temperature=0,
    )
    assert reply.usage is not None and reply.choices[0].finish_reason == "length"
    after = scrape_until(
        metered,
        lambda s: (
            s("privategpt_http_requests_total", **route, status="200")
            > before("privategpt_http_requests_total", **route, status="200")
            and s("privategpt_batch_size") == 0  # the engine has gone idle after the reply
        ),
    )

    def grew(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    assert grew("privategpt_requests_queued_total") == 1
    assert grew("privategpt_requests_finished_total", reason="length") == 1
    assert grew("privategpt_generation_tokens_total") == reply.usage.completion_tokens == 20
    assert grew("privategpt_prompt_tokens_total") == reply.usage.prompt_tokens > 0
    assert grew("privategpt_time_to_first_token_seconds_count") == 1
    assert grew("privategpt_time_to_first_token_seconds_sum") > 0
    assert grew("privategpt_inter_token_latency_seconds_count") == 19  # between 20 tokens
    assert grew("privategpt_request_duration_seconds_count") == 1
    assert grew("privategpt_prefill_duration_seconds_count") >= 1
    assert grew("privategpt_step_duration_seconds_count") >= 1
    assert grew("privategpt_step_batch_size_count") >= 1
    # Nothing runs once the reply is done: the gauges are back to 0, not the last step's batch.
    assert after("privategpt_batch_size") == 0 and after("privategpt_queue_depth") == 0
    assert grew("privategpt_http_requests_total", **route, status="200") == 1
    assert grew("privategpt_http_request_duration_seconds_count", **route) == 1
    assert grew("privategpt_http_stream_duration_seconds_count", **route) == 0


def test_requests_are_labelled_by_route_template_and_streams_timed_apart(
    metered: LiveServer, api: openai.OpenAI, member_factory
) -> None:
    member: Member = member_factory(metered)
    conversation = member.start_chat("What is the expense policy?")
    assert member.get(f"/c/{conversation}").status_code == 200
    message = reply_id(member.get(f"/c/{conversation}").text)
    with member.client.stream("GET", stream_url(conversation, message)) as response:
        assert [e.event for e in read_events(response)][-1] == "done"
    wait_for_message(metered.settings, message)
    chunks = api.chat.completions.create(
        model=metered.settings.model_name,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        stream=True,
    )
    assert len(list(chunks)) > 1
    assert httpx.get(f"{metered.url}/no/such/page").status_code == 404
    assert httpx.get(f"{metered.url}/static/css/app.css").status_code == 200

    page = {"method": "GET", "route": "/c/{conversation_id}"}
    tail = {"method": "GET", "route": "/c/{conversation_id}/messages/{message_id}/stream"}
    streamed_completion = {"method": "POST", "route": "/v1/chat/completions"}
    samples = scrape_until(
        metered,
        lambda s: (
            s("privategpt_http_stream_duration_seconds_count", **streamed_completion) >= 1
            and s("privategpt_http_stream_duration_seconds_count", **tail) >= 1
            and s("privategpt_http_requests_total", method="GET", route="unmatched", status="404") >= 1
        ),
    )
    assert samples("privategpt_http_requests_total", **page, status="200") == 2
    assert samples("privategpt_http_requests_total", method="POST", route="/c", status="204") == 1
    assert samples("privategpt_http_requests_total", **tail, status="200") == 1
    assert samples("privategpt_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert samples("privategpt_http_requests_total", method="GET", route="/static/{path}", status="200") == 1
    # Event streams last as long as their reply: timed in their own histogram, not the latency one.
    assert samples("privategpt_http_stream_duration_seconds_count", **tail) == 1
    assert samples("privategpt_http_stream_duration_seconds_count", **streamed_completion) == 1
    assert samples("privategpt_http_request_duration_seconds_count", **tail) == 0
    assert samples("privategpt_http_request_duration_seconds_count", **page) == 2
    # Scrapes are counted, not timed (Prometheus times them itself).
    assert samples("privategpt_http_requests_total", method="GET", route="/metrics", status="200") >= 1
    assert not [
        labels
        for labels in samples.labelled("privategpt_http_request_duration_seconds_count")
        if labels["route"] == "/metrics"
    ]
    # No label carries a raw path: ids would make a series per conversation.
    routes = {labels["route"] for labels in samples.labelled("privategpt_http_requests_total")}
    assert not [route for route in routes if conversation in route or "/no/such" in route or ".css" in route]


def test_adapter_loads_and_evictions_are_counted(
    metered: LiveServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    admin = make_admin(metered)
    before = scrape(metered)
    for name, seed in (("finance", 1), ("legal", 2)):
        directory = build_adapter(tiny_model_dir, tmp_path / name, seed=seed)
        uploaded = admin.upload(name, zip_directory(directory, tmp_path / f"{name}.zip"))
        assert uploaded.status_code == 201, uploaded.text
    upload = {"method": "POST", "route": "/api/admin/adapters/{name}/versions"}
    after = scrape_until(metered, lambda s: s("privategpt_http_requests_total", **upload, status="201") == 2)

    def grew(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    # Each upload's probe loads it; the second makes room by unloading the first.
    assert grew("privategpt_adapter_loads_total") == 2
    assert grew("privategpt_adapter_load_duration_seconds_count") == 2
    assert grew("privategpt_adapter_evictions_total") == 1
    assert after("privategpt_resident_adapters") == 1
    assert after("privategpt_http_requests_total", **upload, status="201") == 2


def test_metrics_token_is_required_when_set(metered: LiveServer) -> None:
    url = f"{metered.url}/metrics"
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-of-a-decent-length"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 401, headers
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "METRICS_TOKEN" in refused.json()["detail"] and "privategpt_" not in refused.text
    assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"bearer  {TOKEN}"}).status_code == 200


def test_metrics_are_open_without_a_token_and_speak_openmetrics(server: LiveServer) -> None:
    assert server.settings.metrics_token is None
    assert "privategpt_requests_queued_total" in scrape(server, token=None).names()
    # What Prometheus itself asks for.
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    response = httpx.get(f"{server.url}/metrics", headers={"Accept": accept})
    assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.text.endswith("# EOF\n")
    families = {family.name: family for family in openmetrics_families(response.text)}
    assert families["privategpt_time_to_first_token_seconds"].type == "histogram"
    assert families["privategpt_generation_tokens"].type == "counter"


def test_a_short_metrics_token_is_refused_without_echoing_it() -> None:
    assert Settings(_env_file=None, metrics_token="").metrics_token is None  # type: ignore[call-arg]
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, metrics_token="hunter2")  # type: ignore[call-arg]
    message = describe_validation_error(refused.value)
    assert "METRICS_TOKEN: must be at least 16 characters" in message and "hunter2" not in message
