"""What the instance can serve now: the stages of its start and each effect's and model's state.

Read by `/ready` and `/v1/effects` (service/routes/meta.py) and by `/warmup` (service/warmup.py).
"""

from __future__ import annotations

import time
from typing import Any

from effects import EFFECTS
from effects.engine import Engine


def effect_states(engine: Engine) -> dict[str, str]:
    """Each effect's state now: ready, loading (retry shortly), missing or failed (unavailable)."""
    return {name: engine.effect_state(effect) for name, effect in EFFECTS.items()}


def readiness(engine: Engine) -> dict[str, Any]:
    """What /ready and an unauthenticated /warmup answer: the stages of the start and each effect's state."""
    return {
        "ready": engine.ready,
        "all_models_ready": engine.all_ready,
        "uptime_s": round(time.monotonic() - engine.created_at, 3),
        "startup": engine.describe_startup(),
        "effects": effect_states(engine),
        "models": engine.describe_models(),
    }
