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

GPU-seconds of a request: the device time of the work done for it (`effects.device_time`): its
upload, mask input, background, effects, download and diffusion runs, plus an equal share of each
mask batch it rode in, timed with CUDA events on the GPU (the thread's CPU time on the CPU). Time
spent waiting (admission, the memory budget, a mask batch filling, the GPU or diffusion thread busy
with other work) is not device time, and neither is wall time inflated by other requests' work
running alongside. The record binds its `DeviceMeter` for the request's context; the engine charges
it from its worker threads. The "mask batch" span links to every request it served.
"""

from __future__ import annotations

import logging
import threading
import time
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
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from effects import device_time

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
    device: device_time.DeviceMeter = field(default_factory=device_time.DeviceMeter)
    cache: dict[str, str] = field(default_factory=dict)

    def add_stage(self, name: str, seconds: float) -> None:
        self.stages.append((name, seconds))

    @property
    def gpu_seconds(self) -> float:
        """Device seconds of the work done for this request (read once its work has ended)."""
        return self.device.seconds

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
RequestTokens = tuple[Token[RequestRecord | None], Token[device_time.DeviceMeter | None]]


def begin_request(record: RequestRecord) -> RequestTokens:
    return _current.set(record), device_time.bind(record.device)


def end_request(tokens: RequestTokens) -> None:
    device_time.unbind(tokens[1])
    _current.reset(tokens[0])


def current_request() -> RequestRecord | None:
    return _current.get()


class _Result(Protocol):
    @property
    def effect(self) -> str: ...
    @property
    def cache(self) -> str: ...


def note_results(results: Iterable[_Result]) -> None:
    """Record each result's cache outcome (hit, miss, bypass) on the current request."""
    record = _current.get()
    if record is not None:
        for result in results:
            record.cache[result.effect] = result.cache


@contextmanager
def stage(name: str, **attributes: AttributeValue) -> Iterator[trace.Span]:
    """A span for one step of the request flow, its wall time added to the current request record.

    Attributes are recorded as `cutout.<name>`. GPU-seconds are not taken from stages (their wall
    time includes waits): the engine meters its device work itself.
    """
    started = time.perf_counter()
    with _tracer.start_as_current_span(name, attributes={f"cutout.{k}": v for k, v in attributes.items()}) as span:
        try:
            yield span
        finally:
            record = _current.get()
            if record is not None:
                record.add_stage(name, time.perf_counter() - started)


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


_install_lock = threading.Lock()


def install_tracing() -> TracerProvider:
    """The process's SDK tracer provider and propagators, installed on first use."""
    with _install_lock:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            return current
        provider = TracerProvider(resource=Resource.create({"service.name": "cutout"}), sampler=ParentBased(ALWAYS_ON))
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
