"""The storefront client in a real browser: Debian's chromium, driven by playwright-core.

The demo page is served from one loopback origin and the service from another, so the
browser applies real CORS. Between the browser and the service sits a recording proxy that
answers the first upload with `429 Retry-After: 1` (the service's own limiter allows far more
than this test sends) and forwards everything else; the browser's own request log and the
proxy's recording both show what went over the wire.

The production theme's callers (docs/storefront.md, "Theme compatibility") get the same setup:
each one's request rebuilt in `browser/theme-callers.js`, run in the page, compared on the wire
with what the theme writes, and its answer read the way the theme reads it.
"""

from __future__ import annotations

import email.policy
import io
import json
import re
import shutil
from dataclasses import dataclass
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import STATIC_DIR
from tests.support import ROOT, photos
from tests.support.browser import require_browser_tools, run_browser_script, static_site
from tests.support.recording_proxy import Recorded, RecordingProxy
from tests.support.server import running_server

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
    photo.write_bytes(photos.jpeg(640, 480, seed=21))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with static_site(STATIC_DIR) as page_origin:
        env = {
            "CUTOUT_MODELS_DIR": str(models_dir),
            "CUTOUT_ALLOWED_ORIGINS": page_origin,
            "CUTOUT_DIFFUSION_EFFECTS": "",
        }
        with running_server(tmp_path, env, wait_for="/ready") as api, RecordingProxy(api.url) as proxy:
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
            }
            report = run_browser_script(node, SPEC, config, timeout_s=420)
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


# ---------------------------------------------------------------- the production theme's callers

THEME_SPEC = ROOT / "tests" / "browser" / "theme.spec.mjs"
THEME_PAGE = ("theme.html", "theme-callers.js")
PROCESS_WITH_EFFECTS = "/api/v2/process-with-effects"


def theme_site(tmp_path: Path) -> Path:
    """The page that runs the theme's callers, plus the picture its re-segmentation fetches."""
    site = tmp_path / "theme-site"
    site.mkdir()
    for name in THEME_PAGE:
        shutil.copy(ROOT / "tests" / "browser" / name, site / name)
    # Stands in for a generated artistic image: a PNG on an opaque background, served by the shop's side.
    (site / "gemini.png").write_bytes(photos.png(300, 200, seed=31))
    return site


def theme_photos(tmp_path: Path) -> dict[str, str]:
    made = {
        "large": ("pet-large.jpg", photos.jpeg(2000, 1500, seed=32)),  # over 1600 px: pet-processor.js resizes it
        "small": ("pet-small.jpg", photos.jpeg(640, 480, seed=33)),
        "png": ("pet.png", photos.png(500, 400, seed=34)),
    }
    paths = {}
    for key, (name, data) in made.items():
        (tmp_path / name).write_bytes(data)
        paths[key] = str(tmp_path / name)
    return paths


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def form_parts(request: Recorded) -> list[Part]:
    """The multipart body as the browser wrote it: every part, in order."""
    content_type = request.headers.get("Content-Type") or request.headers.get("content-type") or ""
    assert content_type.startswith("multipart/form-data; boundary="), content_type
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + request.body
    )
    parts = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        assert isinstance(name, str)
        parts.append(
            Part(
                name=name,
                filename=part.get_filename(),
                content_type=part.get_content_type() if part["Content-Type"] else None,
                data=part.get_payload(decode=True) or b"",
            )
        )
    return parts


def posts(proxy: RecordingProxy, path: str) -> list[Recorded]:
    return proxy.recorded(lambda r: r.method == "POST" and r.path == path)


