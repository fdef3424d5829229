"""Users, browser sessions and API keys: the data functions behind sign-in.

Session tokens and API keys are random; the database keeps only an HMAC of each, keyed with
SECRET_KEY, so a copy of the database alone lets no one in.

People sign in with a password (the login form), through a trusted reverse proxy's headers, or
through OpenID Connect. The last two arrive here as an `ExternalIdentity`: `sign_in_external`
creates the account on first sight (with no usable password), keeps its display name and groups
current, and maps groups to roles (ADMIN_GROUPS). Changing a password or disabling a user ends
every session and API key they hold.

Sessions end at SESSION_TTL_HOURS after sign-in, after SESSION_IDLE_HOURS without a request, or when
revoked (signing out, the account page, an admin); every request looks its session up, so a
revocation takes effect on the next one. Each sign-in, failed sign-in, revocation and key change
writes an audit record (app/audit.py) in the same transaction as the change.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app import audit
from app.auth.passwords import burn_verification_time, hash_password, verify_password
from app.models import ApiKey, AuthSession, Role, SignInMethod, User, utcnow

log = logging.getLogger(__name__)

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


async def create_user(
    db: AsyncSession, *, email: str, password: str, role: Role = Role.USER, actor: User | None = None
) -> User:
    email = normalize_email(email)
    if await get_user_by_email(db, email) is not None:
        raise UserError(f"a user with the email {email} already exists")
    try:
        password_hash = hash_password(password)
    except ValueError as error:
        raise UserError(str(error)) from None
    user = User(email=email, password_hash=password_hash, role=role)
    db.add(user)
    db.add(
        audit.event(actor, "user.create", email, label=audit.COMMAND_LINE, role=role.value, method="password")
    )
    await db.commit()
    return user


async def authenticate(db: AsyncSession, *, email: str, password: str) -> User | None:
    user = await get_user_by_email(db, email)
    if user is None or not user.password_hash:  # unknown, or signs in through the proxy or OIDC
        burn_verification_time(password)
        return None
    if not verify_password(user.password_hash, password) or not user.is_active:
        return None
    user.last_sign_in_at = utcnow()
    return user


# -- sign-in through the proxy or OpenID Connect -----------------------------------------------------


@dataclass(frozen=True)
class ExternalIdentity:
    """Who a trusted reverse proxy or an OpenID provider says is signing in."""

    email: str
    display_name: str
    groups: tuple[str, ...]
    method: SignInMethod


@dataclass(frozen=True)
class SignInPolicy:
    """What the settings say about people who sign in through the proxy or OIDC."""

    admin_groups: frozenset[str] = frozenset()
    require_approval: bool = False

    def role_for(self, groups: Sequence[str], current: Role) -> Role:
        # Without ADMIN_GROUPS roles are managed by hand (the CLI), so a sign-in leaves them alone.
        if not self.admin_groups:
            return current
        return Role.ADMIN if self.admin_groups.intersection(groups) else Role.USER


def parse_groups(value: str) -> tuple[str, ...]:
    """Groups from a comma-separated header, in order, without blanks or repeats."""
    return tuple(dict.fromkeys(group.strip() for group in value.split(",") if group.strip()))


def _is_current(user: User, identity: ExternalIdentity, policy: SignInPolicy) -> bool:
    return (
        list(user.groups) == list(identity.groups)
        and (not identity.display_name or user.display_name == identity.display_name)
        and user.role is policy.role_for(identity.groups, user.role)
    )


async def sign_in_external(db: AsyncSession, identity: ExternalIdentity, policy: SignInPolicy) -> User:
    """Find or create the identity's user and bring its name, groups and role up to date.

    Returns the user even when disabled or waiting for approval: the caller decides what they may
    do. Raises UserError when the identity's email is not an email address.
    """
    email = normalize_email(identity.email)
    user = await get_user_by_email(db, email)
    if user is None:
        role = policy.role_for(identity.groups, Role.USER)
        user = User(
            email=email,
            password_hash="",
            role=role,
            # Membership of an ADMIN_GROUPS group is the organisation's own approval (and someone
            # has to be able to approve the others).
            is_approved=not policy.require_approval or role is Role.ADMIN,
            display_name=identity.display_name[:200],
            groups=list(identity.groups),
            source=identity.method,
            last_sign_in_at=utcnow(),
        )
        db.add(user)
        db.add(
            audit.event(
                None,
                "user.create",
                email,
                label=audit.SIGN_IN,
                role=role.value,
                method=identity.method.value,
                groups=list(identity.groups),
                approved=user.is_approved,
            )
        )
        try:
            await db.commit()
        except IntegrityError:  # the same person's other request created the account first
            await db.rollback()
            found = await get_user_by_email(db, email)
            if found is None:
                raise
            return await sign_in_external(db, identity, policy)
        log.info("created %s on first sign-in through %s", email, identity.method.value)
        return user
    role = policy.role_for(identity.groups, user.role)
    if role is not user.role:
        db.add(
            audit.event(
                None,
                "user.role",
                email,
                label=audit.SIGN_IN,
                role=role.value,
                previous=user.role.value,
                groups=list(identity.groups),
                method=identity.method.value,
            )
        )
    user.role = role
    user.groups = list(identity.groups)
    if identity.display_name:
        user.display_name = identity.display_name[:200]
    user.last_sign_in_at = utcnow()
    await db.commit()
    return user


async def count_users(db: AsyncSession) -> int:
    return int(await db.scalar(select(func.count()).select_from(User)) or 0)


@dataclass(frozen=True)
class Client:
    """Where a request came from: its address (X-Forwarded-For applied from FORWARDED_ALLOW_IPS) and
    browser, recorded with sign-ins."""

    address: str = ""
    user_agent: str = ""


async def start_session(
    db: AsyncSession,
    *,
    user: User,
    secret: bytes,
    ttl: timedelta,
    method: SignInMethod = SignInMethod.PASSWORD,
    client: Client = Client(),
) -> tuple[str, AuthSession]:
    """Create a sign-in session (audited as a sign-in); returns the cookie token (shown once) and the row."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session = AuthSession(
        token_hash=keyed_hash(secret, token),
        user=user,
        csrf_token=secrets.token_urlsafe(32),
        expires_at=now + ttl,
        method=method,
        last_seen_at=now,
        client_address=client.address[:64],
        user_agent=client.user_agent[:300],
    )
    db.add(session)
    db.add(audit.event(user, "sign-in", user.email, method=method.value, client=client.address))
    await db.commit()
    return token, session


