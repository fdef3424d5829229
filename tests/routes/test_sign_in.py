"""Enterprise sign-in against live servers: the trusted proxy's headers, OpenID Connect, ADMIN_GROUPS,
approval of new users, and the end of every session and API key when a password changes or a user
is disabled.

OpenID Connect runs against `FakeOpenIdProvider`: a small but real provider (discovery, JWKS,
authorize, token and userinfo endpoints, RS256 ID tokens signed with a key made for the test) on a
loopback port, which checks the client's secret and the PKCE verifier as a real one does. The
browser is an httpx client that follows every redirect between the two servers.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import uvicorn
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.conftest import (
    PASSWORD,
    LiveServer,
    create_api_key,
    create_user,
    free_port,
    make_settings,
    sign_in,
    with_db,
)

CLIENT_ID = "private-gpt"
CLIENT_SECRET = "provider-issued-secret"


# -- a small real OpenID provider -------------------------------------------------------------------


@dataclass
class FakeOpenIdProvider:
    """An OpenID provider for the tests (authorization code flow with PKCE, client_secret_basic).

    `person` is whoever signs in at it next (it asks no password); `tamper` overrides ID-token
    claims, to send the app a token it must refuse. `token_requests` records what the app sent.
    """

    port: int = field(default_factory=free_port)
    person: dict[str, Any] = field(default_factory=dict)
    tamper: dict[str, Any] = field(default_factory=dict)
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    access_tokens: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.key = RSAKey.generate_key(2048, parameters={"kid": "test-key", "use": "sig", "alg": "RS256"})
        app = Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.jwks),
                Route("/authorize", self.authorize),
                Route("/token", self.token, methods=["POST"]),
                Route("/userinfo", self.userinfo),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> FakeOpenIdProvider:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the provider did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    async def discovery(self, _: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "userinfo_endpoint": f"{self.issuer}/userinfo",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            }
        )

    async def jwks(self, _: Request) -> Response:
        return JSONResponse(KeySet([self.key]).as_dict(private=False))

    async def authorize(self, request: Request) -> Response:
        query = dict(request.query_params)
        self.authorize_requests.append(query)
        if query.get("client_id") != CLIENT_ID or query.get("response_type") != "code":
            return JSONResponse({"error": "invalid_request"}, 400)
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return JSONResponse({"error": "invalid_request", "error_description": "PKCE is required"}, 400)
        code = secrets.token_urlsafe(16)
        self.codes[code] = {**query, "person": dict(self.person)}
        answer = urlencode({"code": code, "state": query["state"]})
        return RedirectResponse(f"{query['redirect_uri']}?{answer}", status_code=302)

    async def token(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.token_requests.append(form)
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("authorization") != expected:
            return JSONResponse({"error": "invalid_client"}, 401)
        grant = self.codes.pop(form.get("code", ""), None)  # a code works once
        if grant is None or form.get("grant_type") != "authorization_code":
            return JSONResponse({"error": "invalid_grant"}, 400)
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return JSONResponse({"error": "invalid_grant", "error_description": "redirect_uri"}, 400)
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if challenge != grant["code_challenge"]:
            return JSONResponse(
                {"error": "invalid_grant", "error_description": "PKCE verification failed"}, 400
            )
        person, now = grant["person"], int(time.time())
        claims = {
            "iss": self.issuer, "aud": CLIENT_ID, "sub": person["email"], "iat": now, "exp": now + 300,
            "nonce": grant["nonce"], **person, **self.tamper,
        }  # fmt: skip
        claims = {name: value for name, value in claims.items() if value is not None}  # None: left out
        id_token = jwt.encode({"alg": "RS256", "kid": "test-key"}, claims, self.key)
        access = "at-" + secrets.token_urlsafe(8)
        self.access_tokens[access] = person
        return JSONResponse(
            {"access_token": access, "token_type": "Bearer", "expires_in": 300, "id_token": id_token}
        )

    async def userinfo(self, request: Request) -> Response:
        person = self.access_tokens.get(request.headers.get("authorization", "").removeprefix("Bearer "))
        if person is None:
            return JSONResponse({"error": "invalid_token"}, 401)
        return JSONResponse({"sub": person["email"], **person})


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeOpenIdProvider]:
    fake = FakeOpenIdProvider().start()
    yield fake
    fake.stop()


def sso_settings(tmp_path: Path, model_dir: Path, provider: FakeOpenIdProvider, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "proxy_name_header": "X-Forwarded-Name",
        "oidc_issuer": provider.issuer,
        "oidc_client_id": CLIENT_ID,
        "oidc_client_secret": CLIENT_SECRET,
        "oidc_provider_name": "Acme SSO",
        "admin_groups": "it-admins,security",
        **overrides,
    }
    return make_settings(tmp_path, model_dir, **values)


@pytest.fixture(scope="module")
def sso_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, provider: FakeOpenIdProvider
) -> Iterator[LiveServer]:
    """Trusts the proxy at 127.0.0.1 (where the tests connect from); new users may chat at once."""
    settings = sso_settings(
        tmp_path_factory.mktemp("sso"), tiny_model_dir, provider, trusted_proxy_addresses="127.0.0.1,::1"
    )
    live = LiveServer(settings).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def gated_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, provider: FakeOpenIdProvider
) -> Iterator[LiveServer]:
    """Trusts only a proxy in 10.0.0.0/8 (the tests' loopback is not one); new users wait for approval."""
    settings = sso_settings(
        tmp_path_factory.mktemp("gated"),
        tiny_model_dir,
        provider,
        trusted_proxy_addresses="10.0.0.0/8",
        new_users_require_approval=True,
    )
    live = LiveServer(settings).start()
    yield live
    live.stop()


# -- helpers ------------------------------------------------------------------------------------------


def unique_email(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"


def proxied(email: str, *, groups: str = "", name: str = "") -> dict[str, str]:
    """The headers the company's reverse proxy adds for a person it has signed in."""
    headers = {"X-Forwarded-Email": email, "X-Forwarded-Groups": groups}
    if name:
        headers["X-Forwarded-Name"] = name
    return headers


def page_csrf(html: str) -> str:
    match = re.search(r'"X-CSRF-Token": "([^"]+)"', html)
    assert match, html[:500]
    return match.group(1)


def stored_user(server: LiveServer, email: str) -> Any:
    from app.auth.service import get_user_by_email

    return with_db(server.settings, lambda db: get_user_by_email(db, email))


def oidc_sign_in(
    server: LiveServer, provider: FakeOpenIdProvider, person: dict[str, Any], next_url: str = "/"
) -> tuple[httpx.Client, httpx.Response]:
    """Click "Sign in with Acme SSO" and follow the redirects through the provider and back.

    Returns the browser and the callback's answer (not followed further).
    """
    provider.person = person
    browser = httpx.Client(timeout=60)
    start = browser.get(f"{server.url}/login/oidc", params={"next": next_url})
    assert start.status_code == 303, start.text
    at_provider = browser.get(start.headers["location"])
    assert at_provider.status_code == 302, at_provider.text
    callback = browser.get(at_provider.headers["location"])
    return browser, callback


def password_signs_in(server: LiveServer, email: str, password: str = PASSWORD) -> bool:
    with httpx.Client(base_url=server.url) as browser:
        token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/login").text)
        assert token
        form = {"email": email, "password": password, "csrf_token": token.group(1)}
        return browser.post("/login", data=form).status_code == 303


def approve_as_admin(server: LiveServer, email: str) -> httpx.Response:
    admin_email = unique_email("approver")
    create_user(server.settings, admin_email, admin=True)
    admin = sign_in(server, admin_email)
    users = admin.get("/admin/users")
    assert users.status_code == 200 and email in users.text and "waiting for approval" in users.text
    user = stored_user(server, email)
    response = admin.post(f"/admin/users/{user.id}", data={"action": "approve"})
    admin.client.close()
    return response


# -- the trusted proxy ---------------------------------------------------------------------------------


def test_the_trusted_proxy_signs_people_in_and_their_first_visit_creates_the_account(
    sso_server: LiveServer,
) -> None:
    email = unique_email("proxied")
    headers = proxied(email.upper(), groups="staff, engineering,staff", name="Alice Proxied")
    with httpx.Client(base_url=sso_server.url, headers=headers, timeout=60) as browser:
        home = browser.get("/")
        assert home.status_code == 200 and email in home.text
        assert "pgpt_session" not in browser.cookies  # the proxy names the user on every request
        # The page's CSRF token is good for the next requests (the proxy session is reused).
        sent = browser.post(
            "/c",
            data={"message": "Hello"},
            headers={"X-CSRF-Token": page_csrf(home.text), "HX-Request": "true"},
        )
        assert sent.status_code == 204, sent.text
        assert browser.post("/c", data={"message": "Hi"}, headers={"HX-Request": "true"}).status_code == 403
    user = stored_user(sso_server, email)
    assert (user.source.value, user.display_name, user.groups) == (
        "proxy",
        "Alice Proxied",
        ["staff", "engineering"],
    )
    assert (user.role.value, user.password_hash, user.is_approved) == ("user", "", True)
    assert not password_signs_in(sso_server, email)  # no password opens an account the proxy made


def test_proxy_headers_from_an_untrusted_address_are_ignored(gated_server: LiveServer) -> None:
    email = unique_email("mallory")
    for spoof in ({}, {"X-Forwarded-For": "10.1.2.3"}):  # a forwarded address does not make a peer trusted
        with httpx.Client(
            base_url=gated_server.url, headers={**proxied(email, groups="it-admins"), **spoof}
        ) as browser:
            assert browser.get("/").status_code == 303
            assert browser.get("/admin/users").status_code == 303
    assert stored_user(gated_server, email) is None
    # A local account signs in as usual, whatever the headers claim.
    local = unique_email("local")
    create_user(gated_server.settings, local)
    member = sign_in(gated_server, local)
    page = member.get("/", headers=proxied("ceo@example.com", groups="it-admins"))
    assert page.status_code == 200 and local in page.text and "ceo@example.com" not in page.text
    member.client.close()


def test_admin_groups_give_the_admin_role_at_every_sign_in(sso_server: LiveServer) -> None:
    email = unique_email("ops")
    with httpx.Client(base_url=sso_server.url, timeout=60) as browser:
        assert (
            browser.get("/admin/users", headers=proxied(email, groups="staff,it-admins")).status_code == 200
        )
        assert stored_user(sso_server, email).role.value == "admin"
        # Left the admin group at the identity provider: the next request through the proxy says so.
        refused = browser.get("/admin/users", headers=proxied(email, groups="staff"))
        assert refused.status_code == 403
        user = stored_user(sso_server, email)
        assert (user.role.value, user.groups) == ("user", ["staff"])


# -- OpenID Connect -----------------------------------------------------------------------------------


def test_openid_connect_code_flow_with_pkce(sso_server: LiveServer, provider: FakeOpenIdProvider) -> None:
    with httpx.Client(base_url=sso_server.url) as anonymous:
        assert "Sign in with Acme SSO" in anonymous.get("/login").text
    email = unique_email("oidc")
    person = {"email": email, "email_verified": True, "name": "Olive Oidc", "groups": ["security", "staff"]}
    browser, callback = oidc_sign_in(sso_server, provider, person, next_url="/admin/users")
    with closing(browser):
        assert callback.status_code == 303 and callback.headers["location"] == "/admin/users", callback.text
        assert "pgpt_session" in browser.cookies
        page = browser.get(f"{sso_server.url}/admin/users")
        assert page.status_code == 200 and "Olive Oidc" in page.text  # "security" is an admin group
    asked, sent = provider.authorize_requests[-1], provider.token_requests[-1]
    assert asked["code_challenge_method"] == "S256" and asked["scope"] == "openid email profile"
    assert asked["redirect_uri"] == f"{sso_server.url}/login/oidc/callback"
    assert len(sent["code_verifier"]) >= 43  # and the provider checked it against the challenge
    user = stored_user(sso_server, email)
    assert (user.source.value, user.role.value, user.groups, user.password_hash) == (
        "oidc",
        "admin",
        ["security", "staff"],
        "",
    )


def test_groups_and_email_come_from_userinfo_when_the_id_token_lacks_them(
    sso_server: LiveServer, provider: FakeOpenIdProvider
) -> None:
    email = unique_email("thin-token")
    provider.tamper = {"email": None, "groups": None}  # dropped from the ID token, kept in userinfo
    try:
        browser, callback = oidc_sign_in(sso_server, provider, {"email": email, "groups": "it-admins"})
    finally:
        provider.tamper = {}
    browser.close()
    assert callback.status_code == 303, callback.text
    assert stored_user(sso_server, email).role.value == "admin"


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ({"aud": "another-client"}, "failed verification"),
        ({"nonce": "replayed"}, "failed verification"),
        ({"iss": "https://evil.example"}, "failed verification"),
        ({"exp": 1}, "failed verification"),
        ({"email_verified": False}, "has not verified"),
    ],
)
def test_an_id_token_that_fails_verification_signs_no_one_in(
    sso_server: LiveServer, provider: FakeOpenIdProvider, tamper: dict[str, Any], reason: str
) -> None:
    email = unique_email("tampered")
    provider.tamper = tamper
    try:
        browser, callback = oidc_sign_in(sso_server, provider, {"email": email})
    finally:
        provider.tamper = {}
    with closing(browser):
        assert callback.status_code == 400 and reason in callback.text, callback.text
        assert "pgpt_session" not in browser.cookies
    assert stored_user(sso_server, email) is None


