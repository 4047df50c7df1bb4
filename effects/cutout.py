"""`cutout`: the photo with its background removed by InSPyReNet, colours kept.

The work happens in the engine's background step (mask, foreground colour estimation,
compositing); the effect itself adds nothing on top of it.
"""

from __future__ import annotations

from effects.base import Effect, EffectParams


class Params(EffectParams):
    """`cutout` takes no parameters: the background is chosen with the request's `background`."""


EFFECT = Effect(
    name="cutout",
    kind="model",
    description="Background removed (InSPyReNet), colours kept.",
    version=1,
    params=Params,
    model="cutout",
)
