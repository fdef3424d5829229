"""The adapter registry's data functions: publish, activate, roll back, enable, disable, delete, default.

Every change writes an audit record and bumps the registry's revision in the same transaction, so
every server process polling the revision picks the change up (see catalog.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from app import audit
from app.models import Adapter, AdapterStatus, AdapterVersion, RegistryState, User
from app.registry.inspect import AdapterFacts
from app.registry.store import StoredAdapter

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class RegistryError(ValueError):
    """A registry change that cannot be made; the message says why. `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def check_name(name: str, *, base_name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise RegistryError(
            f"{name!r} is not a valid adapter name: use 1 to 64 lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit",
            400,
        )
    if name == base_name:
        raise RegistryError(f"{name!r} is the base model's name; choose another", 400)
    return name


async def revision(db: AsyncSession) -> int:
    return int(await db.scalar(select(RegistryState.revision).where(RegistryState.id == 1)) or 0)


SERVER = audit.SERVER  # the actor recorded for changes the server makes itself


async def _changed(db: AsyncSession, actor: User | None, action: str, target: str, **details: Any) -> None:
    db.add(audit.event(actor, action, target, label=SERVER, **details))
    await db.execute(
        update(RegistryState).where(RegistryState.id == 1).values(revision=RegistryState.revision + 1)
    )
    await db.commit()


async def list_adapters(db: AsyncSession) -> Sequence[Adapter]:
    query = select(Adapter).options(selectinload(Adapter.versions)).order_by(Adapter.name)
    return (await db.scalars(query)).all()


async def get_adapter(db: AsyncSession, name: str) -> Adapter:
    if "\x00" in name:  # PostgreSQL refuses a NUL in a query (a 500); no adapter's name has one
        raise RegistryError(f"there is no adapter named {name!r}", 404)
    adapter = await db.scalar(
        select(Adapter).options(selectinload(Adapter.versions)).where(Adapter.name == name)
    )
    if adapter is None:
        raise RegistryError(f"there is no adapter named {name!r}", 404)
    return adapter


# More adapters than any registry holds; a bound, so a scrape's query stays small whatever happens.
MAX_ADAPTERS_EXPORTED = 1000


@dataclass(frozen=True)
class NewestVersion:
    """An adapter's newest version, with the training figures its manifest recorded."""

    name: str
    version: int
    published_at: datetime
    trained_versions: int  # versions of this adapter that training published (source "training")
    training: dict[str, Any]  # the figures asked for that its metrics hold, values as written (any JSON)


async def newest_versions(db: AsyncSession, *, figures: Sequence[str]) -> list[NewestVersion]:
    """Each adapter's newest version (by number), for /metrics: one row per adapter, in one query,
    with the `figures` (keys of its manifest's "metrics") it recorded. Only those keys are read: the
    loss curve beside them is kilobytes.

    The newest rather than the served one: after a rollback the figures still describe the last
    training run published.
    """
    per_adapter = (
        select(
            AdapterVersion.adapter_id,
            func.max(AdapterVersion.version).label("newest"),
            func.sum(case((AdapterVersion.source == "training", 1), else_=0)).label("trained"),
        )
        .group_by(AdapterVersion.adapter_id)
        .subquery()
    )
    recorded = [AdapterVersion.metrics[key].label(f"figure_{i}") for i, key in enumerate(figures)]
    query = (
        select(
            Adapter.name, AdapterVersion.version, AdapterVersion.created_at, per_adapter.c.trained, *recorded
        )
        .join(per_adapter, per_adapter.c.adapter_id == Adapter.id)
        .join(
            AdapterVersion,
            (AdapterVersion.adapter_id == Adapter.id) & (AdapterVersion.version == per_adapter.c.newest),
        )
        .order_by(Adapter.name)
        .limit(MAX_ADAPTERS_EXPORTED)
    )
    newest = []
    for row in await db.execute(query):
        published = row.created_at
        if published.tzinfo is None:  # SQLite gives back the UTC time it stored, without its zone
            published = published.replace(tzinfo=UTC)
        values = row[4:]
        training = {key: value for key, value in zip(figures, values, strict=True) if value is not None}
        newest.append(NewestVersion(row.name, row.version, published, int(row.trained or 0), training))
    return newest


def _version(adapter: Adapter, number: int) -> AdapterVersion:
    found = next((v for v in adapter.versions if v.version == number), None)
    if found is None:
        raise RegistryError(f"adapter {adapter.name!r} has no version {number}", 404)
    return found


async def publish_version(
    db: AsyncSession,
    *,
    name: str,
    facts: AdapterFacts,
    stored: StoredAdapter,
    source: str,
    notes: str,
    actor: User,
) -> AdapterVersion:
    """Register a validated, stored adapter as the next version of `name`, and make it the one served."""
    adapter = await db.scalar(select(Adapter).where(Adapter.name == name))
    if adapter is None:
        adapter = Adapter(name=name)
        db.add(adapter)
        await db.flush()
    number = int(
        await db.scalar(select(func.coalesce(func.max(AdapterVersion.version), 0)).where(
            AdapterVersion.adapter_id == adapter.id
        ))
        or 0
    ) + 1  # fmt: skip
    version = AdapterVersion(
        adapter_id=adapter.id,
        version=number,
        base_model=facts.base_model,
        base_fingerprint=facts.base_fingerprint,
        peft_type=facts.peft_type,
        rank=facts.rank,
        alpha=facts.alpha,
        target_modules=list(facts.target_modules),
        prompt_template=facts.prompt_template,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        source=source,
        notes=notes,
        metrics=facts.metrics,
        created_by_id=actor.id,
    )
    db.add(version)
    adapter.active_version = number
    await _changed(db, actor, "publish", f"{name}@{number}", source=source, sha256=stored.sha256)
    return version


async def activate_version(db: AsyncSession, *, name: str, version: int, actor: User) -> None:
    """Serve `version` under `name` from the next request on (a rollback when it is older)."""
    adapter = await get_adapter(db, name)
    chosen = _version(adapter, version)
    if chosen.status is not AdapterStatus.READY:
        raise RegistryError(f"{name}@{version} is {chosen.status.value}; enable it before serving it")
    previous = adapter.active_version
    adapter.active_version = version
    action = "rollback" if previous is not None and version < previous else "activate"
    await _changed(db, actor, action, f"{name}@{version}", previous=previous)


async def set_enabled(db: AsyncSession, *, name: str, version: int, enabled: bool, actor: User) -> None:
    adapter = await get_adapter(db, name)
    chosen = _version(adapter, version)
    if chosen.status is AdapterStatus.FAILED:
        raise RegistryError(
            f"{name}@{version} failed ({chosen.status_reason}); upload a fixed version instead"
        )
    if not enabled and adapter.is_default and adapter.active_version == version:
        raise RegistryError(
            f"{name}@{version} serves the default for new conversations; choose another default first"
        )
    chosen.status = AdapterStatus.READY if enabled else AdapterStatus.DISABLED
    await _changed(db, actor, "enable" if enabled else "disable", f"{name}@{version}")


async def delete_version(db: AsyncSession, *, name: str, version: int, actor: User) -> str | None:
    """Delete a version that is not being served; returns its sha256 if no version uses its files any more."""
    adapter = await get_adapter(db, name)
    chosen = _version(adapter, version)
    if adapter.is_default and adapter.active_version == version:
        raise RegistryError(f"{name}@{version} serves new conversations by default; choose another default")
    if adapter.active_version == version and len(adapter.versions) > 1:
        raise RegistryError(f"{name}@{version} is what {name!r} serves; activate another version first")
    sha256 = chosen.sha256
    if len(adapter.versions) == 1:
        await db.delete(adapter)  # its last version: the name goes too
    else:
        await db.delete(chosen)
    await _changed(db, actor, "delete", f"{name}@{version}", sha256=sha256)
    return None if await sha256_in_use(db, sha256) else sha256


async def sha256_in_use(db: AsyncSession, sha256: str) -> bool:
    """Whether any version (of any adapter) still uses the stored files with this content hash."""
    query = select(func.count()).select_from(AdapterVersion).where(AdapterVersion.sha256 == sha256)
    return bool(await db.scalar(query))


async def mark_failed(db: AsyncSession, *, adapter: Adapter, version: AdapterVersion, reason: str) -> None:
    """A version the server cannot serve: record why, so admins see it and requests get a clear no."""
    version.status = AdapterStatus.FAILED
    version.status_reason = reason
    await _changed(db, None, "fail", f"{adapter.name}@{version.version}", reason=reason)


async def set_default(db: AsyncSession, *, name: str | None, actor: User) -> None:
    """Make `name` (None: the bare base model) the adapter new conversations start with."""
    if name is not None:
        adapter = await get_adapter(db, name)
        active = next((v for v in adapter.versions if v.version == adapter.active_version), None)
        if active is None or active.status is not AdapterStatus.READY:
            raise RegistryError(f"{name!r} has no ready version to serve; activate one first")
    await db.execute(update(Adapter).values(is_default=Adapter.name == name if name is not None else False))
    await _changed(db, actor, "set-default", name or "(base model)")


MAX_GROUPS = 100
MAX_GROUP_LENGTH = 200


def clean_groups(groups: Sequence[str]) -> list[str]:
    """Group names as stored: trimmed, without duplicates or empties, sorted; refused when unusable."""
    cleaned = sorted({g.strip() for g in groups if g.strip()})
    for group in cleaned:
        if len(group) > MAX_GROUP_LENGTH or "," in group or not group.isprintable():
            raise RegistryError(
                f"{group[:60]!r} is not a group name: "
                f"at most {MAX_GROUP_LENGTH} printable characters, no commas",
                400,
            )
    if len(cleaned) > MAX_GROUPS:
        raise RegistryError(f"{len(cleaned)} groups; an adapter can be open to at most {MAX_GROUPS}", 400)
    return cleaned


async def set_groups(db: AsyncSession, *, name: str, groups: Sequence[str], actor: User) -> list[str]:
    """Open adapter `name` to members of `groups` only (empty: to everyone); admins always may use it.

    Users outside the groups no longer see it, and requests naming it answer as for a name that does
    not exist, from each server's next registry refresh on. Returns the groups as stored.
    """
    adapter = await get_adapter(db, name)
    cleaned = clean_groups(groups)
    previous = list(adapter.allowed_groups or [])
    if cleaned == previous:
        return cleaned
    adapter.allowed_groups = cleaned
    await _changed(db, actor, "set-groups", name, groups=cleaned, previous=previous)
    return cleaned
