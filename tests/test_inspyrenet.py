"""The cutout model layer: equivalence with transparent-background's Remover, loading, weight scripts.

Random InSPyReNet_SwinB weights at the fast size (384 px), written once per module through
the real script, loaded through the real loader, and compared with `Remover.process` on the
same weights. Nothing here touches the network: sockets refuse to connect for the module.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from effects.inspyrenet import (
    MANIFEST_FILE,
    MASK_LEVELS,
    MODEL_DIR,
    CutoutModel,
    ModelLoadError,
    dequantise_mask,
    load_cutout_model,
    quantise_mask,
    weights_digest,
)
from effects.weights import WeightsFetchError, convert_checkpoint, file_md5, package_checkpoint_source
from tests.support.budget import flops_per_forward
from tests.support.photos import photo
from tests.support.weights import write_inspyrenet

CPU = torch.device("cpu")
# (height, width): odd sizes, both orientations, extreme aspect ratios, single pixels.
SIZES = [(97, 131), (300, 200), (480, 640), (256, 1024), (1024, 256), (1, 1), (3, 2)]


@dataclass(frozen=True)
class Weights:
    models_dir: Path
    safetensors: Path
    pth: Path


@pytest.fixture(scope="module", autouse=True)
def no_network() -> Iterator[None]:
    """Remover downloads weights when it cannot find them; here that must fail loudly instead."""

    def refuse(self: socket.socket, address: Any) -> None:
        raise RuntimeError(f"test tried to open a network connection to {address}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Weights:
    directory = tmp_path_factory.mktemp("models")
    pth = tmp_path_factory.mktemp("reference") / "ckpt_fast.pth"
    path = write_inspyrenet(directory, "fast", seed=0, pth=pth)
    return Weights(directory, path, pth)


@pytest.fixture(scope="module")
def model(weights: Weights) -> CutoutModel:
    return load_cutout_model(weights.safetensors, CPU, torch.float32)


@pytest.fixture(scope="module")
def remover(weights: Weights, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Remover keeps a config copy under $TRANSPARENT_BACKGROUND_FILE_PATH (default: home).
    home = tmp_path_factory.mktemp("remover-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSPARENT_BACKGROUND_FILE_PATH", str(home))
        patch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")  # its import-time version check goes online
        from transparent_background import Remover

        return Remover(mode="fast", jit=False, device="cpu", ckpt=str(weights.pth))


@pytest.fixture(scope="module")
def our_alphas(model: CutoutModel) -> dict[tuple[int, int], np.ndarray]:
    """Our alpha for every size, computed as the engine does: one batched forward, 16-bit mask round trip."""
    images = {size: photo(size[1], size[0], seed=index) for index, size in enumerate(SIZES)}
    batch = torch.stack(
        [model.prepare(torch.from_numpy(image).permute(2, 0, 1).contiguous()) for image in images.values()]
    )
    probabilities = model.forward(batch)
    alphas = {}
    for size, probability in zip(images, probabilities, strict=True):
        mask = dequantise_mask(quantise_mask(probability[None]))
        alphas[size] = model.to_alpha(mask, *size)[0, 0].numpy()
    return alphas


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_alpha_matches_remover(
    size: tuple[int, int], our_alphas: dict[tuple[int, int], np.ndarray], remover: Any
) -> None:
    image = photo(size[1], size[0], seed=SIZES.index(size))
    mapped = np.asarray(remover.process(Image.fromarray(image), type="map"))
    # Remover squeezes a 1 x 1 mask down to a single RGB pixel; its first channel is the mask.
    reference = mapped.reshape(-1, 3)[:, 0].reshape(size).astype(np.float64)
    ours = our_alphas[size] * 255.0
    assert ours.shape == reference.shape
    # Remover truncates to uint8 ('map'), so ours may sit up to one level above it.
    assert np.abs(ours - reference).max() <= 2.0
    if min(size) > 3:
        assert reference.std() > 5.0, "the random network should give a mask that varies over the image"


def test_prepare_matches_remover_preprocessing(model: CutoutModel, remover: Any) -> None:
    for seed, (height, width) in enumerate([(97, 131), (640, 480), (384, 384), (2, 5)]):
        image = photo(width, height, seed=seed)
        reference = remover.transform(Image.fromarray(image))
        ours = model.prepare(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        assert ours.shape == reference.shape == (3, 384, 384)
        # At most one 8-bit level of the resize, in normalised units.
        assert (ours - reference).abs().max().item() <= 1.0 / 255.0 / 0.224 + 1e-5


def test_batching_does_not_change_a_mask(model: CutoutModel) -> None:
    """Each image is min-max normalised on its own, whatever else is in its micro-batch."""
    images = [torch.from_numpy(photo(64 + 16 * i, 48, seed=10 + i)).permute(2, 0, 1).contiguous() for i in range(2)]
    prepared = [model.prepare(image) for image in images]
    together = model.forward(torch.stack(prepared))
    alone = model.forward(prepared[1][None])
    assert together.shape == (2, 1, 384, 384) and together.dtype == torch.float32
    assert torch.allclose(together[1:], alone, atol=1e-5)
    for probability in together:
        assert probability.min().item() == 0.0 and abs(probability.max().item() - 1.0) < 1e-6


def test_nothing_left_on_meta(model: CutoutModel) -> None:
    net: Any = model.net  # the package's untyped modules
    tensors = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    tensors["image_pyramid.kernel"] = net.image_pyramid.kernel
    for name in ("transition0", "transition1", "transition2"):
        tensors[f"{name}.kernel"] = getattr(net, name).kernel
    assert len(tensors) > 700
    for name, tensor in tensors.items():
        assert tensor.device == CPU, name
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
    # The Gaussian kernel is computed by the constructor, not loaded: it must be the real one.
    kernel = net.image_pyramid.kernel
    assert kernel.shape == (1, 1, 7, 7) and abs(kernel.sum().item() - 1.0) < 1e-5
    assert not net.training
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in net.modules()), "batch norms folded"
    assert model.resident_bytes > 300_000_000


def test_model_id_names_the_weights(weights: Weights, model: CutoutModel) -> None:
    manifest = json.loads((weights.models_dir / MODEL_DIR / MANIFEST_FILE).read_text())
    assert manifest["model_id"] == model.model_id
    assert model.model_id.startswith("inspyrenet-swinb-384-")
    assert manifest["base_size"] == model.base_size == 384
    first = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor(1)}
    changed = {"a": torch.arange(6.0).view(2, 3) + 1e-3, "b": torch.tensor(1)}
    assert weights_digest(first) == weights_digest(dict(first))
    assert weights_digest(first) != weights_digest(changed)


def test_mask_quantisation_round_trip() -> None:
    probability = torch.rand(2, 1, 33, 47, generator=torch.Generator().manual_seed(3))
    probability[0, 0, 0, 0], probability[0, 0, 0, 1] = 0.0, 1.0
    levels = quantise_mask(probability)
    assert levels.dtype == torch.uint16 and levels.shape == probability.shape
    assert int(levels[0, 0, 0, 0]) == 0 and int(levels[0, 0, 0, 1]) == MASK_LEVELS
    restored = dequantise_mask(levels)
    assert restored.dtype == torch.float32
    assert (restored - probability).abs().max().item() <= 0.5 / MASK_LEVELS + 1e-7
    assert torch.equal(quantise_mask(restored), levels)


def test_prepare_and_forward_reject_wrong_inputs(model: CutoutModel) -> None:
    with pytest.raises(ValueError, match="uint8"):
        model.prepare(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model.prepare(torch.zeros(4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="prepare"):
        model.forward(torch.zeros(1, 3, 64, 64))


# ----------------------------------------------------------------------------- loader errors


def _rewrite(source: Path, target: Path, change: str) -> Path:
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = dict(load_file(str(source)))
    if change == "missing":
        del tensors["decoder.conv5.conv.weight"]
    elif change == "shape":
        tensors["context1.branch0.conv.weight"] = torch.zeros(64, 128, 3, 3)
    elif change == "unexpected":
        tensors["extra.weight"] = torch.zeros(2)
    elif change == "arch":
        metadata["arch"] = "U2Net"
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "inspyrenet-swinb" / "model.safetensors"
    with pytest.raises(ModelLoadError, match="not found") as error:
        load_cutout_model(path, CPU, torch.float32)
    assert str(path) in str(error.value) and "fetch_weights.py" in str(error.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_file_is_a_clear_error(weights: Weights, tmp_path: Path, damage: str) -> None:
    path = tmp_path / "model.safetensors"
    if damage == "truncated":
        with weights.safetensors.open("rb") as source:
            path.write_bytes(source.read(50_000_000))
    else:
        path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as error:
        load_cutout_model(path, CPU, torch.float32)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("missing", r"1 missing tensor\(s\): decoder\.conv5\.conv\.weight"),
        ("shape", r"context1\.branch0\.conv\.weight has shape \(64, 128, 3, 3\), expected \(64, 128, 1, 1\)"),
        ("unexpected", r"1 unexpected tensor\(s\): extra\.weight"),
        ("arch", r"holds weights for 'U2Net', expected 'InSPyReNet_SwinB'"),
    ],
)
def test_wrong_weights_are_a_clear_error(weights: Weights, tmp_path: Path, change: str, expected: str) -> None:
    path = _rewrite(weights.safetensors, tmp_path / "model.safetensors", change)
    with pytest.raises(ModelLoadError, match=expected) as error:
        load_cutout_model(path, CPU, torch.float32)
    assert str(path) in str(error.value)


# ----------------------------------------------------------------------------- weight scripts


def test_converted_checkpoint_loads_to_the_same_model(weights: Weights, model: CutoutModel, tmp_path: Path) -> None:
    """fetch_weights' conversion of a Remover checkpoint gives the same weights, id and masks."""
    converted = convert_checkpoint(
        weights.pth, tmp_path, base_size=384, expected_md5=file_md5(weights.pth), source="test checkpoint"
    )
    assert converted == tmp_path / MODEL_DIR / "model.safetensors"
    assert json.loads((tmp_path / MODEL_DIR / MANIFEST_FILE).read_text())["model_id"] == model.model_id
    reloaded = load_cutout_model(converted, CPU, torch.float32)
    assert reloaded.model_id == model.model_id
    image = torch.from_numpy(photo(80, 60, seed=5)).permute(2, 0, 1).contiguous()
    prepared = model.prepare(image)[None]
    assert torch.equal(reloaded.forward(prepared), model.forward(prepared))


