"""What the service offers and whether it is up: effects, liveness, readiness."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from effects import EFFECTS
from service.deps import EngineDep

router = APIRouter(tags=["service"])


@router.get("/v1/effects")
async def list_effects(engine: EngineDep) -> dict[str, Any]:
    """Every effect: what it does, its version, whether it can run now, and its parameters."""
    return {
        "effects": [
            {
                "name": effect.name,
                "kind": effect.kind,
                "description": effect.description,
                "version": effect.version,
                "available": engine.is_available(effect),
                "params_schema": effect.params_schema(),
            }
            for effect in EFFECTS.values()
        ]
    }


@router.get("/health")
async def health(engine: EngineDep) -> dict[str, Any]:
    """Liveness: 200 while the process runs."""
    return {"status": "ok", "uptime_s": round(time.monotonic() - engine.created_at, 3)}


@router.get("/ready", response_model=None)
async def ready(engine: EngineDep) -> dict[str, Any] | JSONResponse:
    """Readiness: 200 once every configured model is loaded and warm, else 503 naming what is missing."""
    models = engine.describe_models()
    if engine.ready:
        return {"status": "ready", "cold_start_s": engine.cold_start_seconds, "models": models}
    waiting = [
        f"{name} ({state['status']}: {state['detail']})" for name, state in models.items() if state["status"] != "ready"
    ]
    return JSONResponse(
        {"detail": "not ready: " + "; ".join(waiting), "code": "not_ready", "models": models},
        status_code=503,
        headers={"Retry-After": "5"},
    )
