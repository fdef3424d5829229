"""The FastAPI application: `create_app()` wires settings, services, routes and error pages.

Run it with `python -m app serve` (or `make run`); the services (database, model, engine) are
built in the lifespan, not at import, so tests can build the app with their own settings.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import exc as sql_errors
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app.auth.proxy import DIRECT_PEER
from app.chat.conversations import MAX_MESSAGE_CHARS
from app.config import Settings, get_settings
from app.deps import ApiAuthError, ApprovalPending, LoginRequired
from app.form_text import FormText
from app.logs import RequestId
from app.observability import RecordHttpMetrics, ServerMetrics
from app.openai_protocol import error_body
from app.registry.store import StoreFull
from app.routes import account, admin, auth, chat, health, metrics, openai_api, schema
from app.routes.html import is_htmx, notice, render, sentence
from app.services import build_services

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# A chat message of MAX_MESSAGE_CHARS four-byte characters, percent-encoded, is 12 bytes a character:
# 384 kB, well within.
BROWSER_FORM_BYTES = 2**20
# What a request that found the database unreachable (or every pooled connection busy) tells the
# client to wait before trying again.
DATABASE_RETRY_AFTER_S = 5

# No inline script or style anywhere: the vendored htmx runs with eval and inline styles off.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]
# Sent when COOKIE_SECURE says the site is reached over HTTPS, or the request came over HTTPS: the
# browser then refuses plain HTTP to this host for a year.
HSTS = (b"strict-transport-security", b"max-age=31536000")


def _upload_refusal(limit: str) -> dict[str, Any]:
    return {"detail": f"the upload is larger than this server accepts ({limit})"}


class UploadLimit:
    """Refuses POST bodies over `max_bytes` on the routes under `prefixes` while they stream in (413).

    Starlette spools uploaded files to disk without a size limit; this stops an oversized upload
    before it fills the disk, not after. `refusal` builds the answer's JSON from the limit.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        prefixes: tuple[str, ...],
        refusal: Callable[[str], dict[str, Any]] = _upload_refusal,
        skip: tuple[str, ...] = (),
        skip_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.prefixes = prefixes
        self.refusal = refusal
        # Prefixes, and exact paths, under `prefixes` that another limit looks after.
        self.skip, self.skip_paths = skip, skip_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not scope["path"].startswith(self.prefixes)
            or scope["path"].startswith(self.skip)
            or scope["path"] in self.skip_paths
        ):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        async def tracking(message: Message) -> None:
            nonlocal started
            if not started and seen > self.max_bytes:
                # FastAPI answers any error raised while it reads a body with a 400 of its own.
                raise _TooLarge()
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracking)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(self.refusal(f"{self.max_bytes / 2**20:.0f} MB"), 413)
        await response({"type": "http"}, _no_receive, send)


class _TooLarge(Exception):
    pass


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def security_headers(scope: Scope, *, https: bool) -> list[tuple[bytes, bytes]]:
    """The headers every response carries (HSTS only over HTTPS: `https` is COOKIE_SECURE)."""
    if https or scope.get("scheme") == "https":
        return [*SECURITY_HEADERS, HSTS]
    return SECURITY_HEADERS


