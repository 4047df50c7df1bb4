"""Dependency aliases: what routes receive from the app built in the lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from cache.store import ResultStore
from effects.engine import Engine
from service.flow import Flow
from service.settings import Settings


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _store(request: Request) -> ResultStore:
    store: ResultStore = request.app.state.store
    return store


def _flow(request: Request) -> Flow:
    flow: Flow = request.app.state.flow
    return flow


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


EngineDep = Annotated[Engine, Depends(_engine)]
StoreDep = Annotated[ResultStore, Depends(_store)]
FlowDep = Annotated[Flow, Depends(_flow)]
SettingsDep = Annotated[Settings, Depends(_settings)]