def test_md5_mismatch_is_refused(weights: Weights, tmp_path: Path) -> None:
    with pytest.raises(WeightsFetchError, match=r"md5 [0-9a-f]{32} does not match 0{32}") as error:
        convert_checkpoint(weights.pth, tmp_path, base_size=384, expected_md5="0" * 32, source="test")
    assert str(weights.pth) in str(error.value)
    assert not (tmp_path / MODEL_DIR).exists(), "nothing is written for a corrupt download"


def test_non_checkpoint_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "ckpt_base.pth"
    torch.save({"weights": [1, 2, 3]}, bogus)
    with pytest.raises(WeightsFetchError, match="not a state dict of tensors"):
        convert_checkpoint(bogus, tmp_path / "models", base_size=1024, expected_md5=None, source="test")


def test_checkpoint_source_comes_from_the_package_config() -> None:
    base = package_checkpoint_source("base")
    assert base.url.endswith("/ckpt_base.pth") and base.url.startswith("https://")
    assert base.md5 == "d692e3dd5fa1b9658949d452bebf1cda"
    assert base.base_size == 1024
    assert package_checkpoint_source("fast").base_size == 384


def test_flop_count() -> None:
    small = flops_per_forward(384)
    large = flops_per_forward(1024)
    # Swin-B alone is ~47 GMAC at 384 px; the decoder adds to it.
    assert 100e9 < small < 1e12
    # Windowed attention and convolutions grow with the pixel count, the decoder's row/column
    # attention a little faster.
    assert 6.0 < large / small < 12.0


