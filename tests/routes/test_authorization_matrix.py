"""Who may do what: every route of the real app, exercised as anonymous, user A, user B and an admin.

MATRIX below is the authorization policy written out: for each (method, path template) of the app,
what each of the four answers. The columns are
  anonymous  no session cookie, no API key;
  owner      user A, who owns the conversation and messages in the path (a plain user elsewhere);
  other      user B, signed in (or with an API key) but not the owner: another user's data must
             answer 404, as if it did not exist;
  admin      an administrator, who is another user too as far as conversations go.
A route the app has and the matrix lacks fails `test_every_route_has_an_entry_in_the_matrix`:
a new route needs its row here before it ships.

Each cell is sent for real to one live server (module-scoped, 4-token replies): path parameters are
user A's real ids (a conversation with a finished reply, the admin's uploaded adapter), HTML routes
get the session cookie and CSRF token, /v1 and /api/admin routes a bearer API key. After every
refusal, user A's conversation and the adapter registry are checked to be exactly as before.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.routing import Mount

from app.auth.service import get_user_by_email
from tests.conftest import (
    PASSWORD,
    LiveServer,
    Member,
    build_adapter,
    create_api_key,
    create_user,
    make_admin,
    make_settings,
    sign_in,
    wait_for_message,
    with_db,
    zip_directory,
)
from tests.routes.test_chat import reply_id

ANONYMOUS, OWNER, OTHER, ADMIN = "anonymous", "owner", "other", "admin"
ROLES = (ANONYMOUS, OWNER, OTHER, ADMIN)

# What a cell can say. Success is the status code; refusals are:
SIGN_IN_PAGE = "303 sign in"  # a page: 303 to /login?next=<the path>
SIGN_IN = "401 sign in"  # HTMX, EventSource or a plain form: 401 (HX-Redirect to /login for HTMX)
BEARER = "401"  # an API: 401 with WWW-Authenticate: Bearer (no or the wrong key or token)
REFUSED = "403"  # signed in, but not allowed (admin only, or the login form's CSRF token)
NOT_FOUND = "404"  # another user's data: its existence is not revealed
REFUSALS = frozenset({SIGN_IN_PAGE, SIGN_IN, BEARER, REFUSED, NOT_FOUND})

ADAPTER = "matrix"
SERVED_MODEL = "{served model}"  # replaced by the server's model name when sent
METRICS_TOKEN = "scrape-me-" + "0123456789abcdef" * 2


@dataclass(frozen=True)
class Entry:
    """One route's row: the expected answer per role, and the request each role sends."""

    anonymous: str
    owner: str
    other: str
    admin: str
    form: dict[str, str] | None = None
    json: dict[str, Any] | None = None
    upload: bool = False  # a multipart form with the admin's adapter archive as `file`
    htmx: bool = False  # sent as the page's htmx sends it (HX-Request, CSRF token in a header)
    headers: dict[str, str] = field(default_factory=dict)

    def expected(self, role: str) -> str:
        return str(getattr(self, role))


EVENT_STREAM = {"Accept": "text/event-stream"}  # as EventSource asks
OPEN = ("200", "200", "200", "200")
ADMIN_PAGE = (SIGN_IN_PAGE, REFUSED, REFUSED, "200")
ADMIN_ACTION = (SIGN_IN, REFUSED, REFUSED, "200")
ADMIN_API = (BEARER, REFUSED, REFUSED, "200")
CHAT = {"message": "Hello there"}

