"""One family of domain errors, mapped to HTTP answers in one place.

Every error answer is `{"detail": "...", "code": "..."}`; CORS headers are added by the
CORS middleware, which wraps these handlers.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("cutout.errors")


class CutoutError(Exception):
    """Base of every error the service answers on purpose."""

    status_code = 400
    code = "bad_request"

    def __init__(self, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class InvalidParameter(CutoutError):
    status_code = 400
    code = "invalid_parameter"


class UnknownEffect(CutoutError):
    status_code = 400
    code = "unknown_effect"


class ResultNotFound(CutoutError):
    status_code = 404
    code = "result_not_found"


class ImageNotCached(CutoutError):
    status_code = 404
    code = "image_not_cached"


class UploadTooLarge(CutoutError):
    status_code = 413
    code = "upload_too_large"


class ImageTooLarge(CutoutError):
    status_code = 413
    code = "image_too_large"


class UnsupportedImage(CutoutError):
    status_code = 415
    code = "unsupported_image"


class MalformedRequest(CutoutError):
    status_code = 422
    code = "malformed_request"


class RateLimited(CutoutError):
    status_code = 429
    code = "rate_limited"


class ServiceUnavailable(CutoutError):
    status_code = 503
    code = "service_unavailable"


class NotReady(ServiceUnavailable):
    code = "not_ready"


class ModelLoading(NotReady):
    """The model an effect needs is still loading (a cold start): retry after `Retry-After`."""

    code = "model_loading"


class ModelUnavailable(ServiceUnavailable):
    code = "model_unavailable"


class Overloaded(ServiceUnavailable):
    code = "overloaded"


class GpuOutOfMemory(ServiceUnavailable):
    code = "out_of_memory"


class DeadlineExceeded(CutoutError):
    status_code = 504
    code = "deadline_exceeded"


class Unauthorized(CutoutError):
    status_code = 401
    code = "unauthorized"


class Forbidden(CutoutError):
    status_code = 403
    code = "forbidden"


def error_response(status_code: int, code: str, detail: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": detail, "code": code}, status_code=status_code, headers=headers)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "upload_too_large",
    415: "unsupported_image",
    422: "malformed_request",
    429: "rate_limited",
    503: "service_unavailable",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CutoutError)
    async def _cutout_error(_: Request, exc: CutoutError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("answered %s %s: %s", exc.status_code, exc.code, exc.detail)
        return error_response(exc.status_code, exc.code, exc.detail, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
        detail = "; ".join(parts) or "the request does not match the API"
        return error_response(422, "malformed_request", detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI wraps failures while reading the form (such as the upload guard's limit,
        # raised from inside the body stream) in a generic 400: answer the real cause.
        cause = exc.__cause__
        if isinstance(cause, CutoutError):
            return error_response(cause.status_code, cause.code, cause.detail, cause.retry_after)
        code = _STATUS_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such route; see GET /docs for the API"
        return error_response(exc.status_code, code, detail)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A 500 is a bug: log it with its traceback, answer without internals.
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error; it has been logged")
