"""Take an adapter in: unpack, check, store it, prove it changes the model, register it.

Every step can refuse the adapter with a message naming the problem (`AdapterRejected`); nothing
is registered until every check passed, and a refused upload leaves nothing in the store.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from app.llm.adapters import AdapterRef
from app.llm.engine import GenerationEngine
from app.llm.prompts import format_alpaca_example
from app.models import AdapterVersion, User
from app.registry import service
from app.registry.archive import AdapterRejected, ArchiveLimits, extract_adapter_archive
from app.registry.catalog import Catalog, content_key
from app.registry.inspect import BaseIdentity, inspect_adapter
from app.registry.store import AdapterStore

PROBE_QUESTION = "What is the travel expense policy?"
# Smallest change of the next-token logits that counts as "the adapter does something".
MIN_PROBE_CHANGE = 1e-3


@dataclass(frozen=True)
class Intake:
    """What publishing needs besides the request: built once at start-up."""

    store: AdapterStore
    engine: GenerationEngine
    catalog: Catalog
    base: BaseIdentity
    limits: ArchiveLimits
    max_rank: int


async def publish_archive(
    db: AsyncSession, intake: Intake, *, archive: Path, filename: str, name: str, notes: str, actor: User
) -> AdapterVersion:
    """Publish an uploaded .zip / .tar.gz as the next version of `name`."""
    service.check_name(name, base_name=intake.base.served_name)
    with intake.store.incoming() as staging:
        await asyncio.to_thread(extract_adapter_archive, archive, filename, staging, intake.limits)
        return await publish_directory(db, intake, directory=staging, name=name, notes=notes, actor=actor)


async def publish_directory(
    db: AsyncSession,
    intake: Intake,
    *,
    directory: Path,
    name: str,
    notes: str,
    actor: User,
    source: str = "upload",
) -> AdapterVersion:
    """Check the adapter in `directory` (inside the store's incoming area), store it and register it."""
    service.check_name(name, base_name=intake.base.served_name)
    engine = intake.engine
    facts = await asyncio.to_thread(
        inspect_adapter,
        directory,
        linear_layers=engine.model.linear_layers,
        base=intake.base,
        max_rank=intake.max_rank,
    )
    stored = await asyncio.to_thread(intake.store.commit, directory)
    ref = AdapterRef(key=content_key(stored.sha256), path=stored.path, label=f"{name} (new)")
    probe = engine.model.tokenizer.encode(format_alpaca_example(PROBE_QUESTION), add_special_tokens=False)
    try:
        change = await engine.probe_adapter(ref, probe)
        if change < MIN_PROBE_CHANGE:
            raise AdapterRejected(
                "the adapter does not change the model's output (largest logit change "
                f"{change:.2g} on a probe prompt): its LoRA B matrices are zero, as before training, "
                "or its weights do not reach the layers it names"
            )
        version = await service.publish_version(
            db, name=name, facts=facts, stored=stored, source=source, notes=notes, actor=actor
        )
    except BaseException:
        await db.rollback()
        if not await service.sha256_in_use(db, stored.sha256):  # nothing else uses these files
            await asyncio.to_thread(intake.store.remove, stored.sha256)
            await engine.remove_adapter(ref.key)
        raise
    await intake.catalog.refresh()
    return version
