"""GET /metrics: the server's Prometheus metrics (app/observability.py says what they are)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response
from prometheus_client.metrics_core import Metric

from app.deps import MetricsScraper, ServicesDep
from app.observability import TRAINING_FIGURES, registry_metrics
from app.registry import service as registry
from app.services import Services

log = logging.getLogger(__name__)

router = APIRouter(tags=["metrics"])

# Prometheus gives up on a scrape after 10 s by default: a database that does not answer within
# this costs the scrape the registry's figures only, never the engine's.
REGISTRY_READ_TIMEOUT_S = 3.0


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, services: ServicesDep, _scraper: MetricsScraper) -> Response:
    """Prometheus text exposition, or OpenMetrics when the scraper asks for it (Prometheus does)."""
    published = await read_registry_metrics(services)
    body, content_type = await asyncio.to_thread(
        services.metrics.render, request.headers.get("accept", ""), published
    )
    return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})


async def read_registry_metrics(services: Services) -> list[Metric]:
    """The adapter registry's figures, read from the database at each scrape, so every replica
    exports the same ones; none when the database is down or busy (the rest still answers)."""
    try:
        async with asyncio.timeout(REGISTRY_READ_TIMEOUT_S), services.sessionmaker() as db:
            newest = await registry.newest_versions(db, figures=TRAINING_FIGURES)
    except Exception as error:  # the database down, its pool busy, or a timeout
        reason = (
            f"no answer within {REGISTRY_READ_TIMEOUT_S:g} s"
            if isinstance(error, TimeoutError)
            else f"{type(error).__name__}: {error}"
        )
        log.warning("/metrics: reading the adapter registry failed (%s); its figures are left out", reason)
        return []
    return registry_metrics(newest)
