"""Diffusion effects through the HTTP API, with tiny random pipelines loaded by the real service."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from effects import DIFFUSION_EFFECTS, EFFECTS, diffusion_spec
from tests.support import photos

PHOTO = photos.png(48, 40, seed=5)
DIFFUSION = DIFFUSION_EFFECTS
# The fewest steps the bounds allow keep each CPU job short; the defaults are covered by the contract test.
FAST = {
    effect: {"steps": EFFECTS[effect].params.model_json_schema()["properties"]["steps"]["minimum"]}
    for effect in DIFFUSION
}
SAME_SIZE = tuple(effect for effect in DIFFUSION if diffusion_spec(effect).scale == 1)


def effect_request(client: TestClient, effect: str, seed: int = 0, **fields: Any) -> Any:
    form = {"seed": str(seed), **{key: str(value) for key, value in fields.items()}}
    return client.post(f"/v1/effects/{effect}", data=form, files={"image": ("pet.png", PHOTO, "image/png")})


def rgba(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


def clear_store(client: TestClient) -> None:
    root: Path = client.app.state.store.root  # type: ignore[attr-defined]
    for folder in ("results", "masks"):
        if (root / folder).is_dir():
            for path in (root / folder).iterdir():
                path.unlink()


def test_effects_listing_reports_the_diffusion_effects_available(model_client: TestClient) -> None:
    listing = {item["name"]: item for item in model_client.get("/v1/effects").json()["effects"]}
    for effect in DIFFUSION:
        assert listing[effect]["kind"] == "diffusion"
        assert listing[effect]["available"] is True
        properties = listing[effect]["params_schema"]["properties"]
        assert {"steps", "guidance_scale", "prompt_addition"} <= set(properties)


def test_process_runs_every_diffusion_effect_in_one_upload(model_client: TestClient) -> None:
    clear_store(model_client)
    form = {"effects": ",".join(["cutout", *DIFFUSION]), "params": json.dumps(FAST), "seed": "9"}
    response = model_client.post("/v1/process", data=form, files={"image": ("pet.png", PHOTO, "image/png")})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert set(results) == {"cutout", *DIFFUSION}
    for effect in DIFFUSION:
        scale = diffusion_spec(effect).scale
        assert (results[effect]["width"], results[effect]["height"]) == (48 * scale, 40 * scale), effect
        assert results[effect]["cache"] == "miss"
    cutout = rgba(model_client.get(results["cutout"]["url"].removeprefix("http://testserver")).content)
    for effect in SAME_SIZE:
        output = rgba(model_client.get(results[effect]["url"].removeprefix("http://testserver")).content)
        assert np.array_equal(output[..., 3], cutout[..., 3]), f"{effect} must keep the cutout's alpha"
        assert not np.array_equal(output[..., :3], cutout[..., :3]), f"{effect} must change the picture"

    again = model_client.post("/v1/process", data=form, files={"image": ("pet.png", PHOTO, "image/png")})
    assert {name: result["cache"] for name, result in again.json()["results"].items()} == dict.fromkeys(results, "hit")


def test_params_out_of_bounds_are_400_naming_the_field(model_client: TestClient) -> None:
    cases = [
        ("comic", {"strength": 0.95}, "params.comic.strength"),
        ("enhance", {"steps": 10, "strength": 0.05}, "params.enhance"),
        ("upscale", {"noise_level": 500}, "params.upscale.noise_level"),
        ("aged", {"prompt_addition": "sepia (1.5)"}, "params.aged.prompt_addition"),
    ]
    for effect, params, field in cases:
        response = effect_request(model_client, effect, params=json.dumps(params))
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_parameter"
        assert field in response.json()["detail"]


def test_prompt_addition_is_part_of_the_result(model_client: TestClient) -> None:
    plain = effect_request(model_client, "aged", seed=2, params=json.dumps(FAST["aged"]))
    added = effect_request(
        model_client, "aged", seed=2, params=json.dumps({**FAST["aged"], "prompt_addition": "blue hat"})
    )
    assert plain.status_code == added.status_code == 200
    assert plain.headers["etag"] != added.headers["etag"]
    assert plain.content != added.content


def test_concurrent_diffusion_and_cutout_requests_all_match_their_sequential_results(
    model_client: TestClient,
) -> None:
    requests: list[tuple[str, int, dict[str, Any]]] = [
        ("comic", 5, {"params": json.dumps(FAST["comic"])}),
        ("cutout", 0, {}),
        ("upscale", 2, {"params": json.dumps(FAST["upscale"])}),
        ("blackwhite", 3, {}),
        ("enhance", 4, {"params": json.dumps(FAST["enhance"])}),
        ("cutout", 0, {"background": "white", "format": "jpeg"}),
    ]

    def send(item: tuple[str, int, dict[str, Any]]) -> Any:
        effect, seed, fields = item
        return effect_request(model_client, effect, seed, **fields)

    clear_store(model_client)
    sequential = [send(item) for item in requests]
    clear_store(model_client)
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        concurrent = list(pool.map(send, requests))
    for item, first, second in zip(requests, sequential, concurrent, strict=True):
        assert first.status_code == second.status_code == 200, (item, first.text, second.text)
        assert second.headers["x-cache"] == "MISS", item
        assert first.content == second.content, item


def test_a_missing_or_broken_pipeline_makes_only_that_effect_unavailable(
    models_dir: Path, tmp_path: Path, client_factory: Callable[..., TestClient]
) -> None:
    partial_models = tmp_path / "partial-models"
    partial_models.mkdir()
    (partial_models / "aged").symlink_to(models_dir / "aged", target_is_directory=True)
    shutil.copytree(models_dir / "enhance", partial_models / "enhance")
    weights = partial_models / "enhance" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2048])  # comic is absent altogether

    client = client_factory(models_dir=partial_models, diffusion_effects=["aged", "comic", "enhance"])
    listing = {item["name"]: item["available"] for item in client.get("/v1/effects").json()["effects"]}
    assert listing["aged"] is True
    assert listing["comic"] is False and listing["enhance"] is False
    assert listing["blackwhite"] is True

    for effect in ("comic", "enhance"):
        response = effect_request(client, effect, background="none", params=json.dumps(FAST[effect]))
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "model_unavailable"
        assert effect in response.json()["detail"]
        assert int(response.headers["retry-after"]) > 0
    broken = client.get("/ready")
    assert broken.status_code == 503 and "enhance" in broken.text and "comic" in broken.text

    working = effect_request(client, "aged", background="none", params=json.dumps(FAST["aged"]))
    assert working.status_code == 200, working.text
    assert rgba(working.content).shape == (40, 48, 4)
    assert effect_request(client, "blackwhite", background="none").status_code == 200
