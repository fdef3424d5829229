"""Start and stop replies: the service between the chat routes and the generation engine."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from app.chat.conversations import ChatError, add_exchange, clean_message, history_turns, list_messages
from app.chat.jobs import GenerationJob, JobManager
from app.llm.engine import GenerationEngine, GenerationRequest, SamplingParams
from app.llm.prompts import ChatTurn, build_prompt
from app.logs import current_request_id, new_request_id
from app.models import Conversation, Message, MessageRole, MessageStatus, User
from app.registry.catalog import Catalog, ServedVersion, UnknownModel
from app.usage import LimitDefaults, admit


@dataclass(frozen=True)
class ReplySettings:
    system_prompt: str
    max_tokens: int
    temperature: float
    top_p: float


@dataclass(frozen=True)
class StartedReply:
    user_message: Message | None
    reply: Message
    job: GenerationJob


def prompt_request(
    engine: GenerationEngine,
    turns: Sequence[ChatTurn],
    sampling: SamplingParams,
    adapter: ServedVersion | None,
    catalog: Catalog,
) -> GenerationRequest:
    """Build the engine request for a conversation; raises PromptTooLong or ValueError."""
    window = engine.model.context_window
    if sampling.max_tokens >= window:
        raise ValueError(f"max_tokens must be below the model's context window of {window} tokens")
    prompt = build_prompt(
        engine.model.tokenizer,
        turns,
        max_prompt_tokens=window - sampling.max_tokens,
        template=adapter.prompt_template if adapter else None,
    )
    return GenerationRequest(
        prompt_ids=prompt.token_ids,
        sampling=sampling,
        adapter=catalog.ref(adapter) if adapter else None,
        # The HTTP request's id (app.logs), so the engine's lines about this reply name it too.
        request_id=current_request_id() or new_request_id(),
    )


def conversation_adapter(catalog: Catalog, conversation: Conversation, user: User) -> ServedVersion | None:
    """The adapter version a conversation talks to now; never silently the base instead (nor an
    adapter the user may no longer use)."""
    try:
        return catalog.resolve(conversation.adapter_name, user)
    except UnknownModel:
        raise ChatError(
            f"the adapter '{conversation.adapter_name}' of this conversation is not available any more; "
            "choose another one above"
        ) from None


async def start_reply(
    db: AsyncSession,
    *,
    conversation: Conversation,
    user: User,
    user_text: str | None,
    engine: GenerationEngine,
    catalog: Catalog,
    jobs: JobManager,
    settings: ReplySettings,
    limits: LimitDefaults,
    admitted: bool = False,
) -> StartedReply:
    """Store the user's message (None: regenerate the last reply) and start the model on a reply.

    The limits (app.usage; LimitReached) and then the engine are asked first, so a limit or a full
    queue refuses the message before anything is stored or deleted (the user's text stays in their
    composer to send again). `admitted`: the caller has counted this request already (a new
    conversation is admitted before it is created, since the limits count in a transaction of
    their own and SQLite lets only one write at a time).
    """
    if user_text is not None:
        user_text = clean_message(user_text)
    messages = list(await list_messages(db, conversation))
    if any(m.status is MessageStatus.STREAMING and jobs.get(m.id) for m in messages):
        raise ChatError("a reply is still being written in this conversation; stop it or wait for it")
    if user_text is None and (not messages or messages[-1].role is not MessageRole.ASSISTANT):
        raise ChatError("there is no reply to regenerate")
    adapter = conversation_adapter(catalog, conversation, user)
    if not admitted:
        # admit() counts in a session of its own: end this one's transaction first, so the request
        # holds one pooled connection at a time. Holding one while waiting for another starved the
        # pool under load (every connection held by a request waiting for a second: 500s after 30 s).
        await db.commit()
        await admit(jobs.sessionmaker, user=user, defaults=limits)
    if user_text is None:
        await db.delete(messages.pop())
        await db.flush()
    turns = [ChatTurn("system", settings.system_prompt)] if settings.system_prompt else []
    turns += history_turns(messages)
    if user_text is not None:
        turns.append(ChatTurn("user", user_text))
    sampling = SamplingParams(
        max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p
    )
    # Rendering and tokenizing the whole history takes milliseconds on a long one: off the event loop
    # (encode() without truncation or padding changes no tokenizer state, so threads may share it).
    request = await asyncio.to_thread(prompt_request, engine, turns, sampling, adapter, catalog)
    stream = engine.submit(request)
    try:
        user_message, reply = await add_exchange(db, conversation=conversation, user_text=user_text)
    except BaseException:
        stream.cancel()
        raise
    return StartedReply(user_message, reply, jobs.start(reply.id, stream, user_id=user.id))
