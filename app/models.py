"""The SQL schema: users, their sign-in sessions and API keys, conversations and messages.

Change it only together with an Alembic migration (`alembic revision --autogenerate`);
`tests/test_migrations.py` fails when the two disagree.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    # Named constraints, so migrations can alter them on every database.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON, list[str]: JSON}


class Role(enum.StrEnum):
    ADMIN = "admin"
    USER = "user"


class SignInMethod(enum.StrEnum):
    PASSWORD = "password"  # the login form
    PROXY = "proxy"  # headers from a trusted reverse proxy (TRUSTED_PROXY_ADDRESSES)
    OIDC = "oidc"  # OpenID Connect


class MessageRole(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class AdapterStatus(enum.StrEnum):
    READY = "ready"  # validated and servable
    DISABLED = "disabled"  # kept, but not served until enabled again
    FAILED = "failed"  # could not be served; `status_reason` says why


class MessageStatus(enum.StrEnum):
    STREAMING = "streaming"  # a generation job is writing it
    COMPLETE = "complete"  # the model finished (end of text, stop sequence or token limit)
    STOPPED = "stopped"  # the user pressed Stop; the partial reply is kept
    FAILED = "failed"  # the generation failed; `error` says why
    INTERRUPTED = "interrupted"  # the server stopped mid-reply; the partial reply is kept


def _enum(kind: type[enum.StrEnum], name: str) -> Enum:
    # Stored as plain strings (no native ENUM type): portable, readable in SQL, easy to extend.
    return Enum(kind, name=name, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    # Empty for people who sign in through the proxy or OIDC: no password matches it.
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(_enum(Role, "user_role"), default=Role.USER)
    is_active: Mapped[bool] = mapped_column(default=True)
    # False while a new user waits for an admin (NEW_USERS_REQUIRE_APPROVAL).
    is_approved: Mapped[bool] = mapped_column(default=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    # The groups the proxy or the OIDC provider named at the last sign-in, as a JSON list of
    # strings (for ADMIN_GROUPS, and for restricting adapters to groups).
    groups: Mapped[list[str]] = mapped_column(default=list)
    # How the account came to be: the CLI (password), or a first sign-in through the proxy or OIDC.
    source: Mapped[SignInMethod] = mapped_column(
        _enum(SignInMethod, "sign_in_method"), default=SignInMethod.PASSWORD
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_sign_in_at: Mapped[datetime | None] = mapped_column(default=None)
    # An admin's overrides of RATE_LIMIT_PER_MINUTE and DAILY_TOKEN_QUOTA for this user: None
    # follows the setting, 0 is unlimited (see app/usage.py).
    rate_limit_per_minute: Mapped[int | None] = mapped_column(default=None)
    daily_token_quota: Mapped[int | None] = mapped_column(BigInteger, default=None)

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


class AuthSession(Base):
    """A browser sign-in. The cookie holds a random token; we keep only its keyed hash."""

    __tablename__ = "auth_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    method: Mapped[SignInMethod] = mapped_column(
        _enum(SignInMethod, "session_method"), default=SignInMethod.PASSWORD
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # When a request last used it (at most a minute stale: see app.auth.service.touch), for
    # SESSION_IDLE_HOURS and the account page; None: not since it was made.
    last_seen_at: Mapped[datetime | None] = mapped_column(default=None)
    # Where it was made from, shown on the account page so people recognise their sessions.
    client_address: Mapped[str] = mapped_column(String(64), default="", server_default="")
    user_agent: Mapped[str] = mapped_column(String(300), default="", server_default="")

    user: Mapped[User] = relationship(lazy="joined")


class ApiKey(Base):
    """A bearer key for the OpenAI-compatible API; shown once, stored as a keyed hash."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to recognise a key in lists
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # This key's own requests-per-minute limit, within its user's: None follows
    # API_KEY_RATE_LIMIT_PER_MINUTE, 0 is no limit of its own.
    rate_limit_per_minute: Mapped[int | None] = mapped_column(default=None)

    user: Mapped[User] = relationship(lazy="joined")


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_user_updated", "user_id", "updated_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200), default="New chat")
    # The adapter this conversation talks to, by name (its active version); None is the bare base.
    adapter_name: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        order_by="Message.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_conversation_position", "conversation_id", "position", unique=True),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    position: Mapped[int]  # order within the conversation
    role: Mapped[MessageRole] = mapped_column(_enum(MessageRole, "message_role"))
    content: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[MessageStatus] = mapped_column(
        _enum(MessageStatus, "message_status"), default=MessageStatus.COMPLETE
    )
    # Why the model stopped: stop (end of text or a stop sequence) or length (token limit).
    finish_reason: Mapped[str | None] = mapped_column(String(16), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    prompt_tokens: Mapped[int | None] = mapped_column(default=None)
    completion_tokens: Mapped[int | None] = mapped_column(default=None)
    time_to_first_token_ms: Mapped[int | None] = mapped_column(default=None)
    duration_ms: Mapped[int | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")


class Adapter(Base):
    """A named LoRA adapter. Its `active_version` is what the name serves; rollback moves it back."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    active_version: Mapped[int | None] = mapped_column(default=None)
    # At most one adapter is the default for new conversations; none means the bare base model.
    is_default: Mapped[bool] = mapped_column(default=False)
    # The user groups that may use it (a JSON list); empty: everyone. Admins always may.
    allowed_groups: Mapped[list[str]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[AdapterVersion]] = relationship(
        back_populates="adapter",
        order_by="AdapterVersion.version",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class AdapterVersion(Base):
    """One uploaded or trained version of an adapter, with what we checked about it."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version", name="uq_adapter_versions_adapter_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    version: Mapped[int]
    base_model: Mapped[str] = mapped_column(String(300))  # the base it was trained for, as it names it
    base_fingerprint: Mapped[str] = mapped_column(String(64))  # app.llm.loader.base_fingerprint
    peft_type: Mapped[str] = mapped_column(String(32))
    rank: Mapped[int]
    alpha: Mapped[float]
    target_modules: Mapped[list[str]]
    prompt_template: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))  # of its files; names its directory in the store
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))  # upload | training
    notes: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    status: Mapped[AdapterStatus] = mapped_column(
        _enum(AdapterStatus, "adapter_status"), default=AdapterStatus.READY
    )
    status_reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), default=None
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    adapter: Mapped[Adapter] = relationship(back_populates="versions")
    created_by: Mapped[User | None] = relationship(lazy="joined")


class AuditEvent(Base):
    """Who did what, to which adapter or user, and every sign-in (failed ones too): written by the
    application (app/audit.py), never edited or deleted by it; migration 0005 makes the database
    refuse UPDATE and DELETE on the table as well."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)
    actor_email: Mapped[str] = mapped_column(String(320))  # kept when the user is deleted
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(200))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class RegistryState(Base):
    """One row whose revision goes up with every registry change; servers poll it to converge."""

    __tablename__ = "registry_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger, default=0)


class RateWindow(Base):
    """Requests admitted in one minute for one subject ("user:<id>" or "key:<id>"), or failed
    password sign-ins ("pwa:"/"pwe:" and a keyed hash, app/auth/throttle.py): a fixed-window counter
    in SQL, so every server process sharing the database counts the same."""

    __tablename__ = "rate_windows"

    subject: Mapped[str] = mapped_column(String(32), primary_key=True)
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # minutes since the Unix epoch
    requests: Mapped[int] = mapped_column(default=0)


class DailyUsage(Base):
    """What one user asked of the model on one UTC day: requests admitted and tokens used."""

    __tablename__ = "daily_usage"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    requests: Mapped[int] = mapped_column(default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    last_request_at: Mapped[datetime | None] = mapped_column(default=None)
