"""Form, query and params parsing: every field a client sends, validated up front.

Each refusal is a 400 (or 413, 422) that says what is wrong and how to fix it, repeating at most
`ECHO_CHARS` of the client's own text. `ProcessRequest` is what the request flow
(service/flow.py) runs; the routes build it with `parse_request`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request, UploadFile
from pydantic import ValidationError

from cache.keys import SHA256_HEX
from effects import EFFECTS
from effects.background import Background
from effects.base import EffectParams
from effects.engine import CUTOUT
from service import imaging
from service.errors import InvalidParameter, MalformedRequest, UnknownEffect, UploadTooLarge
from service.settings import Settings
from service.upload import too_large_detail

MAX_SEED = 2**32 - 1
# `params` is a few small objects; far more is a mistake or an attack, refused before parsing.
MAX_PARAMS_CHARS = 16_384
MAX_PARAMS_DEPTH = 8
# How much of a client's own text an error detail repeats.
ECHO_CHARS = 120


@dataclass(frozen=True)
class ProcessRequest:
    effects: tuple[str, ...]
    background: Background
    format: str
    max_size: int
    params: dict[str, EffectParams]
    seed: int


def parse_request(
    *,
    effects: str,
    background: str,
    output_format: str,
    max_size: int | None,
    params: str | None,
    seed: int,
    settings: Settings,
) -> ProcessRequest:
    """Validate every form field up front, with errors that say how to fix them."""
    names = tuple(dict.fromkeys(name.strip().lower() for name in effects.split(",") if name.strip()))
    if not names:
        raise InvalidParameter(f"effects is empty; name one or more of: {', '.join(EFFECTS)}")
    unknown = [name for name in names if name not in EFFECTS]
    if unknown:
        raise UnknownEffect(f"unknown effect {clip(', '.join(unknown))}; valid effects are: {', '.join(EFFECTS)}")
    try:
        parsed_background = Background.parse(background)
    except ValueError as exc:
        raise InvalidParameter(str(exc)) from exc
    fmt = output_format.strip().lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in imaging.OUTPUT_FORMATS:
        raise InvalidParameter(f"format {clip(output_format)!r} is not one of png, webp, jpeg")
    if fmt == "jpeg" and parsed_background.kind == "transparent":
        raise InvalidParameter(
            "format=jpeg cannot keep a transparent background; use png or webp, or background=white|#rrggbb|blur"
        )
    if CUTOUT in names and parsed_background.kind == "none":
        raise InvalidParameter(
            "effect cutout removes the background but background=none keeps it; "
            "use background=transparent, white, #rrggbb or blur"
        )
    size = settings.default_max_size if max_size is None else max_size
    if not 64 <= size <= 4096:
        raise InvalidParameter(f"max_size must be between 64 and 4096 pixels, got {size}")
    if not 0 <= seed <= MAX_SEED:
        raise InvalidParameter(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    return ProcessRequest(
        effects=names,
        background=parsed_background,
        format=fmt,
        max_size=size,
        params=parse_params(params, names),
        seed=seed,
    )


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """A client's text as an error detail repeats it: at most `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{clip(text, 40)} is too large for a number")
    return value


def load_params_json(raw: str) -> Any:
    """`params` parsed, or the 400 that says what is wrong with it, whatever the client sent.

    Beyond syntax errors: text too long, nesting too deep (which would exhaust the parser's
    recursion), integers past Python's digit limit, NaN and Infinity.
    """
    if len(raw) > MAX_PARAMS_CHARS:
        raise InvalidParameter(f"params is {len(raw)} characters long; the limit is {MAX_PARAMS_CHARS}")
    try:
        given = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise InvalidParameter(f"params is not valid JSON ({exc.msg} at position {exc.pos})") from exc
    except RecursionError as exc:
        raise InvalidParameter(f"params is nested too deeply; at most {MAX_PARAMS_DEPTH} levels") from exc
    except ValueError as exc:  # an integer past the digit limit, NaN, Infinity, 1e999
        raise InvalidParameter(f"params holds a value it cannot: {clip(str(exc))}") from exc
    if _depth(given) > MAX_PARAMS_DEPTH:
        raise InvalidParameter(f"params is nested too deeply; at most {MAX_PARAMS_DEPTH} levels")
    return given


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if depth > MAX_PARAMS_DEPTH:
            break
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)
    return deepest


def parse_params(raw: str | None, names: tuple[str, ...]) -> dict[str, EffectParams]:
    given: Any = {}
    if raw is not None and raw.strip():
        given = load_params_json(raw)
    if not isinstance(given, dict):
        raise InvalidParameter('params must be a JSON object like {"blackwhite": {"grain": 0.3}}')
    stray = [name for name in given if name not in names]
    if stray:
        raise InvalidParameter(
            f"params given for {clip(', '.join(map(str, stray)))}, which the request does not ask for; "
            f"requested effects: {', '.join(names)}"
        )
    validated: dict[str, EffectParams] = {}
    for name in names:
        values = given.get(name, {})
        if not isinstance(values, dict):
            raise InvalidParameter(f"params.{name} must be a JSON object of that effect's parameters")
        try:
            validated[name] = EFFECTS[name].params.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"params.{name}.{clip('.'.join(str(p) for p in error['loc']) or name)}: {clip(error['msg'])}"
                for error in exc.errors()[:5]
            )
            raise InvalidParameter(problems) from exc
    return validated


def parse_image_sha256(value: str) -> str:
    text = value.strip().lower()
    if not SHA256_HEX.fullmatch(text):
        raise InvalidParameter("image_sha256 must be the 64 hex digits of the photo's sha256")
    return text


async def reject_unknown_fields(request: Request, allowed: frozenset[str]) -> None:
    """422 for a form field the route does not take (the `/v1` API rejects, never ignores)."""
    form = await request.form()  # parsed once; FastAPI reuses it for the route's fields
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise MalformedRequest(
            f"unknown form field {', '.join(unknown)}; accepted fields: {', '.join(sorted(allowed))}"
        )


async def read_upload(image: UploadFile, limit: int) -> bytes:
    """The uploaded file's bytes, or 413 past `limit` (read one byte over it, never more)."""
    data = await image.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLarge(too_large_detail(limit))
    return data
