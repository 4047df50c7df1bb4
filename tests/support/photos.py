"""Test photos, generated: no files from outside, every byte made here and reproducible.

`photo` is a synthetic scene (fast, any size); `real_photo` is a scikit-image sample photo
enlarged to a phone photo's size with sensor noise, where real texture matters (codec
tolerances, benchmarks); `composite` is a photo with its answer known (alpha and foreground),
for matting; `synthetic_pet` a drawn pet portrait, as a cutout and as a photo, to look at effects.
`jpeg`, `png` and `encode` turn any of them into upload bytes.
"""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

MB = 1024 * 1024


def photo(width: int = 96, height: int = 64, seed: int = 0, *, noise: float = 0.02) -> np.ndarray:
    """A smooth, colourful (H, W, 3) uint8 scene with a bright blob for a subject.

    `noise` is the sensor noise's standard deviation (1.0 = full scale): it sets how well the
    photo compresses."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 0.5 + 0.5 * np.sin(x / max(width, 1) * 3.0 + seed)
    green = 0.5 + 0.5 * np.cos(y / max(height, 1) * 2.5)
    blue = 0.5 + 0.4 * np.sin((x + y) / max(width + height, 1) * 4.0)
    image = np.stack([red, green, blue], axis=2)
    cx, cy = width * 0.5, height * 0.55
    blob = np.exp(-(((x - cx) / (width * 0.2)) ** 2 + ((y - cy) / (height * 0.25)) ** 2))
    image = image * (1 - blob[..., None]) + np.array([0.9, 0.7, 0.4]) * blob[..., None]
    image += rng.normal(0, noise, image.shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def real_photo(width: int, height: int, name: str = "chelsea", *, noise: float = 3.0, seed: int = 0) -> np.ndarray:
    """scikit-image's sample photo `name` enlarged (bicubic) to width x height, with sensor-like noise
    (`noise`: standard deviation in grey levels). Needs scikit-image (requirements-dev.txt)."""
    from skimage import data as samples

    picture = getattr(samples, name)()
    if picture.ndim == 2:
        picture = np.repeat(picture[:, :, None], 3, axis=2)
    resized = Image.fromarray(picture[:, :, :3]).resize((width, height), Image.Resampling.BICUBIC)
    enlarged = np.asarray(resized, dtype=np.float32)
    noisy = enlarged + np.random.default_rng(seed).normal(0.0, noise, enlarged.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, **options: object) -> bytes:
    """`array` saved by Pillow as `fmt` ("JPEG", "PNG", "WEBP", ...) with Pillow's `options`."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg(width: int = 96, height: int = 64, seed: int = 0, *, quality: int = 92, **options: object) -> bytes:
    return encode(photo(width, height, seed), "JPEG", quality=quality, **options)


def png(width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    return encode(photo(width, height, seed), "PNG")


def big_jpeg(megabytes: float, seed: int = 7, width: int = 2000, height: int = 1500) -> bytes:
    """A width x height JPEG of at least `megabytes` MiB (a phone photo's order of size): the noise
    and quality are raised until it is that big."""
    target = int(megabytes * MB)
    data = b""
    for noise in (8.0, 12.0, 16.0, 24.0, 32.0):
        pixels = photo(width, height, seed, noise=noise / 255.0)
        for quality in (85, 90, 95):
            data = encode(pixels, "JPEG", quality=quality)
            if len(data) >= target:
                return data
    return data


def png_header_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG signature and IHDR claiming a huge image, with a tiny (invalid) body."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------ photos with a known answer


def blur(plane: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of an (H, W) plane, edges replicated."""
    radius = max(1, int(3 * sigma))
    taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    x = F.conv2d(F.pad(plane[None, None], (radius, radius, 0, 0), mode="replicate"), taps.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), taps.view(1, 1, -1, 1))[0, 0]


def visible_error(estimate: torch.Tensor, truth: torch.Tensor, alpha: torch.Tensor) -> float:
    """Mean |F̂ − F| over the soft pixels, weighted by how much of each pixel is subject (its alpha)."""
    soft = (alpha > 0.004) & (alpha < 0.996)
    weighted = alpha * (estimate - truth).abs().mean(dim=0)
    return float(weighted[soft].sum() / alpha[soft].sum())


def composite(height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A photo-like composite with known answer: (1, 3, H, W) image, (1, 1, H, W) alpha, (3, H, W) foreground.

    A textured subject with a soft (σ = 2 px) outline and a few hundred 1-2 px hair strands,
    over a textured, checkered background: soft pixels only along the edges, as in a photo.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0.0, 1.0, height).view(-1, 1).expand(height, width)
    x = torch.linspace(0.0, 1.0, width).view(1, -1).expand(height, width)
    phase = torch.rand(3, 2, generator=g) * 6.28
    foreground = torch.stack(
        [0.6 + 0.25 * torch.sin(3 * 6.28 * x + phase[c, 0]) * torch.cos(2 * 6.28 * y + phase[c, 1]) for c in range(3)]
    ).clamp(0, 1)
    checks = ((x * 24).floor() + (y * 18).floor()) % 2
    background = (
        torch.stack(
            [
                0.4 + 0.3 * torch.sin(5 * 6.28 * x + phase[c, 1]) * torch.cos(4 * 6.28 * y + phase[c, 0])
                for c in range(3)
            ]
        )
        + 0.15 * checks
    ).clamp(0, 1)
    body = ((((x - 0.5) / 0.28) ** 2 + ((y - 0.58) / 0.36) ** 2) < 1).float()
    strands = torch.zeros(height, width)
    rows = torch.linspace(0.12, 0.4, 3 * height)
    for _ in range(300):
        x0, amplitude, frequency, opacity = torch.rand(4, generator=g).tolist()
        columns = 0.25 + 0.5 * x0 + 0.04 * amplitude * torch.sin((2 + 4 * frequency) * 6.28 * rows)
        strands[(rows * height).long().clamp(0, height - 1), (columns * width).long().clamp(0, width - 1)] = (
            0.4 + 0.5 * opacity
        )
    alpha = torch.maximum(blur(body, 2.0), (blur(strands, 0.8) * 2.5).clamp(0, 1))
    image = ((alpha * foreground + (1 - alpha) * background) * 255).round() / 255
    return image[None].contiguous(), alpha[None, None].contiguous(), foreground


def composite_jpeg(height: int, width: int, seed: int, quality: int = 90) -> bytes:
    """`composite`'s photo as an upload."""
    image, _, _ = composite(height, width, seed)
    return encode((image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), "JPEG", quality=quality)


# ------------------------------------------------------------------------ a drawn pet


def _ellipse_mask(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _ear_pair(
    width: int, height: int, cx: float, cy: float, s: float, corners: tuple[tuple[float, float], ...]
) -> Image.Image:
    """Two mirrored triangles (corners as (dx, dy) from the face's centre, in drawing units), filled white."""
    canvas = Image.new("L", (width, height))
    draw = ImageDraw.Draw(canvas)
    for side in (-1, 1):
        draw.polygon([(cx + side * dx * s, cy + dy * s) for dx, dy in corners], fill=255)
    return canvas


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
    ears = np.asarray(_ear_pair(width, height, cx, cy, s, ((95, -150), (250, -330), (215, -60)))) > 0
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
    inner_img = _ear_pair(width, height, cx, cy, s, ((125, -150), (228, -285), (200, -110)))
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
