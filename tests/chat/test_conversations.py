"""Conversation data functions on both databases: ownership, ordering, cascades, restarts."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import service as auth
from app.chat import conversations as chats
from app.config import async_database_url
from app.db import create_engine, create_sessionmaker
from app.migrate import upgrade_database
from app.models import Message, MessageStatus, User


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[AsyncSession]:
    url = async_database_url(database_url)
    upgrade_database(url)
    engine = create_engine(url)
    async with create_sessionmaker(engine)() as session:
        yield session
    await engine.dispose()


async def users(db: AsyncSession) -> tuple[User, User]:
    alice = await auth.create_user(db, email="Alice@Example.com", password="password-a")
    bob = await auth.create_user(db, email="bob@example.com", password="password-b")
    return alice, bob


async def test_a_conversation_is_visible_to_its_owner_only(db: AsyncSession) -> None:
    alice, bob = await users(db)
    conversation = await chats.create_conversation(db, user=alice)
    await chats.add_exchange(db, conversation=conversation, user_text="How do I book travel?")
    assert conversation.title == "How do I book travel?"
    assert await chats.get_conversation(db, alice, str(conversation.id)) is conversation
    assert await chats.get_conversation(db, bob, str(conversation.id)) is None
    assert await chats.get_conversation(db, alice, "not-a-uuid") is None
    assert [c.id for c in await chats.list_conversations(db, alice)] == [conversation.id]
    assert await chats.list_conversations(db, bob) == []


async def test_messages_keep_their_order_and_go_with_the_conversation(db: AsyncSession) -> None:
    alice, _ = await users(db)
    conversation = await chats.create_conversation(db, user=alice)
    await chats.add_exchange(db, conversation=conversation, user_text="one")
    _, second_reply = await chats.add_exchange(db, conversation=conversation, user_text="two")
    messages = await chats.list_messages(db, conversation)
    assert [(m.position, m.role.value, m.content) for m in messages] == [
        (1, "user", "one"), (2, "assistant", ""), (3, "user", "two"), (4, "assistant", ""),
    ]  # fmt: skip
    assert second_reply.status is MessageStatus.STREAMING
    await chats.delete_conversation(db, conversation)
    assert await db.scalar(select(func.count()).select_from(Message)) == 0


async def test_newest_conversation_first(db: AsyncSession) -> None:
    alice, _ = await users(db)
    older = await chats.create_conversation(db, user=alice)
    await chats.add_exchange(db, conversation=older, user_text="older")
    newer = await chats.create_conversation(db, user=alice)
    await chats.add_exchange(db, conversation=newer, user_text="newer")
    assert [c.title for c in await chats.list_conversations(db, alice)] == ["newer", "older"]
    await chats.add_exchange(db, conversation=older, user_text="again")
    assert [c.title for c in await chats.list_conversations(db, alice)] == ["older", "newer"]


async def test_replies_cut_off_by_a_restart_keep_their_text(db: AsyncSession) -> None:
    alice, _ = await users(db)
    conversation = await chats.create_conversation(db, user=alice)
    _, reply = await chats.add_exchange(db, conversation=conversation, user_text="hi")
    reply.content = "partial answer"
    await db.commit()
    assert await chats.mark_interrupted_replies(db) == 1
    await db.refresh(reply)
    assert (reply.status, reply.content) == (MessageStatus.INTERRUPTED, "partial answer")


async def test_bad_input_is_refused_with_a_reason(db: AsyncSession) -> None:
    alice, _ = await users(db)
    with pytest.raises(chats.ChatError, match="empty"):
        chats.clean_message("  \n ")
    with pytest.raises(chats.ChatError, match="the limit is 32000"):
        chats.clean_message("x" * 32_001)
    conversation = await chats.create_conversation(db, user=alice)
    await db.commit()
    with pytest.raises(chats.ChatError, match="the title is empty"):
        await chats.rename_conversation(db, conversation, "   ")
    assert conversation.title == "New chat"
    with pytest.raises(auth.UserError, match="already exists"):
        await auth.create_user(db, email="alice@example.com", password="another-one")
    with pytest.raises(auth.UserError, match="at least 8 characters"):
        await auth.create_user(db, email="carol@example.com", password="short")