async def record_failed_sign_in(
    db: AsyncSession, *, email: str, method: SignInMethod, client: Client, reason: str
) -> None:
    """Audit a refused sign-in: the email tried (as typed, cut to fit) and the client, never the password."""
    db.add(
        audit.event(
            None,
            "sign-in.failed",
            email.strip() or "(no email)",
            label=audit.SIGN_IN,
            method=method.value,
            client=client.address,
            reason=reason,
        )
    )
    await db.commit()


async def proxy_session(
    db: AsyncSession,
    identity: ExternalIdentity,
    policy: SignInPolicy,
    *,
    secret: bytes,
    ttl: timedelta,
    idle: timedelta | None = None,
    client: Client = Client(),
) -> AuthSession | None:
    """The session of a request the trusted proxy vouches for; None for a disabled user.

    The proxy names the user on every request, so there is no cookie: the user's live proxy
    session (the oldest, so concurrent first requests settle on one) carries the CSRF token of
    their pages. When none is live, or the proxy's groups or name differ from the stored ones, the
    request is a sign-in: the user is brought up to date (role included) and, if needed, a session
    made (audited as a sign-in). Otherwise a request costs two reads and, at most once a minute, a
    write of when it was last used.
    """
    user = await get_user_by_email(db, identity.email)
    if user is not None and not user.is_active:
        return None
    session = None
    if user is not None:
        session = await db.scalar(
            select(AuthSession)
            .where(
                AuthSession.user_id == user.id,
                AuthSession.method == SignInMethod.PROXY,
                *_live(utcnow(), idle),
            )
            .order_by(AuthSession.created_at, AuthSession.id)
            .limit(1)
        )
    if user is None or session is None or not _is_current(user, identity, policy):
        user = await sign_in_external(db, identity, policy)
        if session is None and user.is_active:
            _, session = await start_session(
                db, user=user, secret=secret, ttl=ttl, method=SignInMethod.PROXY, client=client
            )
    if session is None or not user.is_active:
        return None
    await touch(db, session)
    return session


