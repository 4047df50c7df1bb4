"""The app as tests build it: through the real factory, with temporary model and cache folders."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.settings import Settings


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "models_dir": tmp_path / "models",
        "cache_dir": tmp_path / "cache",
        "diffusion_effects": [],
        "public_url": "http://testserver",
        "allowed_origins": ["https://shop.example"],
        "device": "cpu",
        # Tests send many requests from one address; the rate-limit tests set their own limits.
        "rate_limit_process": "100000/minute",
        "rate_limit_read": "100000/minute",
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
