"""Cross-site request forgery: every state-changing browser route refuses a forged request.

The routes are read from the app's router, not listed by hand, so a new route is covered the day it
is added. A route that reads the session cookie and changes state (POST, PUT, PATCH, DELETE) must
answer 403, with a message that says why, and change nothing, when the request comes
  - without the CSRF token (no header, no form field; or an empty header),
  - with another user's token (in the header as htmx sends it, or in a form field),
  - with the right token but an Origin header naming another site.
The bearer-key APIs must not take the session cookie as a sign-in at all, and the sign-in form
(no session yet) has its own token and refuses other origins too. Each attack is sent for real to
the authorization matrix's live server and world (user A's conversation, the admin's adapter);
after each one, the world, every user's account and the victim's session are as before.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import iter_route_contexts
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.deps import CSRF_FIELD, CSRF_HEADER, UNSAFE_METHODS, get_auth_session, require_api_user
from tests.conftest import PASSWORD, make_settings, with_db
from tests.routes import test_authorization_matrix as matrix
from tests.routes.test_authorization_matrix import (
    ADAPTER,
    ADMIN,
    MATRIX,
    OTHER,
    OWNER,
    World,
    user_id,
)

matrix_server, world = matrix.matrix_server, matrix.world  # the fixtures, shared

EVIL = "https://evil.example"


def _dependencies(dependant: Any) -> set[Any]:
    found = set()
    for sub in dependant.dependencies:
        found |= {sub.call} | _dependencies(sub)
    return found


def state_changing_routes() -> dict[str, set[tuple[str, str]]]:
    """The app's unsafe (method, path) pairs, by how they know who is asking."""
    from app.main import create_app

    with tempfile.TemporaryDirectory() as scratch:
        app = create_app(make_settings(Path(scratch), Path(scratch)))
    kinds: dict[str, set[tuple[str, str]]] = {"cookie": set(), "bearer": set(), "neither": set()}
    for route in iter_route_contexts(app.routes):
        dependant = getattr(route, "dependant", None)
        methods = (route.methods or set()) & UNSAFE_METHODS
        if dependant is None or not methods:
            continue
        calls = _dependencies(dependant)
        kind = "cookie" if get_auth_session in calls else "bearer" if require_api_user in calls else "neither"
        kinds[kind] |= {(method, str(route.path)) for method in methods}
    return kinds


ROUTES = state_changing_routes()
COOKIE_ROUTES = sorted(ROUTES["cookie"])
BEARER_ROUTES = sorted(ROUTES["bearer"])
# Routes that change state with neither a session nor an API key, and what protects each instead.
OWN_DEFENCE = {("POST", "/login"): "its own double-submit token (cookie + form field) and the Origin check"}


def test_every_state_changing_route_is_known_here() -> None:
    assert COOKIE_ROUTES and BEARER_ROUTES
    unknown = ROUTES["neither"] - OWN_DEFENCE.keys()
    assert not unknown, f"state-changing routes with no session, no API key and no known defence: {unknown}"


# -- the attacks ---------------------------------------------------------------------------------------


def victim_of(path: str) -> str:
    return ADMIN if path.startswith("/admin/") else OWNER


def target(world: World, method: str, path: str) -> tuple[str, dict[str, str], dict[str, Any] | None]:
    """The URL, form and files of a request that, sent by the victim with its token, would change things."""
    entry = MATRIX[(method, path)]
    url = path.format(
        conversation_id=world.conversation,  # user A's, which the world's snapshot watches
        message_id=world.message,
        name=ADAPTER,
        version="1",
        action="disable",
        user_id=user_id(world, world.people[OTHER].email) if "{user_id}" in path else "",
        session_id="1",  # the first session and API key made: user A's
        key_id="1",
    )
    form = dict(entry.form or {})
    if path == "/admin/default-adapter":
        form["name"] = ADAPTER
    if path.startswith("/admin/users/"):
        form["action"] = "disable"
    files = {"file": ("adapter.zip", world.archive.read_bytes(), "application/zip")} if entry.upload else None
    return url, form, files


