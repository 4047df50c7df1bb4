"""The effect registry: one table naming every effect the service offers."""

from __future__ import annotations

from effects import aged, blackwhite, comic, cutout, dithering, enhance, popart, retro8bit, upscale
from effects.base import Effect

EFFECTS: dict[str, Effect] = {
    "cutout": cutout.EFFECT,
    "blackwhite": blackwhite.EFFECT,
    "dithering": dithering.EFFECT,
    "popart": popart.EFFECT,
    "retro8bit": retro8bit.EFFECT,
    "upscale": upscale.EFFECT,
    "enhance": enhance.EFFECT,
    "comic": comic.EFFECT,
    "aged": aged.EFFECT,
}
