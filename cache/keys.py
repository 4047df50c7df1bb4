"""Content-hash keys: what names an upload and what names a result.

A result key is the sha256 of a canonical JSON of everything that decides the output bytes,
so the same inputs always give the same key, and any change to them gives another.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

# The version of everything a key does not name field by field: the canonical JSON's layout and
# the pipeline around the recipe, decoding included. A change of decoder (or of the resize after
# it) whose working images differ from the previous decoder's by more than the tolerance stated in
# docs/codecs.md (per channel: max 16 levels, p99.9 6 levels of 255) bumps it, so no stored result
# is served for a recipe that would now look different. A change within that tolerance keeps the
# keys: the same recipe already differs by as much between the CPU and an L4 (nvJPEG vs
# libjpeg-turbo, fp16 vs fp32), and a key names a recipe, not bit-exact bytes. The libjpeg-turbo
# decode with DCT scaling and 8-bit resize that replaced Pillow's full decode is within it.
SCHEMA_VERSION = 1
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a result's bytes. `params` must be validated, defaults filled."""

    image_sha256: str
    effect: str
    effect_version: int
    model_id: str | None
    params: dict[str, Any]
    background: str
    format: str
    max_size: int
    seed: int

    def canonical_json(self) -> str:
        document = {
            "schema": SCHEMA_VERSION,
            "image_sha256": self.image_sha256,
            "effect": self.effect,
            "effect_version": self.effect_version,
            "model_id": self.model_id,
            "params": self.params,
            "background": self.background,
            "format": self.format,
            "max_size": self.max_size,
            "seed": self.seed,
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

    def result_key(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()


def result_object(result_key: str, extension: str) -> str:
    return f"results/{result_key}.{extension}"


def mask_object(image_sha256: str, model_id: str) -> str:
    return f"masks/{image_sha256}-{model_id}.png"


# Kept pictures (`POST /v1/keep`, `POST /store-image`): named by the sha256 of their own bytes, so
# a name always means the same bytes and no upload can ever replace another's picture.
KEPT_EXTENSIONS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "HEIF": "heic"}


def kept_object(data_sha256: str, extension: str) -> str:
    return f"kept/{data_sha256}.{extension}"


def upload_object(image_sha256: str) -> str:
    """Where a processed upload waits (briefly) for its order to keep it: `uploads/<sha256>`."""
    return f"uploads/{image_sha256}"