# How stale a session's last_seen_at may be: a request writes it at most this often, so idle expiry
# and the account page are this exact, and a busy user costs one write a minute, not one a request.
TOUCH_EVERY = timedelta(minutes=1)


def _live(now: datetime, idle: timedelta | None) -> list[Any]:
    """The conditions a session that still lets its holder in meets."""
    conditions: list[Any] = [AuthSession.revoked_at.is_(None), AuthSession.expires_at > now]
    if idle is not None:
        last = func.coalesce(AuthSession.last_seen_at, AuthSession.created_at)
        conditions.append(last > now - idle)
    return conditions


async def resolve_session(
    db: AsyncSession, *, token: str, secret: bytes, idle: timedelta | None = None
) -> AuthSession | None:
    """The live session the cookie `token` opens: not revoked, expired or idle for `idle`, and of an
    active user; notes that it was used."""
    session = await db.scalar(select(AuthSession).where(AuthSession.token_hash == keyed_hash(secret, token)))
    if session is None or session.revoked_at is not None or not session.user.is_active:
        return None
    now = utcnow()
    if _aware(session.expires_at) <= now:
        return None
    if idle is not None and _aware(session.last_seen_at or session.created_at) <= now - idle:
        return None
    await touch(db, session)
    return session


async def touch(db: AsyncSession, session: AuthSession) -> None:
    """Record that the session was used now (when the record is over TOUCH_EVERY old)."""
    now = utcnow()
    if session.last_seen_at is None or _aware(session.last_seen_at) <= now - TOUCH_EVERY:
        session.last_seen_at = now
        await db.commit()


async def end_session(db: AsyncSession, session: AuthSession) -> None:
    """Sign out: the session's own holder ends it."""
    session.revoked_at = utcnow()
    db.add(audit.event(session.user, "sign-out", session.user.email, session=session.id))
    await db.commit()


async def live_sessions(
    db: AsyncSession, user: User, *, idle: timedelta | None = None
) -> Sequence[AuthSession]:
    """The user's sessions that still let someone in, most recently used first."""
    query = (
        select(AuthSession)
        .where(AuthSession.user_id == user.id, *_live(utcnow(), idle))
        .order_by(
            func.coalesce(AuthSession.last_seen_at, AuthSession.created_at).desc(), AuthSession.id.desc()
        )
    )
    return (await db.scalars(query)).all()


async def revoke_session(db: AsyncSession, *, user: User, session_id: int) -> bool:
    """End one of `user`'s own sessions; False when they have no such live session."""
    session = await db.get(AuthSession, session_id)
    if session is None or session.user_id != user.id or session.revoked_at is not None:
        return False
    session.revoked_at = utcnow()
    db.add(audit.event(user, "session.revoke", user.email, session=session_id, method=session.method.value))
    await db.commit()
    return True


