"""Adapters end to end on a live server: upload, serve by the next request, pick, roll back, refuse.

Real PEFT adapters for the tiny NF4 model go in through the admin API; replies are compared with
greedy decoding, so "served by adapter X" is checked by exact output, not by a label.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from app.registry.catalog import MISSING_FILES
from tests.conftest import (
    Admin,
    LiveServer,
    build_adapter,
    create_api_key,
    create_user,
    make_admin,
    make_settings,
    sign_in,
    wait_for_message,
    zip_directory,
)

SYSTEM = "You are a helpful assistant for the employees of this company."


@pytest.fixture(scope="module")
def greedy_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    """Greedy replies of 32 tokens in the chat too, so chat and API outputs can be compared exactly."""
    settings = make_settings(
        tmp_path_factory.mktemp("adapters-server"),
        tiny_model_dir,
        default_temperature=0.0,
        max_new_tokens=32,
        system_prompt=SYSTEM,
        max_resident_adapters=2,
    )
    live = LiveServer(settings).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archives")
    built = {}
    for label, seed, scale in (
        ("one", 1, 0.5),
        ("two", 2, 0.5),
        ("three", 3, 0.5),
        ("four", 5, 0.5),
        ("inert", 4, 0.0),
    ):
        directory = build_adapter(tiny_model_dir, root / label, seed=seed, scale=scale)
        built[label] = zip_directory(directory, root / f"{label}.zip")
    return built


@pytest.fixture(scope="module")
def admin(greedy_server: LiveServer) -> Admin:
    return make_admin(greedy_server)


@pytest.fixture(scope="module")
def client(greedy_server: LiveServer, admin: Admin) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{greedy_server.url}/v1", api_key=admin.key, max_retries=0)


def ask(
    client: openai.OpenAI, model: str, question: str = "How do I file an expense?", tokens: int = 32
) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        max_tokens=tokens,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def test_an_upload_is_served_by_the_next_request(
    greedy_server: LiveServer, admin: Admin, archives, client, member_factory
) -> None:
    base = greedy_server.settings.model_name
    before = ask(client, base)
    response = admin.upload("finance", archives["one"], notes="expense policy v1")
    assert response.status_code == 201, response.text
    published = response.json()
    assert (published["version"], published["active"], published["status"]) == (1, True, "ready")
    assert published["rank"] == 4 and published["source"] == "upload" and len(published["sha256"]) == 64

    models = {m.id: m for m in client.models.list()}
    assert set(models) == {base, "finance"} and models["finance"].parent == base  # type: ignore[attr-defined]
    with_adapter = ask(client, "finance")
    assert with_adapter != before and ask(client, "finance@1") == with_adapter
    assert ask(client, base) == before  # the base is still served as the base

    # The chat: a new conversation on the adapter gets exactly what the API gave.
    member = member_factory(greedy_server)
    response = member.post("/c", data={"message": "How do I file an expense?", "adapter": "finance"})
    conversation = response.headers["HX-Redirect"].rsplit("/", 1)[-1]
    page = member.get(f"/c/{conversation}").text
    assert '<option value="finance" selected>' in page
    reply = re.findall(r'id="msg-([0-9a-f-]{36})" class="message assistant', page)[-1]
    assert wait_for_message(greedy_server.settings, reply).content == with_adapter


def test_rollback_restores_the_earlier_versions_exact_output(
    greedy_server: LiveServer, admin: Admin, archives, client
) -> None:
    assert admin.upload("hr", archives["one"]).status_code == 201
    first = ask(client, "hr")
    second_version = admin.upload("hr", archives["two"], notes="retrained")
    assert second_version.json()["version"] == 2
    second = ask(client, "hr")
    assert second != first and ask(client, "hr@1") == first
    assert admin.act("hr", 1, "activate").status_code == 200  # roll back
    assert ask(client, "hr") == first
    audit = httpx.get(f"{greedy_server.url}/api/admin/audit", headers=admin.headers).json()
    assert [(e["action"], e["target"]) for e in audit[:3]] == [("rollback", "hr@1"), ("publish", "hr@2"),
                                                               ("publish", "hr@1")]  # fmt: skip


def test_two_conversations_on_different_adapters_stream_at_once(
    greedy_server: LiveServer, admin: Admin, archives, client, member_factory
) -> None:
    for name, archive in (("legal", archives["two"]), ("ops", archives["three"])):
        assert admin.upload(name, archive).status_code == 201
    alone = {name: ask(client, name, "Who approves travel?") for name in ("legal", "ops")}
    assert alone["legal"] != alone["ops"]
    members = [member_factory(greedy_server) for _ in range(2)]
    replies: dict[str, str] = {}

    def chat(member, name: str) -> None:  # type: ignore[no-untyped-def]
        response = member.post("/c", data={"message": "Who approves travel?", "adapter": name})
        conversation = response.headers["HX-Redirect"].rsplit("/", 1)[-1]
        page = member.get(f"/c/{conversation}").text
        replies[name] = re.findall(r'id="msg-([0-9a-f-]{36})" class="message assistant', page)[-1]

    threads = [
        threading.Thread(target=chat, args=(m, n)) for m, n in zip(members, ("legal", "ops"), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, message in replies.items():
        assert wait_for_message(greedy_server.settings, message).content == alone[name], name


def test_unknown_and_disabled_adapters_are_errors_never_the_base(
    greedy_server: LiveServer, admin: Admin, archives, client, member_factory
) -> None:
    assert admin.upload("payroll", archives["four"]).status_code == 201  # files no other adapter shares
    member = member_factory(greedy_server)
    response = member.post("/c", data={"message": "hello", "adapter": "payroll"})
    conversation = response.headers["HX-Redirect"].rsplit("/", 1)[-1]
    page = member.get(f"/c/{conversation}").text
    wait_for_message(
        greedy_server.settings, re.findall(r'id="msg-([0-9a-f-]{36})" class="message assistant', page)[-1]
    )
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(client, "no-such-adapter")
    with pytest.raises(openai.NotFoundError, match="has no version '9'"):
        ask(client, "payroll@9")
    served = greedy_server.services.catalog.resolve("payroll")
    assert served.key in greedy_server.services.engine.adapters.resident
    assert admin.act("payroll", 1, "disable").status_code == 200
    assert served.key not in greedy_server.services.engine.adapters.resident  # unloaded, memory freed
    with pytest.raises(openai.NotFoundError, match="is disabled"):
        ask(client, "payroll")
    assert "payroll" not in {m.id for m in client.models.list()}
    refused = member.post(f"/c/{conversation}/messages", data={"message": "and now?"})
    assert refused.status_code == 409 and "not available any more" in refused.text
    assert admin.act("payroll", 1, "enable").status_code == 200
    assert member.post(f"/c/{conversation}/messages", data={"message": "and now?"}).status_code == 200


def test_an_adapter_that_changes_nothing_is_refused_and_leaves_nothing(
    greedy_server: LiveServer, admin: Admin, archives
) -> None:
    store = greedy_server.settings.adapter_store_dir
    before = sorted(p.name for p in store.iterdir())
    response = admin.upload("inert", archives["inert"])
    assert response.status_code == 422
    assert "does not change the model's output" in response.json()["detail"]
    assert sorted(p.name for p in store.iterdir()) == before
    assert list((store / ".incoming").iterdir()) == []
    assert "inert" not in [a["name"] for a in httpx.get(f"{greedy_server.url}/api/admin/adapters",
                                                         headers=admin.headers).json()]  # fmt: skip


def test_admin_pages_and_api_refuse_users(greedy_server: LiveServer, member_factory) -> None:
    member = member_factory(greedy_server)
    assert member.get("/admin/adapters").status_code == 403
    key = create_api_key(greedy_server.settings, member.email)
    assert (
        httpx.get(
            f"{greedy_server.url}/api/admin/adapters", headers={"Authorization": f"Bearer {key}"}
        ).status_code
        == 403
    )
    admin_member = member_factory(greedy_server, admin=True)
    page = admin_member.get("/admin/adapters")
    assert page.status_code == 200 and "Upload a version" in page.text


def announce_upload(server: LiveServer, path: str, headers: dict[str, str]) -> tuple[bytes, float]:
    """POST the start of a 1 GB multipart upload (64 kB of it) and read the answer: what it said and
    how long it took. The rest is never sent, so an answer means the server did not wait for it."""
    length = 2**30
    first = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\n' + b"\0" * 65536
    lines = [
        f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Connection: close",
        "Content-Type: multipart/form-data; boundary=xyz", f"Content-Length: {length}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        started = time.monotonic()
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + first)
        answer = connection.recv(4096)
        return answer, time.monotonic() - started


def test_an_upload_from_someone_not_an_admin_is_refused_before_its_body_is_read(
    greedy_server: LiveServer, member_factory
) -> None:  # type: ignore[no-untyped-def]
    member = member_factory(greedy_server)
    key = create_api_key(greedy_server.settings, member.email)
    cookie = f"pgpt_session={member.client.cookies['pgpt_session']}"
    cases = [
        ("/admin/adapters", {"Cookie": cookie, "X-CSRF-Token": member.csrf, "HX-Request": "true"}, b"403"),
        ("/admin/adapters", {"Cookie": cookie}, b"403"),  # the token must be in the header for an upload
        ("/admin/adapters", {}, b"401"),
        ("/api/admin/adapters/big/versions", {"Authorization": f"Bearer {key}"}, b"403"),
        ("/api/admin/adapters/big/versions", {}, b"401"),
    ]
    for path, headers, status in cases:
        answer, took = announce_upload(greedy_server, path, headers)
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), (path, headers.keys(), answer[:200])
        assert took < 5, (path, took)
    listed = httpx.get(f"{greedy_server.url}/api/admin/adapters", headers=make_admin(greedy_server).headers)
    assert "big" not in [adapter["name"] for adapter in listed.json()]


def test_publishing_while_a_reply_streams_leaves_that_reply_alone(
    greedy_server: LiveServer, admin: Admin, archives, client
) -> None:
    assert admin.upload("swap", archives["one"]).status_code == 201
    expected = ask(client, "swap", tokens=1000)
    streaming = threading.Event()
    streamed: list[str] = []

    def long_reply() -> None:
        chunks = client.chat.completions.create(
            model="swap",
            messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "How do I file an expense?"},
            ],
            max_tokens=1000,
            temperature=0,
            stream=True,
        )
        for chunk in chunks:
            streaming.set()
            streamed.append(chunk.choices[0].delta.content or "" if chunk.choices else "")

    reader = threading.Thread(target=long_reply)
    reader.start()
    assert streaming.wait(30)
    assert admin.upload("swap", archives["two"]).json()["version"] == 2  # published mid-reply
    still_running = greedy_server.services.engine.load()["running"]
    new_version = ask(client, "swap")
    reader.join(60)
    assert still_running >= 1, "the long reply was still being written when version 2 went live"
    assert new_version != expected[: len(new_version)]  # the next request got version 2 ...
    assert "".join(streamed) == expected  # ... while the running one kept version 1 to its end


def test_a_version_whose_files_vanished_is_marked_failed(
    greedy_server: LiveServer, admin: Admin, archives, client
) -> None:
    import shutil

    published = admin.upload("vanishing", archives["three"]).json()
    store = greedy_server.settings.adapter_store_dir
    (store / published["sha256"]).chmod(0o755)
    shutil.rmtree(store / published["sha256"])  # someone cleaned the shared store by hand
    assert admin.set_default(None).status_code == 200  # any registry change makes every server look again
    listed = httpx.get(f"{greedy_server.url}/api/admin/adapters", headers=admin.headers).json()
    version = next(a for a in listed if a["name"] == "vanishing")["versions"][0]
    assert (version["status"], version["status_reason"]) == ("failed", MISSING_FILES)
    with pytest.raises(openai.NotFoundError, match="'vanishing@1' is failed"):
        ask(client, "vanishing")
    audit = httpx.get(f"{greedy_server.url}/api/admin/audit", headers=admin.headers).json()
    assert any(
        e["action"] == "fail" and e["actor"] == "(server)" and e["target"] == "vanishing@1" for e in audit
    )
    refused = admin.act("vanishing", 1, "enable")
    assert refused.status_code == 409 and "upload a fixed version" in refused.json()["detail"]


def test_a_server_starting_on_a_registry_preloads_its_adapters_into_free_slots(
    tmp_path: Path, tiny_model_dir: Path, archives
) -> None:
    """A second server on the same registry loads the active adapters before anyone asks, the
    default first and only into free slots; the first request for one then loads nothing."""
    settings = make_settings(tmp_path, tiny_model_dir, max_resident_adapters=2, default_temperature=0.0)
    first = LiveServer(settings).start()
    try:
        publisher = make_admin(first)
        for name, archive in (
            ("alpha", archives["one"]),
            ("beta", archives["two"]),
            ("gamma", archives["four"]),
        ):
            assert publisher.upload(name, archive).status_code == 201
        assert publisher.set_default("gamma").status_code == 200
    finally:
        first.stop()

    second = LiveServer(settings).start()  # same database and adapter store, a new process's engine
    try:
        engine = second.services.engine
        catalog = second.services.catalog
        keys = {name: catalog.ref(catalog.resolve(name)).key for name in ("alpha", "beta", "gamma")}  # type: ignore[arg-type]
        deadline = time.monotonic() + 60
        while len(engine.adapters.resident) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # a third would have come by now
        resident = set(engine.adapters.resident)
        assert resident == {keys["gamma"], keys["alpha"]}, "the default, then by name; two free slots only"
        assert engine.adapters.evictions == 0, "a preload never unloads anything"
        loads = engine.adapters.loads

        admin = make_admin(second)
        listed = httpx.get(f"{second.url}/api/admin/adapters", headers=admin.headers).json()
        assert {a["name"]: a["versions"][0]["loaded"] for a in listed} == {
            "alpha": True,
            "beta": False,
            "gamma": True,
        }
        create_user(settings, "page-admin@example.com", admin=True)
        member = sign_in(second, "page-admin@example.com")
        try:
            assert member.get("/admin/adapters").text.count(">loaded</span>") == 2
        finally:
            member.client.close()
        client = openai.OpenAI(base_url=f"{second.url}/v1", api_key=admin.key, max_retries=0)
        assert ask(client, "gamma")
        assert engine.adapters.loads == loads, "its first request found it loaded"
    finally:
        second.stop()
