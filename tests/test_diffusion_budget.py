"""The GPU budget of the diffusion effects, from the production architectures on the `meta` device."""

from __future__ import annotations

import pytest
import torch

from effects import DIFFUSION_EFFECTS
from effects.engine import DEVICE_RESERVE_BYTES, DIFFUSION_JOB_BYTES, MASK_FORWARD_BYTES_PER_IMAGE, WORKING_SET_FACTOR
from service.settings import Settings
from tests.support.budget import component_parameter_counts, resident_weight_bytes

GB = 1_000_000_000
MIB = 1024**2

# Published parameter counts (millions) of the production models, ±2 %:
# SD 1.5 UNet 859.5 M, SD 2.x UNet 865.9 M, x4 upscaler UNet 473 M, SDXL refiner UNet 2.26 B (4.52 GB in fp16),
# CLIP ViT-L/14 text 123 M, OpenCLIP ViT-H/14 text without its last layer 340 M, ViT-bigG/14 text 695 M,
# the SD / SDXL VAE 83.7 M, the x4 upscaler's three-level VAE 55.3 M.
PUBLISHED_MILLIONS = {
    "upscale": {"unet": 473.0, "vae": 55.3, "text_encoder": 340.4},
    "enhance": {"unet": 2259.5, "vae": 83.65, "text_encoder_2": 694.7},
    "comic": {"unet": 859.5, "vae": 83.65, "text_encoder": 123.1},
    "aged": {"unet": 865.9, "vae": 83.65, "text_encoder": 340.4},
}

# The GPU budget of ARCHITECTURE.md (fp16, GB): x4 upscaler ~1.7 (+0.1 for its VAE kept in fp32 here),
# SDXL refiner with the fp16-fix VAE ~6.1, Ghibli (SD 1.5) ~2.1, SD 2.1 ~2.6.
EXPECTED_GB = {"upscale": (1.6, 1.95), "enhance": (5.9, 6.2), "comic": (2.0, 2.2), "aged": (2.5, 2.7)}


@pytest.mark.parametrize("effect", DIFFUSION_EFFECTS)
def test_each_model_matches_its_published_size(effect: str) -> None:
    counts = component_parameter_counts(effect)
    assert set(counts) == set(PUBLISHED_MILLIONS[effect])
    for component, published in PUBLISHED_MILLIONS[effect].items():
        millions = counts[component] / 1e6
        assert published * 0.98 <= millions <= published * 1.02, f"{effect}.{component}: {millions:.1f} M"


def test_each_pipeline_fits_its_share_of_the_budget() -> None:
    sizes = resident_weight_bytes(DIFFUSION_EFFECTS)
    for effect, (low, high) in EXPECTED_GB.items():
        assert low * GB <= sizes[effect] <= high * GB, f"{effect}: {sizes[effect] / GB:.2f} GB"


# What the L4 leaves for diffusion weights (an estimate: no GPU measured; docs/capacity.md, "Does it fit
# the L4?"): the 23,034 MiB `total_memory` of an L4, minus the cutout model (~200 MiB), the engine's
# device reserve, one mask batch's and one diffusion job's activations (the engine's own constants) and
# the tensor work of at least one request at the largest max_size (4096² RGBA float32 × the working-set
# factor, 1 GiB). The engine does not refuse a set over this; this test does.
L4_TOTAL_BYTES = 23_034 * MIB
CUTOUT_WEIGHT_BYTES = 200 * MIB
LARGEST_REQUEST_BYTES = int(4096 * 4096 * 4 * 4 * WORKING_SET_FACTOR)


def diffusion_weight_budget(mask_batch_size: int) -> int:
    shared = DEVICE_RESERVE_BYTES + mask_batch_size * MASK_FORWARD_BYTES_PER_IMAGE + DIFFUSION_JOB_BYTES
    return L4_TOTAL_BYTES - CUTOUT_WEIGHT_BYTES - shared - LARGEST_REQUEST_BYTES


def test_configured_diffusion_effects_fit_the_l4() -> None:
    settings = Settings()
    sizes = resident_weight_bytes(settings.diffusion_effects)
    total = sum(sizes.values())
    assert set(sizes) == set(settings.diffusion_effects) == set(DIFFUSION_EFFECTS)
    budget = diffusion_weight_budget(settings.mask_batch_size)
    assert budget == 14_802 * MIB  # 23,034 - 200 - 1,536 - 8 x 300 - 3,072 - 1,024 MiB
    assert total <= budget, f"{total / GB:.2f} GB over the L4's {budget / GB:.2f} GB"
    # With the cutout model (~0.2 GB) this leaves the L4's 24 GB most of its room for one job.
    assert total < 13.5 * GB


def test_fp16_halves_everything_but_the_upscalers_fp32_vae() -> None:
    half = resident_weight_bytes(DIFFUSION_EFFECTS, torch.float16)
    full = resident_weight_bytes(DIFFUSION_EFFECTS, torch.float32)
    for effect in ("enhance", "comic", "aged"):
        assert full[effect] == 2 * half[effect]
    vae_bytes = component_parameter_counts("upscale")["vae"] * 4
    assert full["upscale"] - vae_bytes == 2 * (half["upscale"] - vae_bytes)


def test_a_tighter_budget_would_be_exceeded() -> None:
    # The check can fail: the default set does not fit in 12 GB, nor beside mask batches of 32
    # (CUTOUT_MASK_BATCH_SIZE allows up to 64).
    total = sum(resident_weight_bytes(DIFFUSION_EFFECTS).values())
    assert total > 12 * GB
    assert total > diffusion_weight_budget(32)
