"""Pop art: a silkscreen-style poster of the pet in flat neon colours, optionally as a 2x2 grid.

The photo's luminance is smoothed (so fur noise becomes clean poster shapes, with a little fine
detail kept), then cut into `levels` bands. The band edges come from the subject's own tonal
distribution (alpha-weighted quantiles blended with even steps), so a black dog and a white cat
both get every colour of the palette. Each band is painted in one palette colour: the darkest
as ink, the lighter bands in escalating neon hues. Band edges are anti-aliased over a narrow
tone range, not hard-stepped, so curves stay clean at full resolution.

With `grid=True` the output (same size as the input) holds four half-size panels, each with its
own palette and its own flat background colour behind the subject, Warhol-style. The grid is an
opaque poster: its panel backgrounds are the point, so it is the one setting of any effect that
does not return the input's alpha (every pixel is opaque). Without the grid, alpha is returned
unchanged, as for every effect.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from effects._tensor import (
    EMPTY_COVERAGE,
    area_down,
    mix_channels,
    pool_factor,
    upsample,
    weighted_blur,
    weighted_quantiles,
)
from effects.base import Effect, EffectParams, check_rgba

Colour = tuple[float, float, float]
PaletteName = Literal["marilyn", "electric", "candy", "citrus"]

# Six colours per palette, darkest (the ink) to lightest, plus the panel background.
PALETTES: dict[str, tuple[tuple[str, ...], str]] = {
    "marilyn": (("#1b0b3b", "#d6005f", "#ff4f3a", "#ff9f1c", "#ffe74c", "#fff8dc"), "#00b8e6"),
    "electric": (("#0d0221", "#4b0fd1", "#9b1cff", "#00d9ff", "#7dff3a", "#f4ff9e"), "#ff2e88"),
    "candy": (("#2a0012", "#c9184a", "#ff4d8d", "#ff9ecf", "#ffd1e8", "#fff5fa"), "#2ee6a6"),
    "citrus": (("#001a26", "#0066ff", "#00b37a", "#b8f500", "#ffd000", "#fffbe0"), "#ff6a00"),
}
PANEL_ORDER: tuple[str, ...] = ("marilyn", "electric", "candy", "citrus")
# Which of a palette's six colours each band count uses (always the ink and the lightest).
BAND_COLOURS: dict[int, tuple[int, ...]] = {
    3: (0, 2, 5),
    4: (0, 1, 3, 5),
    5: (0, 1, 2, 4, 5),
    6: (0, 1, 2, 3, 4, 5),
}
REC709 = (0.2126, 0.7152, 0.0722)
# Working resolution (longer side) of the smoothing that turns fur into poster shapes.
SHAPE_SIDE = 512
# Working resolution of the tone statistics.
STATS_SIDE = 256
# Width of the anti-aliased band edge, in luminance.
EDGE_SOFTNESS = 0.025


class Params(EffectParams):
    levels: int = Field(default=4, ge=3, le=6, description="Number of colour bands (3 = boldest, 6 = most detail).")
    palette: PaletteName = Field(
        default="marilyn",
        description="Neon palette: marilyn (magenta/orange/yellow), electric (violet/cyan/lime), "
        "candy (pinks), citrus (blue/green/yellow). In a grid it is the first panel's.",
    )
    grid: bool = Field(
        default=False,
        description="Four half-size panels in four palettes, each on its own background colour (2x2, same size "
        "as the input): an opaque poster, whatever the background.",
    )
    detail: float = Field(
        default=0.3, ge=0.0, le=1.0, description="Fine detail kept inside the flat shapes (0 = smoothest poster)."
    )
    balance: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="How far band edges follow the subject's own tones (1 = equal areas per colour, "
        "0 = even steps between its darkest and lightest tone).",
    )


def _poster_luma(rgba: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed, detail-blended luminance (N, 1, H, W) and the band thresholds (N, levels - 1).

    Both are scaled by 1 / EDGE_SOFTNESS and the thresholds shifted by -1/2, so a band's
    anti-aliased step is clamp(poster - threshold, 0, 1).
    """
    height, width = rgba.shape[-2:]
    alpha = rgba[:, 3:4]
    luma = mix_channels(rgba[:, :3], REC709)
    factor = pool_factor((height, width), SHAPE_SIDE)
    small_alpha = area_down(alpha, factor)
    small_luma_alpha = area_down(luma * alpha, factor)
    smooth = weighted_blur(small_luma_alpha, small_alpha, 1.2)
    stats = pool_factor((small_alpha.shape[-2], small_alpha.shape[-1]), STATS_SIDE)
    stats_alpha = area_down(small_alpha, stats)
    stats_mean = area_down(small_luma_alpha, stats) / stats_alpha.clamp_min(EMPTY_COVERAGE)

    levels = params.levels
    steps = [k / levels for k in range(1, levels)]
    low, high, *equal_area = weighted_quantiles(stats_mean, stats_alpha, (0.02, 0.98, *steps)).unbind(dim=1)
    span = (high - low).clamp_min(0.05)
    even = torch.stack([low + span * step for step in steps], dim=1)
    thresholds = torch.lerp(even, torch.stack(equal_area, dim=1), params.balance)

    # poster = detail * luma + (1 - detail) * smooth, in units of the band-edge width so that
    # painting a band edge is one subtraction and a clamp.
    scale = 1.0 / EDGE_SOFTNESS
    poster = upsample(smooth * ((1.0 - params.detail) * scale), factor, (height, width))
    poster.add_(luma, alpha=params.detail * scale)
    return poster, thresholds * scale - 0.5


