"""Hostile bodies on the browser routes: each gets a clear 4xx, never a 500, and nothing stored is lost.

The routes come from the app's router: every state-changing route that reads the session cookie,
and the sign-in form. Against a live server on SQLite and on PostgreSQL (which refuses a NUL in
text where SQLite stores it), a signed-in admin who owns a conversation sends
  - chat messages over the length limit, and form bodies over the browser-form limit (413 before
    the body is read, signed in or not);
  - malformed forms: multipart without a boundary or cut short, the wrong content type, JSON,
    too many fields;
  - text that is not UTF-8 (raw bytes, percent-encoded, in a multipart field; overlong forms and
    surrogates) or holds a NUL; and NUL in the path where an adapter's name goes.
After each, the database is exactly as before and the member is still signed in.
The JSON APIs have their own fuzzing (tests/routes/test_fuzz_openapi.py).
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.chat.conversations import MAX_MESSAGE_CHARS
from app.main import BROWSER_FORM_BYTES
from tests.conftest import (
    LiveServer,
    Member,
    create_api_key,
    create_user,
    make_settings,
    new_postgres_database,
    sign_in,
    wait_for_message,
    with_db,
)
from tests.routes.test_chat import reply_id
from tests.routes.test_csrf import COOKIE_ROUTES

FORM = "application/x-www-form-urlencoded"
# The routes that read a form, and a valid form for each (the field that carries text first).
FORMS: dict[tuple[str, str], dict[str, str]] = {
    ("POST", "/login"): {"email": "someone@example.com", "password": "x" * 10},
    ("POST", "/c"): {"message": "Hello"},
    ("POST", "/c/{conversation_id}/messages"): {"message": "Hello"},
    ("POST", "/c/{conversation_id}/rename"): {"title": "Renamed"},
    ("POST", "/c/{conversation_id}/adapter"): {"adapter": ""},
    ("POST", "/admin/default-adapter"): {"name": ""},
    ("POST", "/admin/users/{user_id}"): {"action": "approve"},
    ("POST", "/admin/users/{user_id}/limits"): {"rate_limit_per_minute": "", "daily_token_quota": ""},
    ("POST", "/admin/users/{user_id}/api-key-limit"): {"key_id": "1", "rate_limit_per_minute": ""},
    ("POST", "/account/api-keys"): {"name": "laptop"},
}
ROUTES = [*COOKIE_ROUTES, ("POST", "/login")]


def test_every_route_that_reads_a_form_has_one_here(tmp_path: Path) -> None:
    from fastapi.routing import iter_route_contexts

    from app.main import create_app

    app = create_app(make_settings(tmp_path, tmp_path))
    reading = {
        (method, str(route.path))
        for route in iter_route_contexts(app.routes)
        if getattr(route, "dependant", None) is not None and route.dependant.body_params
        for method in route.methods or ()
        if not str(route.path).startswith(
            ("/v1/", "/api/", "/admin/adapters")
        )  # JSON, or the upload's own tests
    }
    missing, gone = sorted(reading - FORMS.keys()), sorted(FORMS.keys() - reading)
    assert not missing, f"add a valid form to FORMS here (and ALL_OPTIONAL if none is required): {missing}"
    assert not gone, f"FORMS lists routes the app no longer has: {gone}"


# -- the server, its data and the snapshot -------------------------------------------------------------


class Site:
    def __init__(self, server: LiveServer) -> None:
        self.server = server
        email = f"admin-{uuid.uuid4().hex[:8]}@example.com"
        create_user(server.settings, email, admin=True)
        create_api_key(server.settings, email)
        self.member: Member = sign_in(server, email)
        self.conversation = self.member.start_chat("Keep this conversation")
        self.message = reply_id(self.member.get(f"/c/{self.conversation}").text)
        wait_for_message(server.settings, self.message)
        self.user_id = self._user_id(email)

    def _user_id(self, email: str) -> str:
        from app.auth.service import get_user_by_email

        async def find(db: AsyncSession) -> str:
            user = await get_user_by_email(db, email)
            assert user is not None
            return str(user.id)

        return with_db(self.server.settings, find)

    def url(self, path: str) -> str:
        return path.format(
            conversation_id=self.conversation, message_id=self.message, user_id=self.user_id,
            name="none", version="1", action="activate", session_id="1", key_id="1",
        )  # fmt: skip

    def snapshot(self) -> tuple[Any, ...]:
        from app.models import Adapter, AuditEvent, AuthSession, Conversation, Message, User

        async def read(db: AsyncSession) -> tuple[Any, ...]:
            async def rows(*columns: Any) -> list[tuple[Any, ...]]:
                return sorted(tuple(row) for row in (await db.execute(select(*columns))).all())

            return (
                await rows(Conversation.id, Conversation.title, Conversation.adapter_name),
                await rows(Message.id, Message.content, Message.status),
                await rows(User.email, User.role, User.is_active, User.is_approved),
                await rows(Adapter.name, Adapter.is_default, Adapter.active_version),
                await db.scalar(select(func.count()).select_from(AuditEvent)),
                await db.scalar(select(func.count()).select_from(AuthSession)),
            )

        return with_db(self.server.settings, read)

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"X-CSRF-Token": self.member.csrf, "HX-Request": "true", **kwargs.pop("headers", {})}
        return self.member.client.request(method, self.url(path), headers=headers, **kwargs)

    def assert_refused_and_unchanged(
        self, response: httpx.Response, before: Any, *, status: int | None = None
    ) -> None:
        request = response.request
        where = f"{request.method} {request.url.path}: {response.status_code} {response.text[:300]}"
        assert 400 <= response.status_code < 500, where
        if status is not None:
            assert response.status_code == status, where
        assert (
            response.json()["detail"] if "json" in response.headers.get("content-type", "") else response.text
        )
        assert self.snapshot() == before, f"{where}: refused, but the data changed"
        assert self.member.get("/").status_code == 200, "the member was signed out"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Site]:
    root = tmp_path_factory.mktemp(f"limits-{request.param}")
    # SQLite: None, the server's own file in its data folder.
    with new_postgres_database() if request.param == "postgresql" else contextlib.nullcontext() as url:
        server = LiveServer(make_settings(root, tiny_model_dir, database_url=url, max_new_tokens=4)).start()
        try:
            built = Site(server)
            yield built
            built.member.client.close()
        finally:
            server.stop()


# -- oversized ---------------------------------------------------------------------------------------


def test_an_oversized_chat_message_is_refused_and_nothing_is_stored(site: Site) -> None:
    before = site.snapshot()
    too_long = "x" * (MAX_MESSAGE_CHARS + 1)
    for path in ("/c", "/c/{conversation_id}/messages"):
        response = site.send("POST", path, data={"message": too_long})
        site.assert_refused_and_unchanged(response, before, status=400)
        assert f"the limit is {MAX_MESSAGE_CHARS}" in response.text
    # Four-byte characters, percent-encoded: the longest form a message within the limit makes.
    response = site.send("POST", "/c", data={"message": "\U0001f600" * (MAX_MESSAGE_CHARS + 1)})
    site.assert_refused_and_unchanged(response, before, status=400)


# The adapter upload has its own, larger limit (tests/routes/test_adapters.py).
FORM_ROUTES = [route for route in ROUTES if route != ("POST", "/admin/adapters")]


@pytest.mark.parametrize(("method", "path"), FORM_ROUTES, ids=[f"{m} {p}" for m, p in FORM_ROUTES])
def test_an_oversized_form_is_refused_before_it_is_read(site: Site, method: str, path: str) -> None:
    field = next(iter(FORMS.get((method, path), {"message": ""})))
    body = {field: "x" * (BROWSER_FORM_BYTES + 1)}
    before = site.snapshot()
    response = site.send(method, path, data=body)
    site.assert_refused_and_unchanged(response, before, status=413)
    assert "the form is larger than this server accepts (1 MB)" in response.json()["detail"]
    # Not even read for a visitor who is not signed in: the answer comes before the body is sent.
    assert announce_only(site.server, site.url(path), 64 * BROWSER_FORM_BYTES).startswith(b"HTTP/1.1 413 ")
    assert site.snapshot() == before


def announce_only(server: LiveServer, path: str, length: int) -> bytes:
    """Send a multipart POST's headers, announcing `length` bytes of body, and read the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        return connection.recv(4096)


