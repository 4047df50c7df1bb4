"""A real `python -m service` process on loopback, for tests that need a socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(tmp_path: Path, env: dict[str, str] | None = None, timeout_s: float = 90.0) -> Iterator[str]:
    """Start the service, wait until /health answers, yield its base URL, stop it with SIGTERM."""
    port = free_port()
    environment = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "CUTOUT_MODELS_DIR": str(tmp_path / "models"),
        "CUTOUT_CACHE_DIR": str(tmp_path / "cache"),
        "CUTOUT_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "CUTOUT_DIFFUSION_EFFECTS": "",
        "CUTOUT_DEVICE": "cpu",
        "CUTOUT_RATE_LIMIT_PROCESS": "100000/minute",
        "CUTOUT_RATE_LIMIT_READ": "100000/minute",
        **(env or {}),
    }
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=environment, stdout=log, stderr=log)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}: {log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer /health in {timeout_s}s: {log_path.read_text()[-3000:]}")
                time.sleep(0.1)
            yield base
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)


def server_log(tmp_path: Path) -> list[dict[str, Any]]:
    """Every JSON line the servers `running_server` started in `tmp_path` have logged so far."""
    entries = []
    for log in tmp_path.glob("server-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    return entries
