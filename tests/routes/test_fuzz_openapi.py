"""Fuzzing the JSON APIs from the app's own OpenAPI schema (schemathesis): no request gets a 500.

The real app, with the tiny model, is reached in-process over ASGI (no socket): schemathesis runs its
lifespan on its own event loop and sends each generated request there. The OpenAI API is called with
a user's API key, the admin API with an admin's; both in valid and invalid forms (negative mode).
The hand-written cases below cover what a schema-driven fuzzer does not send: bytes that are not
UTF-8, bodies that are not JSON or not an object, oversized bodies, unknown OpenAI parameters.

    .venv/bin/pytest tests/routes/test_fuzz_openapi.py
    FUZZ_EXAMPLES=1000 .venv/bin/pytest tests/routes/test_fuzz_openapi.py -k never_answer  # a longer hunt
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.python.asgi import get_client
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from app.config import Settings
from tests.conftest import build_adapter, create_api_key, create_user, make_settings, zip_directory

pytestmark = pytest.mark.slow

# Replies of a few tokens, and a low ceiling: a generated max_tokens above it is refused at once.
MAX_TOKENS_LIMIT = 8
ADAPTER = "fuzzed"
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


class FuzzedApp:
    """The app under test, its settings, and a user's and an admin's API keys."""

    def __init__(self, settings: Settings) -> None:
        from app.main import create_app
        from app.migrate import upgrade_database

        self.settings = settings
        upgrade_database(settings.sqlalchemy_url)
        self.app = create_app(settings)
        user, admin = (f"{who}-{uuid.uuid4().hex[:8]}@example.com" for who in ("user", "admin"))
        create_user(settings, user)
        create_user(settings, admin, admin=True)
        self.user_key = create_api_key(settings, user)
        self.admin_key = create_api_key(settings, admin)

    def headers_for(self, path: str) -> dict[str, str]:
        key = self.admin_key if path.startswith("/api/admin") else self.user_key
        return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> FuzzedApp:
    root = tmp_path_factory.mktemp("fuzz")
    settings = make_settings(
        root / "data", tiny_model_dir, max_new_tokens=4, max_new_tokens_limit=MAX_TOKENS_LIMIT
    )
    fuzzed = FuzzedApp(settings)
    # Two versions of a real adapter, for the requests steered at it (serve, activate, delete, ...).
    admin = fuzzed.headers_for("/api/admin/")
    with get_client(fuzzed.app) as client:
        for seed in (1, 2):
            directory = build_adapter(tiny_model_dir, root / f"adapter-{seed}", seed=seed)
            archive = zip_directory(directory, root / f"adapter-{seed}.zip")
            with archive.open("rb") as file:
                files = {"file": (archive.name, file, "application/zip")}
                response = client.post(f"/api/admin/adapters/{ADAPTER}/versions", headers=admin, files=files)
            assert response.status_code == 201, response.text
    return fuzzed


@pytest.fixture(scope="module")
def api_schema(fuzzed: FuzzedApp) -> Any:
    # The schema is for signed-in users and API clients (app/routes/schema.py).
    return schemathesis.openapi.from_asgi("/openapi.json", fuzzed.app, headers=fuzzed.headers_for("/v1/"))


# Every operation of the OpenAI API and of the admin JSON API, by method and path.
OPERATIONS = [
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/api/admin/adapters"),
    ("POST", "/api/admin/adapters/{name}/versions"),
    ("POST", "/api/admin/adapters/{name}/versions/{version}/{action}"),
    ("PUT", "/api/admin/default-adapter"),
    ("PUT", "/api/admin/adapters/{name}/groups"),
    ("GET", "/api/admin/usage"),
    ("GET", "/api/admin/audit"),
    ("GET", "/api/admin/audit/export"),
]
# Per operation, half valid and half invalid requests (operations without parameters have one).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))


def test_the_fuzzed_operations_are_all_the_json_api_operations(api_schema: Any) -> None:
    operations = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert {op for op in operations if op[1].startswith(("/v1/", "/api/admin/"))} == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_json_apis_never_answer_500(api_schema: Any, fuzzed: FuzzedApp, method: str, path: str) -> None:
    operation = api_schema[path][method]
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    cases = st.one_of(*(operation.as_strategy(mode) for mode in modes))
    headers = fuzzed.headers_for(path)
    names = (fuzzed.settings.model_name, ADAPTER, f"{ADAPTER}@1", f"{ADAPTER}@2")

    def steer_at_known_names(case: Any, data: st.DataObject) -> None:
        if path == "/v1/chat/completions" and isinstance(case.body, dict):
            case.body["model"] = data.draw(st.sampled_from(names))
            for field in ("max_tokens", "max_completion_tokens"):  # replies of a few tokens
                if isinstance(case.body.get(field), int) and case.body[field] > MAX_TOKENS_LIMIT:
                    case.body[field] = MAX_TOKENS_LIMIT
        elif path == "/api/admin/default-adapter" and isinstance(case.body, dict):
            case.body["name"] = data.draw(st.sampled_from([ADAPTER, None]))
        elif path.endswith("/groups") and isinstance(case.path_parameters, dict):
            case.path_parameters["name"] = ADAPTER
        elif path.endswith("/{action}") and isinstance(case.path_parameters, dict):
            case.path_parameters["name"] = ADAPTER
            case.path_parameters["version"] = data.draw(st.integers(1, 3))
            case.path_parameters["action"] = data.draw(
                st.sampled_from(["activate", "enable", "disable", "delete"])
            )

    @given(case=cases, steer=st.booleans(), data=st.data())
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def call(case: Any, steer: bool, data: st.DataObject) -> None:
        if steer:
            # Generated names are almost never ones the server knows (a quick 404): half the
            # requests name the served model or the adapter, so they reach the engine or the registry.
            steer_at_known_names(case, data)
        response = case.call(headers=headers, timeout=30)
        # The OpenAI API documents its error shape; the admin API answers a malformed request with a
        # sentence in `detail`, not FastAPI's documented list, so its errors are checked for status
        # and content type only.
        documented = response.status_code < 400 or path.startswith("/v1/")
        checks = CHECKS if documented else [not_a_server_error, content_type_conformance]
        case.validate_response(response, checks=checks, headers=headers)

    call()


# -- what a schema-driven fuzzer does not send ------------------------------------------------------


@pytest.fixture(scope="module")
def client(fuzzed: FuzzedApp) -> Iterator[Any]:
    """A requests session that reaches the app over ASGI, with the user's API key."""
    with get_client(fuzzed.app) as session:
        session.headers.update(fuzzed.headers_for("/v1/"))
        yield session


