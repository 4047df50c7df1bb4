"""Tracing and the per-request record behind logs and metrics.

Tracing: one OpenTelemetry SDK `TracerProvider` per process (the engine and the flow reach it
through the OpenTelemetry API), FastAPI's instrumentation for the server span, and a `stage()`
span per step of the request flow. Incoming `X-Cloud-Trace-Context` (Cloud Run, the load
balancer) and W3C `traceparent` headers are both honoured, so our spans join the trace Google's
front end started. Spans go to Cloud Trace through a `BatchSpanProcessor` only when
`CUTOUT_TRACE_EXPORT=cloud_trace`; otherwise they are recorded (their ids correlate the logs) and
dropped.

The request record: the access-log middleware (`service.logs`) opens one `RequestRecord` per
request in a context variable; `stage()` adds each stage's time to it and the flow adds each
result's cache outcome, so the single log line and the metrics of a request come from one place
without threading anything through the routes.

GPU-seconds of a request: the wall time of its GPU-bound stages (`background` and every
`effect`, both tensor work on the engine's device) plus its share of each mask batch it rode in:
a batch's wall time divided by the batch size. Mask batches run on the engine's worker, outside
any request, so the engine's "mask batch" span links to every request it served and
`GpuShares` (a span processor) hands each linked trace its share.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.cloud_trace_propagator import CloudTraceFormatPropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from effects.engine import MASK_BATCH_SPAN

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings

PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})

log = logging.getLogger("cutout.telemetry")
_tracer = trace.get_tracer("cutout.flow")


# ------------------------------------------------------------------------ the request record


@dataclass
class RequestRecord:
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    cold_start: bool = False
    trace_id: int = 0
    upload_bytes: int = 0
    stages: list[tuple[str, float]] = field(default_factory=list)
    gpu_seconds: float = 0.0
    cache: dict[str, str] = field(default_factory=dict)

    def add_stage(self, name: str, seconds: float, *, gpu: bool) -> None:
        self.stages.append((name, seconds))
        if gpu:
            self.gpu_seconds += seconds

    def stages_ms(self) -> dict[str, float]:
        """Milliseconds per stage name, summed (one request may run `effect` several times)."""
        totals: dict[str, float] = {}
        for name, seconds in self.stages:
            totals[name] = totals.get(name, 0.0) + seconds * 1000.0
        return {name: round(ms, 2) for name, ms in totals.items()}

    @property
    def computed(self) -> bool:
        """Whether this request made results (rather than finding them all in the cache)."""
        return any(outcome != "hit" for outcome in self.cache.values())


_current: ContextVar[RequestRecord | None] = ContextVar("cutout_request", default=None)


def begin_request(record: RequestRecord) -> Token[RequestRecord | None]:
    return _current.set(record)


def end_request(token: Token[RequestRecord | None]) -> None:
    _current.reset(token)


def current_request() -> RequestRecord | None:
    return _current.get()


class _Result(Protocol):
    effect: str
    cache: str


def note_results(results: Iterable[_Result]) -> None:
    """Record each result's cache outcome (hit, miss, bypass) on the current request."""
    record = _current.get()
    if record is not None:
        for result in results:
            record.cache[result.effect] = result.cache


@contextmanager
def stage(name: str, *, gpu: bool = False, **attributes: AttributeValue) -> Iterator[trace.Span]:
    """A span for one step of the request flow, timed into the current request record.

    Attributes are recorded as `cutout.<name>`; `gpu=True` marks tensor work on the engine's
    device, which counts towards the request's GPU-seconds.
    """
    started = time.perf_counter()
    with _tracer.start_as_current_span(name, attributes={f"cutout.{k}": v for k, v in attributes.items()}) as span:
        try:
            yield span
        finally:
            record = _current.get()
            if record is not None:
                record.add_stage(name, time.perf_counter() - started, gpu=gpu)


class ColdStart:
    """Which request this process served first (health, readiness and metrics probes aside).

    `cold_start` in logs and in the /warmup answer means exactly this: the request was the first
    real one the process served, so it met (or waited for) a fresh instance.
    """

    def __init__(self) -> None:
        self._claimed = False
        self._lock = threading.Lock()

    def claim(self, path: str) -> bool:
        if path in PROBE_PATHS:
            return False
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True


# ------------------------------------------------------------------------ GPU shares


class GpuShares(SpanProcessor):  # type: ignore[misc]
    """Splits each mask batch's wall time equally among the request traces it links to."""

    def __init__(self, max_pending: int = 4096) -> None:
        self._pending: OrderedDict[int, float] = OrderedDict()
        self._max_pending = max_pending
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        if span.name != MASK_BATCH_SPAN or span.start_time is None or span.end_time is None:
            return
        traces = [link.context.trace_id for link in span.links if link.context.is_valid]
        if not traces:
            return
        size = span.attributes.get("cutout.batch_size") if span.attributes else None
        share = (span.end_time - span.start_time) / 1e9 / (size if isinstance(size, int) and size > 0 else len(traces))
        with self._lock:
            for trace_id in traces:
                self._pending[trace_id] = self._pending.get(trace_id, 0.0) + share
                self._pending.move_to_end(trace_id)
            while len(self._pending) > self._max_pending:  # shares nobody collected (warm-ups)
                self._pending.popitem(last=False)

    def take(self, trace_id: int) -> float:
        with self._lock:
            return self._pending.pop(trace_id, 0.0)


GPU_SHARES = GpuShares()
_install_lock = threading.Lock()


def install_tracing() -> TracerProvider:
    """The process's SDK tracer provider and propagators, installed on first use."""
    with _install_lock:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            return current
        provider = TracerProvider(resource=Resource.create({"service.name": "cutout"}), sampler=ParentBased(ALWAYS_ON))
        provider.add_span_processor(GPU_SHARES)
        trace.set_tracer_provider(provider)
        # Extraction runs left to right and the last header found wins: Google's own
        # X-Cloud-Trace-Context (Cloud Run and the load balancer set it) decides the trace.
        propagate.set_global_textmap(
            CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator(), CloudTraceFormatPropagator()])
        )
        return provider


def instrument(app: FastAPI) -> None:
    """FastAPI's server span around every request (probes excepted); call before the app serves."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    provider = install_tracing()
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        excluded_urls=",".join(f"{path}$" for path in sorted(PROBE_PATHS)),
        exclude_spans=["receive", "send"],
    )


class TraceExport:
    """The Cloud Trace exporter of one app, started in the lifespan, flushed at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.processor: BatchSpanProcessor | None = None
        if settings.trace_export == "cloud_trace":
            from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter

            try:
                exporter = CloudTraceSpanExporter(project_id=settings.gcp_project)
            except Exception as exc:
                # No credentials or no client: the service runs on, its spans unexported.
                log.error("trace export disabled: %s: %s", exc.__class__.__name__, exc)
                return
            self.processor = BatchSpanProcessor(exporter)
            install_tracing().add_span_processor(self.processor)

    def shutdown(self) -> None:
        if self.processor is not None:
            self.processor.shutdown()
