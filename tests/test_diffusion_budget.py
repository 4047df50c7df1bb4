"""The GPU budget of the diffusion effects, from the production architectures on the `meta` device."""

from __future__ import annotations

import pytest
import torch

from effects.diffusion import DIFFUSION_EFFECTS, component_parameter_counts, resident_weight_bytes
from service.settings import Settings

GB = 1_000_000_000

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


def test_configured_diffusion_effects_fit_the_settings_budget() -> None:
    settings = Settings()
    sizes = resident_weight_bytes(settings.diffusion_effects)
    total = sum(sizes.values())
    assert set(sizes) == set(settings.diffusion_effects) == set(DIFFUSION_EFFECTS)
    assert total <= settings.diffusion_budget_gb * GB, f"{total / GB:.2f} GB over {settings.diffusion_budget_gb} GB"
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
    # The check can fail: the default set does not fit in 12 GB.
    assert sum(resident_weight_bytes(DIFFUSION_EFFECTS).values()) > 12 * GB
