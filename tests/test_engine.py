"""The engine with the real InSPyReNet architecture (random weights) on the CPU: micro-batching,
the mask cache, out-of-memory handling, and what a broken checkpoint does to the service."""

from __future__ import annotations

import asyncio
import io
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from effects.engine import Engine, ModelMissing, OutOfMemory
from tests.support import photos


@pytest.fixture(scope="module")
def engine_factory(models_dir: Path) -> Callable[..., Engine]:
    def make(**options: object) -> Engine:
        values: dict[str, object] = {
            "device": "cpu",
            "models_dir": models_dir,
            "cutout_model": "inspyrenet-swinb",
            "mask_batch_size": 8,
            "mask_batch_wait_ms": 20.0,
        }
        values.update(options)
        return Engine(**values)  # type: ignore[arg-type]

    return make


def photo_tensors(count: int) -> list[torch.Tensor]:
    """Photos of different sizes and aspect ratios, as the engine receives them (C, H, W) uint8."""
    sizes = [(64, 48), (40, 90), (120, 120), (33, 17), (80, 60), (50, 150), (96, 64), (20, 20)]
    return [
        torch.from_numpy(photos.photo(*sizes[i % len(sizes)], seed=i)).permute(2, 0, 1).contiguous()
        for i in range(count)
    ]


