"""The account page: a signed-in person's own sessions and API keys, to see and revoke.

Plain HTML forms (they work without JavaScript), each answered with a redirect back to the page; a
session or key that is not the person's own (or no longer live) answers 404. Every change is
audited (app/audit.py) and takes effect on the next request, since each request looks its session
or key up.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from app.auth import service as auth
from app.deps import SESSION_COOKIE, CurrentSession, DbDep, ServicesDep
from app.models import SignInMethod
from app.routes.html import forget_cookie, redirect, render
from app.services import Services

router = APIRouter(prefix="/account", tags=["account"], include_in_schema=False)


async def _page(
    request: Request, services: ServicesDep, db: DbDep, session: CurrentSession, *, new_key: str = "",
    status_code: int = 200,
) -> HTMLResponse:  # fmt: skip
    user = session.user
    return render(
        request, services, "pages/account.html", session=session, current_session=session.id,
        sessions=await auth.live_sessions(db, user, idle=services.settings.session_idle),
        api_keys=await auth.user_api_keys(db, user), new_key=new_key, status_code=status_code,
        proxy=session.method is SignInMethod.PROXY,
    )  # fmt: skip


@router.get("", response_class=HTMLResponse)
async def account_page(
    request: Request, services: ServicesDep, db: DbDep, session: CurrentSession
) -> Response:
    return await _page(request, services, db, session)


@router.post("/sessions/{session_id}/revoke")
async def revoke_session(
    request: Request, services: ServicesDep, db: DbDep, session: CurrentSession, session_id: int
) -> Response:
    """End one of the person's sessions (this one included: then they are signed out here)."""
    if not await auth.revoke_session(db, user=session.user, session_id=session_id):
        raise HTTPException(404, "no such session of yours (it may have ended already); reload the page")
    if session_id == session.id:
        return _signed_out(request, services)
    return redirect(request, "/account")


@router.post("/sign-out-everywhere")
async def sign_out_everywhere(
    request: Request, services: ServicesDep, db: DbDep, session: CurrentSession
) -> Response:
    """End every session of the person, this one too (their API keys stay: revoke those one by one)."""
    await auth.end_sessions(db, user=session.user, actor=session.user)
    return _signed_out(request, services)


@router.post("/api-keys", response_class=HTMLResponse)
async def create_key(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: CurrentSession,
    name: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """Make an API key for the person; the page shows it this once (only its hash is kept)."""
    key, _ = await auth.create_api_key(
        db, user=session.user, secret=services.secret, name=name.strip(), actor=session.user
    )
    return await _page(request, services, db, session, new_key=key, status_code=201)


@router.post("/api-keys/{key_id}/revoke")
async def revoke_key(request: Request, db: DbDep, session: CurrentSession, key_id: int) -> Response:
    if not await auth.revoke_api_key(db, user=session.user, key_id=key_id):
        raise HTTPException(404, "no such API key of yours (it may be revoked already); reload the page")
    return redirect(request, "/account")


def _signed_out(request: Request, services: Services) -> Response:
    response = redirect(request, "/login")
    forget_cookie(response, services, SESSION_COOKIE)
    return response
