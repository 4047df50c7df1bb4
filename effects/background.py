"""What goes behind the subject: transparent, a solid colour, a blurred photo, or the original.

Pure tensor code on the image's device. The mask says which pixels are the subject; the
foreground colour estimate removes the old background's colour from the soft edge (fur!),
so a cutout composited on any colour has no halo of the photo it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from effects.matting import estimate_foreground

_HEX = re.compile(r"^#([0-9a-fA-F]{6})$")
BACKGROUND_CHOICES = "transparent, none, white, #rrggbb or blur"


@dataclass(frozen=True)
class Background:
    kind: Literal["transparent", "none", "colour", "blur"]
    colour: tuple[int, int, int] = (255, 255, 255)

    @classmethod
    def parse(cls, value: str) -> Background:
        text = value.strip()
        lowered = text.lower()
        if lowered in ("transparent", "none", "blur"):
            return cls(kind=lowered)  # type: ignore[arg-type]
        if lowered == "white":
            return cls(kind="colour", colour=(255, 255, 255))
        match = _HEX.fullmatch(text)
        if match:
            digits = match.group(1)
            return cls(kind="colour", colour=(int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)))
        shown = value if len(value) <= 40 else f"{value[:40]}…"
        raise ValueError(f"background {shown!r} is not one of {BACKGROUND_CHOICES}")

    def canonical(self) -> str:
        """One spelling per background, so `white` and `#FFFFFF` share cache keys."""
        if self.kind == "colour":
            return "#{:02x}{:02x}{:02x}".format(*self.colour)
        return self.kind

    @property
    def needs_mask(self) -> bool:
        return self.kind != "none"

    @property
    def opaque(self) -> bool:
        return self.kind in ("colour", "blur")


def compose(
    rgb: torch.Tensor, alpha: torch.Tensor | None, source_alpha: torch.Tensor | None, background: Background
) -> torch.Tensor:
    """(1, 3, H, W) photo + (1, 1, H, W) subject mask → (1, 4, H, W) straight RGBA in [0, 1].

    `source_alpha` is the upload's own transparency (a PNG with alpha), kept in every mode.
    `rgb` is consumed: it may be overwritten.
    """
    ones = torch.ones_like(rgb[:, :1])
    source = source_alpha if source_alpha is not None else ones
    if background.kind == "none":
        return torch.cat([rgb, source], dim=1)
    if alpha is None:
        raise ValueError(f"background={background.canonical()} needs the subject mask")
    subject = alpha * source
    if background.kind == "transparent":
        # The estimate is written straight into the colour planes of the result.
        rgba = torch.empty((rgb.shape[0], 4, *rgb.shape[2:]), dtype=rgb.dtype, device=rgb.device)
        estimate_foreground(rgb, subject, out=rgba[:, :3])
        rgba[:, 3:4] = subject
        return rgba
    if background.kind == "colour":
        colour = rgb.new_tensor(background.colour).view(1, 3, 1, 1) / 255.0
        behind = colour.expand_as(rgb)
    else:
        behind = blurred_background(rgb, subject)
    # `rgb` is this call's own copy and is not needed after the estimate: overwrite it.
    foreground = estimate_foreground(rgb, subject, out=rgb)
    composite = foreground.sub_(behind).mul_(subject).add_(behind)
    return torch.cat([composite.clamp_(0.0, 1.0), ones], dim=1)


def blurred_background(rgb: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
    """A strong lens-like blur of the photo with the subject left out of it.

    Normalised convolution (blur of background-weighted colours over blur of the weights)
    keeps the subject's colours from smearing into the background around it. The blur is
    computed at low resolution, where a wide Gaussian costs a few small convolutions.
    """
    _, _, height, width = rgb.shape
    weight = (1.0 - subject).clamp_min(1e-3)
    scale = max(1, round(max(height, width) / 256))
    small_size = (max(1, height // scale), max(1, width // scale))
    weighted = F.interpolate(torch.cat([rgb * weight, weight], dim=1), size=small_size, mode="area")
    blurred = _gaussian_blur(weighted, sigma=max(1.0, 0.02 * max(small_size)))
    blurred = F.interpolate(blurred, size=(height, width), mode="bilinear", align_corners=False)
    return (blurred[:, :3] / blurred[:, 3:].clamp_min(1e-3)).clamp_(0.0, 1.0)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    padded = F.pad(image, (radius, radius, 0, 0), mode="replicate")
    image = F.conv2d(padded, horizontal, groups=channels)
    padded = F.pad(image, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(padded, vertical, groups=channels)