# -- malformed -----------------------------------------------------------------------------------------

MULTIPART = "multipart/form-data; boundary=xyz"
MALFORMED: dict[str, tuple[str, bytes]] = {
    "multipart without a boundary": ("multipart/form-data", b"--xyz\r\n\r\nhello\r\n--xyz--\r\n"),
    "multipart cut short": (MULTIPART, b'--xyz\r\nContent-Disposition: form-data; name="message"\r\n\r\nHel'),
    "multipart header without a name": (
        MULTIPART,
        b"--xyz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--xyz--\r\n",
    ),
    "multipart that is not multipart": (MULTIPART, b"message=Hello"),
    "a part's headers too long": (MULTIPART, b"--xyz\r\nX: " + b"a" * 10_000 + b"\r\n\r\nx\r\n--xyz--\r\n"),
    "JSON": ("application/json", b'{"message": "Hello", "title": "x", "email": "a@b.c"}'),
    "plain text": ("text/plain", b"message=Hello"),
    "no content type": ("", b"message=Hello"),
    "too many fields": (FORM, b"&".join(b"f%d=1" % i for i in range(1001))),
    "only separators": (FORM, b"&&&===&&"),
}


# These parse as an empty form (Starlette drops a part cut short), which a route whose every field
# has a default takes as it should: choosing the base model.
PARSES_EMPTY = {"multipart cut short", "JSON", "plain text", "no content type", "only separators"}
ALL_OPTIONAL = {
    ("POST", "/c/{conversation_id}/adapter"),
    ("POST", "/admin/default-adapter"),
    ("POST", "/admin/users/{user_id}/limits"),  # empty fields: the settings' limits
    ("POST", "/account/api-keys"),  # a key without a name
}
MALFORMED_CASES = [
    (method, path, kind)
    for method, path in sorted(FORMS)
    for kind in MALFORMED
    if not ((method, path) in ALL_OPTIONAL and kind in PARSES_EMPTY)
]


