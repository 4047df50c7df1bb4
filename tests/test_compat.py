"""`POST /api/v2/process-with-effects`, exactly as the storefront in production sends it."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.support import photos

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
            client, photos.jpeg(64, 48), f"/api/v2/process-with-effects?return_all_effects=true&effects={effects}"
        )
        detail = assert_error(response, 503, "model_unavailable")
        assert "cutout" in detail
        assert int(response.headers["retry-after"]) > 0


def test_errors_keep_the_json_shape_and_cors_headers(client: TestClient) -> None:
    detail = assert_error(
        storefront_post(client, photos.jpeg(), "/api/v2/process-with-effects?return_all_effects=true&effects=sepia"),
        400,
        "unknown_effect",
    )
    for name in ("color", "enhancedblackwhite", "blackwhite", "dithering", "popart", "optimized_popart", "retro8bit"):
        assert name in detail
    # A form with no `file` is refused, as the old services refused it.
    assert_error(client.post(STOREFRONT_URL, data={"note": "x"}, headers={"Origin": ORIGIN}), 422, "malformed_request")
    missing = client.post(
        STOREFRONT_URL, files={"image": ("a.jpg", photos.jpeg(), "image/jpeg")}, headers={"Origin": ORIGIN}
    )
    assert "file" in assert_error(missing, 422, "malformed_request")
    assert "png, webp" in assert_error(
        storefront_post(client, photos.jpeg(), STOREFRONT_URL + "&output_format=jpeg"), 400, "invalid_parameter"
    )
    assert "file" in assert_error(
        client.post("/remove-background?format=webp", data={"x": "1"}, headers={"Origin": ORIGIN}),
        422,
        "malformed_request",
    )
    preflight = client.options(STOREFRONT_URL, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN


def test_the_v1_api_still_refuses_what_the_compatibility_routes_accept(client: TestClient) -> None:
    refused = client.post(
        "/v1/process",
        data={"effects": "cutout", "session_id": "perkie_1"},
        files={"image": ("p.jpg", photos.jpeg(), "image/jpeg")},
        headers={"Origin": ORIGIN},
    )
    assert "session_id" in assert_error(refused, 422, "malformed_request")


def test_cors_allows_the_listed_origins_and_the_preview_pattern_only(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory(
        allowed_origins=["https://perkieprints.com", "https://perkie-prints.myshopify.com"],
        allowed_origin_regex=r"https://[a-z0-9-]+\.shopifypreview\.com",
    )
    # api-client.js's warm-up sends `Content-Type: application/json`: a preflighted request.
    for origin in (
        "https://perkieprints.com",
        "https://perkie-prints.myshopify.com",
        "https://a1b2c3d4e5-12345.shopifypreview.com",
    ):
        preflight = client.options(
            "/warmup",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,accept",
            },
        )
        assert preflight.status_code == 200, (origin, preflight.text)
        assert preflight.headers["access-control-allow-origin"] == origin
        assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
        answer = client.get("/health", headers={"Origin": origin})
        assert answer.headers["access-control-allow-origin"] == origin
    for stranger in (
        "https://evil.example",
        "https://perkieprints.com.evil.example",
        "https://x.shopifypreview.com.evil.example",
        "http://a1b2.shopifypreview.com",
    ):
        preflight = client.options(
            STOREFRONT_URL, headers={"Origin": stranger, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status_code == 400, stranger
        assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": stranger}).headers


def test_a_bad_origin_pattern_is_a_startup_error(tmp_path: Path) -> None:
    from service.settings import Settings

    with pytest.raises(ValueError, match="allowed_origin_regex"):
        Settings(allowed_origin_regex="https://(unclosed")


@pytest.fixture
def cutout_client(client_factory: Callable[..., TestClient], models_dir: Path) -> TestClient:
    """An app with the cutout model loaded (random weights): every storefront route needs it."""
    app = client_factory(models_dir=models_dir)
    ready = app.get("/ready")
    assert ready.status_code == 200, ready.text
    return app


def test_storefront_request_answers_base64_transparent_pngs_from_the_shared_cache(
    cutout_client: TestClient,
) -> None:
    photo = photos.jpeg(80, 60, seed=3)

    response = storefront_post(cutout_client, photo)

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
    again = storefront_post(cutout_client, photo).json()
    assert again["cache_info"]["total_cache_hits"] == 2
    assert again["effects"] == body["effects"]

    # Same cache as the current API: `color` is `cutout`, `enhancedblackwhite` is `blackwhite`.
    current = cutout_client.post(
        "/v1/process",
        data={"effects": "cutout,blackwhite", "background": "transparent", "format": "png"},
        files={"image": ("p.jpg", photo, "image/jpeg")},
    ).json()
    assert {name: r["cache"] for name, r in current["results"].items()} == {"cutout": "hit", "blackwhite": "hit"}
    assert current["results"]["cutout"]["key"] == info["effects"]["color"]["key"]
    fetched = cutout_client.get(current["results"]["cutout"]["url"].removeprefix("http://testserver"))
    assert fetched.content == decoded["color"]

    # return_all_effects=false: the old single-image answer, the first effect's PNG.
    single = storefront_post(cutout_client, photo, "/api/v2/process-with-effects?effects=popart,color")
    assert single.status_code == 200
    assert single.headers["content-type"] == "image/png"
    assert single.headers["x-effect"] == "popart"
    assert single.headers["x-cache"] == "MISS"
    with Image.open(io.BytesIO(single.content)) as image:
        assert (image.format, image.size, image.mode) == ("PNG", (80, 60), "RGBA")
    assert (
        storefront_post(cutout_client, photo, "/api/v2/process-with-effects?effects=popart").headers["x-cache"] == "HIT"
    )
    assert_error(storefront_post(cutout_client, b"hello, not a photo" * 10), 415, "unsupported_image")


def decode_effect(value: str) -> tuple[str, Image.Image]:
    """What the theme does with each value: raw base64 is PNG; a data URL says its own type."""
    if value.startswith("data:"):
        header, _, text = value.partition(",")
        mime = header.removeprefix("data:").removesuffix(";base64")
    else:
        mime, text = "image/png", value
    image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    image.load()
    return mime, image


def test_every_request_shape_the_theme_builds_is_answered(
    cutout_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cutout.compat")
    photo = photos.jpeg(72, 56, seed=5)

    # assets/api-client.js (BiRefNet branch): effects and session_id in the form, only return_all_effects in the query.
    api_client = cutout_client.post(
        "/api/v2/process-with-effects?return_all_effects=true",
        data={"effects": "color,enhancedblackwhite", "session_id": "perkie_1764630000000"},
        files={"file": ("blob", photo, "image/jpeg")},
        headers={"Origin": ORIGIN, "Accept": "application/json"},
    )
    assert api_client.status_code == 200, api_client.text
    assert api_client.headers["access-control-allow-origin"] == ORIGIN
    body = api_client.json()
    assert (body["success"], body["session_id"], body["total_effects"]) == (True, "perkie_1764630000000", 2)
    assert list(body["effects"]) == ["color", "enhancedblackwhite"]
    for value in body["effects"].values():
        assert decode_effect(value)[1].size == (72, 56)

    # The same file's InSPyReNet branch asks for optimized_popart and dithering as well.
    inspyrenet = cutout_client.post(
        "/api/v2/process-with-effects?return_all_effects=true",
        data={"effects": "color,enhancedblackwhite,optimized_popart,dithering", "session_id": "perkie_2"},
        files={"file": ("blob", photo, "image/jpeg")},
        headers={"Origin": ORIGIN},
    ).json()
    assert list(inspyrenet["effects"]) == ["color", "enhancedblackwhite", "optimized_popart", "dithering"]
    assert inspyrenet["cache_info"]["effects"]["optimized_popart"]["effect"] == "popart"
    assert inspyrenet["effects"]["color"] == body["effects"]["color"], "same photo, same cutout, from the cache"

    # assets/pet-processor.js: effects both in the query and in the form (the query wins, same names anyway).
    pet_processor = cutout_client.post(
        STOREFRONT_URL,
        data={"effects": "enhancedblackwhite,color"},
        files={"file": ("IMG_0042.jpg", photo, "image/jpeg")},
        headers={"Origin": ORIGIN},
    ).json()
    assert list(pet_processor["effects"]) == ["enhancedblackwhite", "color"]
    assert pet_processor["cache_info"]["total_cache_hits"] == 2
    query_wins = cutout_client.post(
        "/api/v2/process-with-effects?return_all_effects=true&effects=dithering",
        data={"effects": "popart"},
        files={"file": ("p.jpg", photo, "image/jpeg")},
    ).json()
    assert list(query_wins["effects"]) == ["dithering"]

    # The BiRefNet service's name, next to the InSPyReNet one: one result, two keys.
    both = storefront_post(
        cutout_client,
        photo,
        "/api/v2/process-with-effects?return_all_effects=true&effects=blackwhite,enhancedblackwhite",
    ).json()
    assert both["effects"]["blackwhite"] == both["effects"]["enhancedblackwhite"]

    # Fields the old services declared (or never declared) and Cutout has no use for: accepted, ignored.
    extra = cutout_client.post(
        STOREFRONT_URL + "&session_id=s-9&use_cache=true&quality=80&grain=0.1&effect_params=%7B%7D&utm_source=x",
        data={"pet_name": "Rex"},
        files={"file": ("p.jpg", photo, "image/jpeg")},
        headers={"Origin": ORIGIN},
    )
    assert extra.status_code == 200, extra.text
    assert extra.json()["session_id"] == "s-9"
    ignored = [r.getMessage() for r in caplog.records if r.name == "cutout.compat"]
    assert any("'utm_source', 'pet_name'" in line for line in ignored), ignored
    assert not any("Rex" in line or "quality" in line for line in ignored), "names only, and only undeclared ones"
    assert extra.json()["effects"] == pet_processor["effects"]

    # No session id sent: one is made up, as the InSPyReNet service did.
    assert len(storefront_post(cutout_client, photo).json()["session_id"]) >= 16

    # load_single_effect: JSON with only the primary effect.
    single_json = storefront_post(
        cutout_client, photo, "/api/v2/process-with-effects?load_single_effect=true&effect=color&effects=popart,color"
    ).json()
    assert list(single_json["effects"]) == ["color"] and single_json["progressive_mode"] is True

    # output_format=webp: data URLs that say they are WebP (the BiRefNet service's answer).
    webp = storefront_post(cutout_client, photo, STOREFRONT_URL + "&output_format=webp").json()
    for value in webp["effects"].values():
        mime, image = decode_effect(value)
        assert (mime, image.format, image.size, image.mode) == ("image/webp", "WEBP", (72, 56), "RGBA")

    # Single-image answer with the old `effect` parameter.
    legacy = storefront_post(cutout_client, photo, "/api/v2/process-with-effects?effect=dithering")
    assert (legacy.headers["content-type"], legacy.headers["x-effect"]) == ("image/png", "dithering")


def test_remove_background_answers_the_cutout_as_image_bytes(
    cutout_client: TestClient,
) -> None:
    # pet-processor.js sends a generated PNG (opaque background) as `gemini-effect.png`, `?format=webp`.
    source = photos.png(90, 70, seed=8)
    webp = cutout_client.post(
        "/remove-background?format=webp",
        files={"file": ("gemini-effect.png", source, "image/png")},
        headers={"Origin": ORIGIN},
    )
    assert webp.status_code == 200, webp.text
    assert webp.headers["content-type"] == "image/webp"
    assert webp.headers["access-control-allow-origin"] == ORIGIN
    assert webp.headers["x-cache"] == "MISS"
    with Image.open(io.BytesIO(webp.content)) as image:
        assert (image.format, image.size, image.mode) == ("WEBP", (90, 70), "RGBA")
        assert np.asarray(image)[:, :, 3].min() < 255, "the background is removed"
    # The old service's default format is WebP too; output_format=png gives the PNG.
    default = cutout_client.post("/remove-background", files={"file": ("a.png", source, "image/png")})
    assert default.headers["content-type"] == "image/webp" and default.headers["x-cache"] == "HIT"
    png = cutout_client.post(
        "/remove-background?output_format=png&alpha_matting=true&quality=80",
        files={"file": ("a.png", source, "image/png")},
    )
    assert png.headers["content-type"] == "image/png"
    # Same cache as /v1: the cutout of this image in PNG.
    current = cutout_client.post(
        "/v1/process", data={"effects": "cutout"}, files={"image": ("a.png", source, "image/png")}
    ).json()
    assert current["results"]["cutout"]["cache"] == "hit"
    assert current["results"]["cutout"]["key"] == png.headers["etag"].strip('"')
    assert_error(
        cutout_client.post(
            "/remove-background?format=webp",
            files={"file": ("x.png", b"not an image" * 5, "image/png")},
            headers={"Origin": ORIGIN},
        ),
        415,
        "unsupported_image",
    )


def test_json_answers_are_gzipped_for_clients_that_take_it(
    cutout_client: TestClient,
) -> None:
    from service.routes.compat import accepts_gzip

    assert accepts_gzip("gzip, deflate, br, zstd") and accepts_gzip("br;q=1.0, gzip;q=0.5") and accepts_gzip("*")
    assert not accepts_gzip("") and not accepts_gzip("identity") and not accepts_gzip("gzip;q=0")
    assert not accepts_gzip("br, gzip;q=nonsense")

    photo = photos.jpeg(64, 48, seed=9)
    plain = storefront_post_with(cutout_client, photo, {"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert "Accept-Encoding" in plain.headers["vary"].split(", ")
    packed = storefront_post_with(cutout_client, photo, {"Accept-Encoding": "gzip, deflate, br, zstd"})
    assert packed.headers["content-encoding"] == "gzip"
    assert int(packed.headers["content-length"]) < len(plain.content)
    assert packed.json()["effects"] == plain.json()["effects"]  # httpx undoes the gzip, as a browser does


def storefront_post_with(client: TestClient, data: bytes, headers: dict[str, str]) -> Any:
    return client.post(
        STOREFRONT_URL,
        files={"file": ("IMG_0042.jpg", data, "image/jpeg")},
        headers={"Origin": ORIGIN, **headers},
    )
