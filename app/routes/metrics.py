"""GET /metrics: the server's Prometheus metrics (app/observability.py says what they are)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from app.deps import MetricsScraper, ServicesDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, services: ServicesDep, _scraper: MetricsScraper) -> Response:
    """Prometheus text exposition, or OpenMetrics when the scraper asks for it (Prometheus does)."""
    body, content_type = await asyncio.to_thread(services.metrics.render, request.headers.get("accept", ""))
    return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})
