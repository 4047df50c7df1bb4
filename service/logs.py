"""Structured logs for Cloud Logging, and one access line per request.

`CUTOUT_LOG_FORMAT=auto` (the default) writes readable text lines in development and JSON
everywhere else (`CUTOUT_ENVIRONMENT=staging|production`, which terraform sets on Cloud Run).
In JSON, each log record is one JSON object on stdout, which Cloud Logging parses into a structured
entry: `severity`, `message`, `time`, and `logging.googleapis.com/trace` /
`logging.googleapis.com/spanId` / `logging.googleapis.com/trace_sampled`, which put the line
under its request in Logs Explorer and Cloud Trace. Fields given with `extra=` become fields.

The access line (logger `cutout.access`) says: method, path, status, `latency_ms`, the effects
answered and each one's cache outcome (`cache`), `cold_start`, milliseconds per stage,
`gpu_seconds`, the upload's size. It carries no image bytes, no query string and no client
address: Cloud Run's own request log already holds the address for the people allowed to see
it, and a rate-limit key is not worth keeping personal data for.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import telemetry
from service.telemetry import ColdStart, RequestRecord

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.settings import Settings

access_log = logging.getLogger("cutout.access")

_SEVERITY = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR", "CRITICAL": "CRITICAL"}
# Attributes every LogRecord has; anything else came from `extra=` and becomes a field.
# (`color_message` is uvicorn's ANSI-coloured copy of the message.)
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName", "color_message"}
_tracer = trace.get_tracer("cutout.flow")


class CloudLoggingFormatter(logging.Formatter):
    def __init__(self, project: str = "") -> None:
        super().__init__()
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            # The traceback inside `message` is what Error Reporting groups errors by.
            message = f"{message}\n{self.formatException(record.exc_info)}"
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelname, "DEFAULT"),
            "message": message,
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "logger": record.name,
        }
        entry.update(trace_fields(self.project))
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


def trace_fields(project: str) -> dict[str, Any]:
    """Cloud Logging's trace fields for the span current where the line is logged."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    trace_id = f"{span_context.trace_id:032x}"
    return {
        "logging.googleapis.com/trace": f"projects/{project}/traces/{trace_id}" if project else trace_id,
        "logging.googleapis.com/spanId": f"{span_context.span_id:016x}",
        "logging.googleapis.com/trace_sampled": span_context.trace_flags.sampled,
    }


class TextFormatter(logging.Formatter):
    """For a terminal (the default in development): one readable line, extra fields as key=value.

    Fields the message already says (an access line's method, path, status and latency) are not
    repeated; tracebacks follow on their own lines.
    """

    _SAID = frozenset({"method", "path", "status", "latency_ms"})

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{key}={value if isinstance(value, str | int | float) else json.dumps(value, default=str)}"
            for key, value in record.__dict__.items()
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in self._SAID
        ]
        if not extras:
            return line
        head, newline, rest = line.partition("\n")
        return f"{head}  {' '.join(extras)}{newline}{rest}"


def configure_logging(settings: Settings) -> None:
    """Route every logger (uvicorn's included) through one stdout handler in the chosen format."""
    handler = logging.StreamHandler(sys.stdout)
    json_lines = settings.log_lines == "json"
    handler.setFormatter(CloudLoggingFormatter(settings.gcp_project) if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class AccessLogMiddleware:
    """Opens the request record, times the upload (`guard` span), logs one line, feeds metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, cold_start: ColdStart) -> None:
        self.app = app
        self.metrics = metrics
        self.cold_start = cold_start

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(method=scope["method"], path=scope["path"])
        record.cold_start = self.cold_start.claim(record.path)
        record.trace_id = trace.get_current_span().get_span_context().trace_id
        token = telemetry.begin_request(record)
        guard = _UploadGuard(receive, record) if scope["method"] == "POST" else None
        status = 500  # what the client sees if the app fails before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, guard.receive if guard is not None else receive, send_status)
        finally:
            if guard is not None:
                guard.finish()
            self._log(record, status)
            self.metrics.observe_request(record)
            telemetry.end_request(token)

    def _log(self, record: RequestRecord, status: int) -> None:
        latency_ms = round((time.perf_counter() - record.started) * 1000.0, 2)
        fields: dict[str, Any] = {
            "method": record.method,
            "path": record.path,
            "status": status,
            "latency_ms": latency_ms,
            "cold_start": record.cold_start,
        }
        if record.cache:
            fields["effects"] = list(record.cache)
            fields["cache"] = dict(record.cache)
        if record.stages:
            fields["stages_ms"] = record.stages_ms()
            fields["gpu_seconds"] = round(record.gpu_seconds, 4)
        if record.upload_bytes:
            fields["upload_bytes"] = record.upload_bytes
        # A 503 from /ready is the startup probe's "not yet" (or a draining instance): expected, not an error.
        level = logging.ERROR if status >= 500 and record.path != "/ready" else logging.INFO
        access_log.log(level, "%s %s %d %.0f ms", record.method, record.path, status, latency_ms, extra=fields)


class _UploadGuard:
    """The `guard` span: from the first body chunk to the last, with the bytes received."""

    def __init__(self, receive: Receive, record: RequestRecord) -> None:
        self._receive = receive
        self._record = record
        self._context = otel_context.get_current()
        self._span: Span | None = None
        self._started = 0.0

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            if self._span is None and self._started == 0.0:
                self._started = time.perf_counter()
                self._span = _tracer.start_span("guard", context=self._context)
            self._record.upload_bytes += len(message.get("body", b""))
            if not message.get("more_body", False):
                self._end(ok=True)
        elif message["type"] == "http.disconnect":
            self._end(ok=False)
        return message

    def finish(self) -> None:
        """The body was not read to its end (refused early, or the client went away)."""
        self._end(ok=False)

    def _end(self, *, ok: bool) -> None:
        span, self._span = self._span, None
        if span is None:
            return
        span.set_attribute("cutout.bytes", self._record.upload_bytes)
        if not ok:
            span.set_status(Status(StatusCode.ERROR, "upload not read to its end"))
        span.end()
        self._record.add_stage("guard", time.perf_counter() - self._started)