def test_a_callback_from_another_browser_or_with_a_forged_state_is_refused(
    sso_server: LiveServer, provider: FakeOpenIdProvider
) -> None:
    provider.person = {"email": unique_email("victim")}
    with httpx.Client(timeout=60) as victim, httpx.Client(timeout=60) as attacker:
        start = victim.get(f"{sso_server.url}/login/oidc")
        callback_url = victim.get(start.headers["location"]).headers["location"]
        # The code and state, replayed in a browser that did not begin this sign-in.
        replayed = attacker.get(callback_url)
        assert replayed.status_code == 400 and "another browser" in replayed.text
        query = parse_qs(urlsplit(callback_url).query)
        forged = victim.get(
            f"{sso_server.url}/login/oidc/callback", params={"code": query["code"][0], "state": "forged"}
        )
        assert forged.status_code == 400 and "does not match" in forged.text
        refused = victim.get(f"{sso_server.url}/login/oidc/callback", params={"error": "access_denied"})
        assert refused.status_code == 400
        assert "pgpt_session" not in victim.cookies and "pgpt_session" not in attacker.cookies


# -- approval ------------------------------------------------------------------------------------------


def test_new_users_wait_for_an_admins_approval(
    gated_server: LiveServer, provider: FakeOpenIdProvider
) -> None:
    email = unique_email("newcomer")
    browser, callback = oidc_sign_in(
        gated_server, provider, {"email": email, "name": "Nina New", "groups": ["staff"]}
    )
    key = create_api_key(gated_server.settings, email)
    api = {"Authorization": f"Bearer {key}"}
    with closing(browser):
        assert callback.status_code == 303
        waiting = browser.get(f"{gated_server.url}/")
        assert (
            waiting.status_code == 403
            and "Waiting for approval" in waiting.text
            and "Nina New" in waiting.text
        )
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', waiting.text)
        assert csrf
        sent = browser.post(
            f"{gated_server.url}/c", data={"message": "Hi"}, headers={"X-CSRF-Token": csrf.group(1)}
        )
        assert sent.status_code == 403 and "approval" in sent.text
        models = httpx.get(f"{gated_server.url}/v1/models", headers=api)
        assert models.status_code == 403 and "approval" in models.json()["error"]["message"]

        assert approve_as_admin(gated_server, email).status_code == 200
        assert browser.get(f"{gated_server.url}/").status_code == 200
        assert httpx.get(f"{gated_server.url}/v1/models", headers=api).status_code == 200


