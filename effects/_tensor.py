"""Tensor helpers shared by the classic effects (private to `effects/`).

The classic effects must stay within ~100 ms for a 2048 x 1536 image on two CPU cores, so
they follow two rules these helpers encode:

* anything wide (blurs, statistics, local means) runs on a reduced-resolution copy made by
  area pooling and comes back with one bilinear upsample;
* full-resolution work happens on single-channel planes with in-place arithmetic, because a
  fresh full-size buffer costs page faults that are as expensive as the arithmetic itself.

Blurs are *alpha-weighted* (a normalised convolution: blur(value * alpha) / blur(alpha)) so
the arbitrary RGB that a cutout carries under alpha = 0 never bleeds into visible pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Below this pooled coverage a cell counts as empty: its weighted mean is meaningless.
EMPTY_COVERAGE = 1e-4


def area_down(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Box-average downsample by an integer factor; partial border cells average what they hold."""
    if factor <= 1:
        return x
    return F.avg_pool2d(x, kernel_size=factor, stride=factor, ceil_mode=True)


def upsample(x: torch.Tensor, factor: int, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Inverse of `area_down`: scale by `factor` (pixel centres aligned) and crop to `size`.

    Scaling by the exact factor and cropping keeps the grid aligned even when the full size is
    not a multiple of the factor (interpolating straight to `size` would shift it sub-pixel).
    """
    if factor <= 1:
        return x[..., : size[0], : size[1]]
    if mode == "nearest":
        out = x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    else:
        out = F.interpolate(x, scale_factor=float(factor), mode=mode, align_corners=False)
    return out[..., : size[0], : size[1]]


def blocks_to_pixels(grid: torch.Tensor, block: int, out: torch.Tensor, tile: torch.Tensor | None = None) -> None:
    """Nearest-neighbour enlargement of a cell grid straight into `out`, optionally times a tile.

    `grid` is (N, C, ceil(H / block), ceil(W / block)); `out` is (N, C, H, W) (may be a slice of a
    larger buffer); `tile`, (block, block), multiplies every cell (e.g. a dot shape). The bulk is
    one broadcast multiply into a strided view of `out`; only the partial cells on the bottom and
    right edges go through the slower index path.
    """
    n, channels, height, width = out.shape
    rows, cols = height // block, width // block
    full_h, full_w = rows * block, cols * block
    if tile is None:
        tile = torch.ones((block, block), dtype=out.dtype, device=out.device)
    if rows and cols:
        bulk = out[..., :full_h, :full_w].view(n, channels, rows, block, cols, block)
        cells = grid[..., :rows, :cols].reshape(n, channels, rows, 1, cols, 1)
        torch.mul(cells, tile.view(1, 1, 1, block, 1, block), out=bulk)
    for r0, r1, c0, c1 in ((full_h, height, 0, width), (0, full_h, full_w, width)):
        if r1 > r0 and c1 > c0:
            row_index = torch.arange(r0, r1, device=out.device)
            col_index = torch.arange(c0, c1, device=out.device)
            values = grid.index_select(2, row_index // block).index_select(3, col_index // block)
            shape = tile.index_select(0, row_index % block).index_select(1, col_index % block)
            out[..., r0:r1, c0:c1] = values * shape


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicate padding (works for any size, even 1 x 1).

    Written as shifted multiply-adds rather than `conv2d`: on CPU, single-channel convolutions
    with long 1-D kernels hit slow paths (tens of ms on a 512 px image, against well under one
    for the shifted adds), and the effects only ever blur small, reduced-resolution planes.
    """
    if sigma < 0.3:
        return x
    radius = max(1, math.ceil(3.0 * sigma))
    taps = [math.exp(-0.5 * (offset / sigma) ** 2) for offset in range(-radius, radius + 1)]
    total = sum(taps)
    weights = [tap / total for tap in taps]
    height, width = x.shape[-2:]
    padded = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    rows = padded[..., :, 0:width] * weights[0]
    for offset in range(1, len(weights)):
        rows.add_(padded[..., :, offset : offset + width], alpha=weights[offset])
    padded = F.pad(rows, (0, 0, radius, radius), mode="replicate")
    out = padded[..., 0:height, :] * weights[0]
    for offset in range(1, len(weights)):
        out.add_(padded[..., offset : offset + height, :], alpha=weights[offset])
    return out


def weighted_blur(value_times_weight: torch.Tensor, weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Normalised convolution: the blur of a value where only `weight`ed pixels count."""
    numerator = gaussian_blur(value_times_weight, sigma)
    denominator = gaussian_blur(weight, sigma)
    return numerator / denominator.clamp_min(EMPTY_COVERAGE)


def mix_channels(rgb: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum of the three colour planes, (N, 3, H, W) -> (N, 1, H, W), one buffer."""
    out = rgb[:, 0:1] * weights[0]
    out.add_(rgb[:, 1:2], alpha=weights[1])
    out.add_(rgb[:, 2:3], alpha=weights[2])
    return out


def weighted_quantiles(values: torch.Tensor, weights: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
    """Per-image weighted quantiles of (N, C, h, w) values -> (N, len(quantiles)).

    Sort-based (deterministic on every device). An image with no weight at all falls back to
    uniform weights rather than dividing by zero.
    """
    n = values.shape[0]
    flat_values = values.reshape(n, -1)
    flat_weights = weights.expand_as(values).reshape(n, -1)
    total = flat_weights.sum(dim=1, keepdim=True)
    flat_weights = torch.where(total > EMPTY_COVERAGE, flat_weights, torch.ones_like(flat_weights))
    ordered, order = torch.sort(flat_values, dim=1)
    cdf = torch.cumsum(torch.gather(flat_weights, 1, order), dim=1)
    cdf = cdf / cdf[:, -1:]
    targets = torch.tensor(list(quantiles), dtype=values.dtype, device=values.device).expand(n, -1).contiguous()
    index = torch.searchsorted(cdf, targets).clamp_(max=flat_values.shape[1] - 1)
    return torch.gather(ordered, 1, index)


def pool_factor(size: tuple[int, int], target: int) -> int:
    """The integer pooling factor that brings the longer side down to about `target` pixels."""
    return max(1, round(max(size) / target))


def srgb_to_oklab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (channels on dim 1) to Oklab (L, a, b), for small tensors only."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp_min(0.0) + 0.055) / 1.055) ** 2.4)
    to_lms = rgb.new_tensor(
        [
            [0.4122214708, 0.5363325363, 0.0514459929],
            [0.2119034982, 0.6806995451, 0.1073969566],
            [0.0883024619, 0.2817188376, 0.6299787005],
        ]
    )
    to_lab = rgb.new_tensor(
        [
            [0.2104542553, 0.7936177850, -0.0040720468],
            [1.9779984951, -2.4285922050, 0.4505937099],
            [0.0259040371, 0.7827717662, -0.8086757660],
        ]
    )
    lms = torch.einsum("ij,nj...->ni...", to_lms, linear)
    return torch.einsum("ij,nj...->ni...", to_lab, lms.clamp_min(0.0).pow(1.0 / 3.0))


def hex_palette(colours: Sequence[str], like: torch.Tensor) -> torch.Tensor:
    """'#rrggbb' strings -> (K, 3) tensor in [0, 1] with the dtype and device of `like`."""
    values = [[int(code[i : i + 2], 16) / 255.0 for i in (1, 3, 5)] for code in colours]
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def assemble(rgb_planes: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """The output image: colour planes (each (N, 1, H, W), broadcastable) plus the input alpha.

    Writes each plane clamped to [0, 1] straight into the output buffer and copies alpha
    bit for bit.
    """
    out = torch.empty_like(image)
    for channel, plane in enumerate(rgb_planes):
        torch.clamp(plane, 0.0, 1.0, out=out[:, channel : channel + 1])
    out[:, 3:4].copy_(image[:, 3:4])
    return out
