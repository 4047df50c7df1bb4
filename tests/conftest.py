"""Shared fixtures: apps built through the real factory, with temp model and cache folders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support.app import make_settings, wait_loaded

torch.set_num_threads(2)


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


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in the production layout, written once per session through the real savers:
    InSPyReNet SwinB at its fast size (384) and tiny random diffusion pipelines."""
    from tests.support.weights import write_inspyrenet, write_tiny_pipelines

    directory = tmp_path_factory.mktemp("models")
    write_inspyrenet(directory, "fast", seed=0)
    write_tiny_pipelines(directory)
    return directory


@pytest.fixture(scope="session")
def model_client(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app per session with every model loaded (random weights), on the CPU.

    Shared because loading is the slow part; tests that need a cold cache clear it themselves.
    """
    from effects import DIFFUSION_EFFECTS

    settings = make_settings(
        tmp_path_factory.mktemp("model-app"), models_dir=models_dir, diffusion_effects=list(DIFFUSION_EFFECTS)
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_loaded(client)
        assert client.get("/ready").status_code == 200, client.get("/ready").text
        yield client