def test_concurrent_masks_equal_sequential_ones_in_any_arrival_order(engine_factory: Callable[..., Engine]) -> None:
    async def scenario() -> None:
        engine = engine_factory()
        await engine.start()
        try:
            inputs = [engine.prepare_mask_input(photo) for photo in photo_tensors(5)]
            sequential = [await engine.mask(x) for x in inputs]
            batches_before = engine.batches_run
            order = list(range(len(inputs)))
            random.Random(7).shuffle(order)

            async def arrive(index: int, delay: float) -> tuple[int, torch.Tensor]:
                await asyncio.sleep(delay)
                return index, await engine.mask(inputs[index])

            arrivals = await asyncio.gather(*(arrive(i, 0.001 * rank) for rank, i in enumerate(order)))
            batches = engine.batches_run - batches_before
            assert batches < len(inputs), "concurrent requests should share batches"
            for index, mask in arrivals:
                assert torch.equal(mask, sequential[index]), f"request {index} got someone else's mask"
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_out_of_memory_splits_the_batch_then_fails_only_the_lone_image(
    engine_factory: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        engine = engine_factory()
        await engine.start()
        try:
            real_forward = engine._forward
            seen: list[int] = []

            def forward(batch: list[torch.Tensor]) -> list[torch.Tensor]:
                seen.append(len(batch))
                if len(batch) > 1:
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
                return real_forward(batch)

            monkeypatch.setattr(engine, "_forward", forward)
            inputs = [engine.prepare_mask_input(photo) for photo in photo_tensors(4)]
            inputs = [inputs[0]] * 4  # same shape, so one batch of four
            masks = await asyncio.gather(*(engine.mask(x) for x in inputs))
            assert max(seen) == 4 and seen.count(1) == 4, seen
            assert all(torch.equal(m, masks[0]) for m in masks)

            def always_oom(batch: list[torch.Tensor]) -> list[torch.Tensor]:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

            monkeypatch.setattr(engine, "_forward", always_oom)
            with pytest.raises(OutOfMemory):
                await engine.mask(inputs[0])
            monkeypatch.setattr(engine, "_forward", real_forward)
            assert (await engine.mask(inputs[0])).shape == masks[0].shape  # still serving
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_mask_cache_serves_the_second_effect_without_the_model(
    model_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine: Engine = model_client.app.state.engine  # type: ignore[attr-defined]
    upload = photos.jpeg(90, 70, seed=21)
    first = model_client.post(
        "/v1/process", data={"effects": "cutout"}, files={"image": ("a.jpg", upload, "image/jpeg")}
    )
    assert first.status_code == 200, first.text
    store_root: Path = model_client.app.state.store.root  # type: ignore[attr-defined]
    assert any(store_root.joinpath("masks").iterdir())
    batches = engine.batches_run
    second = model_client.post(
        "/v1/process", data={"effects": "popart,dithering"}, files={"image": ("a.jpg", upload, "image/jpeg")}
    )
    assert second.status_code == 200
    assert engine.batches_run == batches, "a cached mask must not run the model again"

    # The cached mask gives the same bytes as a fresh one: clear results only, then masks too.
    key = second.json()["results"]["popart"]["key"]
    cached_bytes = model_client.get(f"/v1/results/{key}.png").content
    shutil.rmtree(store_root / "results")
    shutil.rmtree(store_root / "masks")
    (store_root / "results").mkdir()
    (store_root / "masks").mkdir()
    third = model_client.post(
        "/v1/process", data={"effects": "popart"}, files={"image": ("a.jpg", upload, "image/jpeg")}
    )
    assert third.json()["results"]["popart"]["cache"] == "miss"
    assert engine.batches_run == batches + 1
    assert model_client.get(f"/v1/results/{key}.png").content == cached_bytes


def test_backgrounds_are_composited_from_the_mask(model_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # A known mask (subject on the right half, soft band in the middle) instead of random
    # weights' noise, so every assertion below has pixels to check.
    cutout = model_client.app.state.engine._cutout  # type: ignore[attr-defined]

    def known_mask(batch: torch.Tensor) -> torch.Tensor:
        size = batch.shape[-1]
        ramp = torch.linspace(-4.0, 4.0, size).clamp(-1.0, 1.0).add(1.0).div(2.0)
        return ramp.expand(batch.shape[0], 1, size, size).contiguous()

    monkeypatch.setattr(cutout, "forward", known_mask)
    upload = photos.png(64, 48, seed=404)

    def effect(background: str, fmt: str = "png") -> np.ndarray:
        response = model_client.post(
            "/v1/effects/cutout",
            data={"background": background, "format": fmt},
            files={"image": ("a.png", upload, "image/png")},
        )
        assert response.status_code == 200, response.text
        return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGBA")).astype(np.int16)

    transparent = effect("transparent")
    white = effect("white")
    coloured = effect("#204080")
    blurred = effect("blur", "jpeg")
    alpha = transparent[..., 3:4] / 255.0
    assert (white[..., 3] == 255).all() and (coloured[..., 3] == 255).all() and (blurred[..., 3] == 255).all()
    # Where the mask is empty the chosen background shows; where it is full the subject does.
    clear = alpha[..., 0] < 0.02
    solid = alpha[..., 0] > 0.98
    assert clear.sum() > alpha.size // 4 and solid.sum() > alpha.size // 4, (clear.sum(), solid.sum())
    assert np.abs(coloured[clear][:, :3] - np.array([0x20, 0x40, 0x80])).max() <= 3
    assert (white[clear][:, :3] >= 250).all()
    assert np.abs(white[solid][:, :3] - transparent[solid][:, :3]).max() <= 3
    # The blurred background keeps the subject (JPEG noise aside).
    assert np.abs(blurred[solid][:, :3] - transparent[solid][:, :3]).mean() <= 4
    expected_white = transparent[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(white[..., :3] - expected_white).max() <= 3


@pytest.mark.parametrize("damage", ["missing", "corrupt", "wrong_shape", "missing_key"])
def test_broken_checkpoint_leaves_classic_effects_serving(
    client_factory: Callable[..., TestClient], models_dir: Path, tmp_path: Path, damage: str
) -> None:
    broken = tmp_path / "broken-models"
    shutil.copytree(models_dir / "inspyrenet-swinb", broken / "inspyrenet-swinb")
    weights = broken / "inspyrenet-swinb" / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "corrupt":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 3])
    else:
        tensors = load_file(str(weights))
        metadata = json.loads(weights.read_bytes()[8 : 8 + int.from_bytes(weights.read_bytes()[:8], "little")])
        name = next(n for n in tensors if n.endswith("proj.weight"))
        if damage == "wrong_shape":
            tensors[name] = torch.zeros(3, 3)
        else:
            del tensors[name]
        save_file(tensors, str(weights), metadata=metadata.get("__metadata__"))
    client = client_factory(models_dir=broken)
    ready = client.get("/ready")
    assert ready.status_code == 503
    detail = ready.json()["detail"]
    assert "cutout" in detail and "model.safetensors" in detail
    cutout = client.post("/v1/process", data={"effects": "cutout"}, files={"image": ("a.jpg", photos.jpeg(), "x")})
    assert cutout.status_code == 503 and cutout.json()["code"] == "model_unavailable"
    classic = client.post(
        "/v1/process", data={"effects": "popart", "background": "none"}, files={"image": ("a.jpg", photos.jpeg(), "x")}
    )
    assert classic.status_code == 200


def test_engine_reports_missing_weights_before_loading(tmp_path: Path) -> None:
    engine = Engine(device="cpu", models_dir=tmp_path, cutout_model="inspyrenet-swinb")
    assert engine.states["cutout"].status == "missing"
    with pytest.raises(ModelMissing, match="fetch_weights"):
        engine.check_model("cutout")
