"""The routes the storefront in production already calls, answered as the services it used answered them.

The Shopify theme (`perkins228/perkie-gemini`, `assets/` and `snippets/`) was written against two
background-removal services: an InSPyReNet one and, later, a BiRefNet one that copied its
`/api/v2/process-with-effects` route and added `/remove-background`. The theme's requests are the
contract (docs/storefront.md, "Theme compatibility", maps each caller to its request and answer):

    POST /api/v2/process-with-effects?return_all_effects=true&effects=enhancedblackwhite,color
        multipart: file=<photo> [effects=<comma list>] [session_id=<text>]
    POST /remove-background?format=webp
        multipart: file=<image>

Same engine, same cache as `/v1/process`: each old effect name maps to a current effect applied to
the cutout (background removed, transparent, the default `max_size`, seed 0), so a photo sent here
and the same photo sent to `/v1/process` with `background=transparent` share results.

Unlike `/v1`, these routes accept what the old services accepted: FastAPI services that ignored
any field they did not declare. The parameters they declared and Cutout has no use for (quality,
caching and film-grain knobs) are accepted and ignored; names neither service declared are ignored
too, and logged (names only), so a theme change shows up in the logs instead of breaking a sale.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import Response

from service.deps import FlowDep, SettingsDep
from service.errors import InvalidParameter, UnknownEffect
from service.flow import Flow, ProcessOutcome
from service.forms import parse_request, read_upload
from service.routes import image_response
from service.settings import Settings

log = logging.getLogger("cutout.compat")

router = APIRouter(tags=["compatibility"])

# Old effect name -> current effect. Keys of the answer are the names as requested.
EFFECT_NAMES = {
    "color": "cutout",  # the cutout with its colours kept
    "enhancedblackwhite": "blackwhite",
    "blackwhite": "blackwhite",  # the BiRefNet service's name for the same effect
    "dithering": "dithering",
    "popart": "popart",
    "optimized_popart": "popart",  # what assets/api-client.js asks the InSPyReNet service for
    "retro8bit": "retro8bit",
}
DEFAULT_EFFECTS = "enhancedblackwhite,color"
SESSION_ID_MAX = 200

# What the old services declared on each route. Honoured ones are parameters of the routes below;
# the rest are accepted and ignored (see the module docstring).
PROCESS_QUERY_IGNORED = frozenset(
    {"effect_params", "quality", "use_cache", "alpha_matting", "contrast", "edge_strength", "halation", "grain"}
)
PROCESS_QUERY_HONOURED = frozenset(
    {"effects", "effect", "return_all_effects", "load_single_effect", "session_id", "output_format"}
)
# `form_effects` is the name the InSPyReNet service gave its form field; the theme sends `effects`.
PROCESS_FORM = frozenset({"file", "effects", "form_effects", "session_id"})
REMOVE_QUERY = frozenset({"output_format", "format", "quality", "alpha_matting"})
REMOVE_FORM = frozenset({"file"})
JSON_FORMATS = ("png", "webp")


def map_effects(effects: str) -> list[tuple[str, str]]:
    """(old name, current name) pairs in request order, repeated names dropped."""
    names = list(dict.fromkeys(name.strip().lower() for name in effects.split(",") if name.strip()))
    if not names:
        raise UnknownEffect(f"effects is empty; name one or more of: {', '.join(EFFECT_NAMES)}")
    unknown = [name for name in names if name not in EFFECT_NAMES]
    if unknown:
        raise UnknownEffect(
            f"unknown effect {', '.join(unknown)}; this route takes: {', '.join(EFFECT_NAMES)} "
            "(POST /v1/process offers every current effect)"
        )
    return [(name, EFFECT_NAMES[name]) for name in names]


def _format(value: str | None, default: str) -> str:
    fmt = (value or default).strip().lower()
    if fmt not in JSON_FORMATS:
        raise InvalidParameter(f"output_format {value!r} is not one of png, webp (the result keeps its transparency)")
    return fmt


async def _form(request: Request) -> dict[str, Any]:
    form = await request.form()  # parsed once; FastAPI reuses it for the `file` parameter
    return {key: form.get(key) for key in form}


def _note_ignored(
    route: str, request: Request, form: dict[str, Any], query: frozenset[str], fields: frozenset[str]
) -> None:
    stray = sorted(set(request.query_params.keys()) - query) + sorted(set(form) - fields)
    if stray:
        names = ", ".join(repr(name[:40]) for name in stray[:20])
        log.info("%s: ignored fields the old service did not declare: %s", route, names)


def _text(value: Any) -> str | None:
    """A form value as text; a file sent where text was expected counts as absent."""
    return value.strip() if isinstance(value, str) and value.strip() else None


async def _process(flow: Flow, settings: Settings, file: UploadFile, effects: str, fmt: str) -> ProcessOutcome:
    """The old services' one recipe: the effects on the cutout, transparent, at the default size and seed."""
    process_request = parse_request(
        effects=effects,
        background="transparent",
        output_format=fmt,
        max_size=None,
        params=None,
        seed=0,
        settings=settings,
    )
    upload = await read_upload(file, settings.max_upload_bytes)
    return await flow.process(upload, process_request, want_bytes=True)


