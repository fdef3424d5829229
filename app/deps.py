"""FastAPI dependencies, as Annotated aliases the routes declare in their signatures."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import service as auth
from app.auth.proxy import DIRECT_PEER
from app.models import ApiKey, AuthSession, User
from app.services import Services

log = logging.getLogger(__name__)

SESSION_COOKIE = "pgpt_session"
LOGIN_CSRF_COOKIE = "pgpt_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class LoginRequired(Exception):
    """No valid session; HTML routes answer with the login page."""


class ApiAuthError(Exception):
    """No valid API key; /v1 routes answer 401 in OpenAI's error format."""


APPROVAL_PENDING = "your account is waiting for an administrator's approval"


class ApprovalPending(Exception):
    """Signed in, but waiting for an admin's approval; HTML routes answer with the waiting page."""

    def __init__(self, session: AuthSession) -> None:
        super().__init__(APPROVAL_PENDING)
        self.session = session


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_db(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    async with services.sessionmaker() as db:
        yield db


DbDep = Annotated[AsyncSession, Depends(get_db)]


async def get_auth_session(request: Request, db: DbDep, services: ServicesDep) -> AuthSession | None:
    """The request's sign-in: the trusted proxy's headers when it names someone, else the cookie."""
    proxy = services.trusted_proxy
    if proxy is not None:
        peer = request.scope.get(DIRECT_PEER)
        identity = proxy.identity(peer[0] if peer else None, request.headers)
        if identity is not None:
            try:
                return await auth.proxy_session(
                    db,
                    identity,
                    services.sign_in_policy,
                    secret=services.secret,
                    ttl=timedelta(hours=services.settings.session_ttl_hours),
                    idle=services.settings.session_idle,
                    client=client_of(request),
                )
            except auth.UserError as error:
                log.warning("ignored the trusted proxy's %s header: %s", proxy.user_header, error)
                return None
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    return await auth.resolve_session(
        db, token=token, secret=services.secret, idle=services.settings.session_idle
    )


def client_of(request: Request) -> auth.Client:
    """The request's client, for the audit log and the account page's list of sessions."""
    address = request.client.host if request.client else ""
    return auth.Client(address=address, user_agent=request.headers.get("user-agent", ""))


OptionalSession = Annotated[AuthSession | None, Depends(get_auth_session)]


async def require_signed_in(request: Request, session: OptionalSession) -> AuthSession:
    if session is None:
        raise LoginRequired()
    if request.method in UNSAFE_METHODS:
        await check_csrf(request, session.csrf_token)
    return session


# Signed in, approved or not: only for signing out.
AnySession = Annotated[AuthSession, Depends(require_signed_in)]


async def require_session(session: AnySession) -> AuthSession:
    if not session.user.is_approved:
        raise ApprovalPending(session)
    return session


CurrentSession = Annotated[AuthSession, Depends(require_session)]


async def require_user(session: CurrentSession) -> User:
    return session.user


CurrentUser = Annotated[User, Depends(require_user)]


def check_same_origin(request: Request) -> None:
    """Refuse a request that another site's page sent (its Origin names another host)."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.url.netloc:
        raise HTTPException(403, "cross-origin request refused")


async def check_csrf(request: Request, expected: str) -> None:
    """Refuse a state-changing request without this session's token, or from another origin."""
    check_same_origin(request)
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith("multipart/"):
        # An adapter upload is up to MAX_ADAPTER_UPLOAD_MB: reading it to find the token would let
        # anyone signed in make the server spool that much. The page's htmx sends the header.
        raise HTTPException(
            403, "missing or invalid CSRF token; an upload must send it in the X-CSRF-Token header"
        )
    if sent is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not sent or not hmac.compare_digest(sent, expected):
        raise HTTPException(403, "missing or invalid CSRF token; reload the page and try again")


async def require_api_key(request: Request, db: DbDep, services: ServicesDep) -> ApiKey:
    # Only the standard header: a second way in (e.g. x-api-key) is a second thing to get wrong.
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiAuthError("missing API key: send it as 'Authorization: Bearer <key>'")
    row = await auth.resolve_api_key(db, key=key.strip(), secret=services.secret)
    if row is None:
        raise ApiAuthError("invalid API key")
    return row


# The key itself, for its own rate limit; routes take ApiUser as well, which checks approval.
CurrentApiKey = Annotated[ApiKey, Depends(require_api_key)]


async def require_api_user(key: CurrentApiKey) -> User:
    if not key.user.is_approved:
        raise HTTPException(403, APPROVAL_PENDING)
    return key.user


ApiUser = Annotated[User, Depends(require_api_user)]


class AdminRequired(HTTPException):
    def __init__(self) -> None:
        super().__init__(403, "this page is for administrators only")


async def require_admin_session(session: CurrentSession) -> AuthSession:
    if not session.user.is_admin:
        raise AdminRequired()
    return session


AdminSession = Annotated[AuthSession, Depends(require_admin_session)]


async def require_admin_api_user(user: ApiUser) -> User:
    if not user.is_admin:
        raise AdminRequired()
    return user


AdminApiUser = Annotated[User, Depends(require_admin_api_user)]


async def require_metrics_scraper(request: Request, services: ServicesDep) -> None:
    """With METRICS_TOKEN set, only a scraper sending it as a bearer token reads /metrics."""
    token = services.settings.metrics_token
    if token is None:
        return
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), expected):
        raise HTTPException(
            401,
            "the metrics need this server's METRICS_TOKEN: send it as 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


MetricsScraper = Annotated[None, Depends(require_metrics_scraper)]
