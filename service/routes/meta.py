"""What the service offers and whether it is up: effects, liveness, readiness."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from effects import EFFECTS
from effects.engine import CUTOUT
from service.deps import EngineDep
from service.errors import NotReady, error_answer
from service.readiness import readiness

router = APIRouter(tags=["service"])


@router.get("/v1/effects")
async def list_effects(engine: EngineDep) -> dict[str, Any]:
    """Every effect: what it does, its version, whether it can run now (and its state), and its parameters."""
    return {
        "effects": [
            {
                "name": effect.name,
                "kind": effect.kind,
                "description": effect.description,
                "version": effect.version,
                "available": engine.is_available(effect),
                "state": engine.effect_state(effect),
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
    """The startup probe: 200 once the cutout model is warm (the cutout and classic effects can serve),
    while diffusion pipelines may still be loading; else 503 naming what is missing. The body shows
    each effect's and each model's state."""
    body = readiness(engine)
    if engine.ready:
        return {"status": "ready", "cold_start_s": engine.cutout_ready_seconds, **body}
    cutout = engine.states[CUTOUT]
    return error_answer(NotReady(f"not ready: cutout ({cutout.status}: {cutout.detail})"), extra=body)
