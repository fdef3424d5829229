"""Administration: adapters (pages for admins in the browser, and the same actions as a JSON API),
who may use each adapter, the audit log (filtered, and exported as CSV or JSON), users (approve,
disable, enable, sign out everywhere, their limits) and usage.

Both call the same registry and auth functions; the JSON API (under /api/admin, bearer API key of
an admin) is described in the OpenAPI schema at /openapi.json.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import UploadFile

from app import audit, usage
from app.auth import service as auth
from app.deps import AdminApiUser, AdminSession, DbDep, ServicesDep
from app.models import Adapter, AdapterVersion, ApiKey, User
from app.registry import service
from app.registry.archive import AdapterRejected
from app.registry.catalog import content_key
from app.registry.intake import publish_archive
from app.routes.html import notice, render, sentence
from app.services import Services

pages = APIRouter(prefix="/admin", tags=["admin pages"], include_in_schema=False)
api = APIRouter(prefix="/api/admin", tags=["admin API"])


# -- the actions, shared by pages and API ---------------------------------------------------------


ExportFormat = Literal["csv", "json"]


class AuditQueryParams:
    """The audit log's filters, as the page's form and the API take them (dates YYYY-MM-DD, UTC)."""

    def __init__(
        self,
        actor: Annotated[str, Query(max_length=320, description="part of the actor's email")] = "",
        action: Annotated[
            str, Query(max_length=32, description="an action, or a family (user, sign-in)")
        ] = "",
        since: Annotated[str, Query(max_length=40, description="from this UTC day (YYYY-MM-DD)")] = "",
        until: Annotated[
            str, Query(max_length=40, description="to this UTC day, included (YYYY-MM-DD)")
        ] = "",
    ) -> None:
        self.actor, self.action, self.since, self.until = actor, action, since, until

    def parse(self) -> audit.AuditFilter:
        return audit.parse_filter(actor=self.actor, action=self.action, since=self.since, until=self.until)


@dataclass(frozen=True)
class AdapterUpload:
    file: UploadFile
    name: str  # the form's (the page's); the API takes the name from the path
    notes: str


async def read_upload(request: Request) -> AsyncIterator[AdapterUpload]:
    """The upload's form, read only now: the routes declare this after the admin check, and FastAPI
    solves dependencies in order. Declared as File() and Form() parameters, the body (up to
    MAX_ADAPTER_UPLOAD_MB) was read and spooled to disk before anyone looked at who sent it."""
    async with request.form(max_files=1, max_fields=10) as form:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise HTTPException(422, "send the adapter archive (.zip or .tar.gz) as the form's 'file' field")
        name, notes = form.get("name", ""), form.get("notes", "")
        yield AdapterUpload(
            file, name if isinstance(name, str) else "", notes if isinstance(notes, str) else ""
        )


UploadDep = Annotated[AdapterUpload, Depends(read_upload)]
# The upload API's body, written out since no parameter declares it (see read_upload).
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": ".zip or .tar.gz of a PEFT LoRA adapter directory",
                        },
                        "notes": {"type": "string", "default": ""},
                    },
                }
            }
        },
    }
}


async def upload(
    services: Services, db: AsyncSession, actor: User, name: str, notes: str, file: UploadFile
) -> AdapterVersion:
    with services.store.incoming() as scratch:
        archive = scratch / "upload"
        await asyncio.to_thread(_save_upload, file, archive)  # hundreds of MB: not on the event loop
        return await publish_archive(
            db, services.intake, archive=archive, filename=file.filename or "upload", name=name.strip(),
            notes=notes.strip(), actor=actor,
        )  # fmt: skip


def _save_upload(file: UploadFile, target: Path) -> None:
    with target.open("wb") as out:
        shutil.copyfileobj(file.file, out, 1 << 20)


async def act(
    services: Services, db: AsyncSession, actor: User, name: str, version: int, action: str
) -> None:
    if action == "activate":
        await service.activate_version(db, name=name, version=version, actor=actor)
    elif action in ("enable", "disable"):
        await service.set_enabled(db, name=name, version=version, enabled=action == "enable", actor=actor)
    elif action == "delete":
        unused = await service.delete_version(db, name=name, version=version, actor=actor)
        if unused is not None:
            await asyncio.to_thread(services.store.remove, unused)
    else:
        raise HTTPException(404, f"unknown action {action!r}")
    await services.catalog.refresh()


async def choose_default(services: Services, db: AsyncSession, actor: User, name: str | None) -> None:
    await service.set_default(db, name=name or None, actor=actor)
    await services.catalog.refresh()


async def restrict(
    services: Services, db: AsyncSession, actor: User, name: str, groups: list[str]
) -> list[str]:
    stored = await service.set_groups(db, name=name, groups=groups, actor=actor)
    await services.catalog.refresh()
    return stored


def version_json(adapter: Adapter, v: AdapterVersion, resident: frozenset[str]) -> dict[str, Any]:
    return {
        "name": adapter.name,
        "version": v.version,
        "active": adapter.active_version == v.version,
        "default": adapter.is_default and adapter.active_version == v.version,
        # On this server's GPU now (each server process has its own engine); resident adapters are
        # keyed by content, so versions with the same files are loaded together.
        "loaded": content_key(v.sha256) in resident,
        "status": v.status.value,
        "status_reason": v.status_reason,
        "base_model": v.base_model,
        "base_fingerprint": v.base_fingerprint,
        "peft_type": v.peft_type,
        "rank": v.rank,
        "alpha": v.alpha,
        "target_modules": v.target_modules,
        "prompt_template": v.prompt_template,
        "sha256": v.sha256,
        "size_bytes": v.size_bytes,
        "source": v.source,
        "notes": v.notes,
        "metrics": v.metrics,
        "created_by": v.created_by.email if v.created_by else None,
        "created_at": v.created_at.isoformat(),
    }


def adapters_json(adapters: list[Adapter], resident: frozenset[str]) -> list[dict[str, Any]]:
    return [
        {
            "name": a.name,
            "active_version": a.active_version,
            "default": a.is_default,
            "groups": a.allowed_groups,
            "versions": [version_json(a, v, resident) for v in a.versions],
        }
        for a in adapters
    ]


# -- pages -----------------------------------------------------------------------------------------


async def _adapters_page(request: Request, services: Services, db: AsyncSession, session: Any, *,
                         partial: bool, status_code: int = 200) -> HTMLResponse:  # fmt: skip
    template = "partials/adapters.html" if partial else "pages/admin_adapters.html"
    adapters = list(await service.list_adapters(db))
    # Offered when typing an adapter's groups: those people signed in with so far.
    known_groups = sorted({group for user in await auth.list_users(db) for group in user.groups})
    resident = await services.engine.resident_adapters()
    loaded = {(a.name, v.version) for a in adapters for v in a.versions if content_key(v.sha256) in resident}
    return render(
        request, services, template, session=session, adapters=adapters, ready=services.catalog.ready_names(),
        default=services.catalog.default, known_groups=known_groups, loaded=loaded, status_code=status_code,
    )  # fmt: skip


@pages.get("/adapters", response_class=HTMLResponse)
async def adapters_page(
    request: Request, services: ServicesDep, db: DbDep, session: AdminSession
) -> Response:
    return await _adapters_page(request, services, db, session, partial=False)


@pages.post("/adapters", response_class=HTMLResponse)
async def upload_page(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: AdminSession,
    form: UploadDep,
) -> Response:
    name = form.name
    if not name.strip():
        return notice(request, services, "Name the adapter: the name field is empty.", status_code=422)
    try:
        version = await upload(services, db, session.user, name, form.notes, form.file)
    except (AdapterRejected, service.RegistryError) as error:
        return notice(request, services, f"Upload refused: {sentence(error)}", status_code=_status(error))
    response = await _adapters_page(request, services, db, session, partial=True, status_code=201)
    response.headers["HX-Trigger"] = "adapter-published"
    response.headers["X-Adapter-Version"] = f"{name}@{version.version}"
    return response


@pages.post("/adapters/{name}/versions/{version}/{action}", response_class=HTMLResponse)
async def version_action_page(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: AdminSession,
    name: str,
    version: int,
    action: str,
) -> Response:
    try:
        await act(services, db, session.user, name, version, action)
    except service.RegistryError as error:
        return notice(request, services, sentence(error), status_code=error.status)
    return await _adapters_page(request, services, db, session, partial=True)


@pages.post("/adapters/{name}/groups", response_class=HTMLResponse)
async def groups_page(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: AdminSession,
    name: str,
    groups: Annotated[str, Form()] = "",
) -> Response:
    """Open an adapter to the groups typed, comma-separated (empty: to everyone)."""
    try:
        await restrict(services, db, session.user, name, groups.split(","))
    except service.RegistryError as error:
        return notice(request, services, sentence(error), status_code=error.status)
    return await _adapters_page(request, services, db, session, partial=True)


@pages.post("/default-adapter", response_class=HTMLResponse)
async def default_page(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: AdminSession,
    name: Annotated[str, Form()] = "",
) -> Response:
    try:
        await choose_default(services, db, session.user, name)
    except service.RegistryError as error:
        return notice(request, services, sentence(error), status_code=error.status)
    return await _adapters_page(request, services, db, session, partial=True)


AuditQuery = Annotated[AuditQueryParams, Depends()]


@pages.get("/audit", response_class=HTMLResponse)
async def audit_page(
    request: Request, services: ServicesDep, db: DbDep, session: AdminSession, query: AuditQuery
) -> Response:
    """The newest events the filter selects; the export links download all of them."""
    try:
        where = query.parse()
    except audit.AuditFilterError as error:
        return render(
            request, services, "pages/admin_audit.html", session=session, events=[], query=query,
            error=sentence(error), export="", status_code=422,
        )  # fmt: skip
    return render(
        request, services, "pages/admin_audit.html", session=session, events=await audit.recent(db, where),
        query=query, error="", export=urlencode(where.as_params()), limit=audit.PAGE_ROWS,
    )  # fmt: skip


@pages.get("/audit/export")
async def audit_export_page(
    services: ServicesDep, _session: AdminSession, query: AuditQuery, format: ExportFormat = "csv"
) -> Response:
    return _export(services, query, format)


USER_ACTIONS = ("approve", "disable", "enable", "sign-out")


async def _users(
    request: Request, services: Services, db: AsyncSession, session: Any, template: str
) -> Response:
    keys: dict[int, list[ApiKey]] = {}
    for key in await auth.active_api_keys(db):
        keys.setdefault(key.user_id, []).append(key)
    return render(
        request, services, template, session=session, users=await auth.list_users(db), keys=keys,
        defaults=services.limit_defaults,
    )  # fmt: skip


@pages.get("/users", response_class=HTMLResponse)
async def users_page(request: Request, services: ServicesDep, db: DbDep, session: AdminSession) -> Response:
    return await _users(request, services, db, session, "pages/admin_users.html")


@pages.post("/users/{user_id}/limits", response_class=HTMLResponse)
async def user_limits_page(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: AdminSession,
    user_id: int,
    rate_limit_per_minute: Annotated[str, Form()] = "",
    daily_token_quota: Annotated[str, Form()] = "",
) -> Response:
    """Override a user's requests per minute and tokens per day (empty: the setting; 0: unlimited)."""
    user = await db.get(User, user_id)
    if user is None:
        return notice(request, services, "No such user; reload the page.", status_code=404)
    try:
        per_minute = usage.parse_limit(rate_limit_per_minute, "Requests per minute")
        daily = usage.parse_limit(daily_token_quota, "Tokens per day")
    except usage.LimitError as error:
        return notice(request, services, sentence(error), status_code=422)
    await usage.set_user_limits(db, user=user, per_minute=per_minute, daily_tokens=daily, actor=session.user)
    return await _users(request, services, db, session, "partials/users.html")


