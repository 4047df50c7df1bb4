"""Dependency aliases: what routes receive from the app built at start-up and in the lifespan."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from cache.store import ResultStore
from effects.engine import Engine
from service.flow import Flow
from service.metrics import Metrics
from service.settings import Settings
from service.warmup import Warmup, WarmupAuth


def _app_state(name: str) -> Callable[[Request], Any]:
    """A dependency answering `request.app.state.<name>`, set by the app factory or the lifespan."""

    def dependency(request: Request) -> Any:
        return getattr(request.app.state, name)

    dependency.__name__ = f"app_state_{name}"
    return dependency


EngineDep = Annotated[Engine, Depends(_app_state("engine"))]
StoreDep = Annotated[ResultStore, Depends(_app_state("store"))]
FlowDep = Annotated[Flow, Depends(_app_state("flow"))]
SettingsDep = Annotated[Settings, Depends(_app_state("settings"))]
MetricsDep = Annotated[Metrics, Depends(_app_state("metrics"))]
WarmupDep = Annotated[Warmup, Depends(_app_state("warmup"))]
WarmupAuthDep = Annotated[WarmupAuth, Depends(_app_state("warmup_auth"))]
