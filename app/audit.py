"""The audit log: who signed in (or failed to), and who changed what, when.

Every record is an `AuditEvent` row built by `event()`; the application only ever adds them (no
route edits or deletes one, and migration 0005 makes the database refuse UPDATE and DELETE on
audit_events). Admins read it at /admin/audit and GET /api/admin/audit, filtered by actor, action
and date, and download all of it (or what a filter selects) as CSV or JSON from the export routes,
which stream it a page of rows at a time.

Actions: sign-in, sign-in.failed, sign-out, session.revoke, user.create, user.role, user.password,
user.approve, user.disable, user.enable, user.sign-out, user.limits, api-key.create,
api-key.revoke, api-key.limit, and the adapter registry's publish, activate, rollback, enable,
disable, delete, fail, set-default and set-groups.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import AuditEvent, User

# Actors that are not a signed-in user.
SIGN_IN = "(sign-in)"  # the sign-in itself (a failed attempt; a role the proxy's or provider's groups gave)
SERVER = "(server)"  # the server on its own (an adapter it could not load)
COMMAND_LINE = "(command line)"  # python -m app create-user, set-password, create-api-key

PAGE_ROWS = 200  # rows the page and GET /api/admin/audit show, newest first
EXPORT_BATCH = 500  # rows an export reads per query (each query in a session of its own)
COLUMNS = ("id", "at", "actor", "action", "target", "details")
TARGET_CHARS = 200  # the column's size


class AuditFilterError(ValueError):
    """A filter that cannot be applied; the message names the field and the format it takes."""


@dataclass(frozen=True)
class AuditFilter:
    """Which events to show: all of them when every field is empty."""

    actor: str = ""  # part of the actor's email (or label), any case
    action: str = ""  # an action, or a family of them ("user" is user.role, user.disable, ...)
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive

    def query(self) -> Select[AuditEvent]:
        query = select(AuditEvent)
        if self.actor:
            query = query.where(
                func.lower(AuditEvent.actor_email).contains(self.actor.lower(), autoescape=True)
            )
        if self.action:
            family = AuditEvent.action.startswith(self.action + ".", autoescape=True)
            query = query.where(or_(AuditEvent.action == self.action, family))
        if self.since is not None:
            query = query.where(AuditEvent.at >= self.since)
        if self.until is not None:
            query = query.where(AuditEvent.at < self.until)
        return query

    def as_params(self) -> dict[str, str]:
        """The filter as the query string the page's form sends (for its export links)."""
        params = {"actor": self.actor, "action": self.action}
        params["since"] = self.since.date().isoformat() if self.since else ""
        params["until"] = (self.until - timedelta(days=1)).date().isoformat() if self.until else ""
        return {k: v for k, v in params.items() if v}


def parse_filter(*, actor: str = "", action: str = "", since: str = "", until: str = "") -> AuditFilter:
    """A filter from the page's (or the API's) query string: dates are YYYY-MM-DD, UTC, both inclusive."""

    def day(value: str, field: str) -> date | None:
        if not value.strip():
            return None
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            raise AuditFilterError(f"{field} must be a date as YYYY-MM-DD (got {value[:40]!r})") from None

    first, last = day(since, "since"), day(until, "until")
    if first and last and last < first:
        raise AuditFilterError(f"until ({last}) is before since ({first})")
    return AuditFilter(
        actor=_clean(actor.strip(), 320),
        action=_clean(action.strip(), 32),
        since=datetime.combine(first, time(), UTC) if first else None,
        until=datetime.combine(last + timedelta(days=1), time(), UTC) if last else None,
    )


def event(actor: User | None, action: str, target: str, *, label: str = SERVER, **details: Any) -> AuditEvent:
    """One record, to add to the session of the change it records (so both commit, or neither).

    `label` names the actor when there is no user (SIGN_IN, SERVER, COMMAND_LINE). Text that came
    from outside (an email tried at sign-in) is cut to fit and stripped of NUL, which PostgreSQL
    refuses.
    """
    return AuditEvent(
        actor_id=actor.id if actor else None,
        actor_email=actor.email if actor else label,
        action=action,
        target=_clean(target, TARGET_CHARS),
        details={
            key: _clean(value, 500) if isinstance(value, str) else value for key, value in details.items()
        },
    )


def _clean(text: str, limit: int) -> str:
    return text.replace("\x00", "")[:limit]


async def recent(
    db: AsyncSession, where: AuditFilter = AuditFilter(), *, limit: int = PAGE_ROWS
) -> Sequence[AuditEvent]:
    """The newest `limit` events the filter selects, newest first."""
    return (await db.scalars(where.query().order_by(AuditEvent.id.desc()).limit(limit))).all()


async def every_event(
    sessionmaker: async_sessionmaker[AsyncSession], where: AuditFilter = AuditFilter()
) -> AsyncIterator[AuditEvent]:
    """All the events the filter selects, newest first, read EXPORT_BATCH at a time.

    Each batch is read in a session of its own and the rows after the last one seen (by id) are
    asked for next, so a long download to a slow client holds no connection (nor a transaction)
    between batches, and rows added meanwhile do not shift what comes next.
    """
    before: int | None = None
    while True:
        query = where.query().order_by(AuditEvent.id.desc()).limit(EXPORT_BATCH)
        if before is not None:
            query = query.where(AuditEvent.id < before)
        async with sessionmaker() as db:
            batch = (await db.scalars(query)).all()
        for row in batch:
            yield row
        if len(batch) < EXPORT_BATCH:
            return
        before = batch[-1].id


def as_dict(row: AuditEvent) -> dict[str, Any]:
    at = row.at if row.at.tzinfo is not None else row.at.replace(tzinfo=UTC)  # SQLite's are naive UTC
    return {
        "id": row.id,
        "at": at.isoformat(),
        "actor": row.actor_email,
        "action": row.action,
        "target": row.target,
        "details": row.details,
    }


async def csv_export(rows: AsyncIterator[AuditEvent]) -> AsyncIterator[str]:
    """The rows as CSV, a header line first; details as JSON in one cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    async for row in rows:
        record = as_dict(row)
        record["details"] = json.dumps(record["details"], ensure_ascii=False, sort_keys=True)
        writer.writerow([_no_formula(record[column]) for column in COLUMNS])
        if buffer.tell() > 64 * 1024:
            yield _drain(buffer)
    yield _drain(buffer)


def _no_formula(value: Any) -> Any:
    # A cell that starts with = + - @ runs as a formula when the file is opened in a spreadsheet,
    # and a failed sign-in's email is whatever the stranger typed: such cells get a leading '.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


async def json_export(rows: AsyncIterator[AuditEvent]) -> AsyncIterator[str]:
    """The rows as one JSON array, one object a line."""
    separator = "[\n"
    async for row in rows:
        yield separator + json.dumps(as_dict(row), ensure_ascii=False)
        separator = ",\n"
    yield "[]\n" if separator == "[\n" else "\n]\n"


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text
