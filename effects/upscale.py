"""Upscale: 4× super-resolution of the cutout with the Stable Diffusion x4 upscaler.

The input is capped at 512 px on its long side (so the output is at most 2048 px) and the VAE decodes
in tiles, which keeps one job well inside the GPU memory left beside the resident pipelines. The alpha
is resized 4× alongside.
"""

from __future__ import annotations

from pydantic import Field

from effects.base import Effect
from effects.diffusion_base import DiffusionSpec, UpscaleParams


class Params(UpscaleParams):
    steps: int = Field(
        default=20, ge=5, le=75, description="Sampler steps: more recover finer detail and take proportionally longer."
    )
    guidance_scale: float = Field(
        default=7.5,
        ge=1.0,
        le=15.0,
        description=(
            "How strongly the prompt ('a sharp, detailed photo') steers the detail the upscaler adds; 1 turns it off."
        ),
    )
    noise_level: int = Field(
        default=20,
        ge=0,
        le=100,
        description=(
            "Noise added to the input before upscaling: higher hides compression artefacts and invents more texture, "
            "lower stays closer to the photo."
        ),
    )


SPEC = DiffusionSpec(
    kind="upscale",
    hub_id="stabilityai/stable-diffusion-x4-upscaler",
    prompt="a sharp, detailed, high quality photo",
    negative_prompt="blurry, lowres, jpeg artifacts, noise, oversharpened, deformed",
    scheduler="DDIMScheduler",
    max_side=512,
    scale=4,
    vae_in_float32=True,
    vae_tiling=True,
)

EFFECT = Effect(
    name="upscale",
    kind="diffusion",
    description=(
        "4× super-resolution of the cutout (Stable Diffusion x4 upscaler). Inputs longer than 512 px are scaled to "
        "512 px first, so results are at most 2048 px."
    ),
    version=1,
    params=Params,
    model="upscale",
    diffusion=SPEC,
)
