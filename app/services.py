"""The services the server builds once at start-up and hands to every request."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from fastapi.templating import Jinja2Templates
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.auth.oidc import OidcClient
from app.auth.proxy import TrustedProxy
from app.auth.service import SignInPolicy
from app.chat.conversations import mark_interrupted_replies
from app.chat.jobs import JobManager
from app.chat.render import loss_sparkline, render_markdown
from app.chat.replies import ReplySettings
from app.config import Settings
from app.db import create_engine, create_sessionmaker
from app.llm.demo import ensure_demo_model, is_demo_model
from app.llm.engine import GenerationEngine
from app.llm.loader import LoadedModel, ModelLoadError, ModelSpec, load_model
from app.models import utcnow
from app.observability import ServerMetrics
from app.registry.archive import ArchiveLimits
from app.registry.catalog import Catalog
from app.registry.inspect import BaseIdentity
from app.registry.intake import Intake
from app.registry.store import AdapterStore
from app.replicas import ReplicaPresence
from app.usage import LimitDefaults

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
# Longer than any reply runs (MAX_NEW_TOKENS_LIMIT tokens, after its wait in the queue): a reply
# still "streaming" after this long was cut by a stop, whichever replica ran it.
LONGEST_REPLY = timedelta(hours=1)


class StartupError(RuntimeError):
    """The server cannot start as configured; the message says what to change."""


@dataclass
class Services:
    settings: Settings
    secret: bytes
    db_engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    model: LoadedModel
    engine: GenerationEngine
    jobs: JobManager
    templates: Jinja2Templates
    is_demo_model: bool
    store: AdapterStore
    catalog: Catalog
    intake: Intake
    metrics: ServerMetrics
    # Enterprise sign-in, each None when not configured.
    trusted_proxy: TrustedProxy | None = None
    oidc: OidcClient | None = None
    sign_in_policy: SignInPolicy = field(default_factory=SignInPolicy)
    # This process's presence among the replicas sharing the database (app/replicas.py).
    presence: ReplicaPresence | None = None

    @property
    def reply_settings(self) -> ReplySettings:
        s = self.settings
        return ReplySettings(
            system_prompt=s.system_prompt,
            max_tokens=min(s.max_new_tokens, self.model.context_window // 2),
            temperature=s.default_temperature,
            top_p=s.default_top_p,
        )

    @property
    def limit_defaults(self) -> LimitDefaults:
        s = self.settings
        return LimitDefaults(
            rate_limit_per_minute=s.rate_limit_per_minute,
            api_key_rate_limit_per_minute=s.api_key_rate_limit_per_minute,
            daily_token_quota=s.daily_token_quota,
        )

    async def close(self) -> None:
        await self.catalog.stop_polling()
        await self.jobs.shutdown()
        await asyncio.to_thread(self.engine.shutdown)
        await self.db_engine.dispose()
        if self.presence is not None:
            await self.presence.leave()


def load_configured_model(settings: Settings) -> LoadedModel:
    """Load MODEL_ID, or build (once) and load the embedded demo model when none is set."""
    if settings.uses_demo_model:
        ensure_demo_model(settings.demo_model_dir)
    spec = ModelSpec(
        path_or_id=settings.model_path_or_id,
        quantization=settings.quantization.value,
        device=settings.device,
        context_window=settings.context_window,
    )
    try:
        return load_model(spec)
    except ModelLoadError as error:
        raise StartupError(f"cannot start: {error}") from None


async def build_services(settings: Settings, *, metrics: ServerMetrics) -> Services:
    """Everything the requests share. `metrics` comes from create_app: its HTTP middleware records
    into the same registry, and exists before the lifespan runs."""
    secret = settings.secret()
    db_engine = create_engine(settings.sqlalchemy_url)
    sessionmaker = create_sessionmaker(engine=db_engine)
    presence = await ReplicaPresence.join(settings.sqlalchemy_url)
    # Alone, every reply left streaming was cut by a stop. With other replicas running, the recent
    # ones may be theirs, live: only replies older than any reply runs are marked.
    begun_before = None if presence.alone else utcnow() - LONGEST_REPLY
    async with sessionmaker() as db:
        interrupted = await mark_interrupted_replies(db, begun_before=begun_before)
    if interrupted:
        log.warning(
            "%d replies were cut off by the last shutdown; they keep their text, marked interrupted",
            interrupted,
        )
    model = await asyncio.to_thread(load_configured_model, settings)
    try:  # in a thread: KEEP_DEQUANTIZED_WEIGHTS dequantizes every layer first
        engine = await asyncio.to_thread(
            GenerationEngine,
            model,
            max_running=settings.running_generations(model.device.type),
            max_queued=settings.max_queued_generations,
            max_batch_tokens=settings.max_batch_tokens,
            prefill_chunk=settings.prefill_chunk_tokens,
            cuda_graphs=settings.cuda_graphs,
            keep_dequantized_weights=settings.keep_dequantized_weights,
            max_adapters=settings.max_resident_adapters,
            metrics=metrics.engine,
        )
    except ModelLoadError as error:  # KEEP_DEQUANTIZED_WEIGHTS without the memory for it
        raise StartupError(f"cannot start: {error}") from None
    engine.start()
    templates = Jinja2Templates(directory=TEMPLATES_DIR)
    templates.env.filters["markdown"] = render_markdown
    templates.env.filters["sparkline"] = loss_sparkline
    store = AdapterStore(settings.adapter_store_dir)
    if swept := store.sweep_incoming():
        log.warning("removed %d unfinished adapter uploads left by a stopped server", swept)
    catalog = Catalog(
        sessionmaker,
        store,
        engine,
        base_name=settings.model_name,
        poll_seconds=settings.registry_poll_seconds,
    )
    await catalog.refresh()
    catalog.start_polling()
    intake = Intake(
        store=store,
        engine=engine,
        catalog=catalog,
        base=BaseIdentity(
            model_id=settings.model_path_or_id, served_name=settings.model_name, fingerprint=model.fingerprint
        ),
        limits=ArchiveLimits(max_archive_bytes=settings.max_adapter_upload_mb * 2**20),
        max_rank=settings.max_adapter_rank,
    )
    return Services(
        settings=settings,
        secret=secret,
        db_engine=db_engine,
        sessionmaker=sessionmaker,
        model=model,
        engine=engine,
        jobs=JobManager(sessionmaker),
        templates=templates,
        is_demo_model=is_demo_model(settings.model_path_or_id),
        store=store,
        catalog=catalog,
        intake=intake,
        metrics=metrics,
        trusted_proxy=TrustedProxy.from_settings(settings),
        oidc=OidcClient(settings, secret=secret) if settings.oidc_enabled else None,
        sign_in_policy=SignInPolicy(
            admin_groups=frozenset(settings.admin_groups),
            require_approval=settings.new_users_require_approval,
        ),
        presence=presence,
    )