@pages.post("/users/{user_id}/api-key-limit", response_class=HTMLResponse)
async def key_limit_page(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: AdminSession,
    user_id: int,
    key_id: Annotated[int, Form()],
    rate_limit_per_minute: Annotated[str, Form()] = "",
) -> Response:
    """Give one of the user's API keys its own requests per minute, within theirs (empty: the
    setting; 0: none of its own)."""
    key = await db.get(ApiKey, key_id)
    if key is None or key.user_id != user_id or key.revoked_at is not None:
        return notice(
            request, services, "No such API key (or it was revoked); reload the page.", status_code=404
        )
    try:
        per_minute = usage.parse_limit(rate_limit_per_minute, "The key's requests per minute")
    except usage.LimitError as error:
        return notice(request, services, sentence(error), status_code=422)
    await usage.set_key_limit(db, key=key, per_minute=per_minute, actor=session.user)
    return await _users(request, services, db, session, "partials/users.html")


@pages.get("/usage", response_class=HTMLResponse)
async def usage_page(request: Request, services: ServicesDep, db: DbDep, session: AdminSession) -> Response:
    """Per user: requests and tokens today and over the last 30 days, and when they were last active."""
    report = await usage.usage_report(db, users=await auth.list_users(db), defaults=services.limit_defaults)
    return render(
        request, services, "pages/admin_usage.html", session=session, report=report, days=usage.USAGE_DAYS
    )