def chat(fuzzed: FuzzedApp, **fields: Any) -> dict[str, Any]:
    return {"model": fuzzed.settings.model_name, "messages": [{"role": "user", "content": "Hi"}], **fields}


def raw(text: str, *, latin1: bool = False) -> dict[str, Any]:
    """A body sent as written (NaN, lone surrogate escapes, broken syntax; bytes that are not UTF-8)."""
    data = text.encode("latin-1" if latin1 else "utf-8")
    return {"data": data, "headers": {"Content-Type": "application/json"}}


def assert_openai_error(response: Any, status: int, says: str, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"message", "type", "code"} <= set(error), error
    assert says in error["message"] and error["type"], error
    if code is not None:
        assert error["code"] == code, error


MODEL = "__served__"  # replaced by the served model's name
HI = '[{"role": "user", "content": "Hi"}]'
REFUSED = [
    (
        "invalid UTF-8",
        raw('{"model": "\xff\xfe", "messages": []}', latin1=True),
        "not UTF-8 (invalid start byte at byte 11)",
    ),
    (
        "malformed JSON",
        raw('{"model": "x", "messages": ['),
        "not valid JSON (Expecting value at character 28)",
    ),
    ("an array body", {"json": [{"model": MODEL}]}, "the request body: Input should be a valid dictionary"),
    ("a string body", {"json": "Hi"}, "the request body: Input should be a valid dictionary"),
    ("an empty body", raw(""), "the request body: Field required"),
    ("form data", {"data": {"model": MODEL, "messages": "Hi"}}, "the request body"),
    ("messages as a string", {"messages": "Hi"}, "messages: Input should be a valid list"),
    ("messages of numbers", {"messages": [1, 2]}, "messages.0: Input should be a valid dictionary"),
    ("messages as an object", {"messages": {"role": "user"}}, "messages: Input should be a valid list"),
    ("no messages", {"messages": []}, "messages: List should have at least 1 item"),
    ("an unknown role", {"messages": [{"role": "robot", "content": "Hi"}]}, "messages.0.role"),
    ("temperature above 2", {"temperature": 2.5}, "temperature: Input should be less than or equal to 2"),
    ("temperature below 0", {"temperature": -0.1}, "temperature: Input should be greater than or equal to 0"),
    ("temperature as a word", {"temperature": "hot"}, "temperature: Input should be a valid number"),
    ("temperature NaN", raw(f'{{"model": "{MODEL}", "messages": {HI}, "temperature": NaN}}'), "temperature"),
    ("top_p of 0", {"top_p": 0}, "top_p: Input should be greater than 0"),
    ("max_tokens of 0", {"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ("negative max_tokens", {"max_tokens": -1}, "max_tokens: Input should be greater than or equal to 1"),
    ("huge max_tokens", {"max_tokens": 10**30}, f"this server allows at most {MAX_TOKENS_LIMIT}"),
    ("huge max_completion_tokens", {"max_completion_tokens": 10**6}, f"at most {MAX_TOKENS_LIMIT}"),
    ("fractional max_tokens", {"max_tokens": 2.5}, "max_tokens: Input should be a valid integer"),
    ("a seed over 64 bits", {"seed": 2**64}, "seed: Input should be less than or equal to"),
    ("n of 2", {"n": 2}, "n: Input should be less than or equal to 1"),
    ("five stop sequences", {"stop": list("abcde")}, "stop"),
    (
        "an image content part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "only text content parts",
    ),
    (
        "a lone surrogate in a message",
        raw(f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi \\ud800"}}]}}'),
        "lone surrogate",
    ),
    (
        "the last message from the assistant",
        {"messages": [{"role": "assistant", "content": "Hi"}]},
        "the last message must come from the user",
    ),
]


@pytest.mark.parametrize(
    ("request_", "says"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED]
)
def test_malformed_chat_requests_get_a_clear_400(
    client: Any, fuzzed: FuzzedApp, request_: dict[str, Any], says: str
) -> None:
    served = fuzzed.settings.model_name
    kwargs = dict(request_)
    if "json" not in kwargs and "data" not in kwargs:
        kwargs = {"json": chat(fuzzed, **kwargs)}
    elif isinstance(kwargs.get("data"), bytes):
        kwargs["data"] = kwargs["data"].replace(MODEL.encode(), served.encode())
    elif isinstance(kwargs.get("data"), dict):
        kwargs["data"] = {k: served if v == MODEL else v for k, v in kwargs["data"].items()}
    response = client.post("/v1/chat/completions", **kwargs, timeout=30)
    assert_openai_error(response, 400, says)


def test_an_unknown_model_named_with_a_lone_surrogate_is_a_404(client: Any) -> None:
    response = client.post(
        "/v1/chat/completions", **raw('{"model": "\\ud800", "messages": [{"role": "user", "content": "Hi"}]}')
    )
    assert_openai_error(response, 404, "\\ud800", "model_not_found")


def test_openai_parameters_the_server_does_not_use_are_accepted_and_ignored(
    client: Any, fuzzed: FuzzedApp
) -> None:
    unused = {
        "logit_bias": {"50256": -100},
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "user": "reporting-script",
        "response_format": {"type": "json_object"},
        "logprobs": False,
        "tools": [],
        "parallel_tool_calls": False,
        "service_tier": "auto",
        "metadata": {"team": "finance"},
        "store": False,
    }
    response = client.post("/v1/chat/completions", json=chat(fuzzed, max_tokens=3, **unused), timeout=30)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] <= 3


def test_a_temperature_just_above_0_decodes_greedily(client: Any, fuzzed: FuzzedApp) -> None:
    # 1e-300 divides the logits into infinities; it used to fail the generation with a 500.
    replies = [
        client.post("/v1/chat/completions", json=chat(fuzzed, max_tokens=6, temperature=t), timeout=30)
        for t in (0, 1e-300, 1e-7)
    ]
    assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
    assert len({r.json()["choices"][0]["message"]["content"] for r in replies}) == 1


def test_an_oversized_body_is_refused_before_it_is_read(client: Any, fuzzed: FuzzedApp) -> None:
    from app.routes.openai_api import MAX_REQUEST_BYTES

    huge = chat(fuzzed, messages=[{"role": "user", "content": "word " * (MAX_REQUEST_BYTES // 5)}])
    response = client.post("/v1/chat/completions", json=huge, timeout=30)
    assert_openai_error(response, 413, "larger than this server accepts (1 MB)", "request_too_large")

    # Without a Content-Length (chunked), it is cut off once the limit is passed.
    chunks = (b"x" * 2**16 for _ in range(MAX_REQUEST_BYTES // 2**16 + 2))
    response = client.post(
        "/v1/chat/completions", data=chunks, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert_openai_error(response, 413, "larger than this server accepts", "request_too_large")


def test_malformed_admin_requests_get_a_4xx(client: Any, fuzzed: FuzzedApp) -> None:
    admin = fuzzed.headers_for("/api/admin/")
    as_json = {**admin, "Content-Type": "application/json"}
    answers = [
        client.put("/api/admin/default-adapter", headers=as_json, data=b"{"),
        client.put("/api/admin/default-adapter", headers=as_json, data=b"\xff"),
        client.put("/api/admin/default-adapter", headers=admin, json=["finance"]),
        client.put("/api/admin/default-adapter", headers=admin, json={"name": 7}),
        client.post("/api/admin/adapters/finance/versions", headers=admin, data={"file": "not a file"}),
        client.post("/api/admin/adapters/finance/versions", headers=admin, json={"file": "x"}),
        client.post(
            "/api/admin/adapters/finance/versions",
            headers={**admin, "Content-Type": "multipart/form-data"},
            data=b"no boundary",
        ),
        client.post(f"/api/admin/adapters/finance/versions/{2**70}/activate", headers=admin),
        client.post("/api/admin/adapters/finance/versions/one/activate", headers=admin),
    ]  # fmt: skip
    for response in answers:
        assert 400 <= response.status_code < 500, (response.request.url, response.text)
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]
    assert "not valid JSON" in answers[0].json()["detail"]
    assert "not UTF-8" in answers[1].json()["detail"]
    assert answers[2].json()["detail"].startswith("the request body: ")
