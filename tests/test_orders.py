"""Orders keep their pictures: `POST /v1/keep`, `GET /v1/kept/...`, the storefront's `POST /store-image`.

Through the real app with the local store; the same routes on the GCS store against the storage
emulator are in test_gcs_store.py, and the bucket's lifecycle in tests/iac/test_retention.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import cache.store
import service.routes.orders
from tests.support import ROOT, photos
from tests.support.browser import require_browser_tools, run_browser_script, static_site
from tests.support.server import running_server

ORIGIN = "https://shop.example"


def process(client: TestClient, upload: bytes, effects: str = "dithering,popart", base: str = "") -> dict[str, Any]:
    response = client.post(
        f"{base}/v1/process",
        data={"effects": effects, "background": "none"},
        files={"image": ("cat.png", upload, "image/png")},
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def keep(client: TestClient, **data: str) -> httpx.Response:
    return client.post("/v1/keep", data=data, headers={"Origin": ORIGIN})


def kept_until(entry: dict[str, Any]) -> dt.datetime:
    return dt.datetime.fromisoformat(entry["kept_until"].replace("Z", "+00:00"))


def days_from_now(moment: dt.datetime) -> float:
    return (moment - dt.datetime.now(dt.UTC)).total_seconds() / 86400


# ------------------------------------------------------------------------------------ /v1/keep


def test_an_order_keeps_its_results_and_original_by_link_and_hash(client: TestClient, tmp_path: Path) -> None:
    upload = photos.png(48, 32, seed=1)
    processed = process(client, upload)
    sha = hashlib.sha256(upload).hexdigest()
    urls = [result["url"] for result in processed["results"].values()]

    response = keep(client, results=",".join(urls), image_sha256=sha, tier="order_completed")

    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    answer = response.json()
    assert (answer["tier"], answer["days"]) == ("order_completed", 180)
    assert 179.9 < days_from_now(kept_until(answer["original"])) <= 180
    original = client.get(answer["original"]["url"])
    assert original.status_code == 200 and original.content == upload
    assert original.headers["content-type"] == "image/png"
    for result in processed["results"].values():
        entry = answer["results"][f"{result['key']}.png"]
        assert entry["url"] == f"http://testserver/v1/kept/{entry['sha256']}.png"
        kept = client.get(entry["url"])
        assert kept.status_code == 200
        assert kept.content == client.get(result["url"]).content
        assert hashlib.sha256(kept.content).hexdigest() == entry["sha256"] and entry["bytes"] == len(kept.content)


def test_kept_pictures_outlive_the_cache(client: TestClient, tmp_path: Path) -> None:
    upload = photos.png(48, 32, seed=2)
    processed = process(client, upload, "popart")
    # The photo sent again with the keep, as a file.
    response = client.post(
        "/v1/keep",
        data={"results": processed["results"]["popart"]["url"]},
        files={"image": ("cat.png", upload, "image/png")},
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    # What the bucket's cache lifecycle does to results and held uploads, done by hand.
    cache_dir = tmp_path / "cache"
    for folder in ("results", "masks", "uploads"):
        for path in (cache_dir / folder).iterdir():
            path.unlink()
    assert client.get(processed["results"]["popart"]["url"]).status_code == 404
    assert client.get(answer["original"]["url"]).content == upload
    (entry,) = answer["results"].values()
    assert client.get(entry["url"]).status_code == 200


def test_a_later_keep_lengthens_an_earlier_one_and_never_shortens(client: TestClient) -> None:
    upload = photos.png(40, 30, seed=3)
    sha = hashlib.sha256(upload).hexdigest()
    process(client, upload, "dithering")
    first = keep(client, image_sha256=sha).json()["original"]
    assert 6.9 < days_from_now(kept_until(first)) <= 7, "temporary, the short default"

    longer = keep(client, image_sha256=sha, tier="archived").json()["original"]
    assert longer["url"] == first["url"], "the link stays the same when the keep grows"
    assert 729.9 < days_from_now(kept_until(longer)) <= 730

    shorter = keep(client, image_sha256=sha, tier="temporary").json()["original"]
    assert shorter["kept_until"] == longer["kept_until"], "nobody can shorten a keep"


def test_an_order_lengthens_the_links_its_cart_holds(client: TestClient) -> None:
    """The theme's cart holds /store-image links (7 days); once ordered, the same links are kept 180 days."""
    original, processed = photos.jpeg(64, 48, seed=13), photos.png(64, 48, seed=14)
    cart = [
        client.post(
            "/store-image",
            data={"session_id": "pet_1", "image_type": kind, "tier": "temporary"},
            files={"file": ("f", data, "image/jpeg")},
        ).json()["url"]
        for kind, data in (("original", original), ("processed_popart", processed))
    ]
    response = keep(client, results=" ".join(cart), tier="order_completed")
    assert response.status_code == 200, response.text
    entries = response.json()["results"]
    assert [entry["url"] for entry in entries.values()] == cart, "the links do not move"
    for entry in entries.values():
        assert 179.9 < days_from_now(kept_until(entry)) <= 180
    assert [client.get(url).content for url in cart] == [original, processed]
    gone = keep(client, results=cart[0].replace(cart[0].rsplit("/", 1)[1], "f" * 64 + ".jpeg"))
    assert gone.status_code == 404 and gone.json()["code"] == "result_not_found"