def test_members_of_an_admin_group_need_no_approval(
    gated_server: LiveServer, provider: FakeOpenIdProvider
) -> None:
    email = unique_email("first-admin")
    browser, callback = oidc_sign_in(gated_server, provider, {"email": email, "groups": ["it-admins"]})
    with closing(browser):
        assert callback.status_code == 303
        assert browser.get(f"{gated_server.url}/admin/users").status_code == 200


def test_a_user_waiting_for_approval_can_sign_out(
    gated_server: LiveServer, provider: FakeOpenIdProvider
) -> None:
    browser, _ = oidc_sign_in(gated_server, provider, {"email": unique_email("leaving")})
    with closing(browser):
        waiting = browser.get(f"{gated_server.url}/")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', waiting.text)
        assert waiting.status_code == 403 and csrf
        out = browser.post(f"{gated_server.url}/logout", data={"csrf_token": csrf.group(1)})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert browser.get(f"{gated_server.url}/").status_code == 303


# -- ending sign-ins ----------------------------------------------------------------------------------


def test_a_new_password_ends_every_session_and_api_key(sso_server: LiveServer) -> None:
    from app.auth import service as auth

    email = unique_email("rotated")
    create_user(sso_server.settings, email)
    member = sign_in(sso_server, email)
    key = create_api_key(sso_server.settings, email)
    api = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{sso_server.url}/v1/models", headers=api).status_code == 200

    async def change(db: AsyncSession) -> None:
        user = await auth.get_user_by_email(db, email)
        assert user is not None
        await auth.set_password(db, user=user, password="a brand new password")

    with_db(sso_server.settings, change)
    assert member.get("/").status_code == 303  # to the login page
    assert httpx.get(f"{sso_server.url}/v1/models", headers=api).status_code == 401
    assert not password_signs_in(sso_server, email)  # the old password is gone
    assert password_signs_in(sso_server, email, "a brand new password")
    member.client.close()


