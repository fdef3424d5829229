"""What this server can serve right now: an in-memory view of the registry, kept fresh by polling.

Requests resolve `model` / a conversation's adapter here, without a database round trip, and only
among the adapters open to the user asking (an adapter restricted to groups the user is not in is,
for them, one that does not exist; admins see all). Each
server process polls the registry's revision counter (one indexed row) every few seconds and
reloads the view when it moved, so a change made through any process is served by all of them
shortly after; adapter versions that stopped being servable are unloaded from the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.llm.adapters import AdapterRef
from app.llm.engine import GenerationEngine
from app.models import AdapterStatus, User
from app.registry import service
from app.registry.store import AdapterStore

log = logging.getLogger(__name__)


MISSING_FILES = "its files are missing from the adapter store; upload this version again"


def content_key(sha256: str) -> str:
    """The engine's name for an adapter: by content, so it is known before the version is registered,
    equal in every process, and shared by versions with the same files."""
    return f"adapter-{sha256[:16]}"


class UnknownModel(LookupError):
    """No adapter (or base model) of that name is served here. The message is the API's (it points
    at GET /v1/models); `in_chat` says the same to someone choosing in the browser."""

    def __init__(self, message: str, *, in_chat: str) -> None:
        super().__init__(message)
        self.in_chat = in_chat


@dataclass(frozen=True)
class ServedVersion:
    name: str
    version: int
    version_id: int
    sha256: str
    status: AdapterStatus
    prompt_template: str

    @property
    def ready(self) -> bool:
        return self.status is AdapterStatus.READY

    @property
    def key(self) -> str:
        return content_key(self.sha256)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Snapshot:
    revision: int = -1
    active: dict[str, int] = field(default_factory=dict)  # name -> active version number
    versions: dict[tuple[str, int], ServedVersion] = field(default_factory=dict)
    default: str | None = None
    groups: dict[str, frozenset[str]] = field(default_factory=dict)  # name -> allowed groups (empty: all)

    def servable_keys(self) -> set[str]:
        return {v.key for v in self.versions.values() if v.ready}


class Catalog:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        store: AdapterStore,
        engine: GenerationEngine,
        *,
        base_name: str,
        poll_seconds: float = 2.0,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._store = store
        self._engine = engine
        self.base_name = base_name
        self.poll_seconds = poll_seconds
        self.snapshot = Snapshot()
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._preloading: asyncio.Task[None] | None = None
        self._preload_wanted = False

    # -- reading -------------------------------------------------------------------------------

    def may_use(self, user: User | None, name: str) -> bool:
        """Whether `user` may use adapter `name`: admins and everyone for an unrestricted adapter, else
        members of one of its groups. None stands for the server itself (admin pages): all."""
        allowed = self.snapshot.groups.get(name)
        return user is None or user.is_admin or not allowed or not allowed.isdisjoint(user.groups)

    def ready_names(self, user: User | None = None) -> list[str]:
        """Adapter names whose active version can be served (to `user`), for pickers and /v1/models."""
        snap = self.snapshot
        return sorted(
            name
            for name, number in snap.active.items()
            if snap.versions[(name, number)].ready and self.may_use(user, name)
        )

    @property
    def default(self) -> str | None:
        return self.snapshot.default

    def default_for(self, user: User) -> str | None:
        """The adapter `user`'s new conversations start with: the default, or the bare base model
        (None) when the default is restricted to groups they are not in."""
        default = self.snapshot.default
        return default if default is not None and self.may_use(user, default) else None

    def resolve(self, model: str | None, user: User | None = None) -> ServedVersion | None:
        """`name` (its active version), `name@N` (pinned), or the base model's name / None (no adapter).

        With `user`, an adapter they may not use is answered exactly as one that does not exist.
        """
        if model is None or model == self.base_name:
            return None
        snap = self.snapshot
        name, _, pinned = model.partition("@")
        if name not in snap.active or not self.may_use(user, name):
            raise UnknownModel(
                f"the model '{model}' does not exist; GET /v1/models lists the models served here",
                in_chat=f"the adapter '{model}' is not available; choose another one in the list",
            )
        if pinned:
            if not pinned.isdigit() or (name, int(pinned)) not in snap.versions:
                message = f"adapter '{name}' has no version '{pinned}'"
                raise UnknownModel(message, in_chat=message)
            served = snap.versions[(name, int(pinned))]
        else:
            served = snap.versions[(name, snap.active[name])]
        if not served.ready:
            message = (
                f"adapter '{served.label}' is {served.status.value}; an admin can enable or activate another"
            )
            raise UnknownModel(message, in_chat=message)
        return served

    def ref(self, served: ServedVersion) -> AdapterRef:
        return AdapterRef(key=served.key, path=self._store.path(served.sha256), label=served.label)

    # -- keeping fresh -------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Reload the view if the registry changed since we last looked; unload what left it."""
        async with self._lock, self._sessionmaker() as db:
            current = await service.revision(db)
            if current == self.snapshot.revision:
                return
            adapters = await service.list_adapters(db)
            for adapter in adapters:
                for v in adapter.versions:
                    if v.status is AdapterStatus.READY and not self._store.has(v.sha256):
                        # The store is shared; someone removed files from under us. Say so once,
                        # in the registry, rather than failing every request that names it.
                        await service.mark_failed(db, adapter=adapter, version=v, reason=MISSING_FILES)
        active: dict[str, int] = {}
        versions: dict[tuple[str, int], ServedVersion] = {}
        groups: dict[str, frozenset[str]] = {}
        default = None
        for adapter in adapters:
            groups[adapter.name] = frozenset(adapter.allowed_groups or ())
            if adapter.active_version is not None:
                active[adapter.name] = adapter.active_version
            if adapter.is_default:
                default = adapter.name
            for v in adapter.versions:
                versions[(adapter.name, v.version)] = ServedVersion(
                    adapter.name,
                    v.version,
                    v.id,
                    v.sha256,
                    v.status,
                    v.prompt_template,
                )
        gone = self.snapshot.servable_keys()
        self.snapshot = Snapshot(current, active, versions, default, groups)
        for key in gone - self.snapshot.servable_keys():
            await self._engine.remove_adapter(key)
        log.info("registry revision %d: %d adapters", current, len(active))
        self._preload_wanted = True  # a preload already running goes round again with this view
        if self._preloading is None or self._preloading.done():
            self._preloading = asyncio.create_task(self._preload(), name="adapter-preload")

    async def _preload(self) -> None:
        """Load the active adapters into the engine's free slots, the default first, so that first
        requests do not wait for files (at start-up, and when another process activated a version).
        Only free slots: adapters in use are never pushed out for one nobody asked for yet."""
        while self._preload_wanted:
            self._preload_wanted = False
            snap = self.snapshot
            for name in sorted(snap.active, key=lambda name: (name != snap.default, name)):
                served = snap.versions[(name, snap.active[name])]
                if not served.ready or snap is not self.snapshot:
                    continue
                try:
                    await self._engine.preload_adapter(self.ref(served))
                except Exception as error:  # its own requests will say what is wrong with it
                    log.warning("could not preload adapter %s: %s", served.label, error)

    def start_polling(self) -> None:
        self._poller = asyncio.create_task(self._poll(), name="registry-poller")

    async def stop_polling(self) -> None:
        for task in (self._poller, self._preloading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.refresh()
            except Exception:  # a database hiccup must not stop the polling
                log.exception("could not refresh the adapter registry")
