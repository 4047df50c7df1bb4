"""The storefront client in a real browser: Debian's chromium, driven by playwright-core.

The demo page is served from one loopback origin and the service from another, so the
browser applies real CORS. Between the browser and the service sits a recording proxy that
answers the first upload with `429 Retry-After: 1` (the service's own limiter allows far more
than this test sends) and forwards everything else; the browser's own request log and the
proxy's recording both show what went over the wire.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import STATIC_DIR
from tests import images
from tests.recording_proxy import Recorded, RecordingProxy
from tests.server import ROOT, running_server

CHROMIUM = Path("/usr/bin/chromium")
SPEC = ROOT / "tests" / "browser" / "demo.spec.mjs"
ARTIFACTS = ROOT / "artifacts" / "browser"
CLASSIC_AND_CUTOUT = ["cutout", "blackwhite", "dithering", "popart", "retro8bit"]


def test_the_client_and_demo_page_are_served(client: TestClient) -> None:
    script = client.get("/static/cutout.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "Cutout" in script.text and "image_sha256" in script.text and "Retry-After" in script.text
    page = client.get("/static/demo.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="cutout.js"></script>' in page.text


def require_browser_tools() -> str:
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
    """The demo page on its own loopback origin, as a storefront theme would host it."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="demo-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def wait_ready(base: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(f"{base}/ready", timeout=5.0)
        if response.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the service was not ready in {timeout_s}s: {response.text}")
        time.sleep(0.25)


def is_upload(request: Recorded) -> bool:
    return request.method == "POST" and request.path == "/v1/process" and b'name="image"; filename=' in request.body


def kinds(visit: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return [entry for entry in visit["requests"] if entry["kind"].startswith(prefix)]


@pytest.mark.browser
def test_demo_page_uploads_once_retries_a_429_and_answers_repeats_from_the_hash(
    tmp_path: Path, models_dir: Path
) -> None:
    node = require_browser_tools()
    photo = tmp_path / "pet.jpg"
    photo.write_bytes(images.jpeg(640, 480, seed=21))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with static_site(STATIC_DIR) as page_origin:
        env = {
            "CUTOUT_MODELS_DIR": str(models_dir),
            "CUTOUT_ALLOWED_ORIGINS": page_origin,
            "CUTOUT_DIFFUSION_EFFECTS": "",
        }
        with running_server(tmp_path, env=env) as api:
            wait_ready(api)
            with RecordingProxy(api) as proxy:
                proxy.inject(
                    429,
                    when=is_upload,
                    headers={
                        "Content-Type": "application/json",
                        "Retry-After": "1",
                        "Access-Control-Allow-Origin": page_origin,
                        "Access-Control-Expose-Headers": "Retry-After",
                    },
                    body=json.dumps({"detail": "too many uploads; retry in 1 s", "code": "rate_limited"}).encode(),
                )
                config = {
                    "pageUrl": f"{page_origin}/demo.html?api={proxy.url}&maxSide=320",
                    "photo": str(photo),
                    "userDataDir": str(tmp_path / "chromium-profile"),
                    "screenshotDir": str(ARTIFACTS),
                    "chromium": str(CHROMIUM),
                }
                run = subprocess.run(
                    [node, str(SPEC)],
                    cwd=ROOT,
                    env={**os.environ, "CUTOUT_BROWSER": json.dumps(config)},
                    capture_output=True,
                    text=True,
                    timeout=420,
                    check=False,
                )
                assert run.returncode == 0, f"browser script failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
                report = json.loads(run.stdout.strip().splitlines()[-1])
                uploads_seen_by_proxy = [r.status for r in proxy.recorded(is_upload)]

    first, second = report["first"], report["second"]
    print(f"\nscreenshots: {first['screenshot']} {second['screenshot']}")
    print(json.dumps({"first": first["requests"], "second": second["requests"]}, indent=1))
    assert first["state"] == "done", first
    assert second["state"] == "done", second

    # Visit 1: woken on load, hash-first misses, the upload is refused once and retried after Retry-After.
    assert [r["status"] for r in kinds(first, "wake")][:1] == [200]
    assert kinds(first, "wake")[0]["sentAt"] <= first["pickedAt"], "the service is woken before a photo is picked"
    (miss,) = kinds(first, "hash-first")
    assert miss["status"] == 404
    uploads = kinds(first, "upload")
    assert [u["status"] for u in uploads] == [429, 200], first["requests"]
    waited_ms = uploads[1]["sentAt"] - uploads[0]["doneAt"]
    assert waited_ms >= 900, f"the retry came {waited_ms} ms after the 429; Retry-After said 1 s"
    assert first["uploaded"] == "true"
    # What the page showed: the check, the upload with progress, the wait for Retry-After, the retry.
    stages = first["stages"]
    assert stages[:3] == ["preparing", "checking", "uploading"], stages
    assert "uploading" in stages[stages.index("waiting") + 1 :], stages
    assert stages[-2:] == ["processing", "done"], stages
    browser_hash = miss["kind"].split(":", 1)[1]
    assert first["sha256"] == browser_hash, "the service hashed the uploaded bytes to the browser's hash"

    # Visit 2 (reload, same photo): the same hash, answered from the store, nothing uploaded.
    (hit,) = kinds(second, "hash-first")
    assert hit["status"] == 200
    assert hit["kind"] == miss["kind"], "the browser's resize is deterministic: same photo, same hash"
    assert kinds(second, "upload") == []
    assert second["uploaded"] == "false"
    assert second["stages"] == ["preparing", "checking", "done"]
    assert uploads_seen_by_proxy == [429, 200], "the proxy saw the same: two upload attempts, both in visit 1"

    for visit in (first, second):
        assert [p["effect"] for p in visit["previews"]] == CLASSIC_AND_CUTOUT
        for preview in visit["previews"]:
            assert preview["complete"] and preview["naturalWidth"] > 0, preview
            # 640x480 resized in the browser to a 320 px long side; results are never upscaled.
            assert (preview["naturalWidth"], preview["naturalHeight"]) == (320, 240), preview
        # Chromium logs every 404/429 answer as "Failed to load resource"; anything else is a script error.
        errors = [
            line
            for line in visit["console"]
            if line.startswith(("error", "pageerror")) and "Failed to load resource" not in line
        ]
        assert not errors, visit["console"]
        assert Path(visit["screenshot"]).stat().st_size > 10_000
    assert report["retryAfter"] == {"seconds": 2000, "date": 5000, "past": 0, "garbage": "NaN"}