def _paint(poster: torch.Tensor, thresholds: torch.Tensor, palette: list[Colour], out: torch.Tensor) -> None:
    """Write the banded colours of `poster` into `out` (N, 3, h, w): ink plus anti-aliased steps."""
    for channel in range(3):
        out[:, channel].fill_(palette[0][channel])
    step = torch.empty_like(poster)
    for band in range(1, len(palette)):
        edge = thresholds[:, band - 1].view(-1, 1, 1, 1)
        torch.sub(poster, edge, out=step).clamp_(0.0, 1.0)
        for channel in range(3):
            delta = palette[band][channel] - palette[band - 1][channel]
            if delta != 0.0:
                out[:, channel : channel + 1].add_(step, alpha=delta)


def _rgb(code: str) -> Colour:
    return (int(code[1:3], 16) / 255.0, int(code[3:5], 16) / 255.0, int(code[5:7], 16) / 255.0)


def _palette(name: str, levels: int) -> tuple[list[Colour], Colour]:
    """The band colours (darkest first) and the panel background, as plain floats (no device syncs)."""
    colours, background = PALETTES[name]
    return [_rgb(colours[index]) for index in BAND_COLOURS[levels]], _rgb(background)


def _half_size(image: torch.Tensor) -> torch.Tensor:
    """The image at half size, colour averaged by alpha so hidden RGB stays hidden."""
    alpha = image[:, 3:4]
    coverage = area_down(alpha, 2)
    premultiplied = torch.empty_like(alpha)
    planes = []
    for channel in range(3):
        torch.mul(image[:, channel : channel + 1], alpha, out=premultiplied)
        planes.append(area_down(premultiplied, 2))
    planes.append(coverage)
    half = torch.cat(planes, dim=1)
    half[:, :3] /= coverage.clamp_min(EMPTY_COVERAGE)
    return half


def apply(image: torch.Tensor, params: Params, seed: int) -> torch.Tensor:
    check_rgba(image)
    height, width = image.shape[-2:]
    out = torch.empty_like(image)

    if not params.grid:
        poster, thresholds = _poster_luma(image, params)
        palette, _ = _palette(params.palette, params.levels)
        _paint(poster, thresholds, palette, out[:, :3])
    else:
        # Panels are the image at half size; with odd sizes the bottom/right ones lose a row/column.
        panel = _half_size(image)
        poster, thresholds = _poster_luma(panel, params)
        panel_alpha = panel[:, 3:4]
        first = PANEL_ORDER.index(params.palette)
        names = PANEL_ORDER[first:] + PANEL_ORDER[:first]
        top, left = height - height // 2, width - width // 2
        corners = ((0, 0), (0, left), (top, 0), (top, left))
        painted = torch.empty_like(panel[:, :3])
        for name, (row, col) in zip(names, corners, strict=True):
            palette, background = _palette(name, params.levels)
            _paint(poster, thresholds, palette, painted)
            # Flatten the subject onto the panel's own background colour.
            backdrop = torch.tensor(background, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
            flat = painted.sub_(backdrop).mul_(panel_alpha).add_(backdrop)
            rows, cols = min(panel.shape[-2], height - row), min(panel.shape[-1], width - col)
            out[:, :3, row : row + rows, col : col + cols] = flat[..., :rows, :cols]

    out[:, :3].clamp_(0.0, 1.0)  # the summed band steps can overshoot by float rounding
    if params.grid:
        out[:, 3:4].fill_(1.0)  # the panels' own backgrounds fill the poster
    else:
        out[:, 3:4].copy_(image[:, 3:4])
    return out


EFFECT = Effect(
    name="popart",
    kind="classic",
    description="Pop art: flat neon colour bands with ink shadows, optionally as a four-panel Warhol grid.",
    version=2,
    params=Params,
    apply=apply,
)