def test_warm_up_runs_a_small_real_forward_on_the_cpu(model: CutoutModel) -> None:
    value = model.warm_up()
    assert 0.0 <= value <= 1.0
    with pytest.raises(ValueError, match="multiple of 32"):
        model.warm_up(48)


@pytest.mark.parametrize("size", [(97, 131), (640, 480), (3, 2), (256, 1024)], ids=str)
def test_both_resize_kernels_are_within_one_level_of_pil(size: tuple[int, int]) -> None:
    """The CPU path (uint8 kernel) and the GPU path (float kernel, rounded) against Image.BILINEAR."""
    from effects.inspyrenet import _resize_float, resize_like_pil

    image = photo(size[1], size[0], seed=21)
    reference = torch.from_numpy(
        np.asarray(Image.fromarray(image).resize((384, 384), Image.Resampling.BILINEAR)).copy()
    )
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    for resized in (resize_like_pil(batch, 384, 384), _resize_float(batch, 384, 384)):
        assert (resized[0].permute(1, 2, 0) - reference.float()).abs().max().item() <= 1.0


def test_gpu_resize_path_also_matches_remover(model: CutoutModel, remover: Any) -> None:
    """The float resize used on CUDA (no uint8 kernel there) keeps the mask within 2/255 of Remover."""
    from effects.inspyrenet import IMAGENET_MEAN, IMAGENET_STD, _resize_float

    image = photo(480, 640, seed=22)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    prepared = (_resize_float(batch, 384, 384) / 255.0 - mean) / std
    alpha = model.to_alpha(dequantise_mask(quantise_mask(model.forward(prepared))), 640, 480)[0, 0].numpy() * 255
    mapped = np.asarray(remover.process(Image.fromarray(image), type="map"))[..., 0].astype(np.float64)
    assert np.abs(alpha - mapped).max() <= 2.0
