"""Telemetry backends for tests: Cloud Monitoring's MetricService on loopback, span exporters attached to the tracer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
from google.cloud.monitoring_v3.types import CreateTimeSeriesRequest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

from service.metrics import MAX_SERIES_PER_CALL
from service.telemetry import install_tracing

PROJECT = "cutout-test-project"


class LocalMonitoring:
    """`google.monitoring.v3.MetricService/CreateTimeSeries` on 127.0.0.1, enforcing the API's limits.

    Like Cloud Monitoring it refuses a call with more than 200 series, a series twice in one call,
    and a point less than 5 s after the previous point of the same series.
    """

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.requests: list[CreateTimeSeriesRequest] = []
        self.refusals: list[str] = []
        self.last_point: dict[str, float] = {}
        self.lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler(
            "google.monitoring.v3.MetricService",
            {
                "CreateTimeSeries": grpc.unary_unary_rpc_method_handler(
                    self.create_time_series,
                    request_deserializer=CreateTimeSeriesRequest.deserialize,
                    response_serializer=lambda _: b"",  # google.protobuf.Empty
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"127.0.0.1:{self.port}"

    def create_time_series(self, request: CreateTimeSeriesRequest, context: grpc.ServicerContext) -> None:
        time.sleep(self.delay_s)
        with self.lock:
            problem = self._check(request)
            if problem:
                self.refusals.append(problem)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            self.requests.append(request)

    def _check(self, request: CreateTimeSeriesRequest) -> str | None:
        if request.name != f"projects/{PROJECT}":
            return f"wrong project {request.name}"
        if len(request.time_series) > MAX_SERIES_PER_CALL:
            return f"{len(request.time_series)} series in one call"
        seen: set[str] = set()
        for series in request.time_series:
            key = series_key(series)
            if key in seen:
                return f"series {key} twice in one call"
            seen.add(key)
            if len(series.points) != 1:
                return "exactly one point per series"
            end = series.points[0].interval.end_time.timestamp()
            last = self.last_point.get(key)
            if last is not None and end - last < 5.0:
                return f"series {key} written {end - last:.1f} s after its previous point"
        for series in request.time_series:
            self.last_point[series_key(series)] = series.points[0].interval.end_time.timestamp()
        return None

    def series(self) -> list[Any]:
        return [series for request in self.requests for series in request.time_series]

    def stop(self) -> None:
        self.server.stop(grace=None)


def series_key(series: Any) -> str:
    return f"{series.metric.type}{sorted(series.metric.labels.items())}{sorted(series.resource.labels.items())}"


Exporter = TypeVar("Exporter", bound=SpanExporter)


@contextmanager
def exporting_spans(exporter: Exporter) -> Iterator[Exporter]:
    """`exporter` receives every span the service ends, synchronously (inside the request itself)."""
    processor = SimpleSpanProcessor(exporter)
    install_tracing().add_span_processor(processor)
    try:
        yield exporter
    finally:
        processor.shutdown()  # the provider keeps the processor; a shut-down exporter drops spans
