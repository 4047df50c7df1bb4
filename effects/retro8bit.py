"""Retro 8-bit: the pet as a sprite, in big square pixels and the 16 colours of the PICO-8 palette.

Why PICO-8: its 16 fixed colours were designed for legible, pleasant pixel art; they include a
warm brown, orange, peach, two greys, a warm white and black, which is exactly the range of
pet fur (ginger, tabby, brown, black and white), plus saturated accents (red, pink, blue,
green, yellow) for collars, eyes and toys. The NES master palette has ~54 colours, many of them
near-duplicates, and looks less like "8-bit" once a photo is mapped onto it; the Game Boy's four
greens lose the pet's colours altogether.

Edge-aware pixelation: a plain block average turns every block that straddles an edge (fur
against background, an eye against fur) into a muddy in-between colour. Instead each block is
split into up to 4 x 4 sub-cells; the block takes the colour of the sub-cell most representative
of the block (the weighted medoid, in Oklab) refined by averaging only the sub-cells close to
it. Edges therefore snap to one side, as a pixel artist would draw them.

The block colours then get a saturation/contrast lift, an optional 4 x 4 Bayer ordered dither
in lightness (the classic way 8-bit art renders gradients), a nearest-colour match in Oklab, and,
on cutouts, a dark sprite outline along the subject's edge. All of this happens on the block
grid (~100 x 75 blocks), so the full-resolution cost is three weighted poolings and the final
nearest-neighbour enlargement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from effects._tensor import EMPTY_COVERAGE, area_down, blocks_to_pixels, hex_palette, srgb_to_oklab
from effects.base import Effect, EffectParams, check_rgba

PICO8 = (
    "#000000",  # black
    "#1d2b53",  # dark blue
    "#7e2553",  # dark purple
    "#008751",  # dark green
    "#ab5236",  # brown
    "#5f574f",  # dark grey
    "#c2c3c7",  # light grey
    "#fff1e8",  # white
    "#ff004d",  # red
    "#ffa300",  # orange
    "#ffec27",  # yellow
    "#00e436",  # green
    "#29adff",  # blue
    "#83769c",  # lavender
    "#ff77a8",  # pink
    "#ffccaa",  # peach
)
OUTLINE_COLOUR = 0  # black, the sprite outline
BAYER4 = (
    (0, 8, 2, 10),
    (12, 4, 14, 6),
    (3, 11, 1, 9),
    (15, 7, 13, 5),
)
# Sub-cells closer than this (Oklab distance) to the block's medoid are averaged into its colour.
MODE_RADIUS = 0.1


class Params(EffectParams):
    pixels: int = Field(
        default=96, ge=16, le=256, description="Sprite pixels along the longer side (fewer = chunkier)."
    )
    dither: float = Field(
        default=0.4, ge=0.0, le=1.0, description="Ordered (Bayer) dithering of gradients, as 8-bit art did (0 = flat)."
    )
    saturation: float = Field(
        default=1.3, ge=0.0, le=2.0, description="Colour boost before mapping onto the palette (1 = as is)."
    )
    contrast: float = Field(default=1.1, ge=0.5, le=2.0, description="Lightness contrast before mapping (1 = as is).")
    outline: bool = Field(default=True, description="Draw a dark sprite outline along a cutout's edge.")


def _block_layout(height: int, width: int, pixels: int) -> tuple[int, int]:
    """(block size, sub-cells per block side): block = sub_cell * split."""
    target = max(height, width) / pixels
    split = 4 if target >= 8 else 2 if target >= 4 else 1
    sub_cell = max(1, round(target / split))
    return sub_cell * split, split


def _block_colours(image: torch.Tensor, block: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge-aware block colours (N, 3, gh, gw) in sRGB and block coverage (N, 1, gh, gw)."""
    n, _, height, width = image.shape
    sub_cell = block // split
    alpha = image[:, 3:4]
    coverage = area_down(alpha, sub_cell)
    premultiplied = torch.empty_like(image[:, 0:1])
    sums = []
    for channel in range(3):
        torch.mul(image[:, channel : channel + 1], alpha, out=premultiplied)
        sums.append(area_down(premultiplied, sub_cell))
    del premultiplied
    colour = torch.cat(sums, dim=1) / coverage.clamp_min(EMPTY_COVERAGE)

    # Pad the sub-cell grid to whole blocks (padding carries no weight), then group by block.
    rows, cols = -(-height // block), -(-width // block)
    pad = (0, cols * split - colour.shape[-1], 0, rows * split - colour.shape[-2])
    colour, coverage = F.pad(colour, pad), F.pad(coverage, pad)
    cells = colour.view(n, 3, rows, split, cols, split).permute(0, 2, 4, 3, 5, 1).reshape(n, rows, cols, -1, 3)
    weight = coverage.view(n, 1, rows, split, cols, split).permute(0, 2, 4, 3, 5, 1).reshape(n, rows, cols, -1)

    lab = srgb_to_oklab(cells.movedim(-1, 1)).movedim(1, -1)
    distance = torch.cdist(lab.reshape(-1, split * split, 3), lab.reshape(-1, split * split, 3))
    distance = distance.view(n, rows, cols, split * split, split * split)
    # Weighted medoid: the sub-cell with the least weighted distance to the others; empty
    # sub-cells cannot win.
    cost = (distance * weight.unsqueeze(-2)).sum(dim=-1) + (weight <= EMPTY_COVERAGE).to(lab.dtype) * 1e6
    medoid = cost.argmin(dim=-1, keepdim=True)
    near = torch.gather(distance, 3, medoid.unsqueeze(-1).expand(-1, -1, -1, 1, split * split)).squeeze(3)
    members = weight * (near <= MODE_RADIUS).to(weight.dtype)
    members = members + (members.sum(dim=-1, keepdim=True) <= EMPTY_COVERAGE).to(weight.dtype)  # empty blocks
    block_colour = (cells * members.unsqueeze(-1)).sum(dim=-2) / members.sum(dim=-1, keepdim=True)
    block_coverage = weight.mean(dim=-1)
    return block_colour.permute(0, 3, 1, 2), block_coverage.unsqueeze(1)


def _oklab_palette(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    palette = hex_palette(PICO8, like)
    return palette, srgb_to_oklab(palette.T.reshape(1, 3, -1)).reshape(3, -1).T


def apply(image: torch.Tensor, params: Params, seed: int) -> torch.Tensor:
    check_rgba(image)
    n, _, height, width = image.shape
    block, split = _block_layout(height, width, params.pixels)
    colour, coverage = _block_colours(image, block, split)
    rows, cols = colour.shape[-2:]

    lab = srgb_to_oklab(colour.clamp(0.0, 1.0))
    lightness = (lab[:, 0:1] - 0.6) * params.contrast + 0.6
    if params.dither > 0.0:
        bayer = (torch.tensor(BAYER4, dtype=image.dtype, device=image.device) + 0.5) / 16.0 - 0.5
        bayer = bayer.repeat(-(-rows // 4), -(-cols // 4))[:rows, :cols]
        lightness = lightness + bayer * (0.12 * params.dither)
    lab = torch.cat([lightness, lab[:, 1:3] * params.saturation], dim=1)

    palette, palette_lab = _oklab_palette(image)
    flat = lab.permute(0, 2, 3, 1).reshape(-1, 3)
    index = torch.cdist(flat, palette_lab).argmin(dim=1).view(n, rows, cols)
    if params.outline:
        # A visible block next to an (almost) empty one is on the sprite's edge.
        solid = coverage >= 0.5
        empty = F.max_pool2d((~solid).to(image.dtype), 3, stride=1, padding=1) > 0
        edge = (solid & empty).squeeze(1)
        index = torch.where(edge, torch.full_like(index, OUTLINE_COLOUR), index)
    grid = palette[index].permute(0, 3, 1, 2).contiguous()

    out = torch.empty_like(image)
    blocks_to_pixels(grid, block, out[:, :3])
    out[:, 3:4].copy_(image[:, 3:4])
    return out


EFFECT = Effect(
    name="retro8bit",
    kind="classic",
    description="Retro 8-bit sprite: edge-aware pixelation onto the 16-colour PICO-8 palette, with ordered "
    "dithering and a sprite outline on cutouts.",
    version=1,
    params=Params,
    apply=apply,
)
