"""Test photos, generated: no files from outside, every byte made here and reproducible."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def photo(width: int = 96, height: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth, colourful (H, W, 3) uint8 scene with a bright blob for a subject."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 0.5 + 0.5 * np.sin(x / max(width, 1) * 3.0 + seed)
    green = 0.5 + 0.5 * np.cos(y / max(height, 1) * 2.5)
    blue = 0.5 + 0.4 * np.sin((x + y) / max(width + height, 1) * 4.0)
    image = np.stack([red, green, blue], axis=2)
    cx, cy = width * 0.5, height * 0.55
    blob = np.exp(-(((x - cx) / (width * 0.2)) ** 2 + ((y - cy) / (height * 0.25)) ** 2))
    image = image * (1 - blob[..., None]) + np.array([0.9, 0.7, 0.4]) * blob[..., None]
    image += rng.normal(0, 0.02, image.shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg(width: int = 96, height: int = 64, seed: int = 0, **options: object) -> bytes:
    return encode(photo(width, height, seed), "JPEG", quality=92, **options)


def png(width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    return encode(photo(width, height, seed), "PNG")


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
