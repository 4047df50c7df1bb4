"""Enhance: a light SDXL-refiner image-to-image pass that sharpens detail and cleans noise.

Low strength keeps the photo as it is and lets the refiner re-draw only fine texture. Inputs longer than
1024 px (SDXL's native size) are refined at 1024 px and resized back to their own size.
"""

from __future__ import annotations

from pydantic import Field

from effects.base import Effect
from effects.diffusion_base import DiffusionSpec, Img2ImgParams


class Params(Img2ImgParams):
    strength: float = Field(
        default=0.25,
        ge=0.05,
        le=0.5,
        description="How much the refiner may re-draw: 0.05 touches only grain, 0.5 starts changing details.",
    )
    steps: int = Field(
        default=30,
        ge=10,
        le=60,
        description="Sampler steps before strength applies (30 × 0.25 runs 7 steps); more is slower and smoother.",
    )
    guidance_scale: float = Field(
        default=5.0,
        ge=1.0,
        le=12.0,
        description="How strongly the prompt ('sharp focus, fine detail') steers the result; 1 turns it off.",
    )


SPEC = DiffusionSpec(
    kind="sdxl_img2img",
    hub_id="stabilityai/stable-diffusion-xl-refiner-1.0",
    vae_hub_id="madebyollin/sdxl-vae-fp16-fix",
    prompt="a high quality photo, sharp focus, fine detail, natural colors, clean",
    negative_prompt="blurry, lowres, noisy, jpeg artifacts, oversaturated, deformed, distorted",
    scheduler="EulerDiscreteScheduler",
    max_side=1024,
)

EFFECT = Effect(
    name="enhance",
    kind="diffusion",
    description="Sharper detail and cleaner texture from a low-strength SDXL refiner pass; size and alpha kept.",
    version=1,
    params=Params,
    model="enhance",
    diffusion=SPEC,
)
