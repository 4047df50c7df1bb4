"""Test photos, generated: no files from outside, every byte made here and reproducible.

`photo` is a synthetic scene (fast, any size); `real_photo` is a scikit-image sample photo
enlarged to a phone photo's size with sensor noise, where real texture matters (codec
tolerances, benchmarks); `composite` is a photo with its answer known (alpha and foreground),
for matting. `jpeg`, `png` and `encode` turn any of them into upload bytes.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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
