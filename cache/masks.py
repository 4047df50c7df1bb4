"""The mask cache's codec: a subject mask stored as a lossless 16-bit greyscale PNG.

Masks are cached beside the results (`masks/<image sha256>-<model id>.png`, `cache.keys.mask_object`)
as the cutout model's quantised levels (`effects.inspyrenet.quantise_mask`), so a cached mask gives
back exactly the levels the model produced.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def encode_mask(quantised: torch.Tensor) -> bytes:
    """A (1, 1, S, S) uint16 mask → 16-bit greyscale PNG (lossless)."""
    array = quantised.reshape(quantised.shape[-2], quantised.shape[-1]).cpu().numpy().astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def decode_mask(data: bytes) -> torch.Tensor | None:
    """The (1, 1, S, S) levels of a stored mask, or None when the object is not a mask PNG."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            array = np.asarray(image).astype(np.int32)
    except (OSError, ValueError):
        return None
    if array.ndim != 2:
        return None
    return torch.from_numpy(array).view(1, 1, *array.shape)
