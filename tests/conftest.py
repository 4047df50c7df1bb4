"""Shared fixtures: apps built through the real factory, with temp model and cache folders."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

torch.set_num_threads(2)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "models_dir": tmp_path / "models",
        "cache_dir": tmp_path / "cache",
        "diffusion_effects": [],
        "public_url": "http://testserver",
        "allowed_origins": ["https://shop.example"],
        "device": "cpu",
    }
    values.update(overrides)
    return Settings(**values)


def wait_loaded(client: TestClient, timeout_s: float = 120.0) -> None:
    """Block until every model has finished loading (ready, missing or failed)."""
    deadline = time.monotonic() + timeout_s
    engine = client.app.state.engine  # type: ignore[attr-defined]
    while time.monotonic() < deadline:
        loading = client.app.state.loading  # type: ignore[attr-defined]
        if loading.done():
            return
        time.sleep(0.05)
    states = {name: state.status for name, state in engine.states.items()}
    raise AssertionError(f"models still loading after {timeout_s}s: {states}")


@pytest.fixture
def client_factory(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def factory(**overrides: Any) -> TestClient:
        settings = make_settings(tmp_path, **overrides)
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        wait_loaded(client)
        return client

    yield factory
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(client_factory: Callable[..., TestClient]) -> TestClient:
    return client_factory()
