"""The chat pages: conversations in the sidebar, messages in the transcript, replies streamed over SSE.

Sending is a POST that stores the message and starts a server-side job; the page then tails the
job over SSE (GET, so EventSource can reconnect on its own with Last-Event-ID). Stop is a POST of
its own. Closing the tab does not stop the reply: it is finished and stored either way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.chat import conversations as chats
from app.chat.render import render_stream_text
from app.chat.replies import StartedReply, start_reply
from app.deps import CurrentSession, DbDep, ServicesDep
from app.llm.engine import EngineOverloaded
from app.llm.prompts import PromptTooLong
from app.models import AuthSession, Conversation, Message, MessageStatus, User
from app.registry.catalog import UnknownModel
from app.routes.html import is_htmx, notice, redirect, render, sentence
from app.services import Services
from app.usage import LimitReached, admit

router = APIRouter(tags=["chat"])


async def owned_conversation(db: DbDep, session: CurrentSession, conversation_id: str) -> Conversation:
    """The conversation in the path, if it is the signed-in user's; 404 otherwise (even if it exists)."""
    conversation = await chats.get_conversation(db, session.user, conversation_id)
    if conversation is None:
        raise HTTPException(404, "no such conversation")
    return conversation


OwnedConversation = Annotated[Conversation, Depends(owned_conversation)]


async def owned_message(db: DbDep, conversation: OwnedConversation, message_id: str) -> Message:
    message = await chats.get_message(db, conversation, message_id)
    if message is None:
        raise HTTPException(404, "no such message")
    return message


OwnedMessage = Annotated[Message, Depends(owned_message)]


def stream_state(services: Services, messages: list[Message]) -> dict[str, tuple[str, int]]:
    """For replies still being written: the text so far and the last event id it includes.

    A job that finished since `messages` were read is included too: its stream then ends at once
    and the page fetches the final render, instead of showing the stored text from mid-reply.
    """
    state = {}
    for message in messages:
        job = services.jobs.get(message.id) if message.status is MessageStatus.STREAMING else None
        if job is not None:
            state[str(message.id)] = job.snapshot()
    return state


async def _start(
    request: Request,
    services: Services,
    db: DbDep,
    session: AuthSession,
    conversation: Conversation | None,
    text: str | None,
    *,
    adapter: str | None = None,
) -> StartedReply | Response:
    """Start a reply in `conversation`, or (None) in a new one on `adapter`; a refusal is a notice."""
    try:
        services.engine.check_room()  # a full queue refuses before the request counts against limits
        admitted = conversation is None
        if conversation is None:
            # Counted before the conversation is created, so a refusal leaves nothing behind.
            chats.clean_message(text or "")  # an empty message is refused before it counts
            await db.commit()  # one pooled connection at a time (see start_reply)
            await admit(services.sessionmaker, user=session.user, defaults=services.limit_defaults)
            conversation = await chats.create_conversation(db, user=session.user, adapter_name=adapter)
        return await start_reply(
            db,
            conversation=conversation,
            user=session.user,
            user_text=text,
            engine=services.engine,
            catalog=services.catalog,
            jobs=services.jobs,
            settings=services.reply_settings,
            limits=services.limit_defaults,
            admitted=admitted,
        )
    except LimitReached as error:
        # Nothing was stored: the message stays in the composer, to send once the limit allows.
        return notice(
            request,
            services,
            f"Not sent: {sentence(error)}",
            status_code=429,
            headers={"Retry-After": str(error.retry_after_s)},
        )
    except EngineOverloaded as error:
        return notice(
            request,
            services,
            f"The assistant is busy right now. Try again in {error.retry_after_s} s.",
            status_code=429,
            headers={"Retry-After": str(error.retry_after_s)},
        )
    except chats.InvalidInput as error:
        return notice(request, services, sentence(error), status_code=400)
    except chats.ChatError as error:
        return notice(request, services, sentence(error), status_code=409)
    except (PromptTooLong, ValueError) as error:
        return notice(request, services, sentence(error), status_code=400)


@router.get("/", response_class=HTMLResponse)
async def new_chat(request: Request, services: ServicesDep, db: DbDep, session: CurrentSession) -> Response:
    return render(
        request,
        services,
        "pages/chat.html",
        session=session,
        conversation=None,
        messages=[],
        streams={},
        conversations=await chats.list_conversations(db, session.user),
        **picker(services, session.user),
    )


@router.post("/c")
async def create_chat(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: CurrentSession,
    message: Annotated[str, Form()],
    adapter: Annotated[str, Form()] = "",
) -> Response:
    """Start a conversation with its first message (on the chosen adapter), then open it."""
    try:
        services.catalog.resolve(adapter or None, session.user)
    except UnknownModel as error:
        return notice(request, services, sentence(error.in_chat), status_code=400)
    # A refusal leaves no empty conversation: it is created in the request's transaction, which
    # commits only with the first exchange.
    started = await _start(request, services, db, session, None, message, adapter=adapter or None)
    if isinstance(started, Response):
        return started
    return redirect(request, f"/c/{started.reply.conversation_id}")


@router.get("/c/{conversation_id}", response_class=HTMLResponse)
async def show_chat(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: CurrentSession,
    conversation: OwnedConversation,
) -> Response:
    messages = list(await chats.list_messages(db, conversation))
    return render(
        request,
        services,
        "pages/chat.html",
        session=session,
        conversation=conversation,
        messages=messages,
        streams=stream_state(services, messages),
        conversations=await chats.list_conversations(db, session.user),
        **picker(services, session.user),
    )


