"""Refuse form posts whose text is not UTF-8 or holds NUL characters, before any route reads them.

Starlette decodes a form field that is not UTF-8 without complaint: as Latin-1 in a multipart form,
with U+FFFD in a URL-encoded one. The text the user sent would be stored as something else
without a word. And a NUL (U+0000) in a field is stored by SQLite but makes PostgreSQL refuse the
whole statement, so the same post would be a 500 on one database and fine on the other. Both are
refused here with a 400 that says which field and why.

The middleware reads along as the app reads the body (nothing is buffered twice), feeding each
chunk to python-multipart's parsers; file parts are not looked at. Forms larger than the
browser-form limit are refused before this matters (UploadLimit in app.main).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from python_multipart.multipart import (
    MultipartParser,
    QuerystringParser,
    parse_options_header,
)
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# A field longer than this is refused by Starlette itself (1 MB per part); stop collecting it.
_FIELD_LIMIT = 1 << 20


class BadFormText(Exception):
    """A form field that is not UTF-8 text or holds a NUL; the message says which and why."""


def check_field(name: bytes, value: bytes) -> None:
    label = name.decode("utf-8", "replace") or "(unnamed)"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadFormText(
            f"the form field {label!r} is not UTF-8 ({error.reason} at byte {error.start}); send UTF-8 text"
        ) from None
    if "\x00" in text:
        raise BadFormText(f"the form field {label!r} holds a NUL character (U+0000), which cannot be stored")


class _Fields:
    """Collects one field at a time from a parser's callbacks and checks it when it ends."""

    def __init__(self) -> None:
        self.name = b""
        self.value = bytearray()
        self.is_file = False
        self.problem: BadFormText | None = None

    def start(self) -> None:
        self.name, self.is_file = b"", False
        self.value.clear()

    def add_value(self, data: bytes, start: int, end: int) -> None:
        if not self.is_file and len(self.value) <= _FIELD_LIMIT:
            self.value += data[start:end]

    def end(self, value: bytes | None = None) -> None:
        if self.is_file or self.problem is not None or len(self.value) > _FIELD_LIMIT:
            return
        try:
            check_field(self.name, bytes(self.value) if value is None else value)
        except BadFormText as problem:
            self.problem = problem


def _urlencoded(fields: _Fields) -> Callable[[bytes, bool], None]:
    name = bytearray()

    def on_field_start() -> None:
        fields.start()
        name.clear()

    def on_field_name(data: bytes, start: int, end: int) -> None:
        name.extend(data[start:end])

    def on_field_end() -> None:
        fields.name = unquote_to_bytes(bytes(name).replace(b"+", b" "))
        fields.end(unquote_to_bytes(bytes(fields.value).replace(b"+", b" ")))

    parser = QuerystringParser(
        {
            "on_field_start": on_field_start,
            "on_field_name": on_field_name,
            "on_field_data": fields.add_value,
            "on_field_end": on_field_end,
        }
    )
    return _feeder(parser)


def _multipart(fields: _Fields, boundary: bytes) -> Callable[[bytes, bool], None]:
    header_field, header_value = bytearray(), bytearray()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        if bytes(header_field).lower() == b"content-disposition":
            _, options = parse_options_header(bytes(header_value))
            fields.name = options.get(b"name", b"")
            fields.is_file = b"filename" in options
        header_field.clear()
        header_value.clear()

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": fields.start,
            "on_part_data": fields.add_value,
            "on_part_end": fields.end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
        },
    )
    return _feeder(parser)


def _feeder(parser: QuerystringParser | MultipartParser) -> Callable[[bytes, bool], None]:
    def feed(chunk: bytes, final: bool) -> None:
        parser.write(chunk)
        if final:
            parser.finalize()

    return feed


class FormText:
    """ASGI middleware: a form post with a field that is not UTF-8 text, or holds a NUL, gets a 400."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH", "DELETE"):
            await self.app(scope, receive, send)
            return
        content_type, options = parse_options_header(dict(scope["headers"]).get(b"content-type", b""))
        fields = _Fields()
        if content_type == b"application/x-www-form-urlencoded":
            feed = _urlencoded(fields)
        elif content_type == b"multipart/form-data" and options.get(b"boundary"):
            feed = _multipart(fields, options[b"boundary"])
        else:
            await self.app(scope, receive, send)
            return
        parsing = True
        started = False

        async def checked() -> Message:
            nonlocal parsing
            message = await receive()
            if parsing and message["type"] == "http.request":
                try:
                    feed(message.get("body", b""), not message.get("more_body", False))
                except Exception:  # malformed: Starlette's own parser says so, in its words
                    parsing = False
                if fields.problem is not None:
                    raise fields.problem
            return message

        async def tracking(message: Message) -> None:
            nonlocal started
            if not started and fields.problem is not None:
                # FastAPI answers an error raised while it reads a body with a 400 of its own.
                raise fields.problem
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, checked, tracking)
        except BadFormText as problem:
            if not started:
                await JSONResponse({"detail": str(problem)}, 400)(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
