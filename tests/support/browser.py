"""A real browser against the real server: Debian's chromium driven by playwright-core scripts in tests/browser/."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT

CHROMIUM = Path("/usr/bin/chromium")


def require_browser_tools() -> str:
    """The path of node; fails (never skips) the test when chromium, node or playwright-core is missing."""
    node = shutil.which("node")
    problems = []
    if not CHROMIUM.exists():
        problems.append("Debian chromium (apt-get install chromium; `make system-deps`)")
    if node is None:
        problems.append("node")
    if not (ROOT / "node_modules" / "playwright-core").is_dir():
        problems.append("playwright-core (npm ci; `make node-deps`)")
    if problems:
        pytest.fail("the browser test needs " + ", ".join(problems))
    assert node is not None
    return node


@contextmanager
def static_site(directory: Path) -> Iterator[str]:
    """`directory` served on its own loopback origin, as a storefront theme would host its pages."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="static-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def run_browser_script(node: str, spec: Path, config: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
    """Run a tests/browser/*.spec.mjs script with `config` (plus the chromium path); its report is
    the JSON object on its last line of output."""
    run = subprocess.run(
        [node, str(spec)],
        cwd=ROOT,
        env={**os.environ, "CUTOUT_BROWSER": json.dumps({"chromium": str(CHROMIUM), **config})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert run.returncode == 0, f"browser script failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return report
