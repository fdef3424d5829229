"""Administration: adapters (pages for admins in the browser, and the same actions as a JSON API),
the audit log, and users (approve, disable, enable).

Both call the same registry and auth functions; the JSON API (under /api/admin, bearer API key of
an admin) is documented in the OpenAPI schema at /docs.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import service as auth
from app.deps import AdminApiUser, AdminSession, DbDep, ServicesDep
from app.models import Adapter, AdapterVersion, User
from app.registry import service
from app.registry.archive import AdapterRejected
from app.registry.intake import publish_archive
from app.routes.html import notice, render, sentence
from app.services import Services

pages = APIRouter(prefix="/admin", tags=["admin pages"], include_in_schema=False)
api = APIRouter(prefix="/api/admin", tags=["admin API"])


# -- the actions, shared by pages and API ---------------------------------------------------------


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


def version_json(adapter: Adapter, v: AdapterVersion) -> dict[str, Any]:
    return {
        "name": adapter.name,
        "version": v.version,
        "active": adapter.active_version == v.version,
        "default": adapter.is_default and adapter.active_version == v.version,
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


def adapters_json(adapters: list[Adapter]) -> list[dict[str, Any]]:
    return [
        {
            "name": a.name,
            "active_version": a.active_version,
            "default": a.is_default,
            "versions": [version_json(a, v) for v in a.versions],
        }
        for a in adapters
    ]


# -- pages -----------------------------------------------------------------------------------------


async def _adapters_page(request: Request, services: Services, db: AsyncSession, session: Any, *,
                         partial: bool, status_code: int = 200) -> HTMLResponse:  # fmt: skip
    template = "partials/adapters.html" if partial else "pages/admin_adapters.html"
    adapters = list(await service.list_adapters(db))
    return render(
        request, services, template, session=session, adapters=adapters, ready=services.catalog.ready_names(),
        default=services.catalog.default, status_code=status_code,
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
    name: Annotated[str, Form()],
    file: Annotated[UploadFile, File()],
    notes: Annotated[str, Form()] = "",
) -> Response:
    try:
        version = await upload(services, db, session.user, name, notes, file)
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


@pages.get("/audit", response_class=HTMLResponse)
async def audit_page(request: Request, services: ServicesDep, db: DbDep, session: AdminSession) -> Response:
    return render(
        request, services, "pages/admin_audit.html", session=session, events=await service.audit_log(db)
    )


USER_ACTIONS = ("approve", "disable", "enable")


@pages.get("/users", response_class=HTMLResponse)
async def users_page(request: Request, services: ServicesDep, db: DbDep, session: AdminSession) -> Response:
    return render(
        request, services, "pages/admin_users.html", session=session, users=await auth.list_users(db)
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
    """`approve` a user waiting for approval, `disable` one (ending all their sessions and API keys)
    or `enable` one again."""
    user = await db.get(User, user_id)
    if user is None:
        return notice(request, services, "No such user; reload the page.", status_code=404)
    try:
        if action == "approve":
            await auth.approve(db, user=user, actor=session.user)
        elif action in ("disable", "enable"):
            await auth.set_active(db, user=user, active=action == "enable", actor=session.user)
        else:
            return notice(
                request, services, f"Unknown action {action!r}; use one of {', '.join(USER_ACTIONS)}.",
                status_code=422,
            )  # fmt: skip
    except auth.UserError as error:
        return notice(request, services, sentence(error), status_code=409)
    return render(request, services, "partials/users.html", session=session, users=await auth.list_users(db))


def _status(error: Exception) -> int:
    return error.status if isinstance(error, service.RegistryError) else 422


# -- JSON API --------------------------------------------------------------------------------------


class DefaultAdapter(BaseModel):
    name: str | None = None  # None: new conversations use the bare base model


def _api_error(error: AdapterRejected | service.RegistryError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=_status(error))


@api.get("/adapters")
async def list_adapters_api(db: DbDep, _admin: AdminApiUser) -> list[dict[str, Any]]:
    """Every adapter with all its versions and what was checked about them."""
    return adapters_json(list(await service.list_adapters(db)))


@api.post(
    "/adapters/{name}/versions", status_code=201, responses={422: {"description": "the upload was refused"}}
)
async def upload_api(
    services: ServicesDep,
    db: DbDep,
    admin: AdminApiUser,
    name: str,
    file: Annotated[UploadFile, File(description=".zip or .tar.gz of a PEFT LoRA adapter directory")],
    notes: Annotated[str, Form()] = "",
) -> Any:
    """Upload the next version of adapter `name`; once every check passes it is served at once."""
    try:
        version = await upload(services, db, admin, name, notes, file)
    except (AdapterRejected, service.RegistryError) as error:
        return _api_error(error)
    adapter = await service.get_adapter(db, name)
    return version_json(adapter, version)


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


@api.get("/audit")
async def audit_api(db: DbDep, _admin: AdminApiUser) -> list[dict[str, Any]]:
    """Who uploaded, activated, rolled back, disabled or deleted what, newest first."""
    return [
        {
            "at": e.at.isoformat(),
            "actor": e.actor_email,
            "action": e.action,
            "target": e.target,
            "details": e.details,
        }
        for e in await service.audit_log(db)
    ]
