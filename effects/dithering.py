"""Dithering: Floyd–Steinberg error diffusion drawn as round ink dots on white paper.

The photo is reduced to a grid of cells (`dots` along the longer side), each cell's grey is the
alpha-weighted mean of its pixels, and the grid is diffused to black/white. Each black cell is
then drawn as an anti-aliased round dot, so the result reads as a printed dot screen rather
than as blown-up square pixels.

The threshold is *adaptive*: every cell is compared partly with its neighbourhood's mean
rather than with a fixed 50 % grey, which keeps a dark dog's face or a white cat's fur full of
readable detail instead of collapsing into solid black or blank paper.

Floyd–Steinberg is inherently sequential (each cell's error feeds the next), so it is the one
step done on the CPU: Pillow's C implementation (`Image.convert("1", dither=FLOYDSTEINBERG)`)
runs on the small grid (about 320 x 240 cells at the default, well under a millisecond). All
full-resolution work (the cell means and the dot drawing) stays in torch on the image's device.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from effects._tensor import (
    EMPTY_COVERAGE,
    area_down,
    blocks_to_pixels,
    mix_channels,
    weighted_blur,
    weighted_quantiles,
)
from effects.base import Effect, EffectParams, check_rgba

REC709 = (0.2126, 0.7152, 0.0722)
SHARPEN = 0.6
# Local-mean window, in cells: wide enough to keep the large shapes, narrow enough to lift detail.
LOCAL_MEAN_SIGMA = 6.0


class Params(EffectParams):
    dots: int = Field(
        default=240,
        ge=16,
        le=1024,
        description="Dots along the longer side of the image (fewer = bigger dots, a bolder print).",
    )
    dot_scale: float = Field(
        default=1.15,
        ge=0.5,
        le=1.5,
        description="Dot diameter relative to the cell: 1 = round dots that just touch, "
        "1.41 = dark areas fill solid, below 1 = airy dots.",
    )
    adaptive: float = Field(
        default=0.55,
        ge=0.0,
        le=1.0,
        description="How much the threshold follows the local mean (0 = fixed mid-grey threshold, "
        "1 = fully local: maximum detail, flattest tones).",
    )
    contrast: float = Field(default=1.2, ge=0.5, le=2.0, description="Tone contrast before dithering (1 = as is).")
    brightness: float = Field(
        default=0.0, ge=-0.5, le=0.5, description="Tone shift before dithering (positive = fewer dots)."
    )


def _cell_size(height: int, width: int, dots: int) -> int:
    return max(1, round(max(height, width) / dots))


def _dot_tile(cell: int, dot_scale: float, like: torch.Tensor) -> torch.Tensor:
    """Ink coverage of one cell, (cell, cell): an anti-aliased disc centred in the cell."""
    if cell == 1:
        return torch.ones((1, 1), dtype=like.dtype, device=like.device)
    centres = torch.arange(cell, dtype=like.dtype, device=like.device) + 0.5 - cell / 2.0
    distance = torch.sqrt(centres.view(-1, 1) ** 2 + centres.view(1, -1) ** 2)
    radius = dot_scale * cell / 2.0
    return (radius - distance + 0.5).clamp_(0.0, 1.0)


def _error_diffuse(tones: torch.Tensor) -> torch.Tensor:
    """Floyd–Steinberg on the CPU with Pillow: (N, 1, h, w) tones in [0, 1] -> ink mask (1 = dot)."""
    grey = (tones.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
    masks = []
    for item in grey[:, 0]:
        binary = Image.fromarray(item).convert("1", dither=Image.Dither.FLOYDSTEINBERG)
        masks.append(np.asarray(binary, dtype=np.uint8) == 0)
    ink = torch.from_numpy(np.stack(masks)[:, None])
    return ink.to(device=tones.device, dtype=tones.dtype)


def apply(image: torch.Tensor, params: Params, seed: int) -> torch.Tensor:
    check_rgba(image)
    height, width = image.shape[-2:]
    alpha = image[:, 3:4]
    cell = _cell_size(height, width, params.dots)

    luma_alpha = mix_channels(image[:, :3], REC709).mul_(alpha)
    cell_luma_alpha, coverage = area_down(luma_alpha, cell), area_down(alpha, cell)
    del luma_alpha
    grey = cell_luma_alpha / coverage.clamp_min(EMPTY_COVERAGE)

    # Stretch the subject's tones to the full range, then pull each cell towards a threshold
    # that follows its neighbourhood (an alpha-weighted local mean).
    low, high = weighted_quantiles(grey, coverage, (0.01, 0.99)).unbind(dim=1)
    grey = (grey - low.view(-1, 1, 1, 1)) / (high - low).clamp_min(0.2).view(-1, 1, 1, 1)
    weighted_grey = grey * coverage
    local_mean = weighted_blur(weighted_grey, coverage, LOCAL_MEAN_SIGMA * max(1.0, params.dots / 300))
    # A one-cell unsharp mask keeps small dark features (pupils, nose, whisker pads) crisp.
    crisp = weighted_blur(weighted_grey, coverage, 1.0)
    tones = grey + SHARPEN * (grey - crisp) - params.adaptive * (local_mean - 0.5)
    tones = (tones - 0.5) * params.contrast + 0.5 + params.brightness
    # Paper shows where the subject is absent: composite the cell over white by its coverage.
    tones = tones * coverage + (1.0 - coverage)

    ink = _error_diffuse(tones)
    out = torch.empty_like(image)
    paper = out[:, 0:1]
    blocks_to_pixels(ink, cell, paper, _dot_tile(cell, params.dot_scale, image))
    paper.mul_(-1.0).add_(1.0)
    out[:, 1:2].copy_(paper)
    out[:, 2:3].copy_(paper)
    out[:, 3:4].copy_(alpha)
    return out


EFFECT = Effect(
    name="dithering",
    kind="classic",
    description="Floyd–Steinberg dithering drawn as round ink dots on white, with an adaptive (local-mean) "
    "threshold that keeps detail in dark and light fur.",
    version=1,
    params=Params,
    apply=apply,
)