class SecurityHeaders:
    """Adds the security headers to every response (pure ASGI, so streams are not buffered).

    Starlette answers an unhandled exception outside every middleware (ServerErrorMiddleware), so
    the 500 handler in `_add_error_handlers` adds them itself."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self.app = app
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = security_headers(scope, https=self.https)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class DirectPeer:
    """Records the connection's own peer address, then applies X-Forwarded-For/-Proto from the
    peers in FORWARDED_ALLOW_IPS (uvicorn's ProxyHeadersMiddleware, run here instead of in uvicorn).

    The trusted-proxy sign-in must judge the address that actually connected: once uvicorn has
    replaced it with a forwarded one, a local proxy's users would look like strangers, and a
    forwarded address would decide who is trusted.
    """

    def __init__(self, app: ASGIApp, *, forwarded_allow_ips: str) -> None:
        # uvicorn types ASGI with its own (stricter, equivalent) aliases.
        proxied = ProxyHeadersMiddleware(cast(Any, app), trusted_hosts=forwarded_allow_ips)
        self.app = cast(ASGIApp, proxied)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope[DIRECT_PEER] = scope.get("client")
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # One registry per app, shared by the HTTP middleware (installed now) and the engine (built in
    # the lifespan).
    server_metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        assert settings is not None
        app.state.services = await build_services(settings, metrics=server_metrics)
        try:
            yield
        finally:
            await app.state.services.close()

    # The schema is for signed-in users (app.routes.schema); Swagger UI and ReDoc load scripts from a
    # CDN and run inline ones, which the Content-Security-Policy (and an offline install) refuses.
    app = FastAPI(
        title="Private GPT",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    # Innermost: it reads along as the routes read the body, once the limits below let it in.
    app.add_middleware(FormText)
    # Browser forms carry a message, a title, a name: without a limit of their own a form's
    # fields (1 MB each, 1000 of them) were read into memory before the session was looked at.
    app.add_middleware(
        UploadLimit,
        max_bytes=BROWSER_FORM_BYTES,
        prefixes=("/",),
        skip=("/v1/", "/api/"),
        skip_paths=frozenset({"/admin/adapters"}),  # the archive upload; its other forms are small
        refusal=_form_refusal,
    )
    app.add_middleware(
        UploadLimit,
        max_bytes=settings.max_adapter_upload_mb * 2**20 + 2**20,  # the archive plus the form's other fields
        prefixes=("/admin/adapters", "/api/admin/adapters"),
    )
    app.add_middleware(
        UploadLimit, max_bytes=openai_api.MAX_REQUEST_BYTES, prefixes=("/v1/",), refusal=_api_body_refusal
    )
    app.add_middleware(SecurityHeaders, https=settings.cookie_secure)
    # Outside the others, so it sees every answer, the other middleware's refusals included.
    app.add_middleware(RecordHttpMetrics, metrics=server_metrics.http)
    # Every line logged for a request, and its reply's generation request, carry its id (app.logs).
    app.add_middleware(RequestId)
    # Outermost: the first to see the connection's address (serve() turns uvicorn's own off).
    app.add_middleware(DirectPeer, forwarded_allow_ips=settings.forwarded_allow_ips)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    routers = (
        health.router,
        metrics.router,
        auth.router,
        chat.router,
        account.router,
        schema.router,
        openai_api.router,
        admin.pages,
        admin.api,
    )
    for router in routers:
        app.include_router(router)
    _add_error_handlers(app)
    return app


def _form_refusal(limit: str) -> dict[str, Any]:
    return {
        "detail": f"the form is larger than this server accepts ({limit}); "
        f"shorten the text (a chat message can be at most {MAX_MESSAGE_CHARS} characters)"
    }


def _api_body_refusal(limit: str) -> dict[str, Any]:
    message = f"the request body is larger than this server accepts ({limit}); shorten the messages"
    return error_body(message, "invalid_request_error", "request_too_large")


def _problem(item: dict[str, Any]) -> str:
    """One validation error as a sentence naming the field (or the body as a whole)."""
    where = ".".join(str(p) for p in item["loc"] if p != "body")
    if item["type"] == "json_invalid":  # the location is the character where parsing stopped
        reason = item.get("ctx", {}).get("error", item["msg"])
        return f"the request body is not valid JSON ({reason} at character {where})"
    return f"{where or 'the request body'}: {item['msg']}"


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _: LoginRequired) -> Response:
        target = f"/login?next={quote(request.url.path)}"
        if is_htmx(request):
            return Response(status_code=401, headers={"HX-Redirect": target})
        if request.method == "GET" and "text/event-stream" not in request.headers.get("accept", ""):
            return Response(status_code=303, headers={"Location": target})
        return JSONResponse({"detail": "sign in first"}, status_code=401)

    @app.exception_handler(ApprovalPending)
    async def approval_pending(request: Request, error: ApprovalPending) -> Response:
        if is_htmx(request):
            return Response(status_code=403, headers={"HX-Redirect": "/"})
        if request.method == "GET" and "text/event-stream" not in request.headers.get("accept", ""):
            services = request.app.state.services
            return render(request, services, "pages/pending.html", session=error.session, status_code=403)
        return JSONResponse({"detail": str(error)}, status_code=403)

    @app.exception_handler(ApiAuthError)
    async def api_auth(_: Request, error: ApiAuthError) -> Response:
        return JSONResponse(
            error_body(str(error), "authentication_error", "invalid_api_key"),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(openai_api.ApiError)
    async def api_error(_: Request, error: openai_api.ApiError) -> Response:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> Response:
        problems = "; ".join(_problem(item) for item in error.errors())
        if _is_api(request):
            return JSONResponse(error_body(problems, "invalid_request_error"), status_code=400)
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if isinstance(error.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
            cause = error.__cause__
            error.detail = (
                f"the request body is not UTF-8 ({cause.reason} at byte {cause.start}); send UTF-8 JSON"
            )
        if _is_api(request):
            code = "not_found" if error.status_code == 404 else None
            return JSONResponse(
                error_body(str(error.detail), "invalid_request_error", code), error.status_code
            )
        if is_htmx(request) or "text/html" not in request.headers.get("accept", ""):
            return JSONResponse({"detail": error.detail}, error.status_code, headers=error.headers)
        services = getattr(request.app.state, "services", None)
        if services is None:
            return HTMLResponse(str(error.detail), error.status_code)
        return services.templates.TemplateResponse(
            request,
            "pages/error.html",
            {"status": error.status_code, "detail": error.detail},
            status_code=error.status_code,
        )

    # The database down, or every pooled connection held for longer than the pool's timeout: a 503
    # that says so, with Retry-After, rather than a bare 500. pool_pre_ping (app.db) reconnects
    # once it answers again, so the same process recovers without a restart.
    @app.exception_handler(sql_errors.OperationalError)
    @app.exception_handler(sql_errors.InterfaceError)
    @app.exception_handler(sql_errors.TimeoutError)
    async def database_unavailable(request: Request, error: Exception) -> Response:
        log.error("the database is unavailable on %s %s: %s", request.method, request.url.path, error)
        busy = isinstance(error, sql_errors.TimeoutError)
        message = (
            "the server is busy: every database connection is in use"
            if busy
            else f"the database is unavailable ({type(getattr(error, 'orig', None) or error).__name__})"
        ) + f"; try again in {DATABASE_RETRY_AFTER_S} s"
        headers = {"Retry-After": str(DATABASE_RETRY_AFTER_S)}
        if _is_api(request):
            code = "server_overloaded" if busy else "database_unavailable"
            return JSONResponse(error_body(message, "server_error", code), 503, headers)
        services = getattr(request.app.state, "services", None)
        if is_htmx(request) and services is not None:
            return notice(request, services, sentence(message), status_code=503, headers=headers)
        if services is not None and "text/html" in request.headers.get("accept", ""):
            return services.templates.TemplateResponse(
                request, "pages/error.html", {"status": 503, "detail": message}, 503, headers
            )
        return JSONResponse({"detail": message}, 503, headers)

    @app.exception_handler(StoreFull)
    async def store_full(request: Request, error: StoreFull) -> Response:
        log.error("adapter upload refused: %s", error)
        services = getattr(request.app.state, "services", None)
        if is_htmx(request) and services is not None:
            return notice(request, services, f"Upload refused: {sentence(error)}", status_code=507)
        return JSONResponse({"detail": str(error)}, 507)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        if _is_api(request):
            response: Response = JSONResponse(error_body("internal server error", "server_error"), 500)
        else:
            response = HTMLResponse("Internal server error; the details are in the server log.", 500)
        # Sent from outside the middleware (see SecurityHeaders), so without its headers otherwise.
        services = getattr(request.app.state, "services", None)
        secure = bool(services and services.settings.cookie_secure)
        response.raw_headers.extend(security_headers(request.scope, https=secure))
        return response