def test_disabling_a_user_ends_every_session_and_api_key(sso_server: LiveServer) -> None:
    email, proxy_email = unique_email("leaver"), unique_email("proxy-leaver")
    create_user(sso_server.settings, email)
    member = sign_in(sso_server, email)
    key = create_api_key(sso_server.settings, email)
    api = {"Authorization": f"Bearer {key}"}
    proxy_browser = httpx.Client(base_url=sso_server.url, headers=proxied(proxy_email))
    assert proxy_browser.get("/").status_code == 200
    admin_email = unique_email("admin")
    create_user(sso_server.settings, admin_email, admin=True)
    admin = sign_in(sso_server, admin_email)
    try:
        for target in (email, proxy_email):
            user = stored_user(sso_server, target)
            answer = admin.post(f"/admin/users/{user.id}", data={"action": "disable"})
            assert answer.status_code == 200 and target in answer.text
        assert member.get("/").status_code == 303
        assert httpx.get(f"{sso_server.url}/v1/models", headers=api).status_code == 401
        assert proxy_browser.get("/").status_code == 303  # the proxy's word no longer signs them in
        assert not password_signs_in(sso_server, email)
        # An admin cannot lock themselves out.
        own = admin.post(
            f"/admin/users/{stored_user(sso_server, admin_email).id}", data={"action": "disable"}
        )
        assert own.status_code == 409 and "your own account" in own.text

        # Enabled again: the password signs in anew, but the old key stays revoked.
        admin.post(f"/admin/users/{stored_user(sso_server, email).id}", data={"action": "enable"})
        assert password_signs_in(sso_server, email)
        assert httpx.get(f"{sso_server.url}/v1/models", headers=api).status_code == 401
    finally:
        for client in (member.client, proxy_browser, admin.client):
            client.close()


