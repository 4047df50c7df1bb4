"""Render every classic effect on a procedural pet portrait, to look at the results.

    .venv/bin/python scripts/effects_gallery.py OUT_DIR [--size 1024x768] [--seed 0]

Writes, for a transparent cutout and an opaque photo of the same synthetic pet:
`input-<kind>.png`, `<effect>-<kind>.png` (full size) and `sheet-<kind>.png` (all of them side
by side, transparency shown over a checkerboard). There are no photos on the build machine, so
the pet is drawn: soft body, head and ears, thousands of fur strokes following the head's
shape, eyes with catch-lights, a nose, a bokeh background, and (for the cutout) loud random
colours under alpha = 0, so any effect that lets hidden pixels bleed into the subject shows it.
`synthetic_pet` is also used by `scripts/bench_effects.py`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effects import blackwhite, dithering, popart, retro8bit
from effects.base import Effect

CLASSIC: tuple[Effect, ...] = (blackwhite.EFFECT, dithering.EFFECT, popart.EFFECT, retro8bit.EFFECT)
EXTRA_VARIANTS: dict[str, dict[str, object]] = {"popart-grid": {"grid": True}}


def _ellipse_mask(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


# Coat colours (main coat, ear tips): ginger, a near-black coat (hard for any effect's tones),
# and a silver tabby grey.
COATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "ginger": ((0.78, 0.50, 0.26), (0.35, 0.20, 0.12)),
    "black": ((0.16, 0.14, 0.13), (0.08, 0.07, 0.07)),
    "grey": ((0.55, 0.55, 0.56), (0.25, 0.25, 0.26)),
}


def synthetic_pet(width: int, height: int, seed: int = 0, coat: str = "ginger") -> tuple[np.ndarray, np.ndarray]:
    """A drawn pet portrait: (cutout RGBA uint8, opaque RGB uint8), both (height, width, C)."""
    rng = np.random.default_rng(seed)
    s = min(width, height) / 768.0  # drawing unit: everything is laid out on a 1024 x 768 canvas
    cx, cy = width / 2, height * 0.47

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    # Background: warm-to-teal gradient with out-of-focus blobs.
    t = yy / height
    background = np.stack([0.85 - 0.45 * t, 0.78 - 0.2 * t, 0.62 + 0.15 * t], axis=-1)
    bokeh = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(bokeh)
    for _ in range(40):
        bx, by, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 70) * s
        colour = tuple(int(v) for v in rng.uniform(60, 255, 3))
        draw.ellipse((bx - r, by - r, bx + r, by + r), fill=colour)
    bokeh_arr = np.asarray(bokeh.filter(ImageFilter.GaussianBlur(18 * s)), dtype=np.float32) / 255.0
    background = 0.7 * background + 0.3 * bokeh_arr

    # Silhouette: body, head, two ears.
    head = _ellipse_mask(xx, yy, cx, cy, 230 * s, 200 * s)
    body = _ellipse_mask(xx, yy, cx, cy + 420 * s, 330 * s, 300 * s)
    ears_img = Image.new("L", (width, height))
    ear_draw = ImageDraw.Draw(ears_img)
    for side in (-1, 1):
        ear_draw.polygon(
            [
                (cx + side * 95 * s, cy - 150 * s),
                (cx + side * 250 * s, cy - 330 * s),
                (cx + side * 215 * s, cy - 60 * s),
            ],
            fill=255,
        )
    ears = np.asarray(ears_img) > 0
    silhouette = head | body | ears

    # Base coat with a white blaze, muzzle and chest; darker ear tips; pink inner ears.
    main_colour, tip_colour = COATS[coat]
    cream = np.array([0.95, 0.91, 0.85], dtype=np.float32)
    dark = np.array(tip_colour, dtype=np.float32)
    fur_colour = np.broadcast_to(np.array(main_colour, dtype=np.float32), (height, width, 3)).copy()
    blaze = np.exp(-(((xx - cx) / (45 * s)) ** 2)) * (yy > cy - 170 * s) * (yy < cy + 60 * s)
    muzzle = _ellipse_mask(xx, yy, cx, cy + 95 * s, 120 * s, 85 * s).astype(np.float32)
    chest = _ellipse_mask(xx, yy, cx, cy + 380 * s, 150 * s, 220 * s).astype(np.float32)
    white_amount = np.clip(blaze + muzzle + chest, 0, 1)[..., None]
    white_img = Image.fromarray((white_amount[..., 0] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(12 * s))
    white_amount = np.asarray(white_img, dtype=np.float32)[..., None] / 255.0
    fur_colour = fur_colour * (1 - white_amount) + cream * white_amount
    ear_tip = (ears & (yy < cy - 200 * s)).astype(np.float32)
    ear_tip_img = Image.fromarray((ear_tip * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(20 * s))
    ear_tip = np.asarray(ear_tip_img, dtype=np.float32)[..., None] / 255.0
    fur_colour = fur_colour * (1 - ear_tip) + dark * ear_tip
    inner_img = Image.new("L", (width, height))
    inner_draw = ImageDraw.Draw(inner_img)
    for side in (-1, 1):
        inner_draw.polygon(
            [
                (cx + side * 125 * s, cy - 150 * s),
                (cx + side * 228 * s, cy - 285 * s),
                (cx + side * 200 * s, cy - 110 * s),
            ],
            fill=255,
        )
    inner = np.asarray(inner_img.filter(ImageFilter.GaussianBlur(10 * s)), dtype=np.float32)[..., None] / 255.0
    fur_colour = fur_colour * (1 - 0.7 * inner) + np.array([0.86, 0.56, 0.55], dtype=np.float32) * 0.7 * inner

    # Light from the upper left, falling off towards the edges of each form.
    shade = 1.0 - 0.25 * np.clip(((xx - cx) / (330 * s)) + ((yy - cy) / (400 * s)), -1, 1)
    rim = np.clip(1.0 - 0.35 * (((xx - cx) / (240 * s)) ** 2 + ((yy - cy) / (220 * s)) ** 2), 0.55, 1.0)
    rim = np.where(head, rim, 0.9)
    fur_colour = fur_colour * (shade * rim)[..., None]

    # Fur: short strokes flowing outwards from the face, coloured from the coat underneath.
    fur = Image.fromarray((np.clip(fur_colour, 0, 1) * 255).astype(np.uint8))
    fur_draw = ImageDraw.Draw(fur)
    ys, xs = np.nonzero(silhouette)
    count = int(42000 * (width * height) / (1024 * 768))
    picks = rng.integers(0, len(xs), count)
    for x0, y0 in zip(xs[picks], ys[picks], strict=True):
        angle = math.atan2(y0 - (cy + 40 * s), x0 - cx) + rng.normal(0, 0.35)
        length = rng.uniform(5, 16) * s
        x1, y1 = x0 + math.cos(angle) * length, y0 + math.sin(angle) * length
        base = fur_colour[y0, x0]
        tone = rng.uniform(0.72, 1.22)
        colour = tuple(int(v) for v in np.clip(base * tone * 255, 0, 255))
        fur_draw.line((x0, y0, x1, y1), fill=colour, width=max(1, round(1.4 * s)))

    # Face: eyes with amber irises and catch-lights, nose, mouth.
    face = ImageDraw.Draw(fur)
    for side in (-1, 1):
        ex, ey = cx + side * 85 * s, cy - 20 * s
        face.ellipse((ex - 38 * s, ey - 30 * s, ex + 38 * s, ey + 30 * s), fill=(40, 24, 12))
        face.ellipse((ex - 31 * s, ey - 25 * s, ex + 31 * s, ey + 25 * s), fill=(196, 138, 38))
        face.ellipse((ex - 14 * s, ey - 22 * s, ex + 14 * s, ey + 22 * s), fill=(12, 8, 6))
        face.ellipse((ex - 16 * s, ey - 16 * s, ex - 4 * s, ey - 4 * s), fill=(250, 250, 245))
    nx, ny = cx, cy + 75 * s
    face.polygon([(nx - 30 * s, ny - 15 * s), (nx + 30 * s, ny - 15 * s), (nx, ny + 18 * s)], fill=(70, 40, 40))
    face.ellipse((nx - 10 * s, ny - 12 * s, nx - 2 * s, ny - 6 * s), fill=(160, 120, 115))
    face.line((nx, ny + 18 * s, nx, ny + 45 * s), fill=(60, 35, 30), width=max(1, round(3 * s)))
    face.arc((nx - 45 * s, ny + 20 * s, nx, ny + 60 * s), 20, 160, fill=(60, 35, 30), width=max(1, round(3 * s)))
    face.arc((nx, ny + 20 * s, nx + 45 * s, ny + 60 * s), 20, 160, fill=(60, 35, 30), width=max(1, round(3 * s)))
    for side in (-1, 1):  # whiskers
        for k in range(3):
            face.line(
                (nx + side * 50 * s, ny + (25 + 10 * k) * s, nx + side * 210 * s, ny + (5 + 25 * k) * s),
                fill=(240, 238, 230),
                width=1,
            )
    subject = np.asarray(fur, dtype=np.float32) / 255.0

    # Alpha: the silhouette with a soft, slightly furry edge.
    alpha_img = Image.fromarray((silhouette * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2.0 * s))
    alpha = np.asarray(alpha_img, dtype=np.float32) / 255.0
    alpha = np.clip((alpha - 0.5) * (1.6 + 0.8 * rng.random(alpha.shape)) + 0.5, 0, 1)
    alpha = np.where(silhouette | (alpha > 0), alpha, 0.0)

    opaque = subject * alpha[..., None] + background * (1 - alpha[..., None])
    garbage = rng.random((height, width, 3), dtype=np.float32)
    garbage[..., 1] = 1.0  # loud green under the transparent area
    cutout_rgb = np.where(alpha[..., None] > 0, subject, garbage)
    cutout = np.concatenate([cutout_rgb, alpha[..., None]], axis=-1)
    return (
        (np.clip(cutout, 0, 1) * 255 + 0.5).astype(np.uint8),
        (np.clip(opaque, 0, 1) * 255 + 0.5).astype(np.uint8),
    )


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