@pytest.mark.parametrize(
    ("method", "path", "kind"), MALFORMED_CASES, ids=[f"{m} {p}: {k}" for m, p, k in MALFORMED_CASES]
)
def test_a_malformed_form_is_a_clear_4xx(site: Site, method: str, path: str, kind: str) -> None:
    content_type, body = MALFORMED[kind]
    before = site.snapshot()
    headers = {"Content-Type": content_type} if content_type else {}
    response = site.send(method, path, content=body, headers=headers)
    site.assert_refused_and_unchanged(response, before)


@pytest.mark.parametrize("kind", ["multipart without a boundary", "multipart cut short", "too many fields"])
@pytest.mark.parametrize(("method", "path"), COOKIE_ROUTES, ids=[f"{m} {p}" for m, p in COOKIE_ROUTES])
def test_a_malformed_form_without_the_token_is_a_clear_4xx(
    site: Site, method: str, path: str, kind: str
) -> None:
    """Without the header, the CSRF check reads the form for the token: that read must fail cleanly."""
    content_type, body = MALFORMED[kind]
    before = site.snapshot()
    response = site.member.client.request(
        method, site.url(path), content=body, headers={"Content-Type": content_type, "HX-Request": "true"}
    )
    site.assert_refused_and_unchanged(response, before)


# -- not UTF-8, or a NUL ---------------------------------------------------------------------------------

NOT_TEXT: dict[str, tuple[str, bytes]] = {
    "raw byte": ("urlencoded", b"\xff\xfe"),
    "percent-encoded byte": ("urlencoded", b"%FF"),
    "overlong slash": ("urlencoded", b"%C0%AF"),
    "surrogate": ("urlencoded", b"%ED%A0%80"),
    "cut-off character": ("urlencoded", b"%E2%82"),
    "NUL": ("urlencoded", b"a%00b"),
    "multipart raw byte": ("multipart", b"\xff"),
    "multipart NUL": ("multipart", b"a\x00b"),
}


@pytest.mark.parametrize("kind", NOT_TEXT, ids=list(NOT_TEXT))
@pytest.mark.parametrize(("method", "path"), sorted(FORMS), ids=[f"{m} {p}" for m, p in sorted(FORMS)])
def test_form_text_that_is_not_utf8_or_holds_a_nul_is_refused(
    site: Site, method: str, path: str, kind: str
) -> None:
    encoding, value = NOT_TEXT[kind]
    fields = FORMS[(method, path)]
    field = next(iter(fields))
    if encoding == "urlencoded":
        rest = b"".join(b"&%s=%s" % (k.encode(), v.encode()) for k, v in fields.items() if k != field)
        content, headers = field.encode() + b"=" + value + rest, {"Content-Type": FORM}
    else:
        parts = [(field, value)] + [(k, v.encode()) for k, v in fields.items() if k != field]
        content = (
            b"".join(
                b'--xyz\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k.encode(), v)
                for k, v in parts
            )
            + b"--xyz--\r\n"
        )
        headers = {"Content-Type": MULTIPART}
    before = site.snapshot()
    response = site.send(method, path, content=content, headers=headers)
    site.assert_refused_and_unchanged(response, before, status=400)
    says = "holds a NUL character" if "NUL" in kind else "is not UTF-8"
    assert f"the form field '{field}' {says}" in response.json()["detail"]


def test_a_nul_where_an_adapter_name_goes_is_a_404(site: Site) -> None:
    """PostgreSQL refuses a NUL in a query: it must not reach one (it was a 500)."""
    before = site.snapshot()
    page = site.send("POST", "/admin/adapters/a%00b/versions/1/activate")
    site.assert_refused_and_unchanged(page, before, status=404)
    key = create_api_key(site.server.settings, site.member.email)
    bearer = {"Authorization": f"Bearer {key}"}
    api = httpx.post(f"{site.server.url}/api/admin/adapters/a%00b/versions/1/activate", headers=bearer)
    default = httpx.put(
        f"{site.server.url}/api/admin/default-adapter", headers=bearer, json={"name": "a\x00b"}
    )
    for response in (api, default):
        assert response.status_code == 404 and "no adapter named" in response.text, response.text
    assert site.snapshot()[:4] == before[:4]  # (the API key added one row elsewhere)


@pytest.mark.parametrize(("method", "path"), COOKIE_ROUTES, ids=[f"{m} {p}" for m, p in COOKIE_ROUTES])
def test_the_token_in_a_form_that_is_not_utf8_is_refused(site: Site, method: str, path: str) -> None:
    """The CSRF check reads the form itself on routes that take no other field: it is checked too."""
    body = b"csrf_token=" + site.member.csrf.encode() + b"&note=%FF%00"
    before = site.snapshot()
    response = site.member.client.request(
        method, site.url(path), content=body, headers={"Content-Type": FORM, "HX-Request": "true"}
    )
    site.assert_refused_and_unchanged(response, before, status=400)
    assert "the form field 'note' is not UTF-8" in response.json()["detail"]
