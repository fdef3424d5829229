"""Conversations and their messages: the data functions behind the chat pages.

Every lookup takes the user: a conversation that is not theirs is indistinguishable from
one that does not exist (the routes answer 404 for both).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.llm.prompts import ChatTurn
from app.models import Conversation, Message, MessageRole, MessageStatus, User, utcnow

TITLE_LENGTH = 60
INTERRUPTED_ERROR = "the server stopped before the reply was finished"
MAX_MESSAGE_CHARS = 32_000


class ChatError(ValueError):
    """A chat action that cannot be done now (e.g. a reply is still being written); the message says why."""


class InvalidInput(ChatError):
    """What the user sent is not acceptable (empty, too long); the message says why."""


def parse_id(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1].rstrip() + "…"


def clean_message(text: str) -> str:
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise InvalidInput("the message is empty")
    if len(text) > MAX_MESSAGE_CHARS:
        raise InvalidInput(f"the message is {len(text)} characters long; the limit is {MAX_MESSAGE_CHARS}")
    return text


async def list_conversations(db: AsyncSession, user: User) -> Sequence[Conversation]:
    query = (
        select(Conversation)
        .where(Conversation.user_id == user.id)
        .order_by(Conversation.updated_at.desc(), Conversation.created_at.desc())
    )
    return (await db.scalars(query)).all()


async def get_conversation(db: AsyncSession, user: User, conversation_id: str) -> Conversation | None:
    parsed = parse_id(conversation_id)
    if parsed is None:
        return None
    return await db.scalar(
        select(Conversation).where(Conversation.id == parsed, Conversation.user_id == user.id)
    )


async def get_message(db: AsyncSession, conversation: Conversation, message_id: str) -> Message | None:
    parsed = parse_id(message_id)
    if parsed is None:
        return None
    return await db.scalar(
        select(Message).where(Message.id == parsed, Message.conversation_id == conversation.id)
    )


async def list_messages(db: AsyncSession, conversation: Conversation) -> Sequence[Message]:
    query = select(Message).where(Message.conversation_id == conversation.id).order_by(Message.position)
    return (await db.scalars(query)).all()


async def create_conversation(
    db: AsyncSession, *, user: User, title: str = "New chat", adapter_name: str | None = None
) -> Conversation:
    conversation = Conversation(user_id=user.id, title=title, adapter_name=adapter_name)
    db.add(conversation)
    await db.flush()
    return conversation


async def rename_conversation(db: AsyncSession, conversation: Conversation, title: str) -> None:
    title = " ".join(title.split())
    if not title:
        raise InvalidInput("the title is empty")
    conversation.title = title[:200]
    await db.commit()


async def set_adapter(db: AsyncSession, conversation: Conversation, adapter_name: str | None) -> None:
    conversation.adapter_name = adapter_name
    await db.commit()


async def delete_conversation(db: AsyncSession, conversation: Conversation) -> None:
    await db.delete(conversation)
    await db.commit()


def history_turns(messages: Sequence[Message]) -> list[ChatTurn]:
    """The turns a new prompt is built from: failed and empty replies are left out."""
    turns = []
    for message in messages:
        if message.role is MessageRole.ASSISTANT and (
            message.status is MessageStatus.FAILED or not message.content
        ):
            continue
        turns.append(ChatTurn(role=message.role.value, content=message.content))
    return turns


async def add_exchange(
    db: AsyncSession, *, conversation: Conversation, user_text: str | None
) -> tuple[Message | None, Message]:
    """Store the user's message (unless regenerating) and an empty reply that a job will stream into."""
    position = await db.scalar(
        select(func.coalesce(func.max(Message.position), 0)).where(Message.conversation_id == conversation.id)
    )
    position = int(position or 0)
    user_message = None
    if user_text is not None:
        position += 1
        user_message = Message(
            conversation_id=conversation.id, position=position, role=MessageRole.USER, content=user_text
        )
        db.add(user_message)
        if conversation.title == "New chat":
            conversation.title = title_from(user_text)
    reply = Message(
        conversation_id=conversation.id,
        position=position + 1,
        role=MessageRole.ASSISTANT,
        content="",
        status=MessageStatus.STREAMING,
    )
    db.add(reply)
    conversation.updated_at = utcnow()
    await db.commit()
    return user_message, reply


async def mark_interrupted_replies(db: AsyncSession, *, begun_before: datetime | None = None) -> int:
    """At start-up: replies left streaming by a stopped server keep their text, marked interrupted.

    `begun_before`: only replies begun before then (other replicas are running, and the newer
    streaming replies may be theirs, live).
    """
    query = update(Message).where(Message.status == MessageStatus.STREAMING)
    if begun_before is not None:
        query = query.where(Message.created_at < begun_before)
    result = await db.execute(query.values(status=MessageStatus.INTERRUPTED, error=INTERRUPTED_ERROR))
    await db.commit()
    return int(getattr(result, "rowcount", 0) or 0)