def decoded_size(data: bytes) -> tuple[str | None, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        return image.format, image.size


@pytest.mark.browser
def test_the_theme_callers_get_what_they_read_from_another_origin(tmp_path: Path, models_dir: Path) -> None:
    node = require_browser_tools()
    uploads = theme_photos(tmp_path)
    site = theme_site(tmp_path)
    with static_site(site) as page_origin, static_site(site) as stranger_origin:
        env = {"CUTOUT_MODELS_DIR": str(models_dir), "CUTOUT_ALLOWED_ORIGINS": page_origin}
        with running_server(tmp_path, env, wait_for="/ready") as api, RecordingProxy(api.url) as proxy:
            report = run_browser_script(
                node,
                THEME_SPEC,
                {
                    "mode": "ready",
                    "pageUrl": f"{page_origin}/theme.html?api={proxy.url}",
                    "strangerUrl": f"{stranger_origin}/theme.html?api={proxy.url}",
                    "photos": uploads,
                    "userDataDir": str(tmp_path / "chromium-profile"),
                },
            )
            process_posts = posts(proxy, PROCESS_WITH_EFFECTS)
            remove_posts = posts(proxy, "/remove-background")
            store_posts = posts(proxy, "/store-image")
            warmups = proxy.recorded(lambda r: r.path == "/warmup")
    print(json.dumps({k: v for k, v in report.items() if k != "console"}, indent=1)[:6000])
    errors = [line for line in report["console"] if line.startswith("pageerror")]
    assert not errors, report["console"]
    # In order: pet-processor, inline-preview, api-client (BiRefNet branch), api-client (InSPyReNet
    # branch), then the stranger's inline-preview request.
    assert len(process_posts) == 5, [r.target for r in process_posts]
    pet_req, inline_req, birefnet_req, inspyrenet_req, stranger_req = process_posts

    # assets/pet-processor.js callAPI: resized to 1600 px in the browser, effects in query and form.
    pet = report["petProcessor"]
    assert "error" not in pet, pet
    assert pet_req.query == {"return_all_effects": ["true"], "effects": ["enhancedblackwhite,color"]}
    file_part, effects_part = form_parts(pet_req)
    assert (file_part.name, file_part.filename, file_part.content_type) == ("file", "pet-large.jpg", "image/jpeg")
    assert decoded_size(file_part.data) == ("JPEG", (1600, 1200))
    assert (effects_part.name, effects_part.filename, effects_part.data) == (
        "effects",
        None,
        b"enhancedblackwhite,color",
    )
    assert pet_req.status == 200
    assert pet["keys"] == ["enhancedblackwhite", "color"]
    for name, shown in pet["shown"].items():
        assert shown["prefix"] == "data:image/png;base64,", name  # raw base64 PNG, prefixed by the theme
        assert (shown["loaded"], shown["width"], shown["height"]) == (True, 1600, 1200), (name, shown)
        assert shown["transparency"] > 0, f"{name}: the background is removed"
    assert (pet["gemini"]["loaded"], pet["gemini"]["width"]) == (True, 1600)

    # assets/pet-processor.js resegmentGeminiEffect: the fetched image back without its background, WebP.
    resegment = report["resegment"]
    assert resegment.get("success") is True, resegment
    (remove_req,) = remove_posts
    assert remove_req.query == {"format": ["webp"]}
    (image_part,) = form_parts(remove_req)
    assert (image_part.name, image_part.filename, image_part.content_type) == ("file", "gemini-effect.png", "image/png")
    assert image_part.data == (site / "gemini.png").read_bytes()
    assert resegment["prefix"] == "data:image/webp;base64,"
    assert (resegment["shown"]["loaded"], resegment["shown"]["width"], resegment["shown"]["height"]) == (
        True,
        300,
        200,
    )
    assert resegment["transparency"] > 0

    # assets/inline-preview-mvp.js removeBackground: the picked file alone, effects in the query.
    inline = report["inlinePreview"]
    assert "error" not in inline, inline
    assert inline_req.query == {"return_all_effects": ["true"], "effects": ["enhancedblackwhite,color"]}
    (only_part,) = form_parts(inline_req)
    assert (only_part.name, only_part.filename, only_part.content_type) == ("file", "pet-small.jpg", "image/jpeg")
    assert only_part.data == Path(uploads["small"]).read_bytes()
    assert inline["keys"] == ["enhancedblackwhite", "color"]
    assert all((s["loaded"], s["width"], s["height"]) == (True, 640, 480) for s in inline["shown"].values()), inline

    # assets/api-client.js removeBackground, both branches of its service toggle: effects and a
    # session id in the form, Accept: application/json, only return_all_effects in the query.
    for label, request, effects in (
        ("apiClientBirefnet", birefnet_req, "color,enhancedblackwhite"),
        ("apiClientInspyrenet", inspyrenet_req, "color,enhancedblackwhite,optimized_popart,dithering"),
    ):
        outcome = report[label]
        assert "error" not in outcome, (label, outcome)
        assert request.query == {"return_all_effects": ["true"]}
        assert request.headers.get("Accept") == "application/json"
        file_part, effects_part, session_part = form_parts(request)
        assert (file_part.name, file_part.filename, file_part.content_type) == ("file", "pet.png", "image/png")
        assert (effects_part.name, effects_part.data.decode()) == ("effects", effects)
        assert session_part.name == "session_id" and re.fullmatch(rb"perkie_\d{13}", session_part.data)
        assert outcome["keys"] == effects.split(",")
        assert outcome["returnedIsColor"] is True
        for name, shown in outcome["shown"].items():
            assert (shown["loaded"], shown["width"], shown["height"]) == (True, 500, 400), (label, name, shown)

    # The pictures kept for fulfilment (POST /store-image; the route is described in "Keeping an
    # order's pictures"): every caller's form as the theme writes it, and a link that loads.
    def fields(request: Recorded) -> list[tuple[str, str]]:
        return [(p.name, p.data.decode() if p.filename is None else f"<{p.content_type}>") for p in form_parts(request)]

    assert len(store_posts) == 6, [r.target for r in store_posts]
    pet_bw, pet_color, pet_original, inline_color, inline_original, stitch = store_posts
    for request, effect in ((pet_bw, "enhancedblackwhite"), (pet_color, "color")):
        assert fields(request) == [
            ("file", "<image/png>"),
            ("session_id", "pet_1"),
            ("image_type", f"processed_{effect}"),
            ("tier", "temporary"),
            ("pet_name", "Rex"),
            ("effect_applied", effect),
        ]
        assert re.fullmatch(rf"pet_1_processed_{effect}_\d{{13}}\.png", form_parts(request)[0].filename or "")
    assert fields(pet_original) == [
        ("file", "<image/jpeg>"),
        ("session_id", "pet_1"),
        ("image_type", "original"),
        ("tier", "temporary"),
        ("effect_applied", "source"),
    ]
    assert form_parts(pet_original)[0].data == Path(uploads["large"]).read_bytes()
    assert fields(inline_color) == [
        ("file", "<image/png>"),
        ("session_id", "inline_1"),
        ("image_type", "processed_color"),
        ("tier", "temporary"),
    ]
    assert form_parts(inline_color)[0].filename == "inline_1_color.png"
    assert fields(inline_original) == [
        ("file", "<image/jpeg>"),
        ("session_id", "inline_1"),
        ("image_type", "original"),
        ("tier", "temporary"),
    ]
    assert fields(stitch) == [
        ("file", "<image/png>"),
        ("image_type", "original"),
        ("tier", "temporary"),
        ("session_id", "stitch_1"),
    ]
    assert all(r.status == 200 for r in store_posts), [r.status for r in store_posts]
    expected_sizes = {
        ("petProcessor", "enhancedblackwhite"): (1600, 1200),
        ("petProcessor", "color"): (1600, 1200),
        ("petProcessor", "original"): (2000, 1500),
        ("inlinePreview", "color"): (640, 480),
        ("inlinePreview", "original"): (640, 480),
    }
    for (caller, name), size in expected_sizes.items():
        kept = report[caller]["kept"][name]
        assert kept["url"], (caller, name, kept)
        assert (kept["shown"]["loaded"], kept["shown"]["width"], kept["shown"]["height"]) == (True, *size), kept
    assert report["stitch"]["success"] is True and report["stitch"]["shown"]["loaded"] is True, report["stitch"]
    assert (report["stitch"]["shown"]["width"], report["stitch"]["shown"]["height"]) == (500, 400)

    # assets/api-client.js warmup: a preflighted POST (JSON content type) the browser let through.
    # Answered at once with readiness (no credential, no forward pass): `model_ready` is true.
    assert [(r.method, r.status) for r in warmups] == [("OPTIONS", 200), ("POST", 200)], report["apiClientWarmup"]
    preflight, warm = warmups
    assert "content-type" in preflight.headers.get("Access-Control-Request-Headers", "").lower()
    assert warm.method == "POST" and warm.headers.get("Content-Type") == "application/json"
    assert warm.body == b"[object Object]"
    assert warm.status == 200
    assert report["apiClientWarmup"] == {"modelReady": True}, report["apiClientWarmup"]

    # From an origin the service does not list, the browser withholds the answer.
    assert report["stranger"] == {"error": "Failed to fetch", "name": "TypeError"}, report["stranger"]
    assert stranger_req.headers.get("Origin") == stranger_origin


@pytest.mark.browser
def test_the_theme_callers_read_a_cold_service_error_not_a_cors_failure(tmp_path: Path) -> None:
    node = require_browser_tools()
    uploads = theme_photos(tmp_path)
    # No weights: every effect of these routes needs the cutout model, so each answers 503.
    with (
        static_site(theme_site(tmp_path)) as page_origin,
        running_server(tmp_path, {"CUTOUT_ALLOWED_ORIGINS": page_origin}) as server,
    ):
        report = run_browser_script(
            node,
            THEME_SPEC,
            {
                "mode": "cold",
                "pageUrl": f"{page_origin}/theme.html?api={server.url}",
                "photos": uploads,
                "userDataDir": str(tmp_path / "chromium-profile"),
            },
        )
    assert report["petProcessor"] == {"error": "API error: 503", "name": "Error"}, report
    assert report["inlinePreview"] == {"error": "Background removal failed: 503", "name": "Error"}, report
    assert report["resegment"]["success"] is False
    assert report["resegment"]["error"] == "Error: BiRefNet re-segmentation failed: 503"
    # The theme logs the error body it read: the service's JSON, readable across origins.
    assert any('"code":"model_unavailable"' in line for line in report["console"]), report["console"]
