"""Liveness and readiness probes for load balancers, compose and Kubernetes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and answering."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    """The model is loaded, the engine runs and the database answers: ready for traffic."""
    problems = []
    if not services.engine.running:
        problems.append("the generation engine is not running")
    try:
        async with services.sessionmaker() as db:
            await db.execute(text("SELECT 1"))
    except Exception as error:
        problems.append(f"the database does not answer: {type(error).__name__}")
    body = {
        "status": "ready" if not problems else "not ready",
        "problems": problems,
        "served_model_name": services.settings.model_name,
        "demo_model": services.is_demo_model,
        **services.model.describe(),
        **services.engine.load(),
    }
    return JSONResponse(body, status_code=200 if not problems else 503)