def test_a_keep_ends_when_its_date_passes(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    upload = photos.png(40, 30, seed=4)
    response = client.post("/v1/keep", files={"image": ("cat.png", upload, "image/png")})
    entry = response.json()["original"]
    assert client.get(entry["url"]).status_code == 200
    later = kept_until(entry) + dt.timedelta(seconds=1)
    # Time passes for the whole service: the store's clock and the keep route's.
    monkeypatch.setattr(cache.store, "now_utc", lambda: later)
    monkeypatch.setattr(service.routes.orders, "now_utc", lambda: later)
    gone = client.get(entry["url"])
    assert gone.status_code == 404 and gone.json()["code"] == "result_not_found"
    # Kept again after it ended: kept anew from then on.
    again = client.post("/v1/keep", files={"image": ("cat.png", upload, "image/png")})
    assert again.status_code == 200 and kept_until(again.json()["original"]) > later


def test_another_customers_picture_never_replaces_a_kept_one(client: TestClient) -> None:
    mine, theirs = photos.png(40, 30, seed=5), photos.png(40, 30, seed=6)
    kept_mine = client.post("/v1/keep", files={"image": ("cat.png", mine, "image/png")}).json()["original"]
    kept_theirs = client.post(
        "/store-image",
        data={"session_id": "same-session", "image_type": "original"},
        files={"file": ("cat.png", theirs, "image/png")},
    ).json()
    assert kept_theirs["url"] != kept_mine["url"], "names are the sha256 of the bytes, not of what the client says"
    assert client.get(kept_mine["url"]).content == mine
    assert client.get(kept_theirs["url"]).content == theirs


def test_the_photo_is_held_only_after_being_processed(client: TestClient, tmp_path: Path) -> None:
    upload = photos.png(40, 30, seed=7)
    sha = hashlib.sha256(upload).hexdigest()
    unknown = keep(client, image_sha256=sha)
    assert unknown.status_code == 404 and unknown.json()["code"] == "image_not_cached"
    assert "send it again in `image`" in unknown.json()["detail"]
    process(client, upload, "dithering")
    assert (tmp_path / "cache" / "uploads" / sha).read_bytes() == upload
    assert keep(client, image_sha256=sha).status_code == 200


@pytest.mark.parametrize(
    ("data", "files", "status", "code", "says"),
    [
        ({"results": "x", "order": "1001"}, None, 422, "malformed_request", "unknown form field order"),
        (
            {"results": "a" * 64 + ".png", "tier": "forever"},
            None,
            400,
            "invalid_parameter",
            "order_completed (180 days)",
        ),
        ({"results": "https://cdn.example/cache/results/nope.png"}, None, 400, "invalid_parameter", "not a result"),
        ({"results": "b" * 64 + ".png"}, None, 404, "result_not_found", "b" * 64),
        ({"image_sha256": "not-a-hash"}, None, 400, "invalid_parameter", "64 hex"),
        ({}, None, 400, "invalid_parameter", "nothing to keep"),
        ({}, {"image": ("x.txt", b"hello, not a picture", "text/plain")}, 415, "unsupported_image", "JPEG"),
        (
            {"image_sha256": "c" * 64},
            {"image": ("c.png", photos.png(8, 8), "image/png")},
            400,
            "invalid_parameter",
            "not both",
        ),
        ({"results": ",".join(f"{i:064x}.png" for i in range(25))}, None, 400, "invalid_parameter", "at most 24"),
    ],
)
def test_keep_refusals_are_clear_json(
    client: TestClient, data: dict[str, str], files: Any, status: int, code: str, says: str
) -> None:
    response = client.post("/v1/keep", data=data, files=files, headers={"Origin": ORIGIN})
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert says in response.json()["detail"]
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert client.get("/health").status_code == 200


def test_kept_route_refuses_names_that_are_not_kept_pictures(client: TestClient) -> None:
    for name in ("e" * 64 + ".exe", "short.png", "E" * 64 + ".png"):
        response = client.get(f"/v1/kept/{name}")
        assert response.status_code == 404 and response.json()["code"] == "result_not_found"
    # An escaped path separator never reaches the route (no such route), let alone the disk.
    escaped = client.get("/v1/kept/..%2F..%2Fresults%2Fx.png")
    assert escaped.status_code == 404 and escaped.json()["code"] in {"not_found", "result_not_found"}


# ------------------------------------------------------------------------------------ /store-image


def theme_form(caller: str, effect: str = "enhancedblackwhite") -> dict[str, str]:
    """The fields each of the storefront's /store-image callers appends to its FormData."""
    if caller == "pet-processor.js uploadToGCS":  # assets/pet-processor.js
        return {
            "session_id": "pet_1_1733097600000",
            "image_type": f"processed_{effect}",
            "tier": "temporary",
            "pet_name": "Biscuit",
            "effect_applied": effect,
        }
    if caller == "inline-preview-mvp.js uploadOriginalToGCS":  # assets/inline-preview-mvp.js
        return {"session_id": "pet_2_1733097600001", "image_type": "original", "tier": "temporary"}
    if caller == "ks-product-pet-selector-stitch.liquid uploadToServer":  # snippets/
        return {"image_type": "original", "tier": "temporary", "session_id": "sess_abc"}
    raise AssertionError(caller)


@pytest.mark.parametrize(
    "caller",
    [
        "pet-processor.js uploadToGCS",
        "inline-preview-mvp.js uploadOriginalToGCS",
        "ks-product-pet-selector-stitch.liquid uploadToServer",
    ],
)
def test_store_image_answers_each_storefront_caller(client: TestClient, caller: str) -> None:
    picture = photos.jpeg(64, 48, seed=8) if "original" in theme_form(caller)["image_type"] else photos.png(64, 48)
    response = client.post(
        "/store-image",
        data=theme_form(caller),
        files={"file": ("pet_1_original_source_1733097600000.png", picture, "image/png")},
        headers={"Origin": ORIGIN},
    )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    answer = response.json()
    # What the callers read: `result.success && result.url`.
    assert answer["success"] is True and answer["url"].startswith("http://testserver/v1/kept/")
    assert answer["session_id"] == theme_form(caller)["session_id"]
    assert answer["image_type"] == theme_form(caller)["image_type"]
    assert answer["tier"] == "temporary" and answer["filename"] == "pet_1_original_source_1733097600000.png"
    assert 6.9 < days_from_now(kept_until(answer)) <= 7
    served = client.get(answer["url"])
    assert served.status_code == 200 and served.content == picture
    # The picture is named by its bytes, judged by their magic bytes, not by the file name.
    assert answer["url"].endswith(".jpeg" if picture[:2] == b"\xff\xd8" else ".png")
    assert "Biscuit" not in json.dumps(answer), "the pet's name is not stored"


def test_store_image_ignores_what_the_old_service_ignored_and_refuses_what_it_refused(client: TestClient) -> None:
    picture = photos.png(32, 32, seed=9)
    extra = client.post(
        "/store-image",
        data={**theme_form("inline-preview-mvp.js uploadOriginalToGCS"), "pet_id": "7", "something_new": "x"},
        files={"file": ("a.png", picture, "image/png")},
    )
    assert extra.status_code == 200, extra.text
    missing = client.post(
        "/store-image", data={"image_type": "original"}, files={"file": ("a.png", picture, "image/png")}
    )
    assert missing.status_code == 422 and set(missing.json()) >= {"detail", "code"}
    not_image = client.post(
        "/store-image",
        data=theme_form("inline-preview-mvp.js uploadOriginalToGCS"),
        files={"file": ("a.png", b"<html>not an image</html>", "image/png")},
    )
    assert not_image.status_code == 415 and not_image.json()["code"] == "unsupported_image"
    bad_tier = client.post(
        "/store-image",
        data={**theme_form("inline-preview-mvp.js uploadOriginalToGCS"), "tier": "gold"},
        files={"file": ("a.png", picture, "image/png")},
    )
    assert bad_tier.status_code == 400 and "temporary (7 days)" in bad_tier.json()["detail"]


def test_store_image_keeps_the_old_tiers_meaning(client: TestClient) -> None:
    picture = photos.png(32, 32, seed=10)
    for tier, days in (("temporary", 7), ("order_pending", 30), ("order_completed", 180), ("archived", 730)):
        response = client.post(
            "/store-image",
            data={**theme_form("inline-preview-mvp.js uploadOriginalToGCS"), "tier": tier},
            files={"file": ("a.png", picture, "image/png")},
        )
        assert response.status_code == 200
        assert days - 0.1 < days_from_now(kept_until(response.json())) <= days, tier


# ------------------------------------------------------------------------------------ links


def test_links_follow_the_host_the_client_used(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(public_url="")
    upload = photos.png(40, 30, seed=11)
    for base in ("http://127.0.0.1:9000", "http://shop-laptop.local:8080"):
        url = process(client, upload, "dithering", base)["results"]["dithering"]["url"]
        assert url.startswith(f"{base}/v1/results/")
        kept = client.post(f"{base}/v1/keep", data={"results": url}).json()
        (entry,) = kept["results"].values()
        assert entry["url"].startswith(f"{base}/v1/kept/")
    fixed = client_factory(public_url="https://cutout.example.com")
    url = process(fixed, upload, "dithering")["results"]["dithering"]["url"]
    assert url.startswith("https://cutout.example.com/v1/results/"), "CUTOUT_PUBLIC_URL, when set, wins"


def test_a_server_on_another_port_answers_links_that_resolve_and_logs_text(tmp_path: Path) -> None:
    """`PORT=9000 make run`-style: no CUTOUT_PUBLIC_URL, a port that is not 8080, links followed."""
    env = {"CUTOUT_PUBLIC_URL": "", "CUTOUT_ENVIRONMENT": "development", "CUTOUT_LOG_FORMAT": "auto"}
    upload = photos.png(48, 32, seed=12)
    with running_server(tmp_path, env) as server:
        port = server.url.rsplit(":", 1)[1]
        assert port != "8080"
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            response = httpx.post(
                f"http://{host}/v1/process",
                data={"effects": "popart", "background": "none"},
                files={"image": ("cat.png", upload, "image/png")},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            url = response.json()["results"]["popart"]["url"]
            assert url.startswith(f"http://{host}/v1/results/")
            followed = httpx.get(url, timeout=30)
            assert followed.status_code == 200 and followed.headers["content-type"] == "image/png"
            kept = httpx.post(f"http://{host}/v1/keep", data={"results": url}, timeout=30).json()
            (entry,) = kept["results"].values()
            assert httpx.get(entry["url"], timeout=30).content == followed.content
    lines = server.log_path.read_text().splitlines()
    access = [line for line in lines if "cutout.access: POST /v1/process 200" in line]
    assert len(access) == 2, lines[-20:]
    assert not any(line.startswith("{") for line in lines), "development logs are text, not JSON"
    assert "cache=" in access[0] and "stages_ms=" in access[0]


def test_production_logs_are_json(tmp_path: Path) -> None:
    env = {
        "CUTOUT_PUBLIC_URL": "",
        "CUTOUT_ENVIRONMENT": "production",
        "CUTOUT_LOG_FORMAT": "auto",
        "CUTOUT_WARMUP_TOKEN": "a-random-secret-of-32-characters",
    }
    with running_server(tmp_path, env) as server:
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    lines = [line for line in server.log_path.read_text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]
    assert any(entry.get("path") == "/health" and entry["severity"] == "INFO" for entry in parsed)


# ------------------------------------------------------------------------------------ in a browser

STORE_IMAGE_PAGE = ROOT / "tests" / "browser" / "store_image"
STORE_IMAGE_SPEC = ROOT / "tests" / "browser" / "store_image.spec.mjs"


@pytest.mark.browser
def test_each_storefront_store_image_caller_in_chromium(tmp_path: Path) -> None:
    """A page on another origin builds each caller's FormData, reads `success`/`url`, shows the picture."""
    node = require_browser_tools()
    with static_site(STORE_IMAGE_PAGE) as page_origin:
        env = {"CUTOUT_ALLOWED_ORIGINS": page_origin, "CUTOUT_PUBLIC_URL": ""}
        with running_server(tmp_path, env) as server:
            api = server.url
            report = run_browser_script(node, STORE_IMAGE_SPEC, {"pageUrl": f"{page_origin}/index.html?api={api}"}, 300)
            kept = {name: httpx.get(call["url"], timeout=30) for name, call in report["calls"].items()}
    print(json.dumps(report["calls"], indent=1))
    assert "error" not in report, report
    assert set(report["calls"]) == {
        "pet-processor.js uploadToGCS",
        "inline-preview-mvp.js uploadViaInSPyReNet",
        "inline-preview-mvp.js uploadOriginalToGCS",
        "ks-product-pet-selector-stitch.liquid uploadToServer",
    }
    for name, call in report["calls"].items():
        assert call["status"] == 200, (name, call)
        assert call["url"] and call["url"].startswith(f"{api}/v1/kept/"), (name, call)
        assert (call["shown"]["width"], call["shown"]["height"]) == (120, 80), (name, call)
        assert kept[name].status_code == 200
    originals = {report["calls"][n]["url"] for n in report["calls"] if "Original" in n or "uploadToServer" in n}
    assert len(originals) == 1, "the same photo twice is one kept picture (named by its bytes)"
    assert next(iter(originals)).endswith(".jpeg")
    errors = [line for line in report["console"] if line.startswith(("error", "pageerror"))]
    assert not errors, report["console"]
