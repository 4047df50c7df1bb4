"""Stored results, served by the service itself (the embedded default; the CDN in production)."""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter
from fastapi.responses import Response

from cache.keys import result_object
from cache.store import CONTENT_TYPES, IMMUTABLE_CACHE_CONTROL, StoreError
from service.deps import StoreDep
from service.errors import ResultNotFound, StoreUnavailable

router = APIRouter(tags=["results"])
_RESULT_NAME = re.compile(r"^([0-9a-f]{64})\.(png|webp|jpeg)$")


@router.get("/v1/results/{name}", response_class=Response)
async def result(name: str, store: StoreDep) -> Response:
    """A stored result by its key and extension; immutable."""
    match = _RESULT_NAME.fullmatch(name)
    if match is None:
        raise ResultNotFound(f"{name!r} is not a result name; results are named <64 hex key>.<png|webp|jpeg>")
    key, extension = match.groups()
    try:
        data = await asyncio.to_thread(store.get, result_object(key, extension))
    except StoreError as exc:
        raise StoreUnavailable("the result store is unavailable; retry shortly") from exc
    if data is None:
        raise ResultNotFound(f"no stored result {name}; process the photo again with POST /v1/process")
    return Response(
        content=data,
        media_type=CONTENT_TYPES[extension],
        headers={"Cache-Control": IMMUTABLE_CACHE_CONTROL, "ETag": f'"{key}"'},
    )
