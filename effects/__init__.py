"""The effect registry: one table naming every effect the service offers."""

from __future__ import annotations

from effects import blackwhite, cutout, dithering, popart, retro8bit
from effects.base import Effect

EFFECTS: dict[str, Effect] = {
    "cutout": cutout.EFFECT,
    "blackwhite": blackwhite.EFFECT,
    "dithering": dithering.EFFECT,
    "popart": popart.EFFECT,
    "retro8bit": retro8bit.EFFECT,
}
