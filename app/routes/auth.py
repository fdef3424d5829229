"""Sign-in and sign-out pages: the password form, OpenID Connect, and the page of people waiting
for approval. (Sign-in through the trusted proxy's headers needs no page: app.deps reads them.)"""

from __future__ import annotations

import hmac
import logging
import secrets
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from app.auth import service as auth
from app.auth import throttle
from app.auth.oidc import STATE_COOKIE, STATE_COOKIE_PATH, OidcClient, OidcError
from app.deps import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    AnySession,
    DbDep,
    OptionalSession,
    ServicesDep,
    check_same_origin,
    client_of,
)
from app.models import AuthSession, SignInMethod, User
from app.routes.html import forget_cookie, redirect, render, sentence
from app.services import Services

log = logging.getLogger(__name__)

router = APIRouter(tags=["auth"])


def safe_next(target: str | None) -> str:
    """Only same-site paths: `next` must not send a freshly signed-in user to another site."""
    # Browsers drop tabs and line breaks from a URL ("/\t/evil.example" is "//evil.example" to
    # them), and a Location header holds printable ASCII only (else a 500): anything else goes home.
    if (
        target
        and target.isascii()
        and target.isprintable()
        and target.startswith("/")
        and not target.startswith(("//", "/\\"))
    ):
        return target
    return "/"


def _login_page(
    request: Request,
    services: ServicesDep,
    *,
    next_url: str,
    error: str = "",
    status: int = 200,
    email: str = "",
) -> HTMLResponse:
    # Before sign-in there is no session to hold a CSRF token, so the form and a cookie carry
    # the same random value (double submit).
    token = secrets.token_urlsafe(32)
    response = render(
        request,
        services,
        "pages/login.html",
        login_csrf=token,
        next_url=next_url,
        error=error,
        email=email,
        oidc_name=services.oidc.provider_name if services.oidc else "",
        status_code=status,
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=services.settings.cookie_secure,
        path="/login",
    )
    return response


@router.get("/login", response_class=HTMLResponse)
async def login_form(
    request: Request, services: ServicesDep, session: OptionalSession, next: str = "/"
) -> Response:
    if session is not None:
        return redirect(request, safe_next(next))
    return _login_page(request, services, next_url=safe_next(next))


@router.post("/login")
async def login(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    email: Annotated[str, Form()],
    password: Annotated[str, Form()],
    csrf_token: Annotated[str, Form(alias=CSRF_FIELD)] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    # The double-submit token alone does not stop a sibling subdomain that plants its own cookie
    # (login CSRF: the victim signed in to the attacker's account); another origin is refused too.
    check_same_origin(request)
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not hmac.compare_digest(cookie, csrf_token):
        return _login_page(
            request,
            services,
            next_url=safe_next(next),
            status=403,
            email=email,
            error="The sign-in form expired. Please try again.",
        )
    client = client_of(request)
    limit = services.settings.sign_in_failure_limit
    wait = await throttle.wait_before_sign_in(
        db, secret=services.secret, email=email, address=client.address, limit=limit
    )
    if wait:
        # The password is not checked, and the attempt not audited: the failures that led here were.
        log.warning("sign-in refused: too many failed sign-ins from %s", client.address)
        refused = _login_page(
            request,
            services,
            next_url=safe_next(next),
            status=429,
            email=email,
            error=f"Too many failed sign-ins. Try again in {max(1, round(wait / 60))} min.",
        )
        refused.headers["Retry-After"] = str(wait)
        return refused
    user = await auth.authenticate(db, email=email, password=password)
    if user is None:
        if limit:
            await throttle.count_failed_sign_in(
                db, secret=services.secret, email=email, address=client.address
            )
        await auth.record_failed_sign_in(
            db, email=email, method=SignInMethod.PASSWORD, client=client,
            reason="wrong email or password, or the account is disabled",
        )  # fmt: skip
        return _login_page(
            request,
            services,
            next_url=safe_next(next),
            status=401,
            email=email,
            error="Wrong email or password.",
        )
    response = redirect(request, safe_next(next))
    await _start_session(request, response, services, db, user, SignInMethod.PASSWORD)
    forget_cookie(response, services, LOGIN_CSRF_COOKIE, path="/login")
    return response


async def _start_session(
    request: Request, response: Response, services: Services, db: DbDep, user: User, method: SignInMethod
) -> AuthSession:
    token, session = await auth.start_session(
        db,
        user=user,
        secret=services.secret,
        ttl=timedelta(hours=services.settings.session_ttl_hours),
        method=method,
        client=client_of(request),
    )
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=services.settings.session_ttl_hours * 3600,
        httponly=True,
        samesite="lax",
        secure=services.settings.cookie_secure,
    )
    return session


