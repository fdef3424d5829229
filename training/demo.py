"""The demo adapter: trained once, when a fresh install first serves the embedded demo model.

`python -m app serve` (so `make run`) calls `ensure_demo_adapter(settings)` after the first admin
exists and before it serves. On the demo model (no MODEL_ID), unless DEMO_ADAPTER=false, it trains
a LoRA adapter with the tiny CPU recipe (`configs/tiny-cpu.yaml`) on the sample data set, publishes
it as `demo` under the first admin through the registry's usual checks, and makes it the default
for new conversations: about a minute on 2 CPU cores. A question from its part of the sample data
then gets its answer in the chat; the bare demo model writes word salad.

It happens once per DATA_DIR: `DATA_DIR/demo_adapter.json` records it (delete that file to train
it again on the next start). A second server process starting at the same time waits on
`DATA_DIR/demo_adapter.lock` for the first, then finds the record and does not train.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from app.config import Settings
from training.config import TrainingConfig, load_config

log = logging.getLogger(__name__)

DEMO_ADAPTER_NAME = "demo"
RECIPE = Path(__file__).resolve().parent / "configs" / "tiny-cpu.yaml"
ROOT = Path(__file__).resolve().parent.parent  # the recipe's data files are relative to the repository
MARKER = "demo_adapter.json"
LOCK = "demo_adapter.lock"


class Outcome(StrEnum):
    PUBLISHED = "published"  # trained, published and made the default just now
    DONE_BEFORE = "done before"  # an earlier start did it (or an adapter named demo exists already)
    NOT_DEMO_MODEL = "not the demo model"  # MODEL_ID names a real model
    DISABLED = "disabled"  # DEMO_ADAPTER=false


class DemoAdapterInterrupted(KeyboardInterrupt):
    """Ctrl-C while the demo adapter trained: nothing was published, the next start trains it again."""


def ensure_demo_adapter(settings: Settings) -> Outcome:
    """Train, publish and make default the demo adapter, unless that is not wanted or already done."""
    if not settings.uses_demo_model:
        return Outcome.NOT_DEMO_MODEL
    if not settings.demo_adapter:
        return Outcome.DISABLED
    marker = settings.data_dir / MARKER
    with _one_process_at_a_time(settings.data_dir / LOCK):
        if marker.is_file():
            log.info("demo adapter: set up on an earlier start (%s records it)", marker)
            return Outcome.DONE_BEFORE
        if asyncio.run(_already_registered(settings)):
            log.info("demo adapter: an adapter named %r is in the registry already", DEMO_ADAPTER_NAME)
            _write_marker(marker, {"adapter": DEMO_ADAPTER_NAME, "note": "found in the registry"})
            return Outcome.DONE_BEFORE
        _train_and_publish(settings, marker)
        return Outcome.PUBLISHED


def demo_config(settings: Settings) -> TrainingConfig:
    """The tiny CPU recipe, pointed at this install's demo model and DATA_DIR."""
    run = settings.data_dir / "demo_adapter_run"
    config = load_config(RECIPE, ["--base_model", str(settings.demo_model_dir), "--output_dir", str(run)])
    config.data.files = [str(ROOT / name) for name in config.data.files]  # wherever the server was started
    return config


def _train_and_publish(settings: Settings, marker: Path) -> None:
    from training.publish import publish_adapter
    from training.trainer import train

    config = demo_config(settings)
    data = ", ".join(str(Path(name).relative_to(ROOT)) for name in config.data.files)
    print(
        f"\nFirst start on the demo model: training the demo adapter on {data} ({config.epochs:g} epochs).\n"
        "This happens once and takes about a minute on 2 CPU cores; DEMO_ADAPTER=false skips it.\n",
        flush=True,
    )
    started = time.perf_counter()
    result = train(config)
    if result.interrupted:
        raise DemoAdapterInterrupted(
            "stopped: the demo adapter was not published; it is trained again on the next start "
            "(DEMO_ADAPTER=false skips it)"
        )
    trained_s = time.perf_counter() - started
    print(f"Demo adapter trained in {trained_s:.0f} s; publishing it as {DEMO_ADAPTER_NAME} ...", flush=True)
    version = asyncio.run(
        publish_adapter(
            result.adapter_dir,
            name=DEMO_ADAPTER_NAME,
            settings=settings,
            notes="trained on the sample data when the server first started on the demo model",
            default=True,
        )
    )
    _write_marker(marker, {
        "adapter": f"{DEMO_ADAPTER_NAME}@{version.version}",
        "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "train_seconds": round(trained_s, 1),
        "final_train_loss": result.metrics.get("final_train_loss"),
        "run": str(config.output_path),
    })  # fmt: skip
    print(
        f"Published {DEMO_ADAPTER_NAME}@{version.version}, the default for new conversations "
        f"({time.perf_counter() - started:.0f} s in all). Ask it a question from {data}, "
        "for example: How many days of leave do I get?\n",
        flush=True,
    )


async def _already_registered(settings: Settings) -> bool:
    """Whether the registry already has an adapter named demo; refuses early if no admin could publish it."""
    from sqlalchemy import select

    from app.db import create_engine, create_sessionmaker
    from app.models import Adapter
    from training.publish import publisher

    engine = create_engine(settings.sqlalchemy_url)
    try:
        async with create_sessionmaker(engine)() as db:
            if await db.scalar(select(Adapter.id).where(Adapter.name == DEMO_ADAPTER_NAME)) is not None:
                return True
            await publisher(db, None)  # no admin: say so now, not after two minutes of training
            return False
    finally:
        await engine.dispose()


def _write_marker(marker: Path, record: dict[str, Any]) -> None:
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(marker)


@contextlib.contextmanager
def _one_process_at_a_time(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`: a second server process starting at once waits for the first."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("Another server process is setting up the demo adapter; waiting for it ...", flush=True)
            fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)
