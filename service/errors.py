"""One family of domain errors, mapped to HTTP answers in one place.

An error raised anywhere in the service says what happened (its class, and its `detail` in
words the client can act on); `ANSWERS` alone says how each is answered: status, `code` and
`Retry-After`. The engine's own failures (a model still loading, weights missing, the device out
of memory) are answered from the same table, so the request flow raises or lets them pass and
never chooses a status. Middleware that answers before the app (admission, rate limit, upload
guard) and `/ready`'s 503 build their answers with `error_answer` too.

Every error answer is `{"detail": "...", "code": "..."}`; CORS headers are added by the
CORS middleware, which wraps these handlers. A genuine bug is answered by `CatchAllMiddleware`,
just inside CORS (Starlette's own catch-all, `ServerErrorMiddleware`, sits outside every user
middleware, so its 500 would reach a browser without CORS headers as an opaque network error):
`500 internal_error` with a `request_id`, also sent as `X-Request-Id` and logged with the
traceback, so a customer's report finds the log line.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from effects.engine import ModelMissing, ModelNotReady, OutOfMemory
from service.middleware import HttpMiddleware

log = logging.getLogger("cutout.errors")


class CutoutError(Exception):
    """Base of every error the service answers on purpose: what went wrong, and how to fix it."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def known_wait_s(self) -> int | None:
        """Seconds until the condition ends, when the error knows them (else `ANSWERS` says)."""
        return None


class InvalidParameter(CutoutError):
    """A field or parameter has a value the API does not take."""


class UnknownEffect(CutoutError):
    """An effect name that is not in the registry."""


class ResultNotFound(CutoutError):
    """No stored result or kept picture by that name."""


class ImageNotCached(CutoutError):
    """Asked by its hash, the photo (or a result of it) is not in the store: the client uploads it."""


class UploadTooLarge(CutoutError):
    """The body is over the byte limit."""


class ImageTooLarge(CutoutError):
    """The image is over the pixel limit."""


class UnsupportedImage(CutoutError):
    """The bytes are not an image format the service reads."""


class MalformedRequest(CutoutError):
    """The request does not have the API's shape (unknown or malformed form fields)."""


class RateLimited(CutoutError):
    """The client is over its rate limit; its window frees a place in `reset_in_s`."""

    def __init__(self, detail: str, *, reset_in_s: int) -> None:
        super().__init__(detail)
        self.reset_in_s = reset_in_s

    def known_wait_s(self) -> int | None:
        return self.reset_in_s


class NotReady(CutoutError):
    """The instance cannot serve yet: its cutout model is not warm."""


class Overloaded(CutoutError):
    """The instance holds as many processing requests as it admits."""


class ShuttingDown(CutoutError):
    """The instance is draining: it takes no new work (or stopped before this request ended)."""


class DrainingProbe(CutoutError):
    """The readiness probe of a draining instance: not ready, for good."""


class StoreUnavailable(CutoutError):
    """The result or picture store could not be read."""


class NotKept(CutoutError):
    """The store failed to keep a picture; nothing looks kept that is not, and keeping again is safe."""


class SigningKeysUnavailable(CutoutError):
    """Google's token-signing keys could not be fetched, so OIDC tokens cannot be checked now."""


class DeadlineExceeded(CutoutError):
    """The request passed its deadline and was cancelled."""


class ClientClosedRequest(CutoutError):
    """The client left before its answer; recorded (nginx's 499), never seen by the client."""


class Unauthorized(CutoutError):
    """A credential is needed and none was sent."""


class Forbidden(CutoutError):
    """The credential sent does not check out."""


@dataclass(frozen=True)
class Answer:
    """How one kind of error is answered. `detail`, when set, replaces the error's own text."""

    status: int
    code: str
    retry_after: int | None = None
    detail: str | None = None