@pages.post("/users/{user_id}", response_class=HTMLResponse)
async def user_action_page(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: AdminSession,
    user_id: int,
    action: Annotated[str, Form()],
) -> Response:
    """`approve` a user waiting for approval, `disable` one (ending all their sessions and API keys),
    `enable` one again, or `sign-out` one everywhere (ending their sessions; their keys go on)."""
    user = await db.get(User, user_id)
    if user is None:
        return notice(request, services, "No such user; reload the page.", status_code=404)
    try:
        if action == "approve":
            await auth.approve(db, user=user, actor=session.user)
        elif action in ("disable", "enable"):
            await auth.set_active(db, user=user, active=action == "enable", actor=session.user)
        elif action == "sign-out":
            await auth.end_sessions(db, user=user, actor=session.user)
        else:
            return notice(
                request, services, f"Unknown action {action!r}; use one of {', '.join(USER_ACTIONS)}.",
                status_code=422,
            )  # fmt: skip
    except auth.UserError as error:
        return notice(request, services, sentence(error), status_code=409)
    return await _users(request, services, db, session, "partials/users.html")


def _status(error: Exception) -> int:
    return error.status if isinstance(error, service.RegistryError) else 422


# -- JSON API --------------------------------------------------------------------------------------


class DefaultAdapter(BaseModel):
    name: str | None = None  # None: new conversations use the bare base model


