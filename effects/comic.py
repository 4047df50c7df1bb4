"""Comic: the cutout re-drawn as a hand-drawn Ghibli-style illustration (Ghibli-Diffusion, SD 1.5 img2img).

"ghibli style" is the fine-tune's trigger phrase. Inputs longer than 768 px are drawn at 768 px and
resized back to their own size.
"""

from __future__ import annotations

from pydantic import Field

from effects.base import Effect
from effects.diffusion_base import DiffusionSpec, Img2ImgParams


class Params(Img2ImgParams):
    strength: float = Field(
        default=0.55,
        ge=0.2,
        le=0.85,
        description="How freely the photo is re-drawn: 0.2 stays close to it, 0.85 keeps little but the composition.",
    )
    steps: int = Field(
        default=30,
        ge=10,
        le=60,
        description="Sampler steps before strength applies (30 × 0.55 runs 16 steps); more is slower and smoother.",
    )
    guidance_scale: float = Field(
        default=7.0,
        ge=1.0,
        le=15.0,
        description="How strongly the style prompt steers the drawing; 1 turns it off.",
    )


SPEC = DiffusionSpec(
    kind="sd_img2img",
    hub_id="nitrosocke/Ghibli-Diffusion",
    prompt="ghibli style, hand-drawn anime illustration, soft colors, clean line art, detailed",
    negative_prompt="photo, photorealistic, realistic, blurry, lowres, deformed, bad anatomy, text, watermark",
    scheduler="DDIMScheduler",
    max_side=768,
)

EFFECT = Effect(
    name="comic",
    kind="diffusion",
    description="The cutout re-drawn as a Ghibli-style illustration (Ghibli-Diffusion img2img); size and alpha kept.",
    version=1,
    params=Params,
    model="comic",
    diffusion=SPEC,
)