@router.post("/c/{conversation_id}/adapter", response_class=HTMLResponse)
async def choose_adapter(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: CurrentSession,
    conversation: OwnedConversation,
    adapter: Annotated[str, Form()] = "",
) -> Response:
    """Switch the adapter that answers in this conversation from its next reply on."""
    try:
        services.catalog.resolve(adapter or None, session.user)
    except UnknownModel as error:
        return notice(request, services, sentence(error.in_chat), status_code=400)
    await chats.set_adapter(db, conversation, adapter or None)
    return render(
        request,
        services,
        "partials/adapter_picker.html",
        session=session,
        conversation=conversation,
        **picker(services, session.user),
    )


def picker(services: Services, user: User) -> dict[str, Any]:
    """What the adapter picker shows `user`: the ready adapters open to them, and the default for
    their new conversations (the bare base model when the default is not open to them)."""
    catalog = services.catalog
    return {"adapters": catalog.ready_names(user), "default_adapter": catalog.default_for(user)}


@router.post("/c/{conversation_id}/messages", response_class=HTMLResponse)
async def send_message(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: CurrentSession,
    conversation: OwnedConversation,
    message: Annotated[str, Form()],
) -> Response:
    started = await _start(request, services, db, session, conversation, message)
    if isinstance(started, Response):
        return started
    return render(
        request,
        services,
        "partials/exchange.html",
        session=session,
        conversation=conversation,
        messages=[started.user_message, started.reply],
        streams={str(started.reply.id): ("", 0)},
    )


@router.post("/c/{conversation_id}/messages/{message_id}/regenerate", response_class=HTMLResponse)
async def regenerate(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: CurrentSession,
    conversation: OwnedConversation,
    message: OwnedMessage,
) -> Response:
    """Replace the last reply with a new one (the page swaps it in place)."""
    messages = await chats.list_messages(db, conversation)
    if messages[-1].id != message.id:
        return notice(request, services, "Only the newest reply can be regenerated.", status_code=409)
    started = await _start(request, services, db, session, conversation, None)
    if isinstance(started, Response):
        return started
    return render(
        request,
        services,
        "partials/message.html",
        session=session,
        conversation=conversation,
        message=started.reply,
        streams={str(started.reply.id): ("", 0)},
        last=True,
    )


@router.get("/c/{conversation_id}/messages/{message_id}", response_class=HTMLResponse)
async def show_message(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: CurrentSession,
    conversation: OwnedConversation,
    message: OwnedMessage,
) -> Response:
    messages = list(await chats.list_messages(db, conversation))
    return render(
        request,
        services,
        "partials/message.html",
        session=session,
        conversation=conversation,
        message=message,
        streams=stream_state(services, [message]),
        last=messages[-1].id == message.id,
    )


@router.get("/c/{conversation_id}/messages/{message_id}/stream")
async def stream_message(
    services: ServicesDep,
    db: DbDep,
    message: OwnedMessage,
    after: int = 0,
    last_event_id: Annotated[int | None, Header()] = None,
) -> EventSourceResponse:
    """Tail a reply: `token` events of escaped text, each with an id, then one `done` event.

    Resumes after `Last-Event-ID` (EventSource reconnecting) or `after` (a page rendered with
    the text up to that event), so no text is lost or repeated.
    """
    job = services.jobs.get(message.id)
    status = message.status.value
    # The stream may run for minutes: give the database connection back now.
    await db.close()
    start = last_event_id if last_event_id is not None else after

    async def events() -> AsyncIterator[ServerSentEvent]:
        last = start
        if job is not None:
            async for event_id, text in job.tail(start):
                last = event_id
                yield ServerSentEvent(render_stream_text(text), event="token", id=str(event_id))
            final = job.status.value
        else:
            final = status
        # Always end with `done`: without it EventSource reconnects and would tail again.
        yield ServerSentEvent(final, event="done", id=str(last + 1))

    return EventSourceResponse(events(), ping=15, headers={"Cache-Control": "no-store"})


@router.post("/c/{conversation_id}/messages/{message_id}/stop", status_code=204)
async def stop_message(services: ServicesDep, db: DbDep, message: OwnedMessage) -> Response:
    """Cancel the reply on the model; its partial text is kept and marked stopped."""
    await db.close()
    job = services.jobs.get(message.id)
    if job is not None and not job.finished:
        await job.stop()
    return Response(status_code=204)


@router.get("/c/{conversation_id}/rename", response_class=HTMLResponse)
async def rename_form(
    request: Request, services: ServicesDep, session: CurrentSession, conversation: OwnedConversation
) -> Response:
    return render(request, services, "partials/rename_form.html", session=session, conversation=conversation)


@router.post("/c/{conversation_id}/rename", response_class=HTMLResponse)
async def rename(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    session: CurrentSession,
    conversation: OwnedConversation,
    title: Annotated[str, Form()],
) -> Response:
    try:
        await chats.rename_conversation(db, conversation, title)
    except chats.InvalidInput as error:
        return notice(request, services, sentence(error), status_code=400)
    return render(
        request, services, "partials/conversation_item.html", session=session, item=conversation, current=None
    )


@router.post("/c/{conversation_id}/delete")
async def delete(
    request: Request, services: ServicesDep, db: DbDep, conversation: OwnedConversation
) -> Response:
    for message in await chats.list_messages(db, conversation):
        job = services.jobs.get(message.id)
        if job is not None and not job.finished:
            await job.stop()
    await chats.delete_conversation(db, conversation)
    current = request.headers.get("hx-current-url", "")
    if not is_htmx(request) or current.rstrip("/").endswith(f"/c/{conversation.id}"):
        return redirect(request, "/")
    return Response(status_code=200)  # the sidebar removes the item
