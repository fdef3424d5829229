"""Publish a trained adapter into the registry, through the same checks as an admin's upload.

The adapter is copied into the store's incoming area, inspected against the served base, probed
on the real (4-bit) model, stored and registered as the next version of its name. Servers
polling the registry serve it from their next request on.

    python -m training publish runs/finance/adapter --name finance [--by admin@company.com] [--default]
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import create_engine, create_sessionmaker
from app.llm.engine import GenerationEngine
from app.llm.loader import ModelSpec, load_model
from app.migrate import upgrade_database
from app.models import AdapterVersion, Role, User
from app.registry import service
from app.registry.archive import ALLOWED_FILES, ArchiveLimits
from app.registry.catalog import Catalog
from app.registry.inspect import BaseIdentity
from app.registry.intake import Intake, publish_directory
from app.registry.store import AdapterStore


class PublishError(ValueError):
    pass


async def publish_adapter(
    adapter_dir: Path,
    *,
    name: str,
    settings: Settings,
    by: str | None = None,
    notes: str = "",
    default: bool = False,
) -> AdapterVersion:
    """Register `adapter_dir` as the next version of `name` in the registry `settings` point at.

    `default`: also make `name` the adapter new conversations start with.
    """
    if not (adapter_dir / "adapter_config.json").is_file():
        raise PublishError(f"{adapter_dir} is not an adapter directory (no adapter_config.json)")
    await asyncio.to_thread(upgrade_database, settings.sqlalchemy_url)
    db_engine = create_engine(settings.sqlalchemy_url)
    spec = ModelSpec(
        settings.model_path_or_id, quantization=settings.quantization.value, device=settings.device
    )
    model = await asyncio.to_thread(load_model, spec)
    engine = GenerationEngine(model, max_running=1, max_queued=0, max_adapters=1)
    engine.start()
    try:
        sessionmaker = create_sessionmaker(db_engine)
        store = AdapterStore(settings.adapter_store_dir)
        catalog = Catalog(sessionmaker, store, engine, base_name=settings.model_name)
        intake = Intake(
            store=store,
            engine=engine,
            catalog=catalog,
            base=BaseIdentity(settings.model_path_or_id, settings.model_name, model.fingerprint),
            limits=ArchiveLimits(),
            max_rank=settings.max_adapter_rank,
        )
        async with sessionmaker() as db:
            actor = await publisher(db, by)
            with store.incoming() as staging:
                await asyncio.to_thread(copy_adapter_files, adapter_dir, staging)
                version = await publish_directory(
                    db, intake, directory=staging, name=name, notes=notes, actor=actor, source="training"
                )
            if default:
                await service.set_default(db, name=name, actor=actor)
            return version
    finally:
        engine.shutdown()
        await db_engine.dispose()


def copy_adapter_files(source: Path, target: Path) -> None:
    """Copy only what an upload may carry: the trainer also leaves a pickled training_args.bin."""
    for file in source.iterdir():
        if file.is_file() and file.name in ALLOWED_FILES:
            shutil.copy2(file, target / file.name)


async def publisher(db: AsyncSession, by: str | None) -> User:
    """The admin the publication is recorded under: `by`, or the first admin when not given."""
    query = select(User).where(User.role == Role.ADMIN, User.is_active.is_(True))
    if by:
        query = query.where(User.email == by.strip().lower())
    user = await db.scalar(query.order_by(User.id))
    if user is None:
        raise PublishError(
            f"no active admin {by}" if by else "no admin to record the publication under: create one first"
        )
    return user
