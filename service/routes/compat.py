"""`POST /api/v2/process-with-effects`: the request the storefront in production already sends.

    POST /api/v2/process-with-effects?return_all_effects=true&effects=enhancedblackwhite,color
    multipart/form-data: file=<the photo>

Same engine, same cache as `/v1/process`: each old effect name maps to a current effect
applied to the cutout (background removed, transparent PNG at the default `max_size`,
seed 0), so a photo processed here and the same photo asked for on `/v1/process` with
`background=transparent&format=png` share results.

`return_all_effects=true` answers JSON with every requested effect as base64 PNG;
`false` (the old service's default) answers the PNG bytes of the first requested effect,
as the old single-image answer did.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response

from cache.store import IMMUTABLE_CACHE_CONTROL
from service.deps import FlowDep, SettingsDep
from service.errors import MalformedRequest, UnknownEffect
from service.flow import ProcessOutcome, parse_request
from service.routes.process import read_upload

router = APIRouter(tags=["compatibility"])

# Old effect name -> current effect. `color` was the cutout with its colours kept.
EFFECT_NAMES = {
    "color": "cutout",
    "enhancedblackwhite": "blackwhite",
    "dithering": "dithering",
    "popart": "popart",
    "retro8bit": "retro8bit",
}
DEFAULT_EFFECTS = "enhancedblackwhite,color"
QUERY_FIELDS = frozenset({"effects", "return_all_effects"})
FORM_FIELDS = frozenset({"file"})


async def compat_fields(request: Request) -> None:
    """Unknown fields are refused, not ignored, here as everywhere."""
    unknown_query = sorted(set(request.query_params.keys()) - QUERY_FIELDS)
    if unknown_query:
        raise MalformedRequest(
            f"unknown query parameter {', '.join(unknown_query)}; accepted: {', '.join(sorted(QUERY_FIELDS))}"
        )
    form = await request.form()
    unknown_form = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown_form:
        raise MalformedRequest(
            f"unknown form field {', '.join(unknown_form)}; send the photo as `file` and the effects in the query"
        )


def map_effects(effects: str) -> list[tuple[str, str]]:
    """(old name, current name) pairs in request order, duplicates dropped."""
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


@router.post("/api/v2/process-with-effects", dependencies=[Depends(compat_fields)], response_model=None)
async def process_with_effects(
    flow: FlowDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="The photo: JPEG, PNG, WebP, GIF or HEIC/HEIF.")],
    effects: Annotated[
        str, Query(description="Comma list of color, enhancedblackwhite, dithering, popart, retro8bit.")
    ] = DEFAULT_EFFECTS,
    return_all_effects: Annotated[
        bool, Query(description="true: JSON with every effect as base64 PNG; false: the first effect's PNG.")
    ] = False,
) -> dict[str, Any] | Response:
    """The storefront's original route: background removed, effects applied, base64 PNGs back."""
    pairs = map_effects(effects)
    if not return_all_effects:
        pairs = pairs[:1]
    request = parse_request(
        effects=",".join(current for _, current in pairs),
        background="transparent",
        output_format="png",
        max_size=None,
        params=None,
        seed=0,
        settings=settings,
    )
    upload = await read_upload(file, settings.max_upload_bytes)
    outcome = await flow.process(upload, request, want_bytes=True)
    if not return_all_effects:
        old, current = pairs[0]
        result = outcome.results[current]
        headers = {
            "X-Cache": result.cache.upper(),
            "X-Effect": old,
            "ETag": f'"{result.key}"',
            "Cache-Control": IMMUTABLE_CACHE_CONTROL,
        }
        if result.location is not None:  # a result the store could not keep has no URL but this answer
            headers["Content-Location"] = result.location
        return Response(content=result.data, media_type=result.content_type, headers=headers)
    encoded = await asyncio.to_thread(_encode_all, outcome, pairs)
    return {
        "success": True,
        "effects": encoded,
        "processing_time": {stage: round(ms / 1000.0, 4) for stage, ms in outcome.timings_ms.items()},
        "cache_info": {
            "image_sha256": outcome.image_sha256,
            "total_cache_hits": sum(1 for result in outcome.results.values() if result.cache == "hit"),
            "effects": {
                old: {
                    "effect": current,
                    "cache": outcome.results[current].cache,
                    "key": outcome.results[current].key,
                    "url": outcome.results[current].public_url(),
                }
                for old, current in pairs
            },
        },
    }


def _encode_all(outcome: ProcessOutcome, pairs: list[tuple[str, str]]) -> dict[str, str]:
    encoded: dict[str, str] = {}
    for old, current in pairs:
        data = outcome.results[current].data
        if data is None:  # want_bytes=True always fills it; a missing body is a bug, not a client error
            raise RuntimeError(f"result {current} came back without its bytes")
        encoded[old] = base64.b64encode(data).decode("ascii")
    return encoded