# fmt: off
MATRIX: dict[tuple[str, str], Entry] = {
    # Probes, metrics, API docs and static files: no user data.
    ("GET", "/healthz"): Entry(*OPEN),
    ("GET", "/readyz"): Entry(*OPEN),
    # Behind METRICS_TOKEN (set on this server): a session or API key is not the scraper's token.
    ("GET", "/metrics"): Entry(BEARER, BEARER, BEARER, BEARER),
    # The API's schema: anyone signed in (the cookie here) or holding an API key.
    ("GET", "/openapi.json"): Entry(BEARER, "200", "200", "200"),
    ("GET", "/static/{path}"): Entry(*OPEN),
    ("HEAD", "/static/{path}"): Entry(*OPEN),
    # Sign-in and sign-out. A signed-in browser is sent on from the form, so it holds no login
    # token and its POST is refused; sign-out ends a session of the user's own (a fresh one here).
    ("GET", "/login"): Entry("200", "303", "303", "303"),
    ("POST", "/login"): Entry("303", REFUSED, REFUSED, REFUSED),
    ("POST", "/logout"): Entry(SIGN_IN, "303", "303", "303"),
    # The account page: one's own sessions and API keys. The session and key in the path are fresh
    # ones of user A's (so A's own cells end something of A's, and the others' cells find nothing);
    # signing out everywhere is done by a fresh user of the role's kind (see `send`).
    ("GET", "/account"): Entry(SIGN_IN_PAGE, "200", "200", "200"),
    ("POST", "/account/sessions/{session_id}/revoke"): Entry(SIGN_IN, "303", NOT_FOUND, NOT_FOUND),
    ("POST", "/account/sign-out-everywhere"): Entry(SIGN_IN, "303", "303", "303"),
    ("POST", "/account/api-keys"): Entry(SIGN_IN, "201", "201", "201", form={"name": "matrix"}),
    ("POST", "/account/api-keys/{key_id}/revoke"): Entry(SIGN_IN, "303", NOT_FOUND, NOT_FOUND),
    # OpenID Connect: open to all, but this server has no OIDC_ISSUER (tests/routes/test_sign_in.py
    # drives the flow against a provider).
    ("GET", "/login/oidc"): Entry(NOT_FOUND, NOT_FOUND, NOT_FOUND, NOT_FOUND),
    ("GET", "/login/oidc/callback"): Entry(NOT_FOUND, NOT_FOUND, NOT_FOUND, NOT_FOUND),
    # The chat. Everyone signed in has a chat of their own; in user A's conversation only A.
    ("GET", "/"): Entry(SIGN_IN_PAGE, "200", "200", "200"),
    ("POST", "/c"): Entry(SIGN_IN, "204", "204", "204", form=CHAT, htmx=True),
    ("GET", "/c/{conversation_id}"): Entry(SIGN_IN_PAGE, "200", NOT_FOUND, NOT_FOUND),
    ("POST", "/c/{conversation_id}/adapter"):
        Entry(SIGN_IN, "200", NOT_FOUND, NOT_FOUND, form={"adapter": ""}, htmx=True),
    ("POST", "/c/{conversation_id}/messages"):
        Entry(SIGN_IN, "200", NOT_FOUND, NOT_FOUND, form=CHAT, htmx=True),
    ("POST", "/c/{conversation_id}/messages/{message_id}/regenerate"):
        Entry(SIGN_IN, "200", NOT_FOUND, NOT_FOUND, htmx=True),
    ("GET", "/c/{conversation_id}/messages/{message_id}"):
        Entry(SIGN_IN, "200", NOT_FOUND, NOT_FOUND, htmx=True),
    ("GET", "/c/{conversation_id}/messages/{message_id}/stream"):
        Entry(SIGN_IN, "200", NOT_FOUND, NOT_FOUND, headers=EVENT_STREAM),
    ("POST", "/c/{conversation_id}/messages/{message_id}/stop"):
        Entry(SIGN_IN, "204", NOT_FOUND, NOT_FOUND, htmx=True),
    ("GET", "/c/{conversation_id}/rename"): Entry(SIGN_IN, "200", NOT_FOUND, NOT_FOUND, htmx=True),
    ("POST", "/c/{conversation_id}/rename"):
        Entry(SIGN_IN, "200", NOT_FOUND, NOT_FOUND, form={"title": "Mine now"}, htmx=True),
    ("POST", "/c/{conversation_id}/delete"): Entry(SIGN_IN, "200", NOT_FOUND, NOT_FOUND, htmx=True),
    # The OpenAI API: any user's API key.
    ("GET", "/v1/models"): Entry(BEARER, "200", "200", "200"),
    ("POST", "/v1/chat/completions"): Entry(BEARER, "200", "200", "200", json={
        "model": SERVED_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    # Adapter administration, pages and JSON API: admins only.
    ("GET", "/admin/adapters"): Entry(*ADMIN_PAGE),
    ("POST", "/admin/adapters"):
        Entry(SIGN_IN, REFUSED, REFUSED, "201", form={"name": ADAPTER}, upload=True, htmx=True),
    ("POST", "/admin/adapters/{name}/versions/{version}/{action}"): Entry(*ADMIN_ACTION, htmx=True),
    ("POST", "/admin/default-adapter"): Entry(*ADMIN_ACTION, form={"name": ""}, htmx=True),
    # Who may use an adapter (open to everyone, as it is) and what everyone used.
    ("POST", "/admin/adapters/{name}/groups"): Entry(*ADMIN_ACTION, form={"groups": ""}, htmx=True),
    ("GET", "/admin/usage"): Entry(*ADMIN_PAGE),
    ("GET", "/admin/audit"): Entry(*ADMIN_PAGE),
    ("GET", "/admin/audit/export"): Entry(*ADMIN_PAGE),
    # User administration (approving user A, who is approved already, changes nothing).
    ("GET", "/admin/users"): Entry(*ADMIN_PAGE),
    ("POST", "/admin/users/{user_id}"): Entry(*ADMIN_ACTION, form={"action": "approve"}, htmx=True),
    # User A's limits left at the settings' (empty fields), as they are.
    ("POST", "/admin/users/{user_id}/limits"):
        Entry(*ADMIN_ACTION, form={"rate_limit_per_minute": "", "daily_token_quota": ""}, htmx=True),
    # Key 1 is user A's (the world makes A's key first), left without a limit of its own.
    ("POST", "/admin/users/{user_id}/api-key-limit"):
        Entry(*ADMIN_ACTION, form={"key_id": "1", "rate_limit_per_minute": ""}, htmx=True),
    ("GET", "/api/admin/adapters"): Entry(*ADMIN_API),
    ("POST", "/api/admin/adapters/{name}/versions"): Entry(BEARER, REFUSED, REFUSED, "201", upload=True),
    ("POST", "/api/admin/adapters/{name}/versions/{version}/{action}"): Entry(*ADMIN_API),
    ("PUT", "/api/admin/default-adapter"): Entry(*ADMIN_API, json={"name": None}),
    ("PUT", "/api/admin/adapters/{name}/groups"): Entry(*ADMIN_API, json={"groups": []}),
    ("GET", "/api/admin/usage"): Entry(*ADMIN_API),
    ("GET", "/api/admin/audit"): Entry(*ADMIN_API),
    ("GET", "/api/admin/audit/export"): Entry(*ADMIN_API),
}
# fmt: on


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path template) the app answers, mounts included."""
    found: set[tuple[str, str]] = set()
    # app.routes holds each included router as one opaque entry; this flattens them as the
    # OpenAPI generator does.
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, Mount):
            found |= {("GET", f"{route.path}/{{path}}"), ("HEAD", f"{route.path}/{{path}}")}
        else:
            found |= {(method, str(route.path)) for method in route.methods or {"WEBSOCKET"}}
    return found


def test_every_route_has_an_entry_in_the_matrix(tmp_path: Path) -> None:
    from app.main import create_app

    routes = app_routes(create_app(make_settings(tmp_path, tmp_path)))
    missing = sorted(routes - MATRIX.keys())
    assert not missing, f"routes without an entry in the authorization matrix (add them to MATRIX): {missing}"
    gone = sorted(MATRIX.keys() - routes)
    assert not gone, f"matrix entries for routes the app no longer has (remove them from MATRIX): {gone}"


# -- the world the cells run in ----------------------------------------------------------------------


@dataclass
class Person:
    email: str
    member: Member
    key: str


@dataclass
class World:
    server: LiveServer
    people: dict[str, Person]
    archive: Path
    conversation: str  # user A's, with one finished exchange
    message: str  # its reply
    title: str
    baseline: tuple[Any, ...] = ()

    def owner_conversation(self) -> tuple[str, str]:
        """A conversation of user A's own, with its reply finished: for A's state-changing cells."""
        member = self.people[OWNER].member
        conversation = member.start_chat("A fresh question")
        message = reply_id(member.get(f"/c/{conversation}").text)
        wait_for_message(self.server.settings, message)
        return conversation, message

    def snapshot(self) -> tuple[Any, ...]:
        """User A's conversation, A's conversation list, the adapter registry and its audit log."""
        from app.models import Adapter, AdapterVersion, AuditEvent, Conversation, Message, User

        victim, owner = uuid.UUID(self.conversation), self.people[OWNER].email

        async def read(db: AsyncSession) -> tuple[Any, ...]:
            async def rows(query: Any) -> list[tuple[Any, ...]]:
                return [tuple(row) for row in (await db.execute(query)).all()]

            conversation = await rows(
                select(Conversation.title, Conversation.adapter_name, Conversation.user_id).where(
                    Conversation.id == victim
                )
            )
            messages = await rows(
                select(Message.id, Message.role, Message.content, Message.status)
                .where(Message.conversation_id == victim)
                .order_by(Message.position)
            )
            owned = await rows(
                select(Conversation.id, Conversation.title)
                .join(User, Conversation.user_id == User.id)
                .where(User.email == owner)
                .order_by(Conversation.id)
            )
            registry = await rows(
                select(
                    Adapter.name,
                    Adapter.active_version,
                    Adapter.is_default,
                    AdapterVersion.version,
                    AdapterVersion.status,
                )
                .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
                .order_by(Adapter.name, AdapterVersion.version)
            )
            audit = await db.scalar(select(func.count()).select_from(AuditEvent))
            return conversation, messages, owned, registry, audit

        return with_db(self.server.settings, read)


@pytest.fixture(scope="module")
def matrix_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("matrix"), tiny_model_dir, max_new_tokens=4, metrics_token=METRICS_TOKEN
    )
    live = LiveServer(settings).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def world(
    matrix_server: LiveServer, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[World]:
    settings = matrix_server.settings
    people: dict[str, Person] = {}
    for role in (OWNER, OTHER, ADMIN):
        email = f"{role}-{uuid.uuid4().hex[:8]}@example.com"
        create_user(settings, email, admin=role == ADMIN)
        people[role] = Person(email, sign_in(matrix_server, email), create_api_key(settings, email))
    root = tmp_path_factory.mktemp("matrix-adapter")
    archive = zip_directory(build_adapter(tiny_model_dir, root / "adapter"), root / "adapter.zip")
    admin = make_admin(matrix_server)
    assert admin.upload(ADAPTER, archive).status_code == 201  # version 1, which the action cells use

    title = "Private question about salaries " + uuid.uuid4().hex[:8]  # nothing HTML escapes
    member = people[OWNER].member
    conversation = member.start_chat(title)
    message = reply_id(member.get(f"/c/{conversation}").text)
    wait_for_message(settings, message)
    built = World(matrix_server, people, archive, conversation, message, title)
    built.baseline = built.snapshot()
    yield built
    for person in people.values():
        person.member.client.close()


# -- sending one cell ------------------------------------------------------------------------------


def user_id(world: World, email: str) -> str:
    from app.auth.service import get_user_by_email

    async def find(db: AsyncSession) -> str:
        user = await get_user_by_email(db, email)
        assert user is not None
        return str(user.id)

    return with_db(world.server.settings, find)


def path_parameters(world: World, role: str, method: str, path: str) -> dict[str, str]:
    conversation, message = world.conversation, world.message
    if role == OWNER and method != "GET" and "{conversation_id}" in path:
        conversation, message = world.owner_conversation()  # A's own changes must not spoil the rest
    return {
        "user_id": user_id(world, world.people[OWNER].email) if "{user_id}" in path else "",
        "conversation_id": conversation,
        "message_id": message,
        "name": ADAPTER,
        "version": "1",
        "action": "activate",
        "path": "css/app.css",
        "session_id": fresh_session(world) if "{session_id}" in path else "",
        "key_id": fresh_key(world) if "{key_id}" in path else "",
    }


def fresh_session(world: World) -> str:
    """A new session of user A's, to end (made here, not signed in: a sign-in would be audited, and
    the cell's snapshot is taken before)."""
    from app.models import AuthSession, utcnow

    async def start(db: AsyncSession) -> str:
        user = await get_user_by_email(db, world.people[OWNER].email)
        assert user is not None
        row = AuthSession(
            token_hash=uuid.uuid4().hex,
            user_id=user.id,
            csrf_token="x",
            expires_at=utcnow() + timedelta(hours=1),
        )
        db.add(row)
        await db.commit()
        return str(row.id)

    return with_db(world.server.settings, start)


def fresh_key(world: World) -> str:
    """A new API key of user A's, to revoke (made here, for the same reason)."""
    from app.models import ApiKey

    async def make(db: AsyncSession) -> str:
        user = await get_user_by_email(db, world.people[OWNER].email)
        assert user is not None
        row = ApiKey(user_id=user.id, prefix="pgpt-matrix", key_hash=uuid.uuid4().hex)
        db.add(row)
        await db.commit()
        return str(row.id)

    return with_db(world.server.settings, make)


def send(world: World, role: str, method: str, path: str, entry: Entry) -> tuple[str, httpx.Response]:
    url = path.format(**path_parameters(world, role, method, path))
    api = url.startswith(("/v1/", "/api/"))
    person = world.people.get(role)
    headers = dict(entry.headers)
    form = dict(entry.form or {})
    client = httpx.Client(base_url=world.server.url, timeout=60)  # anonymous, and the API's
    try:
        if person is not None and api:
            headers["Authorization"] = f"Bearer {person.key}"
        elif person is not None:
            member = person.member
            if path == "/logout":
                # Sign-out ends the session: end a fresh one, so this role's session lives on.
                client.close()
                member = sign_in(world.server, person.email)
                client = member.client
            elif path == "/account/sign-out-everywhere":
                # It ends every session of the user: a throwaway user's, of the role's kind.
                client.close()
                email = f"{role}-{uuid.uuid4().hex[:8]}@example.com"
                create_user(world.server.settings, email, admin=role == ADMIN)
                member = sign_in(world.server, email)
                client = member.client
            else:
                client.cookies = httpx.Cookies(member.client.cookies)
            if method not in ("GET", "HEAD"):
                if entry.htmx:
                    headers["X-CSRF-Token"] = member.csrf
                else:
                    form["csrf_token"] = member.csrf
        if entry.htmx:
            headers["HX-Request"] = "true"
        if path == "/login" and method == "POST":
            # User A's credentials, with the token the login form gave this browser (if it gave one).
            page = client.get("/login")
            token = page.cookies.get("pgpt_login_csrf", "") if page.status_code == 200 else ""
            form |= {"email": world.people[OWNER].email, "password": PASSWORD, "csrf_token": token}
        json = entry.json
        if json is not None and json.get("model") == SERVED_MODEL:
            json = {**json, "model": world.server.settings.model_name}
        files = None
        if entry.upload:
            files = {"file": ("adapter.zip", world.archive.read_bytes(), "application/zip")}
        response = client.request(method, url, headers=headers, data=form or None, json=json, files=files)
        return url, response
    finally:
        client.close()


def check(response: httpx.Response, expected: str, url: str) -> None:
    where = f"{response.request.method} {url}: {response.status_code} {response.text[:300]}"
    if expected == SIGN_IN_PAGE:
        assert response.status_code == 303, where
        assert response.headers["location"] == f"/login?next={quote(url.split('?')[0])}", where
    elif expected == SIGN_IN:
        assert response.status_code == 401, where
        to_login = response.headers.get("HX-Redirect", "").startswith("/login?next=")
        assert to_login or response.json() == {"detail": "sign in first"}, where
    elif expected == BEARER:
        assert response.status_code == 401, where
        assert response.headers["www-authenticate"] == "Bearer", where
    else:
        assert response.status_code == int(expected), where
    if expected == REFUSED and url.startswith(("/admin/", "/api/admin/")):
        assert "administrators only" in response.text, where


CASES = [(method, path, role) for (method, path) in MATRIX for role in ROLES]


@pytest.mark.parametrize(("method", "path", "role"), CASES, ids=[f"{m} {p} as {r}" for m, p, r in CASES])
def test_each_role_gets_what_the_matrix_says(world: World, method: str, path: str, role: str) -> None:
    entry = MATRIX[(method, path)]
    expected = entry.expected(role)
    before = world.snapshot() if expected in REFUSALS else None
    url, response = send(world, role, method, path, entry)
    check(response, expected, url)
    if before is not None:
        assert world.snapshot() == before, f"{method} {url} as {role} was refused but changed data"
    if expected == NOT_FOUND:
        assert world.title not in response.text, f"{method} {url} as {role} shows user A's conversation"


def test_a_message_is_reached_only_through_its_own_conversation(world: World) -> None:
    """User B's own conversation id with user A's message id: still 404, and nothing changes."""
    other = world.people[OTHER].member
    own = other.start_chat("Bob's question")
    wait_for_message(world.server.settings, reply_id(other.get(f"/c/{own}").text))
    before = world.snapshot()
    base = f"/c/{own}/messages/{world.message}"
    for url in (base, f"{base}/stream"):
        assert other.get(url).status_code == 404, url
    for url in (f"{base}/regenerate", f"{base}/stop"):
        assert other.post(url).status_code == 404, url
    assert world.snapshot() == before


def test_user_as_data_survives_everyone_elses_attempts(world: World) -> None:
    conversation, messages, owned, *_ = world.snapshot()
    assert conversation == world.baseline[0] and conversation[0][0] == world.title
    assert messages == world.baseline[1] and len(messages) == 2
    assert (uuid.UUID(world.conversation), world.title) in owned
    page = world.people[OWNER].member.get(f"/c/{world.conversation}")
    assert page.status_code == 200 and world.title in page.text