# Short: loading finishes in seconds, memory frees with the request that held it, a store
# outage is skipped after a cool-down. Long: absent weights come back only with a new revision.
ANSWERS: dict[type[Exception], Answer] = {
    InvalidParameter: Answer(400, "invalid_parameter"),
    UnknownEffect: Answer(400, "unknown_effect"),
    Unauthorized: Answer(401, "unauthorized"),
    Forbidden: Answer(403, "forbidden"),
    ResultNotFound: Answer(404, "result_not_found"),
    ImageNotCached: Answer(404, "image_not_cached"),
    UploadTooLarge: Answer(413, "upload_too_large"),
    ImageTooLarge: Answer(413, "image_too_large"),
    UnsupportedImage: Answer(415, "unsupported_image"),
    MalformedRequest: Answer(422, "malformed_request"),
    RateLimited: Answer(429, "rate_limited"),  # Retry-After: when the client's window frees a place
    ClientClosedRequest: Answer(499, "client_closed_request"),
    NotReady: Answer(503, "not_ready", retry_after=5),
    ModelNotReady: Answer(503, "model_loading", retry_after=5),
    ModelMissing: Answer(503, "model_unavailable", retry_after=60),
    OutOfMemory: Answer(503, "out_of_memory", retry_after=5),
    torch.OutOfMemoryError: Answer(503, "out_of_memory", 5, detail="the GPU ran out of memory; retry shortly"),
    # Another instance (or this one, a moment later) usually has room.
    Overloaded: Answer(503, "overloaded", retry_after=2),
    # A draining instance never takes the request back; the retry lands on another instance.
    ShuttingDown: Answer(503, "shutting_down", retry_after=1),
    DrainingProbe: Answer(503, "shutting_down"),
    StoreUnavailable: Answer(503, "service_unavailable", retry_after=5),
    NotKept: Answer(503, "service_unavailable", retry_after=15),
    SigningKeysUnavailable: Answer(503, "service_unavailable", retry_after=30),
    DeadlineExceeded: Answer(504, "deadline_exceeded"),
}


def answer_for(exc: BaseException) -> Answer | None:
    """The table's answer for an error (its nearest mapped class), or None for a bug."""
    for kind in type(exc).__mro__:
        found = ANSWERS.get(kind)
        if found is not None:
            return found
    return None


def error_answer(exc: BaseException, extra: dict[str, Any] | None = None) -> JSONResponse:
    """The HTTP answer to an error the table maps; `extra` adds fields after `detail` and `code`."""
    answer = answer_for(exc)
    if answer is None:
        return internal_error_response(exc)
    detail = _detail(exc, answer)
    retry_after = exc.known_wait_s() if isinstance(exc, CutoutError) else None
    if retry_after is None:
        retry_after = answer.retry_after
    return error_response(answer.status, answer.code, detail, retry_after, extra)


def _detail(exc: BaseException, answer: Answer) -> str:
    return answer.detail or (exc.detail if isinstance(exc, CutoutError) else str(exc))


def error_response(
    status_code: int, code: str, detail: str, retry_after: int | None = None, extra: dict[str, Any] | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": detail, "code": code, **(extra or {})}, status_code=status_code, headers=headers)


# Starlette's own HTTP errors (no such route, wrong method, a form it cannot read), by status.
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
    async def _mapped(_: Request, exc: Exception) -> JSONResponse:
        answer = answer_for(exc)
        if answer is not None and answer.status >= 500:
            log.warning("answered %s %s: %s", answer.status, answer.code, _detail(exc, answer))
        return error_answer(exc)

    for kind in ANSWERS:
        app.add_exception_handler(kind, _mapped)

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
        if cause is not None and answer_for(cause) is not None:
            return error_answer(cause)
        code = _STATUS_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such route; see GET /docs for the API"
        return error_response(exc.status_code, code, detail)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The last resort (outside CORS): CatchAllMiddleware answers bugs before they get here.
        return internal_error_response(exc)


def request_id() -> str:
    """The id a bug's answer and its log line share: the request's trace id, or a fresh one."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        return f"{span_context.trace_id:032x}"
    return uuid.uuid4().hex


def internal_error_response(exc: BaseException) -> JSONResponse:
    """A bug's answer: logged with its traceback and a request id the client is given too."""
    rid = request_id()
    log.error("unhandled error", exc_info=exc, extra={"request_id": rid})
    response = JSONResponse(
        {"detail": f"internal error; it has been logged as request {rid}", "code": "internal_error", "request_id": rid},
        status_code=500,
        headers={"X-Request-Id": rid},
    )
    return response


class CatchAllMiddleware(HttpMiddleware):
    """Answers a bug inside it as JSON 500; add it just before CORS so CORS wraps the answer.

    Once an answer has started nothing can replace it: the exception goes on, and the server
    closes the connection (a cut answer, never a wrong one).
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            if started:
                raise
            await internal_error_response(exc)(scope, receive, send)
