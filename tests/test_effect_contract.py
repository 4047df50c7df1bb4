"""One contract, parametrised over the registry, that every effect keeps (STYLE.md 8).

Each effect runs through the real service with real (random) weights: size kept (4x for
`upscale`), the cutout's alpha kept, the same seed giving the same bytes, another seed
giving other bytes where the effect is stochastic, and bad params answered 400 naming the field.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from effects import DIFFUSION_EFFECTS, EFFECTS
from tests.support import photos

STOCHASTIC = {"blackwhite", *DIFFUSION_EFFECTS}
PHOTO = photos.png(48, 40, seed=11)


def run(client: TestClient, effect: str, seed: int = 0, params: dict[str, Any] | None = None) -> Any:
    form = {"background": "transparent", "seed": str(seed)}
    if params is not None:
        form["params"] = json.dumps(params)
    return client.post(f"/v1/effects/{effect}", data=form, files={"image": ("pet.png", PHOTO, "image/png")})


def rgba(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGBA"))


@pytest.mark.parametrize("effect", list(EFFECTS))
def test_effect_contract(model_client: TestClient, effect: str) -> None:
    cutout = rgba(run(model_client, "cutout"))
    first = run(model_client, effect, seed=3)
    output = rgba(first)
    spec = EFFECTS[effect].diffusion
    scale = 1 if spec is None else spec.scale
    assert output.shape == (40 * scale, 48 * scale, 4)
    if scale == 1:
        assert np.array_equal(output[..., 3], cutout[..., 3]), "alpha must be the cutout's"
    else:
        small = np.asarray(Image.fromarray(output[..., 3]).resize((48, 40), Image.Resampling.BOX), dtype=np.int16)
        assert np.abs(small - cutout[..., 3].astype(np.int16)).mean() < 8, "alpha must follow the cutout's"

    # Same seed, same bytes — computed again from scratch, not served from the cache.
    for path in model_client.app.state.store.root.joinpath("results").iterdir():  # type: ignore[attr-defined]
        path.unlink()
    again = run(model_client, effect, seed=3)
    assert again.headers["x-cache"] == "MISS"
    assert again.content == first.content
    if effect in STOCHASTIC:
        assert run(model_client, effect, seed=4).content != first.content


@pytest.mark.parametrize("effect", list(EFFECTS))
def test_effect_rejects_bad_params_naming_the_field(model_client: TestClient, effect: str) -> None:
    schema = EFFECTS[effect].params.model_json_schema()
    bounded = [(name, spec) for name, spec in schema.get("properties", {}).items() if "maximum" in spec]
    if bounded:
        field, spec = bounded[0]
        params = {effect: {field: spec["maximum"] + 1000}}
    else:
        field, params = "surprise", {effect: {"surprise": 1}}
    response = run(model_client, effect, params=params)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_parameter"
    assert f"params.{effect}.{field}" in response.json()["detail"]


def test_max_size_bounds_the_upscaled_result(model_client: TestClient) -> None:
    response = model_client.post(
        "/v1/effects/upscale",
        data={"background": "transparent", "max_size": "96"},
        files={"image": ("pet.png", PHOTO, "image/png")},
    )
    output = rgba(response)
    assert max(output.shape[:2]) <= 96
    assert max(output.shape[:2]) >= 80, "the upscaler should still enlarge up to the bound"
