"""Failed password sign-ins, counted per account and address, and a pause past a bound.

Without a bound, anyone who can reach the sign-in form may guess a password as fast as the server
checks them, and every guess adds a row to the audit log. Failures are counted in SQL (the
`rate_windows` table of app/usage.py, one row per subject and minute), so every server process
sharing the database counts the same, over the last `WINDOW_MINUTES`:

- per email as typed and client address: `SIGN_IN_FAILURE_LIMIT` failures (10 by default), then
  that email is refused from that address, with its password unchecked and nothing audited, until
  the oldest failure leaves the window. Counting per address as well as per email means a stranger
  guessing at a colleague's account does not lock the colleague out of their own desk;
- per client address: ten times that, for someone trying many emails (password spraying).

The email and address go into the table only as a keyed hash. `SIGN_IN_FAILURE_LIMIT=0` turns the
bound off. Sign-in through the trusted proxy or OpenID Connect has no password here to guess.
"""

from __future__ import annotations

import math

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.service import keyed_hash
from app.models import RateWindow, utcnow
from app.usage import take_from_window

WINDOW_MINUTES = 15
ADDRESS_FACTOR = 10  # an address may fail this many times the per-account bound, over all emails


def _subjects(secret: bytes, email: str, address: str) -> tuple[str, str]:
    # rate_windows.subject holds 32 characters: a prefix and 28 hex digits of an HMAC.
    account = keyed_hash(secret, f"sign-in\0{email.strip().lower()}\0{address}")[:28]
    everyone = keyed_hash(secret, f"sign-in\0\0{address}")[:28]
    return f"pwa:{account}", f"pwe:{everyone}"


def _minute() -> int:
    return int(utcnow().timestamp() // 60)


async def wait_before_sign_in(
    db: AsyncSession, *, secret: bytes, email: str, address: str, limit: int
) -> int:
    """Seconds until this email may try a password again from this address; 0 when it may now."""
    if limit <= 0:
        return 0
    now = _minute()
    first = now - WINDOW_MINUTES + 1
    waits = []
    for subject, bound in zip(
        _subjects(secret, email, address), (limit, limit * ADDRESS_FACTOR), strict=True
    ):
        rows = (
            await db.execute(
                select(RateWindow.minute, RateWindow.requests)
                .where(RateWindow.subject == subject, RateWindow.minute >= first)
                .order_by(RateWindow.minute)
            )
        ).all()
        failures = sum(count for _, count in rows)
        if failures >= bound:
            # Free again when enough of the oldest minutes have left the window.
            over, freed_at = failures - bound + 1, now + 1
            for minute, count in rows:
                over -= count
                if over <= 0:
                    freed_at = minute + WINDOW_MINUTES
                    break
            waits.append(max(1, math.ceil(freed_at * 60 - utcnow().timestamp())))
    return max(waits, default=0)


async def count_failed_sign_in(db: AsyncSession, *, secret: bytes, email: str, address: str) -> None:
    """Count one failed password sign-in (the caller commits), and drop minutes past the window."""
    now = _minute()
    subjects = _subjects(secret, email, address)
    for subject in subjects:
        await take_from_window(db, subject, now)
    await db.execute(
        delete(RateWindow).where(RateWindow.subject.in_(subjects), RateWindow.minute <= now - WINDOW_MINUTES)
    )