async def end_sessions(db: AsyncSession, *, user: User, actor: User) -> int:
    """End every session of `user` (their API keys stay): "sign out everywhere", by them or an admin.
    Returns how many were live."""
    result = await db.execute(
        update(AuthSession)
        .where(AuthSession.user_id == user.id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    ended = int(getattr(result, "rowcount", 0) or 0)
    db.add(audit.event(actor, "user.sign-out", user.email, sessions=ended))
    await db.commit()
    return ended


async def create_api_key(
    db: AsyncSession, *, user: User, secret: bytes, name: str = "", actor: User | None = None
) -> tuple[str, ApiKey]:
    """Create an API key (`actor`: who asked; None: the command line); returns the key itself
    (shown once) and the stored row."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(user_id=user.id, name=name[:100], prefix=key[:12], key_hash=keyed_hash(secret, key))
    db.add(row)
    db.add(
        audit.event(
            actor, "api-key.create", f"{user.email} key {row.prefix}", label=audit.COMMAND_LINE, name=row.name
        )
    )
    await db.commit()
    return key, row


async def user_api_keys(db: AsyncSession, user: User) -> Sequence[ApiKey]:
    """The user's keys that still work, newest first."""
    query = (
        select(ApiKey)
        .where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.id.desc())
    )
    return (await db.scalars(query)).all()


async def revoke_api_key(db: AsyncSession, *, user: User, key_id: int) -> bool:
    """Revoke one of `user`'s own keys; False when they have no such working key."""
    row = await db.get(ApiKey, key_id)
    if row is None or row.user_id != user.id or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    db.add(audit.event(user, "api-key.revoke", f"{user.email} key {row.prefix}", name=row.name))
    await db.commit()
    return True


async def resolve_api_key(db: AsyncSession, *, key: str, secret: bytes) -> ApiKey | None:
    """The key's row (its user in `.user`), if it is valid and its user active."""
    row = await db.scalar(select(ApiKey).where(ApiKey.key_hash == keyed_hash(secret, key)))
    if row is None or row.revoked_at is not None or not row.user.is_active:
        return None
    row.last_used_at = utcnow()
    await db.commit()
    return row


# -- administration -----------------------------------------------------------------------------------


async def list_users(db: AsyncSession) -> Sequence[User]:
    """Everyone, those waiting for approval first."""
    return (await db.scalars(select(User).order_by(User.is_approved, User.email))).all()


async def active_api_keys(db: AsyncSession) -> Sequence[ApiKey]:
    """Every key that still works, oldest first (for the admins' users page)."""
    query = select(ApiKey).where(ApiKey.revoked_at.is_(None)).order_by(ApiKey.id)
    return (await db.scalars(query)).all()


async def end_all_sign_ins(db: AsyncSession, user: User) -> None:
    """Revoke every session and API key of `user` (committed by the caller)."""
    now = utcnow()
    await db.execute(
        update(AuthSession)
        .where(AuthSession.user_id == user.id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    await db.execute(
        update(ApiKey).where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None)).values(revoked_at=now)
    )


async def set_password(db: AsyncSession, *, user: User, password: str, actor: User | None = None) -> None:
    """Give `user` a new password, and sign them out everywhere: whoever knew the old one (or holds
    a session or key made with it) is out."""
    try:
        user.password_hash = hash_password(password)
    except ValueError as error:
        raise UserError(str(error)) from None
    await end_all_sign_ins(db, user)
    db.add(audit.event(actor, "user.password", user.email, label=audit.COMMAND_LINE))
    await db.commit()


async def set_active(db: AsyncSession, *, user: User, active: bool, actor: User | None = None) -> None:
    """Enable or disable `user`; disabling ends every session and API key they hold."""
    if actor is not None and actor.id == user.id and not active:
        raise UserError("you cannot disable your own account; ask another administrator")
    user.is_active = active
    if not active:
        await end_all_sign_ins(db, user)
    db.add(audit.event(actor, "user.enable" if active else "user.disable", user.email))
    await db.commit()


async def approve(db: AsyncSession, *, user: User, actor: User | None = None) -> None:
    """Let a user who signed in for the first time chat and use the API."""
    if user.is_approved:
        return
    user.is_approved = True
    db.add(audit.event(actor, "user.approve", user.email))
    await db.commit()


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes even for timezone-aware columns; they are UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
