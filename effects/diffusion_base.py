"""What a diffusion effect declares: its `Params` bases and its `DiffusionSpec`.

Each diffusion effect module (`upscale`, `enhance`, `comic`, `aged`) imports this module only; the
registry (`effects/__init__.py`) carries each effect's spec, and the runtime (`effects/diffusion.py`),
the weight fetcher (`effects/weights.py`) and the test builders read it from there. Nothing here imports
diffusers, transformers, the registry or the runtime.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from effects.base import EffectParams

PROMPT_ADDITION_MAX_CHARS = 120
_PROMPT_PUNCTUATION = frozenset(" ,.'-!?&/")

# The production architectures of each effect's pipeline (`<effect>/unet.json`, ...), and the tiny
# test architecture beside them (`<effect>/tiny.json`): see model_configs/README.md.
MODEL_CONFIGS_DIR = Path(__file__).parent / "model_configs"

PipelineKind = Literal["upscale", "sd_img2img", "sdxl_img2img"]

PIPELINE_CLASS_NAMES: dict[PipelineKind, str] = {
    "upscale": "StableDiffusionUpscalePipeline",
    "sd_img2img": "StableDiffusionImg2ImgPipeline",
    "sdxl_img2img": "StableDiffusionXLImg2ImgPipeline",
}


# --- Params ----------------------------------------------------------------------------------------


def clean_prompt_addition(value: str | None) -> str | None:
    """Collapse whitespace and refuse anything but words and plain punctuation: no control characters,
    no brackets, colons or other prompt-weighting syntax (diffusers would read it as plain text anyway,
    so refusing it tells the customer up front). The addition is appended to the effect's own prompt."""
    if value is None:
        return None
    text = " ".join(value.split())
    if not text:
        return None
    refused = sorted({ch for ch in text if not (ch.isalnum() or ch in _PROMPT_PUNCTUATION)})
    if refused:
        shown = " ".join(repr(ch) if unicodedata.category(ch)[0] != "C" else f"U+{ord(ch):04X}" for ch in refused)
        raise ValueError(
            f"prompt_addition may hold letters, digits, spaces and the punctuation , . ' - ! ? & / only; remove {shown}"
        )
    return text


class DiffusionParams(EffectParams):
    """What every diffusion effect accepts: the sampler's effort, the prompt's pull, an optional addition.

    Each effect module re-declares `steps` and `guidance_scale` with its own defaults and bounds.
    """

    steps: int
    guidance_scale: float
    prompt_addition: str | None = Field(
        default=None,
        max_length=PROMPT_ADDITION_MAX_CHARS,
        description=(
            "Words appended to the effect's own prompt, e.g. 'red scarf, autumn light'. Letters, digits, spaces "
            f"and plain punctuation, at most {PROMPT_ADDITION_MAX_CHARS} characters. Slower: the text encoder runs "
            "for this request."
        ),
    )

    @field_validator("prompt_addition")
    @classmethod
    def _clean_prompt_addition(cls, value: str | None) -> str | None:
        return clean_prompt_addition(value)


class Img2ImgParams(DiffusionParams):
    """Image-to-image effects: `strength` of the re-drawing decides how many of `steps` actually run."""

    strength: float

    @model_validator(mode="after")
    def _at_least_one_step(self) -> Self:
        if int(self.steps * self.strength) < 1:
            raise ValueError(
                f"steps × strength must leave at least one denoising step, but {self.steps} × {self.strength} "
                f"rounds down to 0; raise steps or strength"
            )
        return self


class UpscaleParams(DiffusionParams):
    """The upscaler also takes the noise level it adds to the low-resolution input."""

    noise_level: int


# --- Spec ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffusionSpec:
    """Where one diffusion effect's pipeline comes from and how the runner drives it.

    `hub_id` is the Hugging Face Hub repository the image build fetches the pipeline from, and
    `vae_hub_id` one whose VAE replaces the pipeline's own (the service itself reads only the converted
    copy under MODELS_DIR). `max_side` is the longest side the pipeline works on: for `upscale` the input
    is capped there (the output is `scale` times the capped input); for image-to-image effects larger
    inputs are diffused at that size and resized back, so the output always has the input's size.
    `scheduler` names the diffusers scheduler class each job gets a fresh instance of (schedulers keep
    per-run state). `vae_in_float32` keeps the VAE in float32 when the rest runs in half precision (the
    x4 upscaler's decoder is unstable in fp16; a resident fp32 copy beats re-casting the shared VAE on
    every job).
    """

    kind: PipelineKind
    hub_id: str
    prompt: str
    negative_prompt: str
    scheduler: str
    max_side: int
    vae_hub_id: str | None = None
    scale: int = 1
    vae_in_float32: bool = False
    vae_tiling: bool = False
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    @property
    def pipeline_class_name(self) -> str:
        return PIPELINE_CLASS_NAMES[self.kind]

    @property
    def pipeline_options(self) -> dict[str, Any]:
        """`from_pretrained` options that leave out the safety checker, feature extractor and watermarker."""
        if self.kind == "sdxl_img2img":
            return {"add_watermarker": False}
        if self.kind == "sd_img2img":
            return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        return {"safety_checker": None, "feature_extractor": None, "watermarker": None}

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the pipeline sees: the input scaled down (never up) to fit `max_side`."""
        longest = max(height, width)
        if longest <= self.max_side:
            return height, width
        factor = self.max_side / longest
        return max(1, round(height * factor)), max(1, round(width * factor))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The size `run_diffusion` returns for an input of this size."""
        if self.scale == 1:
            return height, width
        working_height, working_width = self.working_size(height, width)
        return working_height * self.scale, working_width * self.scale
