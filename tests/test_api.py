"""The HTTP contract of API.md over real multipart uploads (httpx against the ASGI app)."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from effects import EFFECTS
from tests.support import photos

ORIGIN = "https://shop.example"


def post_process(client: TestClient, data: bytes | None = None, **fields: Any) -> Any:
    files = {"image": ("photo.jpg", data, "image/jpeg")} if data is not None else None
    form = {key: str(value) for key, value in fields.items()}
    return client.post("/v1/process", data=form, files=files, headers={"Origin": ORIGIN})


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]
    assert response.headers.get("access-control-allow-origin") == ORIGIN
    return body


def test_health_and_readiness_without_weights(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    response = client.get("/ready")
    body = assert_error(client.get("/ready", headers={"Origin": ORIGIN}), 503, "not_ready")
    assert "cutout" in body["detail"] and "missing" in body["detail"]
    assert response.headers["retry-after"]


def test_effects_listing_reports_every_effect_with_schema(client: TestClient) -> None:
    listing = {item["name"]: item for item in client.get("/v1/effects").json()["effects"]}
    assert set(listing) == set(EFFECTS)
    assert listing["cutout"]["available"] is False
    for name in ("blackwhite", "dithering", "popart", "retro8bit"):
        assert listing[name]["available"] is True
        assert listing[name]["kind"] == "classic"
        assert listing[name]["params_schema"]["type"] == "object"
        assert isinstance(listing[name]["version"], int)


def test_process_classic_effects_on_the_original_background(client: TestClient) -> None:
    upload = photos.jpeg(120, 80)
    response = post_process(client, upload, effects="blackwhite,popart", background="none")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body["results"]) == {"blackwhite", "popart"}
    assert body["image_sha256"] and len(body["image_sha256"]) == 64
    for name, result in body["results"].items():
        assert result["cache"] == "miss", name
        assert (result["width"], result["height"]) == (120, 80)
        assert result["content_type"] == "image/png"
        fetched = client.get(result["url"].removeprefix("http://testserver"))
        assert fetched.status_code == 200
        assert fetched.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert len(fetched.content) == result["bytes"]
        assert Image.open(io.BytesIO(fetched.content)).size == (120, 80)
    for key in ("decode", "effects", "encode", "store", "total"):
        assert key in body["timings_ms"]


def test_repeat_request_is_a_cache_hit_without_running_the_effect(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = EFFECTS["dithering"]

    def counting_apply(image: torch.Tensor, params: Any, seed: int) -> torch.Tensor:
        calls.append(seed)
        assert original.apply is not None
        return original.apply(image, params, seed)

    monkeypatch.setitem(EFFECTS, "dithering", dataclasses.replace(original, apply=counting_apply))
    upload = photos.png(64, 48)
    first = post_process(client, upload, effects="dithering", background="none")
    second = post_process(client, upload, effects="dithering", background="none")
    assert first.status_code == second.status_code == 200
    assert first.json()["results"]["dithering"]["cache"] == "miss"
    assert second.json()["results"]["dithering"]["cache"] == "hit"
    assert first.json()["results"]["dithering"]["key"] == second.json()["results"]["dithering"]["key"]
    assert calls == [0]


def test_single_effect_route_answers_bytes_with_cache_headers(client: TestClient) -> None:
    upload = photos.jpeg(80, 60)
    files = {"image": ("p.jpg", upload, "image/jpeg")}
    first = client.post("/v1/effects/retro8bit", data={"background": "none"}, files=files)
    assert first.status_code == 200, first.text
    assert first.headers["x-cache"] == "MISS"
    assert first.headers["content-type"] == "image/png"
    key = first.headers["etag"].strip('"')
    assert first.headers["content-location"].endswith(f"/v1/results/{key}.png")
    second = client.post("/v1/effects/retro8bit", data={"background": "none"}, files=files)
    assert second.headers["x-cache"] == "HIT"
    assert second.content == first.content
    by_hash = client.post("/v1/effects/retro8bit", data={"background": "none", "image_sha256": _sha(upload)})
    assert by_hash.status_code == 200 and by_hash.content == first.content


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_same_seed_same_bytes_and_seed_changes_the_key(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    # Two services with separate stores: the second computes afresh, so equal bytes mean a
    # deterministic effect, not a cache hit.
    first_service, second_service = client_factory(cache_dir=tmp_path / "a"), client_factory(cache_dir=tmp_path / "b")
    upload = photos.jpeg(64, 64, seed=3)

    def grain(client: TestClient, seed: int) -> tuple[str, bytes]:
        body = post_process(client, upload, effects="blackwhite", background="none", seed=seed).json()
        result = body["results"]["blackwhite"]
        assert result["cache"] == "miss", body
        fetched = client.get(f"/v1/results/{result['key']}.png")
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png", fetched.text
        assert fetched.content.startswith(b"\x89PNG") and len(fetched.content) == result["bytes"]
        return result["key"], fetched.content

    key_a, bytes_a = grain(first_service, 7)
    key_b, bytes_b = grain(second_service, 7)
    assert (key_a, bytes_a) == (key_b, bytes_b)
    key_c, bytes_c = grain(second_service, 8)
    assert key_c != key_a
    assert bytes_c != bytes_a, "the grain must follow the seed"


def test_hash_first_answers_from_the_store_or_asks_for_the_upload(client: TestClient) -> None:
    upload = photos.jpeg(72, 48, seed=5)
    sha = _sha(upload)
    missing = post_process(client, None, image_sha256=sha, effects="popart", background="none")
    body = assert_error(missing, 404, "image_not_cached")
    assert "upload" in body["detail"]
    assert post_process(client, upload, effects="popart", background="none").status_code == 200
    cached = post_process(client, None, image_sha256=sha, effects="popart", background="none")
    assert cached.status_code == 200
    assert cached.json()["results"]["popart"]["cache"] == "hit"
    partly = post_process(client, None, image_sha256=sha, effects="popart,dithering", background="none")
    assert_error(partly, 404, "image_not_cached")


def test_model_effects_answer_503_until_the_model_is_there(client: TestClient) -> None:
    upload = photos.jpeg()
    body = assert_error(post_process(client, upload, effects="cutout"), 503, "model_unavailable")
    assert "cutout" in body["detail"]
    assert_error(post_process(client, upload, effects="blackwhite"), 503, "model_unavailable")
    assert post_process(client, upload, effects="blackwhite", background="none").status_code == 200


@pytest.mark.parametrize(
    ("fields", "code", "mentions"),
    [
        ({"effects": "sepia"}, "unknown_effect", "blackwhite"),
        ({"effects": "blackwhite", "params": '{"blackwhite": {"nope": 1}}'}, "invalid_parameter", "nope"),
        ({"effects": "popart", "params": '{"popart": [1]}'}, "invalid_parameter", "popart"),
        ({"effects": "popart", "params": "{not json"}, "invalid_parameter", "JSON"),
        ({"effects": "popart", "params": '{"dithering": {}}'}, "invalid_parameter", "dithering"),
        ({"effects": "popart", "format": "gif"}, "invalid_parameter", "format"),
        ({"effects": "popart", "background": "transparent", "format": "jpeg"}, "invalid_parameter", "jpeg"),
        ({"effects": "popart", "background": "purple"}, "invalid_parameter", "#rrggbb"),
        ({"effects": "popart", "max_size": 10}, "invalid_parameter", "max_size"),
        ({"effects": "popart", "max_size": 5000}, "invalid_parameter", "max_size"),
        ({"effects": "popart", "seed": -1}, "invalid_parameter", "seed"),
        ({"effects": "cutout", "background": "none"}, "invalid_parameter", "background"),
        ({"effects": " , "}, "invalid_parameter", "effects"),
    ],
)
def test_bad_parameters_are_400_with_a_teaching_detail(
    client: TestClient, fields: dict[str, Any], code: str, mentions: str
) -> None:
    fields.setdefault("background", "none")
    body = assert_error(post_process(client, photos.jpeg(), **fields), 400, code)
    assert mentions in body["detail"]


def test_bad_param_values_name_the_field(client: TestClient) -> None:
    effect = "blackwhite"
    schema = EFFECTS[effect].params.model_json_schema()
    field, spec = next((name, spec) for name, spec in schema["properties"].items() if "maximum" in spec)
    params = json.dumps({effect: {field: spec["maximum"] + 1000}})
    body = assert_error(
        post_process(client, photos.jpeg(), effects=effect, background="none", params=params), 400, "invalid_parameter"
    )
    assert f"params.{effect}.{field}" in body["detail"]


def test_malformed_forms_are_422(client: TestClient) -> None:
    assert_error(post_process(client, photos.jpeg(), effects="popart", colour="red"), 422, "malformed_request")
    assert_error(post_process(client, photos.jpeg(), effects="popart", seed="abc"), 422, "malformed_request")
    no_photo = post_process(client, None, effects="popart", background="none")
    assert_error(no_photo, 400, "invalid_parameter")


def test_unknown_result_is_404(client: TestClient) -> None:
    assert_error(client.get(f"/v1/results/{'0' * 64}.png", headers={"Origin": ORIGIN}), 404, "result_not_found")
    assert_error(client.get("/v1/results/secret.png", headers={"Origin": ORIGIN}), 404, "result_not_found")
    assert_error(client.get("/v1/results/..%2Fsecret.png", headers={"Origin": ORIGIN}), 404, "not_found")


def test_uploads_over_the_byte_limit_are_413_before_reading_them(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(max_upload_bytes=20_000)
    big = photos.encode(photos.photo(400, 400, seed=1), "PNG")
    assert len(big) > 100_000
    assert_error(post_process(client, big, effects="popart", background="none"), 413, "upload_too_large")

    def chunks() -> Any:  # no Content-Length: the limit applies while streaming
        boundary = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        yield boundary
        for _ in range(50):
            yield b"\0" * 10_000
        yield b"\r\n--b--\r\n"

    streamed = client.post(
        "/v1/process",
        content=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=b", "Origin": ORIGIN},
    )
    assert_error(streamed, 413, "upload_too_large")
    assert client.get("/health").status_code == 200


def test_pixel_bombs_are_413(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory()
    body = assert_error(
        post_process(client, photos.png_header_bomb(), effects="popart", background="none"), 413, "image_too_large"
    )
    assert "30000x30000" in body["detail"]
    small_limit = client_factory(max_pixels=5000)
    assert_error(
        post_process(small_limit, photos.jpeg(100, 100), effects="popart", background="none"), 413, "image_too_large"
    )


def test_cors_headers_on_answers_and_preflight(client: TestClient) -> None:
    preflight = client.options("/v1/process", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    other = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert_error(client.get("/nope", headers={"Origin": ORIGIN}), 404, "not_found")


def test_output_is_never_upscaled_and_respects_max_size(client: TestClient) -> None:
    upload = photos.jpeg(300, 200)
    small = post_process(client, upload, effects="popart", background="none", max_size=64).json()
    assert (small["results"]["popart"]["width"], small["results"]["popart"]["height"]) == (64, 43)
    big = post_process(client, upload, effects="popart", background="none", max_size=4096).json()
    assert (big["results"]["popart"]["width"], big["results"]["popart"]["height"]) == (300, 200)


def test_formats_webp_and_jpeg(client: TestClient) -> None:
    upload = photos.jpeg(64, 48)
    for fmt, pil_name, content_type in (("webp", "WEBP", "image/webp"), ("jpeg", "JPEG", "image/jpeg")):
        result = post_process(client, upload, effects="blackwhite", background="none", format=fmt).json()
        entry = result["results"]["blackwhite"]
        assert entry["content_type"] == content_type
        assert entry["url"].endswith(f".{fmt}")
        fetched = client.get(entry["url"].removeprefix("http://testserver"))
        assert fetched.headers["content-type"] == content_type
        assert Image.open(io.BytesIO(fetched.content)).format == pil_name
