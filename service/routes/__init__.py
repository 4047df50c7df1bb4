"""HTTP routes: each parses, calls the request flow, and shapes the answer."""

from __future__ import annotations

from fastapi.responses import Response

from cache.store import IMMUTABLE_CACHE_CONTROL
from service.flow import EffectResult


def image_response(result: EffectResult, extra: dict[str, str] | None = None) -> Response:
    """One result's bytes, with its cache outcome, its key as ETag and, when stored, its URL."""
    headers = {
        "X-Cache": result.cache.upper(),
        "ETag": f'"{result.key}"',
        "Cache-Control": IMMUTABLE_CACHE_CONTROL,
        **(extra or {}),
    }
    if result.location is not None:  # a result the store could not keep has no URL but this answer
        headers["Content-Location"] = result.location
    return Response(content=result.data, media_type=result.content_type, headers=headers)
