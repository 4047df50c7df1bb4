"""Foreground colour estimation: the subject's own colours under its soft edges.

Where the mask is soft (hair, fur, motion blur) a photo's pixel mixes the subject with the
old background: I = αF + (1 − α)B. A cutout that keeps I there drags a halo of the old
background onto the new one; it must keep F instead.

The method is blur fusion (Forte & Pitié 2021, "Approximate fast foreground colour
estimation"): blur the alpha-weighted foreground and background to get local colours F̄ and
B̄, then F = F̄ + α(I − αF̄ − (1 − α)B̄): the local foreground colour, corrected by what it
leaves unexplained in the observed pixel. The paper runs two passes (box widths 90 and 6
px). Two changes make it both better and much faster:

* Coarse to fine over the whole range of scales: box windows from the whole image down to
  3 cells, halving each pass, each pass starting from the previous one's F and B, with the
  background updated symmetrically (B = B̄ + (1 − α)(I − αF̄ − (1 − α)B̄)). On synthetic
  composites with known answers this beats pymatting's multilevel `estimate_foreground_ml`;
  the paper's two fixed passes do not.
* No pass touches full resolution. A pass needs window sums of Fα, B(1 − α) and α. With F̄
  and B̄ from the previous, wider pass nearly constant over a small cell (4 px, 8 px above
  2048 px), those sums follow exactly from per-cell means of α, α², α³, I, Iα and Iα²,
  computed once. A cell whose alpha is constant 0 or 1 (most of a photo) gets its means from
  its mean colour; only cells crossed by the subject's edge are gathered pixel by pixel.
  Full resolution is read once for the cell means and written once for the result.

Pure torch, any device, float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

# Box window of every pass, in cells (odd, so windows are centred).
WINDOW = 3
# Alpha this close to 0 or 1 counts as exactly 0 or 1: the colour there cannot move an 8-bit
# composite by more than half a level.
ALPHA_EPSILON = 1.0 / 512.0
# Above this fraction of edge cells, dense full-resolution passes beat gathering their pixels.
DENSE_LIMIT = 0.5
# Dense passes work on bands of about this many pixel rows, so their temporaries stay in cache.
CHUNK_PIXEL_ROWS = 128
_EPS = 1e-5


def cell_size(height: int, width: int) -> int:
    """Side of the square cells the passes work on: 4 px, 8 px for photos above 2048 px."""
    return 4 if max(height, width) <= 2048 else 8


def estimate_foreground(image: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 3, H, W) image in [0, 1] + (N, 1, H, W) alpha → (N, 3, H, W) foreground colours in [0, 1].

    Where alpha is within 1/512 of 0 or 1 the result is the image itself (exact at 1; at 0
    the colour is invisible); in between it is the estimated colour of the subject. `out`
    (N, 3, H, W) float32 receives the result and may be `image` itself, which saves copying
    the photo when the caller no longer needs it.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"estimate_foreground expects an (N, 3, H, W) image, got {tuple(image.shape)}")
    if alpha.ndim != 4 or alpha.shape[1] != 1 or alpha.shape[0] != image.shape[0] or alpha.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"alpha must be (N, 1, H, W) matching the image {tuple(image.shape)}, got {tuple(alpha.shape)}"
        )
    if out is not None and (out.shape != image.shape or out.dtype != torch.float32 or out.device != image.device):
        raise ValueError(
            f"out must be float32 of shape {tuple(image.shape)} on {image.device}, "
            f"got {out.dtype} of shape {tuple(out.shape)} on {out.device}"
        )
    with torch.inference_mode():
        image = image.to(torch.float32)
        alpha = alpha.to(torch.float32)
        low, high = torch.aminmax(alpha)
        if float(low) < 0.0 or float(high) > 1.0:
            alpha = alpha.clamp(0.0, 1.0)
        if out is None:
            out = torch.empty_like(image, memory_format=torch.contiguous_format)
        for index in range(image.shape[0]):
            target = out[index]
            if target.is_contiguous():
                _estimate_one(image[index], alpha[index, 0], target)
            else:  # results are written through flat views of each channel plane
                scratch = torch.empty_like(target, memory_format=torch.contiguous_format)
                _estimate_one(image[index], alpha[index, 0], scratch)
                target.copy_(scratch)
        return out


def _estimate_one(image: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor) -> None:
    """One (3, H, W) image and its (H, W) alpha into `out` (3, H, W)."""
    height, width = alpha.shape
    cell = cell_size(height, width)
    mean_alpha = F.avg_pool2d(alpha[None, None], cell, ceil_mode=True)[0, 0]
    mean_image = F.avg_pool2d(image[None], cell, ceil_mode=True)[0]
    # A cell whose mean alpha is within ε/cell² of 0 or 1 has every pixel within ε of it: its
    # moments follow from its mean colour and its pixels keep the photo's colour. Every soft
    # pixel lies in one of the other cells, the edge cells.
    margin = ALPHA_EPSILON / (cell * cell)
    edge = (mean_alpha > margin) & (mean_alpha < 1.0 - margin)
    edge_cells = edge.view(-1).nonzero().squeeze(1)
    if edge_cells.numel() > DENSE_LIMIT * edge.numel():
        moments = _dense_moments(image, alpha, cell)
        foreground, background = _coarse_to_fine(moments)
        _fuse_dense(image, alpha, torch.cat([foreground, background]), cell, out)
        return
    blocks = _EdgeBlocks(image, alpha, edge_cells, edge.shape[1], cell)
    moments = torch.cat(
        [mean_alpha[None].expand(3, -1, -1), mean_image, mean_alpha * mean_image, mean_alpha * mean_image]
    )
    if edge_cells.numel():
        moments.view(12, -1).index_copy_(1, edge_cells, blocks.moments())
    foreground, background = _coarse_to_fine(moments)
    if out.data_ptr() != image.data_ptr():
        out.copy_(image)
    if edge_cells.numel():
        blocks.fuse_into(torch.cat([foreground, background]), out)


class _EdgeBlocks:
    """The cell × cell pixel blocks of the edge cells, gathered once (block-major, row-major inside)."""

    def __init__(self, image: torch.Tensor, alpha: torch.Tensor, cells: torch.Tensor, cells_w: int, cell: int) -> None:
        height, width = alpha.shape
        self.cell = cell
        self.cells = cells
        self.cells_w = cells_w
        count = cells.numel()
        offsets = torch.arange(cell, device=alpha.device)
        self.cy = cells // cells_w
        self.cx = cells % cells_w
        y = (self.cy * cell).view(-1, 1, 1) + offsets.view(1, cell, 1)
        x = (self.cx * cell).view(-1, 1, 1) + offsets.view(1, 1, cell)
        inside = (y < height) & (x < width)
        self.inside = inside.view(count, cell * cell)
        self.all_inside = bool(self.inside.all())
        self.flat = (y.clamp(max=height - 1) * width + x.clamp(max=width - 1)).view(-1)
        self.alpha = alpha.reshape(-1).index_select(0, self.flat).view(count, cell * cell)
        self.image = image.reshape(3, -1).index_select(1, self.flat).view(3, count, cell * cell)
        if not self.all_inside:
            self.alpha = self.alpha * self.inside
            self.image = self.image * self.inside
        self.count = self.inside.sum(dim=1).to(torch.float32)

    def moments(self) -> torch.Tensor:
        """(12, cells): exact means of α, α², α³, I, Iα, Iα² over each block's pixels inside the image."""
        a = self.alpha
        a2 = a * a
        weighted = self.image * a
        sums = torch.cat(
            [
                a.sum(dim=1)[None],
                a2.sum(dim=1)[None],
                (a2 * a).sum(dim=1)[None],
                self.image.sum(dim=2),
                weighted.sum(dim=2),
                weighted.mul_(a).sum(dim=2),
            ]
        )
        return sums / self.count

    def fuse_into(self, fields: torch.Tensor, out: torch.Tensor) -> None:
        """Blend each soft pixel with F̄, B̄ upsampled bilinearly from the cells, write it into `out`.

        A block's pixels only see its 3 × 3 cell neighbourhood, with fixed weights per
        offset: the upsampling is two small matrix products per block. Clamping the
        neighbourhood at the grid's border reproduces F.interpolate's edge handling.
        """
        cell = self.cell
        cells_h, cells_w = fields.shape[-2:]
        step = torch.arange(-1, 2, device=fields.device)
        rows = (self.cy.view(-1, 1) + step).clamp_(0, cells_h - 1)
        cols = (self.cx.view(-1, 1) + step).clamp_(0, cells_w - 1)
        neighbours = (rows.view(-1, 3, 1) * cells_w + cols.view(-1, 1, 3)).view(-1)
        patches = fields.reshape(6, -1).index_select(1, neighbours).view(6, -1, 3, 3)
        weights = _upsampling_weights(cell, fields.device)
        fine = torch.einsum("yi,cnij,xj->cnyx", weights, patches, weights).reshape(6, -1)
        alpha = self.alpha.view(1, -1)
        pixels = self.image.view(3, -1)
        fused = _fuse(pixels, alpha, fine[0:3], fine[3:6])
        soft = (alpha > ALPHA_EPSILON) & (alpha < 1.0 - ALPHA_EPSILON)
        values = torch.where(soft, fused, pixels)
        if self.all_inside:
            out.view(3, -1).index_copy_(1, self.flat, values)
        else:
            keep = self.inside.view(-1).nonzero().squeeze(1)
            out.view(3, -1).index_copy_(1, self.flat.index_select(0, keep), values.index_select(1, keep))


