"""app/usage.py on real SQLite and PostgreSQL: limits counted by several server processes at once.

Each "server process" is an engine of its own (its own connections), as two uvicorn processes
sharing one database would have; requests from both race for the same minute's window.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth import service as auth
from app.config import async_database_url
from app.db import create_engine, create_sessionmaker
from app.migrate import upgrade_database
from app.models import ApiKey, User
from app.usage import LimitDefaults, LimitReached, admit, record_tokens, tokens_used, usage_report

# Mid-minute, so a test's requests all fall into one window however long it takes.
NOON = datetime(2026, 11, 28, 12, 0, 30, tzinfo=UTC)


@contextlib.asynccontextmanager
async def two_processes(url: str) -> AsyncIterator[list[async_sessionmaker[AsyncSession]]]:
    """Session makers of two "server processes" on one database, each with its own connections."""
    engines = [create_engine(url), create_engine(url)]
    try:
        yield [create_sessionmaker(engine) for engine in engines]
    finally:
        for engine in engines:
            await engine.dispose()


async def _user(db: AsyncSession, email: str, **limits: int | None) -> User:
    user = await auth.create_user(db, email=email, password="correct horse battery")
    for name, value in limits.items():
        setattr(user, name, value)
    await db.commit()
    return user


async def _attempts(
    makers: list[async_sessionmaker[AsyncSession]],
    count: int,
    *,
    user: User,
    key: ApiKey | None = None,
    defaults: LimitDefaults,
    now: datetime = NOON,
) -> list[LimitReached | None]:
    """`count` requests at once, spread over the processes; None for each one admitted."""

    async def one(maker: async_sessionmaker[AsyncSession]) -> LimitReached | None:
        try:
            await admit(maker, user=user, api_key=key, defaults=defaults, now=now)
        except LimitReached as refusal:
            return refusal
        return None

    return await asyncio.gather(*(one(makers[i % len(makers)]) for i in range(count)))


def test_processes_sharing_the_database_admit_exactly_the_limit(database_url: str) -> None:
    url = async_database_url(database_url)
    upgrade_database(url)

    async def run() -> None:
        async with two_processes(url) as makers:
            async with makers[0]() as db:
                limited = await _user(db, "limited@example.com")
                by_key = await _user(db, "keys@example.com")
                _, key = await auth.create_api_key(db, user=by_key, secret=b"s" * 32)
                _, other_key = await auth.create_api_key(db, user=by_key, secret=b"s" * 32)
                key.rate_limit_per_minute = 2
                await db.commit()

            defaults = LimitDefaults(rate_limit_per_minute=5)
            results = await _attempts(makers, 16, user=limited, defaults=defaults)
            assert sum(r is None for r in results) == 5
            refusals = [r for r in results if r is not None]
            assert {r.kind for r in refusals} == {"requests"}
            assert {r.retry_after_s for r in refusals} == {30}  # the rest of NOON's minute
            assert "your limit is 5 requests a minute; try again in 30 s" in str(refusals[0])

            # The next minute is a new window; the requests refused earlier did not count in it.
            later = NOON + timedelta(minutes=1)
            results = await _attempts(makers, 8, user=limited, defaults=defaults, now=later)
            assert sum(r is None for r in results) == 5

            # A key's own limit, within the user's: the key with none goes on.
            results = await _attempts(makers, 6, user=by_key, key=key, defaults=defaults)
            assert sum(r is None for r in results) == 2
            assert all("this API key's limit is 2 requests a minute" in str(r) for r in results if r)
            results = await _attempts(makers, 6, user=by_key, key=other_key, defaults=defaults)
            assert sum(r is None for r in results) == 3  # the user's 5, less the first key's 2

            # Only admitted requests are in the day's usage.
            async with makers[1]() as db:
                report = {row.user.email: row for row in await usage_report(
                    db, users=[limited, by_key], defaults=defaults, today=NOON.date()
                )}  # fmt: skip
            assert report["limited@example.com"].requests_today == 10
            assert report["keys@example.com"].requests_today == 5

    asyncio.run(run())


def test_daily_token_quota_counts_tokens_from_every_process(database_url: str) -> None:
    url = async_database_url(database_url)
    upgrade_database(url)

    async def run() -> None:
        async with two_processes(url) as makers:
            async with makers[0]() as db:
                user = await _user(db, "quota@example.com", daily_token_quota=100)
                unlimited = await _user(db, "free@example.com", daily_token_quota=0)
            defaults = LimitDefaults(daily_token_quota=10)  # the user's own 100 applies, 0 is unlimited

            await admit(makers[0], user=user, defaults=defaults, now=NOON)
            await record_tokens(makers[0], user_id=user.id, prompt_tokens=40, completion_tokens=20, now=NOON)
            await admit(makers[1], user=user, defaults=defaults, now=NOON)  # 60 of 100: admitted
            await record_tokens(makers[1], user_id=user.id, prompt_tokens=30, completion_tokens=15, now=NOON)
            with pytest.raises(LimitReached) as refused:
                await admit(makers[0], user=user, defaults=defaults, now=NOON)
            assert refused.value.kind == "tokens"
            assert refused.value.retry_after_s == 12 * 3600 - 30  # until midnight UTC
            assert "you have used 105 tokens today, your daily quota is 100 tokens" in str(refused.value)
            assert str(refused.value).endswith("it renews at 00:00 UTC, in 12 h")

            # The next UTC day starts from nothing.
            tomorrow = NOON + timedelta(days=1)
            await admit(makers[1], user=user, defaults=defaults, now=tomorrow)
            for _ in range(3):
                await admit(makers[0], user=unlimited, defaults=defaults, now=NOON)
                await record_tokens(
                    makers[0], user_id=unlimited.id, prompt_tokens=500, completion_tokens=0, now=NOON
                )

            async with makers[1]() as db:
                assert await tokens_used(db, user_id=user.id, day=NOON.date()) == 105
                rows = await usage_report(
                    db, users=[user, unlimited], defaults=defaults, today=tomorrow.date()
                )
            mine, theirs = rows
            assert (mine.requests_today, mine.tokens_today) == (1, 0)
            assert (mine.requests_period, mine.tokens_period) == (3, 105)
            assert mine.last_active == tomorrow
            assert (mine.limits.daily_tokens, mine.limits.daily_tokens_overridden) == (100, True)
            assert (theirs.requests_period, theirs.tokens_period) == (3, 1500)
            assert theirs.limits.daily_tokens == 0 and theirs.last_active == NOON

    asyncio.run(run())


def test_requests_either_side_of_a_minute_boundary_race_safely_and_old_windows_go(database_url: str) -> None:
    from sqlalchemy import select

    from app.models import RateWindow

    url = async_database_url(database_url)
    upgrade_database(url)

    async def run() -> None:
        async with two_processes(url) as makers:
            async with makers[0]() as db:
                user = await _user(db, "busy@example.com", rate_limit_per_minute=1000)
                _, key = await auth.create_api_key(db, user=user, secret=b"s" * 32)
                key.rate_limit_per_minute = 1000
                await db.commit()
            defaults = LimitDefaults()
            boundary = datetime(2026, 11, 28, 12, 1, tzinfo=UTC)
            # Clocks read a moment apart, either side of 12:01: all admitted, none deadlocked.
            times = [boundary + timedelta(milliseconds=ms) for ms in (-50, 50) * 20]
            results = await asyncio.gather(
                *(
                    admit(makers[i % 2], user=user, api_key=key, defaults=defaults, now=moment)
                    for i, moment in enumerate(times)
                )
            )
            assert results == [None] * len(times)

            await admit(
                makers[0], user=user, api_key=key, defaults=defaults, now=boundary + timedelta(minutes=1)
            )
            async with makers[1]() as db:
                rows = (
                    await db.execute(select(RateWindow.subject, RateWindow.minute, RateWindow.requests))
                ).all()
            minute = int(boundary.timestamp() // 60)
            # At 12:02, 12:00 went; 12:01 stays (a request that read the clock a moment earlier may
            # still hold its row).
            expected = [(subject, minute, 20) for subject in (f"key:{key.id}", f"user:{user.id}")]
            expected += [(subject, minute + 1, 1) for subject in (f"key:{key.id}", f"user:{user.id}")]
            assert sorted(rows) == sorted(expected)

    asyncio.run(run())
