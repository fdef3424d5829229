"""What each person asks of the model, counted in SQL, and the limits on it.

Two limits, both 0 for unlimited, set by RATE_LIMIT_PER_MINUTE, API_KEY_RATE_LIMIT_PER_MINUTE and
DAILY_TOKEN_QUOTA and overridden per user (and per API key) by admins:

- requests per minute, per user and per API key: a fixed window per calendar minute (UTC), one
  row per subject and minute in `rate_windows`, raised by a conditional upsert that admits the
  request only while the count is under the limit. The upsert is one atomic statement, so server
  processes sharing the database count together and never admit more than the limit between them.
- prompt + completion tokens per user per UTC day, in `daily_usage`. A request is admitted while
  the day's tokens are under the quota; its own tokens are added when its reply ends, so the reply
  that crosses the quota finishes, and the next request is refused.

A request here is one that asks the model for a reply: a chat message, a regenerate, a chat
completion. The `limits` package was the first candidate, but its storages are Redis, Memcached,
MongoDB or process memory; the database is what every server process here already shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import case, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import ApiKey, AuditEvent, DailyUsage, RateWindow, User, utcnow

USAGE_DAYS = 30  # the usage page's longer period, today included


@dataclass(frozen=True)
class LimitDefaults:
    """The settings' limits, for users and keys without an override (0: unlimited)."""

    rate_limit_per_minute: int = 0
    api_key_rate_limit_per_minute: int = 0
    daily_token_quota: int = 0


@dataclass(frozen=True)
class Limits:
    """The limits in effect for one user (0: unlimited), and whether each is their own override."""

    per_minute: int
    daily_tokens: int
    per_minute_overridden: bool
    daily_tokens_overridden: bool


def limits_for(user: User, defaults: LimitDefaults) -> Limits:
    per_minute, daily = user.rate_limit_per_minute, user.daily_token_quota
    return Limits(
        per_minute=defaults.rate_limit_per_minute if per_minute is None else per_minute,
        daily_tokens=defaults.daily_token_quota if daily is None else daily,
        per_minute_overridden=per_minute is not None,
        daily_tokens_overridden=daily is not None,
    )


def key_limit(key: ApiKey, defaults: LimitDefaults) -> int:
    return (
        defaults.api_key_rate_limit_per_minute
        if key.rate_limit_per_minute is None
        else key.rate_limit_per_minute
    )


class LimitReached(Exception):
    """A request refused by a limit; the message says which and when to try again."""

    def __init__(self, message: str, *, retry_after_s: int, kind: Literal["requests", "tokens"]) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.kind = kind


def _insert(db: AsyncSession, table: Any) -> Any:
    # ON CONFLICT ... DO UPDATE ... RETURNING is the same on both databases (SQLite 3.35+), but
    # SQLAlchemy builds it per dialect.
    dialect = postgresql if db.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


async def take_from_window(db: AsyncSession, subject: str, minute: int, limit: int | None = None) -> bool:
    """Count one event in `subject`'s window for `minute` if it is under `limit` (None: always, as
    for failed sign-ins, app/auth/throttle.py); False when the window is full."""
    insert = _insert(db, RateWindow)
    statement = (
        insert.values(subject=subject, minute=minute, requests=1)
        .on_conflict_do_update(
            index_elements=[RateWindow.subject, RateWindow.minute],
            set_={"requests": RateWindow.requests + 1},
            where=None if limit is None else RateWindow.requests < limit,
        )
        .returning(RateWindow.requests)
    )
    return (await db.execute(statement)).scalar_one_or_none() is not None


async def _add_usage(
    db: AsyncSession,
    *,
    user_id: int,
    day: date,
    requests: int = 0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    at: datetime | None = None,
) -> None:
    insert = _insert(db, DailyUsage)
    values = {
        "user_id": user_id,
        "day": day,
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "last_request_at": at,
    }
    statement = insert.values(**values).on_conflict_do_update(
        index_elements=[DailyUsage.user_id, DailyUsage.day],
        set_={
            "requests": DailyUsage.requests + insert.excluded.requests,
            "prompt_tokens": DailyUsage.prompt_tokens + insert.excluded.prompt_tokens,
            "completion_tokens": DailyUsage.completion_tokens + insert.excluded.completion_tokens,
            "last_request_at": func.coalesce(insert.excluded.last_request_at, DailyUsage.last_request_at),
        },
    )
    await db.execute(statement)