# -- OpenID Connect --------------------------------------------------------------------------------


def _oidc(services: Services) -> OidcClient:
    if services.oidc is None:
        raise HTTPException(404, "sign-in with OpenID Connect is not set up on this server (OIDC_ISSUER)")
    return services.oidc


def _redirect_uri(request: Request, services: Services) -> str:
    return services.settings.oidc_redirect_uri or str(request.url_for("oidc_callback"))


@router.get("/login/oidc")
async def oidc_begin(request: Request, services: ServicesDep, next: str = "/") -> Response:
    """Send the browser to the OpenID provider (authorization code flow with PKCE)."""
    oidc = _oidc(services)
    try:
        started = await oidc.begin(redirect_uri=_redirect_uri(request, services), next_url=safe_next(next))
    except OidcError as error:
        failed = f"Sign-in failed: {sentence(error)}"
        return _login_page(request, services, next_url=safe_next(next), status=502, error=failed)
    response = Response(status_code=303, headers={"Location": started.url})
    # Lax, so the browser sends it back on the provider's top-level redirect to the callback.
    response.set_cookie(
        STATE_COOKIE,
        started.cookie,
        max_age=600,
        httponly=True,
        samesite="lax",
        secure=services.settings.cookie_secure,
        path=STATE_COOKIE_PATH,
    )
    return response


@router.get("/login/oidc/callback", name="oidc_callback")
async def oidc_callback(request: Request, services: ServicesDep, db: DbDep) -> Response:
    """The provider sends the browser back here with a code; exchange it and sign the user in."""
    oidc = _oidc(services)
    try:
        identity, next_url = await oidc.finish(
            params=dict(request.query_params), cookie=request.cookies.get(STATE_COOKIE, "")
        )
        user = await auth.sign_in_external(db, identity, services.sign_in_policy)
    except (OidcError, auth.UserError) as error:
        await auth.record_failed_sign_in(
            db, email="", method=SignInMethod.OIDC, client=client_of(request),
            reason=str(error),
        )  # fmt: skip
        failed = f"Sign-in failed: {sentence(error)}"
        response: Response = _login_page(request, services, next_url="/", status=400, error=failed)
        forget_cookie(response, services, STATE_COOKIE, path=STATE_COOKIE_PATH)
        return response
    if not user.is_active:
        await auth.record_failed_sign_in(
            db, email=user.email, method=SignInMethod.OIDC, client=client_of(request),
            reason="the account is disabled",
        )  # fmt: skip
        response = _login_page(
            request, services, next_url="/", status=403,
            error=f"The account {user.email} is disabled. Ask an administrator to enable it.",
        )  # fmt: skip
        forget_cookie(response, services, STATE_COOKIE, path=STATE_COOKIE_PATH)
        return response
    response = Response(status_code=303, headers={"Location": safe_next(next_url)})
    await _start_session(request, response, services, db, user, SignInMethod.OIDC)
    forget_cookie(response, services, STATE_COOKIE, path=STATE_COOKIE_PATH)
    return response


@router.post("/logout")
async def logout(request: Request, services: ServicesDep, db: DbDep, session: AnySession) -> Response:
    await auth.end_session(db, session)
    response = redirect(request, "/login")
    forget_cookie(response, services, SESSION_COOKIE)
    return response
