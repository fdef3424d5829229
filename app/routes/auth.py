"""Sign-in and sign-out pages."""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from app.auth import service as auth
from app.deps import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    CurrentSession,
    DbDep,
    OptionalSession,
    ServicesDep,
)
from app.routes.html import redirect, render

router = APIRouter(tags=["auth"])


def safe_next(target: str | None) -> str:
    """Only same-site paths: `next` must not send a freshly signed-in user to another site."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
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
    user = await auth.authenticate(db, email=email, password=password)
    if user is None:
        return _login_page(
            request,
            services,
            next_url=safe_next(next),
            status=401,
            email=email,
            error="Wrong email or password.",
        )
    token, _ = await auth.start_session(
        db, user=user, secret=services.secret, ttl=timedelta(hours=services.settings.session_ttl_hours)
    )
    response = redirect(request, safe_next(next))
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=services.settings.session_ttl_hours * 3600,
        httponly=True,
        samesite="lax",
        secure=services.settings.cookie_secure,
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


@router.post("/logout")
async def logout(request: Request, db: DbDep, session: CurrentSession) -> Response:
    await auth.end_session(db, session)
    response = redirect(request, "/login")
    response.delete_cookie(SESSION_COOKIE)
    return response
