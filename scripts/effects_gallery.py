"""Render every classic effect on a procedural pet portrait, to look at the results.

    .venv/bin/python scripts/effects_gallery.py OUT_DIR [--size 1024x768] [--seed 0]

Writes, for a transparent cutout and an opaque photo of the same synthetic pet:
`input-<kind>.png`, `<effect>-<kind>.png` (full size) and `sheet-<kind>.png` (all of them side
by side, transparency shown over a checkerboard). There are no photos on the build machine, so
the pet is drawn: soft body, head and ears, thousands of fur strokes following the head's
shape, eyes with catch-lights, a nose, a bokeh background, and (for the cutout) loud random
colours under alpha = 0, so any effect that lets hidden pixels bleed into the subject shows it.
The pet is `tests/support/photos.py`'s `synthetic_pet`, which `scripts/bench_effects.py` times the effects on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effects import blackwhite, dithering, popart, retro8bit
from effects.base import Effect
from tests.support.photos import COATS, synthetic_pet

CLASSIC: tuple[Effect, ...] = (blackwhite.EFFECT, dithering.EFFECT, popart.EFFECT, retro8bit.EFFECT)
EXTRA_VARIANTS: dict[str, dict[str, object]] = {"popart-grid": {"grid": True}}


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3|4) uint8 -> (1, 4, H, W) float32 RGBA in [0, 1]."""
    if pixels.shape[-1] == 3:
        pixels = np.concatenate([pixels, np.full((*pixels.shape[:2], 1), 255, np.uint8)], axis=-1)
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """(1, 4, H, W) float -> (H, W, 4) uint8."""
    return (image[0].permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def over_checkerboard(pixels: np.ndarray, cell: int = 16) -> Image.Image:
    height, width = pixels.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    board = np.where(((yy // cell) + (xx // cell)) % 2 == 0, 205, 235).astype(np.float32)[..., None]
    alpha = pixels[..., 3:4].astype(np.float32) / 255.0
    rgb = pixels[..., :3].astype(np.float32) * alpha + board * (1 - alpha)
    return Image.fromarray(rgb.astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the test photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coat", choices=sorted(COATS), default="ginger")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    args.out_dir.mkdir(parents=True, exist_ok=True)

    cutout, opaque = synthetic_pet(width, height, args.seed, args.coat)
    for kind, pixels in (("cutout", cutout), ("opaque", opaque)):
        image = to_tensor(pixels)
        tiles = [("input", to_pixels(image))]
        runs: list[tuple[str, Effect, dict[str, object]]] = [(e.name, e, {}) for e in CLASSIC]
        runs += [(label, popart.EFFECT, extra) for label, extra in EXTRA_VARIANTS.items()]
        for label, effect, extra in runs:
            assert effect.apply is not None
            result = effect.apply(image, effect.params(**extra), args.seed)
            tiles.append((label, to_pixels(result)))
        for label, pixels_out in tiles:
            Image.fromarray(pixels_out).save(args.out_dir / f"{label}-{kind}.png")
        thumbs = [over_checkerboard(p).resize((width // 2, height // 2), Image.Resampling.LANCZOS) for _, p in tiles]
        columns = 3
        rows = -(-len(thumbs) // columns)
        sheet = Image.new("RGB", (columns * (width // 2), rows * (height // 2)), (255, 255, 255))
        for index, thumb in enumerate(thumbs):
            sheet.paste(thumb, ((index % columns) * (width // 2), (index // columns) * (height // 2)))
        sheet.save(args.out_dir / f"sheet-{kind}.png")
        print(f"wrote {len(tiles)} images for the {kind} input to {args.out_dir}")


if __name__ == "__main__":
    main()
