"""The OpenAI-compatible API: /v1/chat/completions (streamed or not) and /v1/models.

Clients built for OpenAI (the official `openai` package, LangChain, ...) work by pointing their
base URL at /v1 and using an API key from `python -m app create-api-key`. The request is bound
to its connection: a client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from app.chat.replies import prompt_request
from app.deps import ApiUser, CurrentApiKey, ServicesDep
from app.llm.engine import EngineOverloaded, GenerationResult, GenerationStream, SamplingParams
from app.llm.prompts import ChatTurn, PromptTooLong
from app.openai_protocol import (
    ChatCompletionRequest,
    ErrorResponse,
    completion_id,
    error_body,
    now,
    usage,
)
from app.registry.catalog import UnknownModel
from app.routes.html import sentence
from app.services import Services
from app.usage import LimitReached, admit, record_tokens

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])

DISCONNECT_POLL_S = 0.5
# Far more than any conversation a served context can hold (128k tokens of text is well under 1 MiB):
# a bigger body is refused while it streams in (app.main.UploadLimit), before it is parsed and tokenized.
MAX_REQUEST_BYTES = 2**20


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param, self.headers = status, type_, code, param, headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(str(self), self.type, self.code, self.param), self.status, self.headers
        )


def overloaded(error: EngineOverloaded) -> ApiError:
    return ApiError(
        429,
        str(error),
        "server_overloaded",
        "server_overloaded",
        headers={"Retry-After": str(error.retry_after_s)},
    )


def generation_failed(result: GenerationResult) -> ApiError:
    """A failed generation as an API error: 503 when its adapter could not be loaded (the server's
    trouble, maybe passing: other adapters work meanwhile), else 500."""
    if result.adapter_unavailable:
        return ApiError(
            503, str(result.error), "server_error", "adapter_unavailable", headers={"Retry-After": "30"}
        )
    return ApiError(500, f"generation failed: {result.error}", "server_error", "generation_failed")


@router.get("/models")
async def list_models(services: ServicesDep, user: ApiUser) -> dict[str, Any]:
    """The base model and every adapter that is ready and open to the key's user, each adapter
    with `parent` = the base."""
    created, base = now(), services.settings.model_name
    models = [{"id": base, "object": "model", "created": created, "owned_by": "private-gpt", "parent": None}]
    models += [
        {"id": name, "object": "model", "created": created, "owned_by": "private-gpt", "parent": base}
        for name in services.catalog.ready_names(user)
    ]
    return {"object": "list", "data": models}


@router.post(
    "/chat/completions",
    response_model=None,
    responses={
        200: {
            "description": "A chat.completion, or chat.completion.chunk events when `stream` is true",
            "content": {"application/json": {}, "text/event-stream": {}},
        },
        **{
            status: {"model": ErrorResponse, "description": what}
            for status, what in (
                (400, "A malformed request, or one the model cannot take"),
                (404, "No model of that name is served"),
                (413, "The request body is too large"),
                (
                    429,
                    "A rate limit or the daily token quota is reached, or the server is at capacity; "
                    "retry after Retry-After seconds",
                ),
                (
                    503,
                    "The database is unavailable, or every connection to it is busy; "
                    "retry after Retry-After seconds",
                ),
            )
        },
    },
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, services: ServicesDep, user: ApiUser, key: CurrentApiKey
) -> Response:
    settings = services.settings
    try:
        # An adapter the user may not use answers exactly as one that does not exist.
        adapter = services.catalog.resolve(body.model, user)
    except UnknownModel as error:
        raise ApiError(404, sentence(error), "invalid_request_error", "model_not_found", "model") from None
    try:
        turns = [ChatTurn("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
    except ValueError as error:
        raise ApiError(400, str(error), "invalid_request_error", "invalid_content", "messages") from None
    if turns[-1].role != "user":
        raise ApiError(
            400, "the last message must come from the user", "invalid_request_error", None, "messages"
        )
    if settings.system_prompt and not any(turn.role == "system" for turn in turns):
        # As the chat does: the demo adapter (and any trained on the sample data) learnt with it.
        turns.insert(0, ChatTurn("system", settings.system_prompt))
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens
    if max_tokens > settings.max_new_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}; this server allows at most {settings.max_new_tokens_limit}",
            "invalid_request_error",
            "max_tokens_exceeded",
            "max_tokens",
        )
    sampling = SamplingParams(
        max_tokens=max_tokens,
        # The engine decodes greedily at 0 and below app.llm.engine.GREEDY_BELOW.
        temperature=settings.default_temperature if body.temperature is None else body.temperature,
        top_p=settings.default_top_p if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stop_sequences(),
    )
    try:
        # Rendering and tokenizing a long conversation takes milliseconds: off the event loop.
        prompt = await asyncio.to_thread(
            prompt_request, services.engine, turns, sampling, adapter, services.catalog
        )
    except (PromptTooLong, ValueError) as error:
        raise ApiError(
            400, str(error), "invalid_request_error", "context_length_exceeded", "messages"
        ) from None
    try:
        services.engine.check_room()  # a full queue refuses before the request counts against limits
        await admit(services.sessionmaker, user=user, api_key=key, defaults=services.limit_defaults)
    except EngineOverloaded as error:
        raise overloaded(error) from None
    except LimitReached as error:
        # OpenAI's own types: `requests` for a rate limit, `insufficient_quota` for a spent quota.
        kind, code = (
            ("requests", "rate_limit_exceeded")
            if error.kind == "requests"
            else ("insufficient_quota", "daily_token_quota_exceeded")
        )
        raise ApiError(
            429, sentence(error), kind, code, headers={"Retry-After": str(error.retry_after_s)}
        ) from None
    try:
        stream = services.engine.submit(prompt)
    except EngineOverloaded as error:
        raise overloaded(error) from None
    except (PromptTooLong, ValueError) as error:
        raise ApiError(
            400, str(error), "invalid_request_error", "context_length_exceeded", "messages"
        ) from None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def count(written: int) -> None:
            await _count_tokens(services, user.id, stream, written)

        return EventSourceResponse(_chunks(stream, body.model, include_usage, count), ping=15)
    try:
        text, result = await _collect_while_connected(stream, request)
    finally:
        stream.cancel()  # no-op when finished; stops the model if this request was cancelled
        await _count_tokens(services, user.id, stream)
    if result.finish_reason == "error":
        raise generation_failed(result)
    return JSONResponse(
        {
            "id": completion_id(),
            "object": "chat.completion",
            "created": now(),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(result.prompt_tokens, result.completion_tokens),
        }
    )


async def _count_tokens(services: Services, user_id: int, stream: GenerationStream, written: int = 0) -> None:
    """Add the request's tokens to its user's day, however it ended: a client that hung up
    mid-reply still used the prompt and the `written` tokens it was sent."""
    result = stream.result
    prompt = result.prompt_tokens if result else len(stream.request.prompt_ids)
    completion = result.completion_tokens if result else written
    try:
        await asyncio.shield(
            record_tokens(
                services.sessionmaker, user_id=user_id, prompt_tokens=prompt, completion_tokens=completion
            )
        )
    except Exception:
        log.exception("could not count the tokens of a chat completion")


async def _collect_while_connected(
    stream: GenerationStream, request: Request
) -> tuple[str, GenerationResult]:
    """Collect the whole reply, cancelling it if the client hangs up before it is done."""
    collector = asyncio.ensure_future(stream.collect())
    while not collector.done():
        await asyncio.wait({collector}, timeout=DISCONNECT_POLL_S)
        if not collector.done() and await request.is_disconnected():
            stream.cancel()
    return collector.result()


async def _chunks(
    stream: GenerationStream, model: str, include_usage: bool, count: Callable[[int], Awaitable[None]]
) -> AsyncIterator[str]:
    """chat.completion.chunk events as OpenAI sends them, ending with `data: [DONE]`; `count` gets
    the tokens written when the stream ends."""
    chunk_id, created = completion_id(), now()
    written = 0

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        return json.dumps(
            {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
        )

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for delta in stream:
            written = delta.completion_tokens
            yield chunk({"content": delta.text})
        result = stream.result
        assert result is not None
        if result.finish_reason == "error":
            failed = generation_failed(result)
            yield json.dumps(error_body(str(failed), failed.type, failed.code))
        else:
            yield chunk({}, result.finish_reason)
            if include_usage:
                yield json.dumps(
                    {
                        "id": chunk_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage(result.prompt_tokens, result.completion_tokens),
                    }
                )
        yield "[DONE]"
    finally:
        # The client went away (or we are done): free the model for others.
        stream.cancel()
        await count(written)
