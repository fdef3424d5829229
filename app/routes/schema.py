"""The OpenAPI schema, for signed-in people and API clients only.

It lists every API operation and its parameters: not secret, but no business of a stranger's, so
it answers a session cookie or an API key (as `Authorization: Bearer`), like the API itself.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.deps import DbDep, OptionalSession, ServicesDep, require_api_key

router = APIRouter(include_in_schema=False)


@router.get("/openapi.json")
async def openapi_schema(
    request: Request, db: DbDep, services: ServicesDep, session: OptionalSession
) -> JSONResponse:
    if session is None:
        await require_api_key(request, db, services)  # 401 with WWW-Authenticate: Bearer without one
    return JSONResponse(request.app.openapi())