# -- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"trusted_proxy_addresses": "10.0.0.300"}, "TRUSTED_PROXY_ADDRESSES: '10.0.0.300' is not an IP"),
        ({"proxy_user_header": "X Email"}, "PROXY_USER_HEADER: 'X Email' is not an HTTP header name"),
        ({"oidc_issuer": "https://login.example.com"}, "OIDC_CLIENT_ID must be set with OIDC_ISSUER"),
        ({"oidc_issuer": "https://login.example.com", "oidc_client_id": "x", "oidc_scopes": "email"},
         "OIDC_SCOPES must include openid"),
        ({"oidc_issuer": "http://login.example.com", "oidc_client_id": "x", "environment": "production",
          "secret_key": "0123456789abcdef" * 2, "model_id": "/models/m"},
         "OIDC_ISSUER must use https:// in production"),
    ],
)  # fmt: skip
def test_sign_in_settings_are_checked_at_start(values: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    from app.config import Settings, describe_validation_error

    with pytest.raises(ValidationError) as error:
        Settings(_env_file=None, **values)  # type: ignore[call-arg]
    assert message in describe_validation_error(error.value)


async def test_an_unreachable_provider_is_an_error_that_names_it(tmp_path: Path) -> None:
    from app.auth.oidc import OidcClient, OidcError

    issuer = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = make_settings(tmp_path, tmp_path, oidc_issuer=issuer, oidc_client_id=CLIENT_ID)
    client = OidcClient(settings, secret=b"k" * 32)
    with pytest.raises(OidcError, match=r"could not fetch the provider's discovery document from http://127"):
        await client.begin(redirect_uri="http://127.0.0.1/login/oidc/callback", next_url="/")
