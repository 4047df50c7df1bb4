"""Metrics: the real google-cloud-monitoring client against a MetricService on loopback, and /metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google.api.metric_pb2 import MetricDescriptor

from service.metrics import Metrics, MonitoringExporter, monitoring_client
from service.settings import Settings
from tests.support import photos
from tests.support.server import free_port
from tests.support.telemetry import PROJECT, LocalMonitoring

MetricKind = MetricDescriptor.MetricKind
ValueType = MetricDescriptor.ValueType


@pytest.fixture
def monitoring() -> Iterator[LocalMonitoring]:
    server = LocalMonitoring()
    yield server
    server.stop()


def exporting(endpoint: str, **overrides: Any) -> dict[str, Any]:
    return {
        "metrics_export": "cloud_monitoring",
        "metrics_endpoint": endpoint,
        "gcp_project": PROJECT,
        "metrics_interval_s": 5.0,
        **overrides,
    }


def process(client: TestClient, effects: str = "popart") -> float:
    started = time.perf_counter()
    response = client.post(
        "/v1/process",
        data={"effects": effects, "background": "none"},
        files={"image": ("cat.jpg", photos.jpeg(64, 48), "image/jpeg")},
    )
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def test_the_flusher_writes_through_the_real_client(
    client_factory: Callable[..., TestClient], monitoring: LocalMonitoring
) -> None:
    client = client_factory(**exporting(monitoring.endpoint))
    process(client, "popart,dithering")
    process(client, "popart,dithering")  # two hits

    # The background task writes on its own, one interval (5 s) after start.
    deadline = time.monotonic() + 30
    while not monitoring.requests and time.monotonic() < deadline:
        time.sleep(0.1)
    assert monitoring.requests, "no CreateTimeSeries call within 30 s"
    assert not monitoring.refusals

    series = {(s.metric.type, tuple(sorted(s.metric.labels.items()))): s for s in monitoring.series()}
    prefix = "custom.googleapis.com/cutout/"
    misses = series[(prefix + "cache_requests", (("outcome", "miss"),))]
    hits = series[(prefix + "cache_requests", (("outcome", "hit"),))]
    assert misses.points[0].value.int64_value == 2 and hits.points[0].value.int64_value == 2
    assert misses.metric_kind == MetricKind.CUMULATIVE and misses.value_type == ValueType.INT64
    start, end = misses.points[0].interval.start_time, misses.points[0].interval.end_time
    assert start.timestamp() < end.timestamp()

    decode = series[(prefix + "stage_latency_ms", (("stage", "decode"),))]
    distribution = decode.points[0].value.distribution_value
    assert decode.value_type == ValueType.DISTRIBUTION and distribution.count == 1
    assert sum(distribution.bucket_counts) == 1
    assert len(distribution.bucket_counts) == len(distribution.bucket_options.explicit_buckets.bounds) + 1

    images_computed = series[(prefix + "gpu_seconds_per_image", ())].points[0].value.distribution_value
    assert images_computed.count == 1 and images_computed.mean > 0  # the second request was all hits
    cost = series[(prefix + "cost_per_image_usd", ())].points[0].value.distribution_value
    assert cost.mean == pytest.approx(images_computed.mean * Settings().l4_usd_per_second)

    memory = series[(prefix + "gpu_memory_bytes", (("kind", "allocated"),))]
    assert memory.metric_kind == MetricKind.GAUGE and memory.points[0].value.int64_value == 0  # CPU here

    # Every series is on this instance's generic_task.
    resources = {tuple(sorted(s.resource.labels.items())) for s in monitoring.series()}
    assert len(resources) == 1
    labels = dict(next(iter(resources)))
    assert labels["project_id"] == PROJECT and labels["namespace"] == "cutout" and labels["task_id"]
    assert {s.resource.type for s in monitoring.series()} == {"generic_task"}

    # A flush right after the last one waits out Monitoring's 5 s per series instead of being refused.
    exporter = client.app.state.metrics_exporter  # type: ignore[attr-defined]
    calls = len(monitoring.requests)
    written = client.portal.call(exporter.flush)  # type: ignore[attr-defined]
    assert written > 0 and len(monitoring.requests) > calls
    assert not monitoring.refusals


def test_batches_of_at_most_200_series(monitoring: LocalMonitoring) -> None:
    settings = Settings(**exporting(monitoring.endpoint))
    metrics = Metrics(usd_per_second=settings.l4_usd_per_second)
    for index in range(450):
        metrics.count_rate_limited(f"family-{index}")
    exporter = MonitoringExporter(metrics, settings, monitoring_client(monitoring.endpoint), task_id="task-1")

    written = asyncio.run(exporter.flush())
    # 450 counters + 2 memory gauges, in calls of at most 200 series.
    assert written == 452
    assert [len(request.time_series) for request in monitoring.requests] == [200, 200, 52]
    assert not monitoring.refusals


def test_exporter_down_leaves_requests_alone(
    client_factory: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens on this port: every write fails.
    client = client_factory(**exporting(f"127.0.0.1:{free_port()}"))
    assert process(client) < 30
    exporter = client.app.state.metrics_exporter  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="cutout.metrics"):
        written = client.portal.call(exporter.flush)  # type: ignore[attr-defined]
    assert written == 0
    assert any("metrics export failed" in record.getMessage() for record in caplog.records)
    assert process(client, "dithering") < 30
    assert "cutout_export_failures_total 1.0" in client.get("/metrics").text


def test_a_slow_exporter_is_never_on_the_request_path(client_factory: Callable[..., TestClient]) -> None:
    slow = LocalMonitoring(delay_s=3.0)
    try:
        client = client_factory(**exporting(slow.endpoint))
        process(client)  # warm the code paths
        exporter = client.app.state.metrics_exporter  # type: ignore[attr-defined]
        flushing = threading.Thread(target=lambda: client.portal.call(exporter.flush))  # type: ignore[attr-defined]
        flushing.start()
        time.sleep(0.5)  # the write is in flight, held by the server for 3 s
        assert process(client, "dithering") < 2.5
        assert flushing.is_alive()
        flushing.join(timeout=30)
        assert slow.requests
    finally:
        slow.stop()


def test_prometheus_text_at_metrics(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory()
    process(client)
    text = client.get("/metrics").text
    assert 'cutout_cache_requests_total{outcome="miss"} 1.0' in text
    assert 'cutout_stage_latency_ms_count{stage="effect"} 1.0' in text
    assert "cutout_gpu_seconds_per_image_count 1.0" in text
    assert 'cutout_gpu_memory_bytes{kind="peak"} 0.0' in text
    assert "# TYPE cutout_stage_latency_ms histogram" in text


def test_metrics_need_the_operator_credential_outside_development(client_factory: Callable[..., TestClient]) -> None:
    token = "operator-token-0123456789abcdef"
    client = client_factory(environment="staging", warmup_token=token)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"X-Warmup-Token": token}).status_code == 200
