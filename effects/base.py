"""The effect contract shared by every effect module and the engine.

Images travel through the engine as float32 tensors of shape (N, 4, H, W): straight (not
premultiplied) RGBA in [0, 1], on whatever device the engine owns. An effect never changes
the size of the image and never changes its alpha channel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from effects.diffusion_base import DiffusionSpec

# Model construction is not thread-safe across libraries: diffusers builds its modules under
# accelerate's `init_empty_weights`, which patches `nn.Module.register_parameter` for the whole
# process while it runs (and torch's default dtype, and `torch.nn.init`). Every loader builds its
# modules while holding this lock (`effects.diffusion.prepare_libraries` makes the libraries' own
# build contexts take it); reading weights and moving them to the device happen outside it, in
# parallel. Re-entrant: those contexts nest.
MODEL_BUILD_LOCK = threading.RLock()


class EffectParams(BaseModel):
    """Base of every effect's `Params`: unknown fields are rejected, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


EffectKind = Literal["model", "classic", "diffusion"]

# apply(image, params, seed) -> image, for classic effects (pure tensor functions).
ClassicApply = Callable[[torch.Tensor, Any, int], torch.Tensor]


@dataclass(frozen=True)
class Effect:
    """One entry of the registry.

    `model` names the loaded model the effect needs (None for classic effects): the cutout
    model for `cutout`, the diffusion pipeline for diffusion effects. `apply` is set for
    classic effects; model effects are run by the engine with the model it owns. `diffusion`
    is set for diffusion effects: where their pipeline's weights come from and how it runs.
    """

    name: str
    kind: EffectKind
    description: str
    version: int
    params: type[EffectParams]
    apply: ClassicApply | None = None
    model: str | None = None
    diffusion: DiffusionSpec | None = None

    def __post_init__(self) -> None:
        if (self.kind == "diffusion") != (self.diffusion is not None):
            raise ValueError(f"effect {self.name!r}: a diffusion spec goes with kind 'diffusion' and only with it")
        if (self.kind == "classic") != (self.apply is not None):
            raise ValueError(f"effect {self.name!r}: `apply` goes with kind 'classic' and only with it")

    def params_schema(self) -> dict[str, Any]:
        return self.params.model_json_schema()


def check_rgba(image: torch.Tensor) -> None:
    """Fail loudly when an effect is handed something that is not an (N, 4, H, W) float image."""
    if image.ndim != 4 or image.shape[1] != 4:
        raise ValueError(f"expected an RGBA batch of shape (N, 4, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"expected a floating-point image in [0, 1], got dtype {image.dtype}")


def generator_for(image: torch.Tensor, seed: int) -> torch.Generator:
    """A generator on the image's device, seeded so the same seed gives the same output."""
    generator = torch.Generator(device=image.device)
    generator.manual_seed(seed)
    return generator


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Rec. 709 luma of an (N, 3, H, W) tensor, shape (N, 1, H, W)."""
    weights = rgb.new_tensor([0.2126, 0.7152, 0.0722]).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True)
