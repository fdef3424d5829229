"""Console logs, as text for people or as JSON for a log collector (LOG_FORMAT), and the request id
that ties together every line one HTTP request causes.

`RequestId` (ASGI middleware) takes the caller's `X-Request-ID` (a proxy's or a client's; one of up
to 128 letters, digits and `-_.:`) or makes one, answers with it in `X-Request-ID`, and keeps it in a
context variable for the request's duration: log lines carry it, and the generation request built for
the reply carries it to the engine (app/chat/replies.py), whose job task inherits it.

    LOG_FORMAT=json python -m app serve
    {"time": "2026-11-28T11:04:05.123Z", "level": "INFO", "logger": "uvicorn.access",
     "message": "10.0.0.7:53122 - \\"POST /v1/chat/completions HTTP/1.1\\" 200", "request_id": "9f1c..."}
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import LogFormat

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def current_request_id() -> str | None:
    """The id of the HTTP request this code runs for, if any."""
    return _request_id.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestId:
    """Every HTTP request gets an id: the caller's X-Request-ID when it is a sane one, else a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()), b"")
        text = given.decode("latin-1")
        request_id = text if _VALID_REQUEST_ID.fullmatch(text) else new_request_id()
        token = _request_id.set(request_id)

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, with_id)
        finally:
            _request_id.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id, and the
    exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: LogFormat, level: int = logging.INFO) -> None:
    """Send every logger's lines (uvicorn's included) to stderr in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format is LogFormat.JSON else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if log_format is LogFormat.JSON:
        # Progress bars (loading weights) would be lines of another shape: off, before transformers
        # and huggingface_hub are imported and read these.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    # uvicorn's loggers reach the root handler instead of their own (uvicorn.run(log_config=None)).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
