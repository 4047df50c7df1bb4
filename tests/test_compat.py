"""`POST /api/v2/process-with-effects`, exactly as the storefront in production sends it."""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from tests import images

ORIGIN = "https://shop.example"
STOREFRONT_URL = "/api/v2/process-with-effects?return_all_effects=true&effects=enhancedblackwhite,color"


def storefront_post(client: TestClient, data: bytes, url: str = STOREFRONT_URL, **files: Any) -> Any:
    """The storefront's request: multipart with the photo in `file`, everything else in the query."""
    return client.post(url, files={"file": ("IMG_0042.jpg", data, "image/jpeg"), **files}, headers={"Origin": ORIGIN})


def assert_error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "code"}, body
    assert body["code"] == code
    assert response.headers["access-control-allow-origin"] == ORIGIN
    return str(body["detail"])


def test_without_the_cutout_model_every_effect_is_503_with_cors(client: TestClient) -> None:
    # Every storefront effect is applied to the cutout, so each one needs the model.
    for effects in ("color", "enhancedblackwhite,color", "popart"):
        response = storefront_post(
            client, images.jpeg(64, 48), f"/api/v2/process-with-effects?return_all_effects=true&effects={effects}"
        )
        detail = assert_error(response, 503, "model_unavailable")
        assert "cutout" in detail
        assert int(response.headers["retry-after"]) > 0


def test_errors_keep_the_json_shape_and_cors_headers(client: TestClient) -> None:
    detail = assert_error(
        storefront_post(client, images.jpeg(), "/api/v2/process-with-effects?return_all_effects=true&effects=sepia"),
        400,
        "unknown_effect",
    )
    for name in ("color", "enhancedblackwhite", "dithering", "popart", "retro8bit"):
        assert name in detail
    assert_error(client.post(STOREFRONT_URL, data={"note": "x"}, headers={"Origin": ORIGIN}), 422, "malformed_request")
    missing = client.post(
        STOREFRONT_URL, files={"image": ("a.jpg", images.jpeg(), "image/jpeg")}, headers={"Origin": ORIGIN}
    )
    assert "file" in assert_error(missing, 422, "malformed_request")
    assert "session_id" in assert_error(
        storefront_post(client, images.jpeg(), STOREFRONT_URL + "&session_id=abc"), 422, "malformed_request"
    )
    preflight = client.options(STOREFRONT_URL, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN


def test_storefront_request_answers_base64_transparent_pngs_from_the_shared_cache(
    client_factory: Callable[..., TestClient], models_dir: Path
) -> None:
    client = client_factory(models_dir=models_dir)
    assert client.get("/ready").status_code == 200, client.get("/ready").text
    photo = images.jpeg(80, 60, seed=3)

    response = storefront_post(client, photo)

    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    body = response.json()
    assert body["success"] is True
    assert list(body["effects"]) == ["enhancedblackwhite", "color"]
    decoded = {name: base64.b64decode(text, validate=True) for name, text in body["effects"].items()}
    for name, data in decoded.items():
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG", name
            assert image.size == (80, 60), name
            # A transparent PNG: colour with alpha, or greyscale with alpha for black-and-white results.
            assert image.mode in ("RGBA", "LA"), f"{name}: the storefront composites a transparent PNG"
            alpha = np.asarray(image.convert("RGBA"))[:, :, 3]
        assert alpha.min() < 255, f"{name}: the background is removed (some transparency)"
    assert body["processing_time"]["total"] > 0
    assert {"decode", "mask", "effects", "encode"} <= set(body["processing_time"])
    info = body["cache_info"]
    assert info["image_sha256"] == hashlib.sha256(photo).hexdigest()
    assert info["total_cache_hits"] == 0
    assert info["effects"]["color"]["effect"] == "cutout"
    assert info["effects"]["enhancedblackwhite"]["effect"] == "blackwhite"
    assert {entry["cache"] for entry in info["effects"].values()} == {"miss"}

    # Same photo again: every effect from the cache, byte for byte.
    again = storefront_post(client, photo).json()
    assert again["cache_info"]["total_cache_hits"] == 2
    assert again["effects"] == body["effects"]

    # Same cache as the current API: `color` is `cutout`, `enhancedblackwhite` is `blackwhite`.
    current = client.post(
        "/v1/process",
        data={"effects": "cutout,blackwhite", "background": "transparent", "format": "png"},
        files={"image": ("p.jpg", photo, "image/jpeg")},
    ).json()
    assert {name: r["cache"] for name, r in current["results"].items()} == {"cutout": "hit", "blackwhite": "hit"}
    assert current["results"]["cutout"]["key"] == info["effects"]["color"]["key"]
    fetched = client.get(current["results"]["cutout"]["url"].removeprefix("http://testserver"))
    assert fetched.content == decoded["color"]

    # return_all_effects=false: the old single-image answer, the first effect's PNG.
    single = storefront_post(client, photo, "/api/v2/process-with-effects?effects=popart,color")
    assert single.status_code == 200
    assert single.headers["content-type"] == "image/png"
    assert single.headers["x-effect"] == "popart"
    assert single.headers["x-cache"] == "MISS"
    with Image.open(io.BytesIO(single.content)) as image:
        assert (image.format, image.size, image.mode) == ("PNG", (80, 60), "RGBA")
    assert storefront_post(client, photo, "/api/v2/process-with-effects?effects=popart").headers["x-cache"] == "HIT"
    assert_error(storefront_post(client, b"hello, not a photo" * 10), 415, "unsupported_image")