@router.post("/api/v2/process-with-effects", response_model=None)
async def process_with_effects(
    request: Request,
    flow: FlowDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="The photo: JPEG, PNG, WebP, GIF or HEIC/HEIF.")],
    effects: Annotated[
        str | None,
        Query(
            description="Comma list of color, enhancedblackwhite (or blackwhite), dithering, popart "
            "(or optimized_popart), retro8bit. Without it, the form field `effects`; without both, "
            "enhancedblackwhite,color."
        ),
    ] = None,
    effect: Annotated[
        str | None, Query(description="The effect of a single-image answer (default: the first of `effects`).")
    ] = None,
    return_all_effects: Annotated[
        bool, Query(description="true: JSON with every effect in base64; false: one effect's image bytes.")
    ] = False,
    load_single_effect: Annotated[
        bool, Query(description="true: JSON with one effect (`effect`, else the first of `effects`).")
    ] = False,
    session_id: Annotated[str | None, Query(description="Echoed back in the JSON answer.")] = None,
    output_format: Annotated[
        str | None, Query(description="png (default: raw base64 in JSON) or webp (data URLs in JSON).")
    ] = None,
) -> Response:
    """The storefront's original route: background removed, effects applied, base64 images back."""
    form = await _form(request)
    _note_ignored("process-with-effects", request, form, PROCESS_QUERY_HONOURED | PROCESS_QUERY_IGNORED, PROCESS_FORM)
    # The query wins over the form, as on the InSPyReNet service.
    requested = effects or _text(form.get("effects")) or _text(form.get("form_effects")) or DEFAULT_EFFECTS
    pairs = map_effects(requested)
    fmt = _format(output_format, "png")
    json_answer = return_all_effects or load_single_effect
    if load_single_effect or not return_all_effects:
        # One effect: `effect` when given (the old single-image parameter), else the first requested.
        pairs = (map_effects(effect) if effect else pairs)[:1]
    current = list(dict.fromkeys(name for _, name in pairs))
    outcome = await _process(flow, settings, file, ",".join(current), fmt)
    session = (session_id or _text(form.get("session_id")) or uuid.uuid4().hex)[:SESSION_ID_MAX]
    if not json_answer:
        old, name = pairs[0]
        return image_response(outcome.results[name], {"X-Effect": old})
    encoded = await asyncio.to_thread(_encode_all, outcome, pairs, fmt)
    hits = sum(1 for result in outcome.results.values() if result.cache == "hit")
    processing_time = {stage: round(ms / 1000.0, 4) for stage, ms in outcome.timings_ms.items()}
    body = {
        "success": True,
        "effects": encoded,
        "processing_time": processing_time,
        "cache_info": {
            "image_sha256": outcome.image_sha256,
            "total_cache_hits": hits,
            "effects": {
                old: {
                    "effect": name,
                    "cache": outcome.results[name].cache,
                    "key": outcome.results[name].key,
                    "url": outcome.results[name].public_url(),
                }
                for old, name in pairs
            },
        },
        "session_id": session,
        "total_effects": len(encoded),
        "failed_effects": None,
        "progressive_mode": load_single_effect,
    }
    compress = accepts_gzip(request.headers.get("accept-encoding", ""))
    content = await asyncio.to_thread(_json_bytes, body, compress)
    headers = {
        "Cache-Control": "no-store",
        "Vary": "Accept-Encoding",
        "X-Processing-Time": str(processing_time.get("total", 0.0)),
        "X-Cache-Hits": str(hits),
    }
    if compress:
        headers["Content-Encoding"] = "gzip"
    return Response(content=content, media_type="application/json", headers=headers)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether `Accept-Encoding` takes gzip (browsers always send it); `;q=0` refuses it."""
    for item in accept_encoding.split(","):
        token, _, parameters = item.partition(";")
        if token.strip().lower() not in ("gzip", "*"):
            continue
        quality = parameters.strip().lower().removeprefix("q=")
        try:
            return not parameters.strip() or float(quality) > 0
        except ValueError:
            return False
    return False


def _json_bytes(body: dict[str, Any], compress: bool) -> bytes:
    """The JSON answer; gzipped (fast level) when the client takes it, as the old services' answers were.

    Base64 spends 4 characters on 3 bytes; gzip wins most of that back: about a quarter fewer
    bytes to the customer's phone, for about 45 ms of CPU per megabyte on a laptop-class core.
    """
    data = json.dumps(body, separators=(",", ":")).encode()
    return gzip.compress(data, compresslevel=1, mtime=0) if compress else data


def _encode_all(outcome: ProcessOutcome, pairs: list[tuple[str, str]], fmt: str) -> dict[str, str]:
    """PNG as raw base64 (the InSPyReNet answer); WebP as a data URL (the BiRefNet answer)."""
    encoded: dict[str, str] = {}
    for old, name in pairs:
        result = outcome.results[name]
        if result.data is None:  # want_bytes=True always fills it; a missing body is a bug, not a client error
            raise RuntimeError(f"result {name} came back without its bytes")
        text = base64.b64encode(result.data).decode("ascii")
        encoded[old] = text if fmt == "png" else f"data:{result.content_type};base64,{text}"
    return encoded


@router.post("/remove-background", response_model=None)
async def remove_background(
    request: Request,
    flow: FlowDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="The image: JPEG, PNG, WebP, GIF or HEIC/HEIF.")],
    output_format: Annotated[str | None, Query(description="webp (default) or png.")] = None,
    format: Annotated[str | None, Query(description="Same as output_format (what the theme sends).")] = None,
) -> Response:
    """The cutout alone: the image with its background removed, as image bytes (WebP by default)."""
    form = await _form(request)
    _note_ignored("remove-background", request, form, REMOVE_QUERY, REMOVE_FORM)
    fmt = _format(output_format or format, "webp")
    outcome = await _process(flow, settings, file, "cutout", fmt)
    return image_response(outcome.results["cutout"])