def _upsampling_weights(cell: int, device: torch.device) -> torch.Tensor:
    """(cell, 3): bilinear weights (align_corners=False) of the previous, own and next cell for each pixel offset."""
    offset = (torch.arange(cell, device=device, dtype=torch.float32) + 0.5) / cell - 0.5
    return torch.stack([(-offset).clamp(min=0.0), 1.0 - offset.abs(), offset.clamp(min=0.0)], dim=1)


def _row_chunks(height: int, cell: int) -> Iterator[tuple[int, int]]:
    """Bands of whole cell rows, [first, last) in cell rows, small enough to stay in cache."""
    cells_h = -(-height // cell)
    rows = max(1, CHUNK_PIXEL_ROWS // cell)
    for first in range(0, cells_h, rows):
        yield first, min(first + rows, cells_h)


def _dense_moments(image: torch.Tensor, alpha: torch.Tensor, cell: int) -> torch.Tensor:
    """(12, cells_h, cells_w) cell means of α, α², α³, I, Iα, Iα², over every pixel, band by band."""
    height, width = alpha.shape
    moments = image.new_empty((12, -(-height // cell), -(-width // cell)))
    for first, last in _row_chunks(height, cell):
        top, bottom = first * cell, min(last * cell, height)
        plane = alpha[None, top:bottom]
        pixels = image[:, top:bottom]
        weighted = pixels * plane
        power = plane * plane
        stacked = torch.cat([plane, power, power * plane, pixels, weighted, weighted * plane])
        moments[:, first:last] = F.avg_pool2d(stacked[None], cell, ceil_mode=True)[0]
    return moments


def _fuse_dense(image: torch.Tensor, alpha: torch.Tensor, fields: torch.Tensor, cell: int, out: torch.Tensor) -> None:
    """Every soft pixel blended with F̄, B̄ upsampled from the cells, band by band.

    A band of cell rows upsamples its cells plus one halo row above and below; with a scale
    of exactly `cell` the result equals the whole-grid upsampling on the band's pixels.
    """
    height, width = alpha.shape
    cells_h = fields.shape[1]
    for first, last in _row_chunks(height, cell):
        top, bottom = first * cell, min(last * cell, height)
        halo_top = max(first - 1, 0)
        grid = fields[None, :, halo_top : min(last + 1, cells_h)]
        full = F.interpolate(
            grid, scale_factor=float(cell), mode="bilinear", align_corners=False, recompute_scale_factor=False
        )
        offset = (first - halo_top) * cell
        full = full[0, :, offset : offset + bottom - top, :width]
        plane = alpha[None, top:bottom]
        pixels = image[:, top:bottom]
        fused = _fuse(pixels, plane, full[0:3], full[3:6])
        soft = (plane > ALPHA_EPSILON) & (plane < 1.0 - ALPHA_EPSILON)
        out[:, top:bottom] = torch.where(soft, fused, pixels)


def _coarse_to_fine(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blurred foreground and background colours (3, cells_h, cells_w) of the finest pass.

    `moments` are the cell means (α, α², α³, I, Iα, Iα²). For the previous pass's
    F = f + α·r and B = b + (1 − α)·r, with r = I − αf − (1 − α)b and f, b constant over a
    cell, the cell means of F·α and B·(1 − α) are linear in f and b:
        mean(Fα)       = (α − α³) f + (α³ − α²) b + Iα²
        mean(B(1 − α)) = −(α − 2α² + α³) f + (2α − 3α² + α³) b + (I − 2Iα + Iα²)
    (bars over α powers and I products omitted). Those coefficients are pooled into a
    pyramid once; each pass is then a handful of small tensor ops.
    """
    a1, a2, a3 = moments[0:1], moments[1:2], moments[2:3]
    i0, i1, i2 = moments[3:6], moments[6:9], moments[9:12]
    finest = torch.cat(
        [a1, a1 - a3, a3 - a2, 2.0 * a2 - a1 - a3, 2.0 * a1 - 3.0 * a2 + a3, i2, i0 - 2.0 * i1 + i2, i1, i0 - i1]
    )
    levels = [finest[None]]
    while max(levels[-1].shape[-2:]) > WINDOW:
        levels.append(F.avg_pool2d(levels[-1], 2, ceil_mode=True))
    foreground: torch.Tensor | None = None
    background: torch.Tensor | None = None
    for level in reversed(levels):
        alpha = level[:, 0:1]
        if foreground is None or background is None:
            # First pass: F = B = I, so F·α and B·(1 − α) are the means of Iα and I(1 − α).
            fore_alpha, back_alpha = level[:, 11:14], level[:, 14:17]
        else:
            both = F.interpolate(
                torch.cat([foreground, background], dim=1), size=level.shape[-2:], mode="bilinear", align_corners=False
            )
            f, b = both[:, 0:3], both[:, 3:6]
            fore_alpha = torch.addcmul(torch.addcmul(level[:, 5:8], level[:, 1:2], f), level[:, 2:3], b)
            back_alpha = torch.addcmul(torch.addcmul(level[:, 8:11], level[:, 3:4], f), level[:, 4:5], b)
        sums = F.avg_pool2d(
            torch.cat([fore_alpha, back_alpha, alpha], dim=1),
            WINDOW,
            stride=1,
            padding=WINDOW // 2,
            count_include_pad=False,
        )
        blurred_alpha = sums[:, 6:7]
        foreground = sums[:, 0:3].div_(blurred_alpha + _EPS).clamp_(0.0, 1.0)
        background = sums[:, 3:6].div_(1.0 - blurred_alpha + _EPS).clamp_(0.0, 1.0)
    assert foreground is not None and background is not None
    return foreground[0], background[0]


def _fuse(
    image: torch.Tensor, alpha: torch.Tensor, blurred_foreground: torch.Tensor, blurred_background: torch.Tensor
) -> torch.Tensor:
    """F = F̄ + α(I − αF̄ − (1 − α)B̄), clamped to [0, 1] (in-place steps: this runs on every edge pixel)."""
    fused = torch.addcmul(image, alpha, blurred_foreground, value=-1.0)
    fused.addcmul_(1.0 - alpha, blurred_background, value=-1.0).mul_(alpha).add_(blurred_foreground)
    return fused.clamp_(0.0, 1.0)