class AdapterGroups(BaseModel):
    groups: list[str]  # empty: everyone may use the adapter


def _api_error(error: AdapterRejected | service.RegistryError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=_status(error))


@api.get("/adapters")
async def list_adapters_api(services: ServicesDep, db: DbDep, _admin: AdminApiUser) -> list[dict[str, Any]]:
    """Every adapter with all its versions, what was checked about them, and whether each is
    loaded on this server's GPU now."""
    return adapters_json(list(await service.list_adapters(db)), await services.engine.resident_adapters())


@api.post(
    "/adapters/{name}/versions",
    status_code=201,
    responses={422: {"description": "the upload was refused"}},
    openapi_extra=UPLOAD_BODY,
)
async def upload_api(
    services: ServicesDep, db: DbDep, admin: AdminApiUser, name: str, form: UploadDep
) -> Any:
    """Upload the next version of adapter `name`; once every check passes it is served at once."""
    try:
        version = await upload(services, db, admin, name, form.notes, form.file)
    except (AdapterRejected, service.RegistryError) as error:
        return _api_error(error)
    adapter = await service.get_adapter(db, name)
    return version_json(adapter, version, await services.engine.resident_adapters())


@api.post("/adapters/{name}/versions/{version}/{action}", responses={404: {}, 409: {}})
async def version_action_api(
    services: ServicesDep, db: DbDep, admin: AdminApiUser, name: str, version: int, action: str
) -> Any:
    """`activate` (also rolls back to an older version), `enable`, `disable` or `delete` a version."""
    try:
        await act(services, db, admin, name, version, action)
    except service.RegistryError as error:
        return _api_error(error)
    return {"ok": True}


