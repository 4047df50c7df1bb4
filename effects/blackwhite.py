"""Film black & white: a silver-gelatin print look for pet portraits.

The pipeline, in the order light would meet it:

1. **Panchromatic channel mix.** Film is more sensitive to red and blue and less to green than
   the eye's Rec. 709 luma, which is what makes fur and noses read lighter and richer than a
   plain desaturate. An optional coloured lens filter (yellow, orange, red, green) shifts the
   mix the way it would on a camera.
2. **Levels** from the subject's own histogram (alpha-weighted 0.5 % / 99.5 % points), so a dull
   phone photo still prints with a real black and a real paper white.
3. **Fine edge boost + clarity.** Unsharp masks at two scales: ~1 px for fur edges, ~2 % of the
   frame for local contrast. Both are alpha-weighted blurs so the background hidden under a
   cutout's transparent pixels never halos into the subject.
4. **Halation.** Highlights spread a soft glow, as bright areas do through a film base.
5. **S-curve**: deeper shadows, brighter highlights, kept monotonic.
6. **Grain**, seeded and strongest in the midtones (like real grain, invisible in clipped
   blacks and paper white), with a grain size that scales with the frame.

All the wide work runs at reduced resolution; the full-resolution cost is a handful of
single-plane passes (see `effects/_tensor.py`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from effects._tensor import (
    EMPTY_COVERAGE,
    area_down,
    assemble,
    gaussian_blur,
    mix_channels,
    pool_factor,
    upsample,
    weighted_blur,
    weighted_quantiles,
)
from effects.base import Effect, EffectParams, check_rgba, generator_for

LensFilter = Literal["none", "yellow", "orange", "red", "green"]

# A classic panchromatic emulsion, relative to Rec. 709 luma (0.21, 0.72, 0.07): more red and blue.
PANCHROMATIC = (0.30, 0.46, 0.24)
# Transmission of the usual black-and-white lens filters, per channel.
FILTERS: dict[str, tuple[float, float, float]] = {
    "none": (1.0, 1.0, 1.0),
    "yellow": (1.05, 1.0, 0.55),
    "orange": (1.35, 0.85, 0.3),
    "red": (1.8, 0.5, 0.12),
    "green": (0.7, 1.25, 0.6),
}
# Reference frame size for the grain and blur sizes, so a 512 px preview looks like the 2048 px print.
REFERENCE_SIDE = 2048.0
# Working resolution (longer side) of the clarity and halation blurs.
STATS_SIDE = 256
HALATION_THRESHOLD = 0.72
# Where the subject's 99.5 % point lands: headroom for edge boost and halation, so bright fur
# keeps its texture and only speculars and glow reach paper white.
PRINT_WHITE = 0.94


class Params(EffectParams):
    filter: LensFilter = Field(
        default="yellow",
        description="Lens filter in front of the film: yellow (default) is the classic portrait choice; "
        "orange/red lighten warm fur and darken blues; green lightens foliage; none is bare panchromatic film.",
    )
    contrast: float = Field(default=0.5, ge=0.0, le=1.0, description="Strength of the S-curve (0 = linear).")
    clarity: float = Field(default=0.3, ge=0.0, le=1.0, description="Local (mid-scale) contrast boost.")
    sharpness: float = Field(default=0.35, ge=0.0, le=1.5, description="Fine edge boost that brings out fur.")
    halation: float = Field(default=0.2, ge=0.0, le=1.0, description="Glow around the highlights.")
    grain: float = Field(default=0.35, ge=0.0, le=1.0, description="Film grain strength (0 = none).")
    grain_size: float = Field(
        default=1.4, ge=1.0, le=4.0, description="Grain size in pixels at a 2048 px frame (scales with the frame)."
    )
    auto_levels: float = Field(
        default=1.0, ge=0.0, le=1.0, description="How far to stretch the subject's tones to a full black and white."
    )


def film_weights(lens_filter: str) -> tuple[float, float, float]:
    r, g, b = (base * transmission for base, transmission in zip(PANCHROMATIC, FILTERS[lens_filter], strict=True))
    total = r + g + b
    return (r / total, g / total, b / total)


def _grain(image: torch.Tensor, params: Params, seed: int) -> tuple[torch.Tensor, float]:
    """Grain (N, 1, H, W) and the factor that brings it to unit variance.

    Every image of a batch gets the seed's own pattern, so an image's grain does not depend on
    what it was batched with.
    """
    n, _, height, width = image.shape
    scale = max(1.0, params.grain_size * max(height, width) / REFERENCE_SIDE)
    small = (max(1, round(height / scale)), max(1, round(width / scale)))
    noise = torch.empty((n, 1, *small), dtype=image.dtype, device=image.device)
    for index in range(n):
        generator = generator_for(image, seed)
        noise[index] = torch.randn((1, *small), generator=generator, dtype=image.dtype, device=image.device)
    if small == (height, width):
        return noise, 1.0
    # Bilinear resampling averages neighbouring samples, which lowers the variance (amplitude
    # about 2/3 once the scale reaches 2): the caller scales it back up.
    noise = F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)
    return noise, 1.0 + 0.5 * min(1.0, scale - 1.0)


def apply(image: torch.Tensor, params: Params, seed: int) -> torch.Tensor:
    check_rgba(image)
    height, width = image.shape[-2:]
    size = (height, width)
    alpha = image[:, 3:4]

    luma = mix_channels(image[:, :3], film_weights(params.filter))
    luma_alpha = luma * alpha

    # A small pyramid of alpha-weighted sums: half resolution for the fine edge boost, then
    # ~256 px for the tone statistics, clarity and halation.
    half_luma_alpha, half_alpha = area_down(luma_alpha, 2), area_down(alpha, 2)
    del luma_alpha
    coarse = pool_factor((half_alpha.shape[-2], half_alpha.shape[-1]), STATS_SIDE)
    small_luma_alpha, small_alpha = area_down(half_luma_alpha, coarse), area_down(half_alpha, coarse)
    half_mean = half_luma_alpha / half_alpha.clamp_min(EMPTY_COVERAGE)
    small_mean = small_luma_alpha / small_alpha.clamp_min(EMPTY_COVERAGE)

    # Levels: map the subject's 0.5 % / 99.5 % points towards 0 and PRINT_WHITE (bounded gain).
    low, high = weighted_quantiles(small_mean, small_alpha, (0.005, 0.995)).unbind(dim=1)
    black = low * params.auto_levels
    white = 1.0 - (1.0 - high) * params.auto_levels
    gain = PRINT_WHITE / (white - black).clamp_min(1.0 / 3.0)
    black = black.view(-1, 1, 1, 1)
    gain = gain.view(-1, 1, 1, 1)

    # Unsharp masks as one low-resolution "base" subtracted from an amplified full image:
    # out = (1 + s + c) L - s * blur_fine(L) - c * blur_wide(L), then levels (an affine map,
    # which commutes with the normalised blurs) and halation folded into the same base.
    fine = params.sharpness
    wide = params.clarity
    side = max(height, width)
    wide_sigma = 0.02 * side / (2 * coarse)
    blurred_wide = upsample(weighted_blur(small_luma_alpha, small_alpha, wide_sigma), coarse, half_mean.shape[-2:])
    # Empty (fully transparent) half-resolution cells would read as black and drag the edge
    # pixels' bilinear base down, a bright halo once subtracted: give them the wide blur's value.
    half_mean = torch.where(half_alpha > EMPTY_COVERAGE, half_mean, blurred_wide)
    base = half_mean * fine + blurred_wide * wide

    if params.halation > 0.0:
        # Only visible highlights glow (weighted by alpha); the glow is not normalised so it
        # fades out past the subject's edge like light does.
        highlights = ((small_mean - black) * gain - HALATION_THRESHOLD).clamp_min(0.0) * small_alpha
        glow = gaussian_blur(highlights, 0.035 * side / (2 * coarse))
        glow *= params.halation * 1.6 / (1.0 - HALATION_THRESHOLD)
        base -= upsample(glow, coarse, half_mean.shape[-2:]) / gain

    # toned = gain * ((1 + s + c) L - base - black): one upsample and one multiply-add at full size.
    toned = upsample((base + black) * -gain, 2, size)
    toned.addcmul_(luma, gain * (1.0 + fine + wide))
    del luma, base
    toned.clamp_(0.0, 1.0)

    # S-curve y = x + c (2x - 1) x (1 - x): monotonic for c <= 1, fixed at 0, 1/2 and 1.
    if params.contrast > 0.0:
        spread = torch.addcmul(toned, toned, toned, value=-1.0)  # x (1 - x)
        toned.addcmul_(toned, spread, value=2.0 * params.contrast).sub_(spread, alpha=params.contrast)
        del spread

    if params.grain > 0.0:
        # Grain peaks in the midtones: amplitude ~ x (1 - x), with a floor so highlights keep some.
        envelope = torch.addcmul(toned, toned, toned, value=-1.0).add_(0.04)
        noise, unit = _grain(image, params, seed)
        envelope.mul_(noise)
        del noise
        toned.add_(envelope, alpha=params.grain * 0.22 * unit)
        del envelope

    return assemble((toned, toned, toned), image)


EFFECT = Effect(
    name="blackwhite",
    kind="classic",
    description="Film black & white: panchromatic film tones with a lens filter, S-curve, clarity, "
    "highlight halation and seeded grain.",
    version=1,
    params=Params,
    apply=apply,
)
