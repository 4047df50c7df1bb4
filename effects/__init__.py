"""The effect registry: one table naming every effect the service offers.

Everything about an effect hangs off its entry: kind, params, version, the model it needs and, for a
diffusion effect, its `DiffusionSpec` (where the pipeline's weights come from and how it runs). The
settings, the weight fetcher, the engine, the test builders and the docs' tables derive from it.
"""

from __future__ import annotations

from effects import aged, blackwhite, comic, cutout, dithering, enhance, popart, retro8bit, upscale
from effects.base import Effect
from effects.diffusion_base import DiffusionSpec

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

DIFFUSION_EFFECTS: tuple[str, ...] = tuple(name for name, effect in EFFECTS.items() if effect.diffusion is not None)


def diffusion_spec(effect_name: str) -> DiffusionSpec:
    """The spec of a diffusion effect, by name."""
    effect = EFFECTS.get(effect_name)
    if effect is None or effect.diffusion is None:
        raise ValueError(
            f"{effect_name!r} is not a diffusion effect; diffusion effects are {', '.join(DIFFUSION_EFFECTS)}"
        )
    return effect.diffusion