async def tokens_used(db: AsyncSession, *, user_id: int, day: date) -> int:
    total = DailyUsage.prompt_tokens + DailyUsage.completion_tokens
    query = select(total).where(DailyUsage.user_id == user_id, DailyUsage.day == day)
    return int(await db.scalar(query) or 0)


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _wait(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    hours, minutes = divmod(math.ceil(seconds / 60), 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


async def admit(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    user: User,
    api_key: ApiKey | None = None,
    defaults: LimitDefaults,
    now: datetime | None = None,
) -> None:
    """Count one request for `user` (through `api_key`, for the API), or raise LimitReached.

    In a transaction of its own (not the request's session, whose objects a rollback would expire).
    A refused request counts nowhere: its window increments are rolled back with it.
    """
    now = now or utcnow()
    epoch_s = now.timestamp()
    minute = int(epoch_s // 60)
    next_minute_s = max(1, math.ceil((minute + 1) * 60 - epoch_s))
    limits = limits_for(user, defaults)
    windows: list[tuple[str, int, str]] = []
    if api_key is not None and (limit := key_limit(api_key, defaults)):
        windows.append(
            (f"key:{api_key.id}", limit, f"this API key's limit is {_plural(limit, 'request')} a minute")
        )
    if limits.per_minute:
        windows.append(
            (
                f"user:{user.id}",
                limits.per_minute,
                f"your limit is {_plural(limits.per_minute, 'request')} a minute",
            )
        )
    async with sessionmaker() as db:
        await _admit(
            db, user=user, windows=windows, limits=limits, now=now, minute=minute, next_minute_s=next_minute_s
        )


async def _admit(
    db: AsyncSession,
    *,
    user: User,
    windows: list[tuple[str, int, str]],
    limits: Limits,
    now: datetime,
    minute: int,
    next_minute_s: int,
) -> None:
    try:
        for subject, limit, which in windows:
            if not await take_from_window(db, subject, minute, limit):
                raise LimitReached(
                    f"too many requests: {which}; try again in {_wait(next_minute_s)}",
                    retry_after_s=next_minute_s,
                    kind="requests",
                )
        today = now.astimezone(UTC).date()
        if limits.daily_tokens:
            used = await tokens_used(db, user_id=user.id, day=today)
            if used >= limits.daily_tokens:
                midnight = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
                until_midnight = max(1, math.ceil((midnight - now).total_seconds()))
                raise LimitReached(
                    f"you have used {_plural(used, 'token')} today, your daily quota is "
                    f"{_plural(limits.daily_tokens, 'token')}; "
                    f"it renews at 00:00 UTC, in {_wait(until_midnight)}",
                    retry_after_s=until_midnight,
                    kind="tokens",
                )
        if windows:
            # Windows that ended are of no further use. The one just before this is left alone: a
            # request that read the clock a moment earlier may still hold its row, and waiting for it
            # while holding rows it waits for next (the day's usage) would deadlock on PostgreSQL.
            subjects = [subject for subject, _, _ in windows]
            await db.execute(
                delete(RateWindow).where(RateWindow.subject.in_(subjects), RateWindow.minute < minute - 1)
            )
        await _add_usage(db, user_id=user.id, day=today, requests=1, at=now)
        await db.commit()
    except BaseException:
        await db.rollback()
        raise


async def record_tokens(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    user_id: int,
    prompt_tokens: int,
    completion_tokens: int,
    now: datetime | None = None,
) -> None:
    """Add a finished reply's tokens to its user's day (the day it ended, UTC)."""
    if not prompt_tokens and not completion_tokens:
        return
    day = (now or utcnow()).astimezone(UTC).date()
    async with sessionmaker() as db:
        await _add_usage(
            db, user_id=user_id, day=day, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
        await db.commit()


# -- administration -----------------------------------------------------------------------------------


class LimitError(ValueError):
    """A limit an admin typed that is not one; the message names the field."""


def parse_limit(value: str, field: str) -> int | None:
    """A limit from a form: empty follows the setting (None), else a whole number >= 0."""
    value = value.strip().replace(",", "").replace("_", "")
    if not value:
        return None
    if not value.isdigit() or len(value) > 12:
        raise LimitError(
            f"{field} must be a whole number of 0 or more (0: unlimited), or empty for the default"
        )
    return int(value)


async def set_user_limits(
    db: AsyncSession, *, user: User, per_minute: int | None, daily_tokens: int | None, actor: User
) -> None:
    """Override (None: follow the settings) a user's requests per minute and daily token quota."""
    previous = {
        "rate_limit_per_minute": user.rate_limit_per_minute,
        "daily_token_quota": user.daily_token_quota,
    }
    if previous == {"rate_limit_per_minute": per_minute, "daily_token_quota": daily_tokens}:
        return  # nothing changes, nothing to audit
    user.rate_limit_per_minute = per_minute
    user.daily_token_quota = daily_tokens
    db.add(
        AuditEvent(
            actor_id=actor.id,
            actor_email=actor.email,
            action="user.limits",
            target=user.email,
            details={
                "rate_limit_per_minute": per_minute,
                "daily_token_quota": daily_tokens,
                "previous": previous,
            },
        )
    )
    await db.commit()


async def set_key_limit(db: AsyncSession, *, key: ApiKey, per_minute: int | None, actor: User) -> None:
    """Give an API key its own requests per minute, within its user's (None: the setting; 0: none)."""
    if key.rate_limit_per_minute == per_minute:
        return  # nothing changes, nothing to audit
    previous, key.rate_limit_per_minute = key.rate_limit_per_minute, per_minute
    db.add(
        AuditEvent(
            actor_id=actor.id,
            actor_email=actor.email,
            action="api-key.limit",
            target=f"{key.user.email} key {key.prefix}",
            details={"rate_limit_per_minute": per_minute, "previous": previous},
        )
    )
    await db.commit()


@dataclass(frozen=True)
class UserUsage:
    user: User
    limits: Limits
    requests_today: int
    tokens_today: int
    requests_period: int  # the last USAGE_DAYS days, today included
    tokens_period: int
    last_active: datetime | None


async def usage_report(
    db: AsyncSession, *, users: Sequence[User], defaults: LimitDefaults, today: date | None = None
) -> list[UserUsage]:
    """Each user's requests and tokens today and over the last USAGE_DAYS days, and when they last
    asked the model for something."""
    today = today or utcnow().date()
    since = today - timedelta(days=USAGE_DAYS - 1)
    tokens = DailyUsage.prompt_tokens + DailyUsage.completion_tokens
    in_period = DailyUsage.day >= since
    query = select(
        DailyUsage.user_id,
        func.sum(case((DailyUsage.day == today, DailyUsage.requests), else_=0)),
        func.sum(case((DailyUsage.day == today, tokens), else_=0)),
        func.sum(case((in_period, DailyUsage.requests), else_=0)),
        func.sum(case((in_period, tokens), else_=0)),
        func.max(DailyUsage.last_request_at),
    ).group_by(DailyUsage.user_id)
    rows = {row[0]: row[1:] for row in (await db.execute(query)).all()}
    report = []
    for user in users:
        req_today, tok_today, req_period, tok_period, last = rows.get(user.id, (0, 0, 0, 0, None))
        if last is not None and last.tzinfo is None:  # SQLite returns what it stored, without a zone
            last = last.replace(tzinfo=UTC)
        report.append(
            UserUsage(
                user=user,
                limits=limits_for(user, defaults),
                requests_today=int(req_today or 0),
                tokens_today=int(tok_today or 0),
                requests_period=int(req_period or 0),
                tokens_period=int(tok_period or 0),
                last_active=last,
            )
        )
    return report