def accounts(world: World) -> list[tuple[Any, ...]]:
    """Every user's standing and how many sessions each has."""
    from app.models import AuthSession, User

    async def read(db: AsyncSession) -> list[tuple[Any, ...]]:
        users = (await db.execute(select(User.email, User.role, User.is_active, User.is_approved))).all()
        sessions = (await db.execute(select(AuthSession.user_id))).all()
        return [*sorted(tuple(row) for row in users), (len(sessions),)]

    return with_db(world.server.settings, read)


ATTACKS = [
    "no token",
    "empty token",
    "another user's token",
    "another user's token in the form",
    "other origin",
]
CASES = [(method, path, attack) for method, path in COOKIE_ROUTES for attack in ATTACKS]


@pytest.mark.parametrize(("method", "path", "attack"), CASES, ids=[f"{m} {p}: {a}" for m, p, a in CASES])
def test_forged_requests_are_refused_and_change_nothing(
    world: World, method: str, path: str, attack: str
) -> None:
    victim = world.people[victim_of(path)].member
    other = world.people[OTHER if victim_of(path) == OWNER else OWNER].member
    url, form, files = target(world, method, path)
    headers: dict[str, str] = {"HX-Request": "true"}
    if attack == "empty token":
        headers[CSRF_HEADER] = ""
    elif attack == "another user's token":
        headers[CSRF_HEADER] = other.csrf
    elif attack == "another user's token in the form":
        headers = {"Accept": "text/html"}  # a plain form post, as a page on another site would send
        form[CSRF_FIELD] = other.csrf
    elif attack == "other origin":
        headers |= {CSRF_HEADER: victim.csrf, "Origin": EVIL}
    before = world.snapshot(), accounts(world)

    # The victim's browser: its session cookie goes along, whoever wrote the request.
    with httpx.Client(base_url=world.server.url, timeout=60, cookies=victim.client.cookies) as browser:
        response = browser.request(method, url, headers=headers, data=form or None, files=files)

    assert response.status_code == 403, (
        f"{method} {url} ({attack}): {response.status_code} {response.text[:300]}"
    )
    says = "cross-origin request refused" if attack == "other origin" else "missing or invalid CSRF token"
    answer = response.text if "html" in headers.get("Accept", "") else response.json()["detail"]
    assert says.lower() in answer.lower()  # the error page capitalizes it
    assert (world.snapshot(), accounts(world)) == before, f"{method} {url} ({attack}) changed data"
    assert victim.get("/").status_code == 200  # the victim is still signed in


def test_the_right_token_from_the_right_origin_is_accepted(world: World) -> None:
    """The control: the same kind of request with the session's own token goes through."""
    member = world.people[OWNER].member
    for headers in ({}, {"Origin": world.server.url}, {"Origin": "null"}):
        response = member.post("/c", data={"message": "Hello"}, headers=headers)
        assert response.status_code == 204, response.text
    form = member.client.post("/c", data={"message": "Hello", CSRF_FIELD: member.csrf})
    assert form.status_code == 303


@pytest.mark.parametrize(("method", "path"), BEARER_ROUTES, ids=[f"{m} {p}" for m, p in BEARER_ROUTES])
def test_the_apis_do_not_take_the_session_cookie(world: World, method: str, path: str) -> None:
    """An admin's browser on another site's page cannot drive the JSON APIs: they want the bearer key."""
    admin = world.people[ADMIN].member
    url = path.format(name=ADAPTER, version="1", action="disable")
    entry = MATRIX[(method, path)]
    files = {"file": ("adapter.zip", world.archive.read_bytes(), "application/zip")} if entry.upload else None
    before = world.snapshot(), accounts(world)
    headers = {CSRF_HEADER: admin.csrf}
    response = admin.client.request(method, url, headers=headers, json=entry.json, files=files)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", response.text
    assert (world.snapshot(), accounts(world)) == before


