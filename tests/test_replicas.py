"""Replicas on one PostgreSQL database (app/replicas.py): a starting server marks replies left
"streaming" as interrupted only when no other replica runs; with one running, only replies older than
any reply lasts, so another replica's live reply is never cut."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.chat.conversations import add_exchange, create_conversation
from app.migrate import upgrade_database
from app.models import Message, MessageStatus, User, utcnow
from app.replicas import ReplicaPresence
from tests.conftest import LiveServer, create_user, make_settings, new_postgres_database, with_db


def test_a_process_knows_whether_it_is_alone(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def joins(url: str) -> list[bool]:
        first = await ReplicaPresence.join(url)
        second = await ReplicaPresence.join(url)
        await first.leave()
        third = await ReplicaPresence.join(url)  # the second still runs
        await second.leave()
        await third.leave()
        last = await ReplicaPresence.join(url)  # everyone has gone
        await last.leave()
        return [first.alone, second.alone, third.alone, last.alone]

    with new_postgres_database() as url:
        settings = make_settings(tmp_path, tiny_model_dir, url)
        assert asyncio.run(joins(settings.sqlalchemy_url)) == [True, False, False, True]
    sqlite = make_settings(tmp_path, tiny_model_dir)
    assert asyncio.run(ReplicaPresence.join(sqlite.sqlalchemy_url)).alone


def streaming_replies(settings: object, ages: list[timedelta]) -> list[uuid.UUID]:
    """Replies left streaming, begun `ages` ago."""
    create_user(settings, "r@example.com")  # type: ignore[arg-type]

    async def make(db: AsyncSession) -> list[uuid.UUID]:
        user = await db.scalar(select(User).where(User.email == "r@example.com"))
        assert user is not None
        ids = []
        for age in ages:
            conversation = await create_conversation(db, user=user)
            _, reply = await add_exchange(db, conversation=conversation, user_text="hi")
            await db.execute(update(Message).where(Message.id == reply.id).values(created_at=utcnow() - age))
            await db.commit()
            ids.append(reply.id)
        return ids

    return with_db(settings, make)  # type: ignore[arg-type]


def statuses(settings: object, ids: list[uuid.UUID]) -> list[MessageStatus]:
    async def read(db: AsyncSession) -> list[MessageStatus]:
        return [(await db.get(Message, i)).status for i in ids]  # type: ignore[union-attr]

    return with_db(settings, read)  # type: ignore[arg-type]


def test_a_starting_replica_leaves_another_replicas_live_replies_alone(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with new_postgres_database() as url:
        settings = make_settings(tmp_path, tiny_model_dir, url)
        upgrade_database(settings.sqlalchemy_url)
        live, cut = streaming_replies(settings, [timedelta(seconds=5), timedelta(hours=2)])

        async def other_replica() -> ReplicaPresence:
            return await ReplicaPresence.join(settings.sqlalchemy_url)

        other = asyncio.run(other_replica())  # another replica runs, writing the recent reply
        server = LiveServer(settings).start()
        try:
            assert statuses(settings, [live, cut]) == [MessageStatus.STREAMING, MessageStatus.INTERRUPTED]
        finally:
            server.stop()
        asyncio.run(other.leave())

        server = LiveServer(settings).start()  # alone now: the recent one was cut too
        try:
            assert statuses(settings, [live, cut]) == [MessageStatus.INTERRUPTED, MessageStatus.INTERRUPTED]
        finally:
            server.stop()
