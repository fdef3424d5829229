"""Users, browser sessions and API keys: the data functions behind sign-in.

Session tokens and API keys are random; the database keeps only an HMAC of each, keyed with
SECRET_KEY, so a copy of the database alone lets no one in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.passwords import burn_verification_time, hash_password, verify_password
from app.models import ApiKey, AuthSession, Role, User, utcnow

API_KEY_PREFIX = "pgpt-"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")


class UserError(ValueError):
    """Bad input for a user operation; the message names what is wrong."""


def keyed_hash(secret: bytes, token: str) -> str:
    return hmac.new(secret, token.encode(), hashlib.sha256).hexdigest()


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if not _EMAIL.match(email) or len(email) > 320:
        raise UserError(f"{email!r} is not an email address")
    return email


async def get_user_by_email(db: AsyncSession, email: str) -> User | None:
    return await db.scalar(select(User).where(User.email == email.strip().lower()))


async def create_user(db: AsyncSession, *, email: str, password: str, role: Role = Role.USER) -> User:
    email = normalize_email(email)
    if await get_user_by_email(db, email) is not None:
        raise UserError(f"a user with the email {email} already exists")
    try:
        password_hash = hash_password(password)
    except ValueError as error:
        raise UserError(str(error)) from None
    user = User(email=email, password_hash=password_hash, role=role)
    db.add(user)
    await db.commit()
    return user


async def authenticate(db: AsyncSession, *, email: str, password: str) -> User | None:
    user = await get_user_by_email(db, email)
    if user is None:
        burn_verification_time(password)
        return None
    if not verify_password(user.password_hash, password) or not user.is_active:
        return None
    return user


async def count_users(db: AsyncSession) -> int:
    return int(await db.scalar(select(func.count()).select_from(User)) or 0)


async def start_session(
    db: AsyncSession, *, user: User, secret: bytes, ttl: timedelta
) -> tuple[str, AuthSession]:
    """Create a sign-in session; returns the cookie token (shown once) and the row."""
    token = secrets.token_urlsafe(32)
    session = AuthSession(
        token_hash=keyed_hash(secret, token),
        user_id=user.id,
        csrf_token=secrets.token_urlsafe(32),
        expires_at=utcnow() + ttl,
    )
    db.add(session)
    await db.commit()
    return token, session


async def resolve_session(db: AsyncSession, *, token: str, secret: bytes) -> AuthSession | None:
    session = await db.scalar(select(AuthSession).where(AuthSession.token_hash == keyed_hash(secret, token)))
    if session is None or session.revoked_at is not None or not session.user.is_active:
        return None
    if _aware(session.expires_at) <= utcnow():
        return None
    return session


async def end_session(db: AsyncSession, session: AuthSession) -> None:
    session.revoked_at = utcnow()
    await db.commit()


async def create_api_key(
    db: AsyncSession, *, user: User, secret: bytes, name: str = ""
) -> tuple[str, ApiKey]:
    """Create an API key; returns the key itself (shown once) and the stored row."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(user_id=user.id, name=name[:100], prefix=key[:12], key_hash=keyed_hash(secret, key))
    db.add(row)
    await db.commit()
    return key, row


async def resolve_api_key(db: AsyncSession, *, key: str, secret: bytes) -> User | None:
    row = await db.scalar(select(ApiKey).where(ApiKey.key_hash == keyed_hash(secret, key)))
    if row is None or row.revoked_at is not None or not row.user.is_active:
        return None
    row.last_used_at = utcnow()
    await db.commit()
    return row.user


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes even for timezone-aware columns; they are UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
