"""A real `python -m service` on loopback, started as the container starts it; free ports; its JSON log.

Tests, load tests and benchmarks all start the service here, so that every one of them runs the
image's command with the same settings unless it says otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support import ROOT


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    cache_dir: Path
    started: float  # time.perf_counter() when the process was started
    # From process start to the awaited path's first 200 (None when nothing was awaited).
    ready_after_s: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 30.0) -> tuple[int, float]:
        """SIGTERM, as Cloud Run stops an instance, then SIGKILL after `timeout_s`.

        Returns the exit code and the seconds from the signal to the exit."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode, time.monotonic() - started

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_for(self, path: str, timeout_s: float) -> None:
        """Poll `path` until it answers 200; fail at once if the process exits."""
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2.0).status_code == 200:
                    self.ready_after_s = time.perf_counter() - self.started
                    return
            except httpx.TransportError:
                pass
            if time.perf_counter() - self.started > timeout_s:
                raise RuntimeError(f"server did not answer {path} with 200 in {timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.05)


@contextmanager
def running_server(
    workdir: Path,
    env: Mapping[str, str] | None = None,
    *,
    wait_for: str | None = "/health",
    timeout_s: float = 240.0,
) -> Iterator[Server]:
    """`python -m service` on a free loopback port, stopped with SIGTERM on exit.

    Settings are test defaults under `env`: the CPU, no diffusion effects, rate limits out of the
    way (every request comes from one address), models in `workdir/models`, results in
    `workdir/cache`, its output in `workdir/server-<port>.log`. Waits until `wait_for` answers
    200 (`/ready`: the models are loaded; None: not at all, for a process expected to exit).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "CUTOUT_MODELS_DIR": str(workdir / "models"),
        "CUTOUT_CACHE_DIR": str(workdir / "cache"),
        "CUTOUT_PUBLIC_URL": url,
        "CUTOUT_DIFFUSION_EFFECTS": "",
        "CUTOUT_DEVICE": "cpu",
        "CUTOUT_RATE_LIMIT_PROCESS": "100000/minute",
        "CUTOUT_RATE_LIMIT_READ": "100000/minute",
        **(env or {}),
    }
    log_path = workdir / f"server-{port}.log"
    with log_path.open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(url, process, log_path, Path(environment["CUTOUT_CACHE_DIR"]), started)
    try:
        if wait_for is not None:
            server.wait_for(wait_for, timeout_s)
        yield server
    finally:
        server.stop()


def server_log(workdir: Path) -> list[dict[str, Any]]:
    """Every JSON line the servers started in `workdir` have logged so far (other lines skipped)."""
    entries = []
    for log in sorted(workdir.glob("server-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
    return entries