def login_token(client: httpx.Client) -> str:
    page = client.get("/login")
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


@pytest.mark.parametrize("attack", ["no token", "another browser's token", "other origin"])
def test_the_sign_in_form_refuses_forged_posts(world: World, attack: str) -> None:
    """Login CSRF (the victim's browser signed in to the attacker's account) is refused."""
    email = world.people[OWNER].email
    with httpx.Client(base_url=world.server.url) as browser, httpx.Client(base_url=world.server.url) as other:
        token, headers = login_token(browser), {"Accept": "text/html"}
        if attack == "no token":
            token = ""
        elif attack == "another browser's token":
            token = login_token(other)
        else:
            headers["Origin"] = EVIL
        before = accounts(world)
        response = browser.post(
            "/login", data={"email": email, "password": PASSWORD, CSRF_FIELD: token}, headers=headers
        )
        assert response.status_code == 403, response.text
        expected = "cross-origin request refused" if attack == "other origin" else "The sign-in form expired"
        assert expected.lower() in response.text.lower()
        assert "pgpt_session" not in response.cookies and accounts(world) == before


# -- the session itself --------------------------------------------------------------------------------

# Paths a browser reads as another site, or that no Location header can carry.
OFF_SITE_NEXT = [
    "/\t/evil.example",  # browsers drop tabs and line breaks from a URL: "//evil.example"
    "/\n/evil.example",
    "/\r\n/evil.example",
    "/\t\\evil.example",
    "/\x00/evil.example",
    "/caf\u00e9/\u65e5\u672c",  # not Latin-1: the header could not be written at all
]


@pytest.mark.parametrize("target", OFF_SITE_NEXT, ids=[repr(t) for t in OFF_SITE_NEXT])
def test_next_never_leads_off_site_after_sign_in(world: World, target: str) -> None:
    email = world.people[OWNER].email
    with httpx.Client(base_url=world.server.url) as browser:
        token = login_token(browser)
        form = {"email": email, "password": PASSWORD, CSRF_FIELD: token, "next": target}
        signed_in = browser.post("/login", data=form)
        if "\x00" in target:  # no form field may hold one (app/form_text.py): sign in without it
            assert signed_in.status_code == 400 and "NUL" in signed_in.text
            signed_in = browser.post("/login", data={**form, "next": "/"})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/", signed_in.text
        # Signed in, the form itself sends the browser on to `next`.
        again = browser.get("/login", params={"next": target})
        assert again.status_code == 303 and again.headers["location"] == "/", again.text


def test_sign_in_sets_a_fresh_httponly_session_cookie_whatever_the_browser_held(world: World) -> None:
    """No session fixation: a cookie planted before sign-in is replaced, and scripts cannot read it."""
    email = world.people[OWNER].email
    with httpx.Client(base_url=world.server.url) as browser:
        browser.cookies.set("pgpt_session", "planted-by-someone-else")
        token = login_token(browser)
        response = browser.post("/login", data={"email": email, "password": PASSWORD, CSRF_FIELD: token})
        assert response.status_code == 303
        session_cookie = next(
            c for c in response.headers.get_list("set-cookie") if c.startswith("pgpt_session=")
        )
        assert "httponly" in session_cookie.lower() and "samesite=lax" in session_cookie.lower()
        value = session_cookie.split(";", 1)[0].split("=", 1)[1]
        assert value and value != "planted-by-someone-else"
        # The page's CSRF token is its own secret: not the session cookie, and not another session's.
    with httpx.Client(base_url=world.server.url, cookies={"pgpt_session": value}) as browser:
        page = browser.get("/").text
        found = re.search(r'"X-CSRF-Token": "([^"]+)"', page)
        assert found and found.group(1) not in (value, world.people[OWNER].member.csrf)