@api.put("/default-adapter")
async def default_api(services: ServicesDep, db: DbDep, admin: AdminApiUser, body: DefaultAdapter) -> Any:
    """Choose the adapter new conversations start with (null: the bare base model)."""
    try:
        await choose_default(services, db, admin, body.name)
    except service.RegistryError as error:
        return _api_error(error)
    return {"default": body.name}


@api.put("/adapters/{name}/groups", responses={400: {}, 404: {}})
async def groups_api(
    services: ServicesDep, db: DbDep, admin: AdminApiUser, name: str, body: AdapterGroups
) -> Any:
    """Open adapter `name` to members of `groups` only (empty: everyone). Others, admins aside, no
    longer see it in /v1/models, and requests naming it answer 404."""
    try:
        groups = await restrict(services, db, admin, name, body.groups)
    except service.RegistryError as error:
        return _api_error(error)
    return {"name": name, "groups": groups}


@api.get("/usage")
async def usage_api(services: ServicesDep, db: DbDep, _admin: AdminApiUser) -> list[dict[str, Any]]:
    """Per user: requests and tokens (prompt + completion) today and over the last 30 days (UTC days),
    the limits in effect (0: unlimited) and when they last asked the model for something."""
    report = await usage.usage_report(db, users=await auth.list_users(db), defaults=services.limit_defaults)
    return [
        {
            "email": row.user.email,
            "requests_today": row.requests_today,
            "tokens_today": row.tokens_today,
            f"requests_{usage.USAGE_DAYS}_days": row.requests_period,
            f"tokens_{usage.USAGE_DAYS}_days": row.tokens_period,
            "rate_limit_per_minute": row.limits.per_minute,
            "daily_token_quota": row.limits.daily_tokens,
            "last_active": row.last_active.isoformat() if row.last_active else None,
        }
        for row in report
    ]


@api.get("/audit", responses={422: {"description": "a filter is not understood"}})
async def audit_api(
    db: DbDep, _admin: AdminApiUser, query: AuditQuery, limit: Annotated[int, Query(ge=1, le=1000)] = 200
) -> Any:
    """The newest `limit` audit events the filters select, newest first: sign-ins (failed ones too),
    sign-outs, user and API-key administration, and every adapter registry change. All of them:
    /api/admin/audit/export."""
    try:
        where = query.parse()
    except audit.AuditFilterError as error:
        return JSONResponse({"detail": str(error)}, 422)
    return [audit.as_dict(e) for e in await audit.recent(db, where, limit=limit)]


@api.get(
    "/audit/export",
    responses={
        200: {"content": {"text/csv": {}, "application/json": {}}, "description": "every event selected"},
        422: {"description": "a filter is not understood"},
    },
)
async def audit_export_api(
    services: ServicesDep, _admin: AdminApiUser, query: AuditQuery, format: ExportFormat = "csv"
) -> Response:
    """Every audit event the filters select, newest first, as a CSV or JSON download (streamed)."""
    return _export(services, query, format)


def _export(services: Services, query: AuditQueryParams, format: str) -> Response:
    try:
        where = query.parse()
    except audit.AuditFilterError as error:
        return JSONResponse({"detail": str(error)}, 422)
    rows = audit.every_event(services.sessionmaker, where)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    body, media = (
        (audit.csv_export(rows), "text/csv")
        if format == "csv"
        else (audit.json_export(rows), "application/json")
    )
    return StreamingResponse(
        body,
        media_type=f"{media}; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.{format}"'},
    )
