"""Processing routes: one photo, one or several effects."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response

from service.deps import FlowDep, SettingsDep
from service.errors import InvalidParameter
from service.forms import (
    ProcessRequest,
    load_params_json,
    parse_image_sha256,
    parse_request,
    read_upload,
    reject_unknown_fields,
)
from service.routes import image_response

router = APIRouter(tags=["processing"])

PROCESS_FIELDS = frozenset({"image", "image_sha256", "effects", "background", "format", "max_size", "params", "seed"})
EFFECT_FIELDS = PROCESS_FIELDS - {"effects"}


async def process_fields(request: Request) -> None:
    await reject_unknown_fields(request, PROCESS_FIELDS)


async def effect_fields(request: Request) -> None:
    await reject_unknown_fields(request, EFFECT_FIELDS)


ImageField = Annotated[UploadFile | None, File(description="The photo: JPEG, PNG, WebP, GIF or HEIC/HEIF.")]
HashField = Annotated[str | None, Form(description="sha256 of a photo uploaded before, instead of `image`.")]
BackgroundField = Annotated[str, Form(description="transparent | none | white | #rrggbb | blur")]
FormatField = Annotated[str, Form(description="png | webp | jpeg (jpeg needs an opaque background)")]
MaxSizeField = Annotated[int | None, Form(description="Longest output side in px, 64-4096 (default 2048).")]
ParamsField = Annotated[str | None, Form(description='JSON object {"<effect>": {<param>: <value>}}.')]
SeedField = Annotated[int, Form(description="Same seed, same bytes.")]


async def _run(
    flow: FlowDep,
    settings: SettingsDep,
    request: ProcessRequest,
    image: UploadFile | None,
    image_sha256: str | None,
    *,
    want_bytes: bool,
) -> Any:
    if image is not None and image_sha256 is not None:
        raise InvalidParameter("send either `image` (the photo) or `image_sha256` (a photo sent before), not both")
    if image is not None:
        upload = await read_upload(image, settings.max_upload_bytes)
        return await flow.process(upload, request, want_bytes=want_bytes)
    if image_sha256 is not None:
        return await flow.from_hash(parse_image_sha256(image_sha256), request, want_bytes=want_bytes)
    raise InvalidParameter("no photo: send the file in the form field `image` (or `image_sha256` for one sent before)")


@router.post("/v1/process", dependencies=[Depends(process_fields)])
async def process(
    flow: FlowDep,
    settings: SettingsDep,
    image: ImageField = None,
    image_sha256: HashField = None,
    effects: Annotated[str, Form(description="Comma-separated effect names.")] = "cutout",
    background: BackgroundField = "transparent",
    format: FormatField = "png",
    max_size: MaxSizeField = None,
    params: ParamsField = None,
    seed: SeedField = 0,
) -> dict[str, Any]:
    """Process one photo with several effects; answers the result URLs."""
    request = parse_request(
        effects=effects,
        background=background,
        output_format=format,
        max_size=max_size,
        params=params,
        seed=seed,
        settings=settings,
    )
    outcome = await _run(flow, settings, request, image, image_sha256, want_bytes=False)
    return {
        "image_sha256": outcome.image_sha256,
        "results": {name: result.describe() for name, result in outcome.results.items()},
        "timings_ms": outcome.timings_ms,
    }


@router.post("/v1/effects/{effect}", dependencies=[Depends(effect_fields)], response_class=Response)
async def apply_effect(
    effect: str,
    flow: FlowDep,
    settings: SettingsDep,
    image: ImageField = None,
    image_sha256: HashField = None,
    background: BackgroundField = "transparent",
    format: FormatField = "png",
    max_size: MaxSizeField = None,
    params: ParamsField = None,
    seed: SeedField = 0,
) -> Response:
    """Apply one effect to one photo; answers the image bytes."""
    request = parse_request(
        effects=effect,
        background=background,
        output_format=format,
        max_size=max_size,
        params=None if params is None else _wrap_params(effect, params),
        seed=seed,
        settings=settings,
    )
    if len(request.effects) != 1:
        raise InvalidParameter("this route applies exactly one effect; use POST /v1/process for several")
    outcome = await _run(flow, settings, request, image, image_sha256, want_bytes=True)
    return image_response(outcome.results[request.effects[0]])


def _wrap_params(effect: str, params: str) -> str:
    """`params` as on /v1/process ({"<effect>": {...}}), or that effect's parameters alone."""
    name = effect.strip().lower()
    try:
        given = load_params_json(params) if params.strip() else {}
    except InvalidParameter:
        return params  # parse_params explains what is wrong with it
    if isinstance(given, dict) and set(given) <= {name} and all(isinstance(v, dict) for v in given.values()):
        return params
    return json.dumps({name: given})
