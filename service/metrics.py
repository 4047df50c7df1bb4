"""Metrics: aggregated in the process, shown at GET /metrics, flushed to Cloud Monitoring.

Requests only add to in-process aggregates (a few dictionary updates under a lock, after the
answer is sent); a background task turns a snapshot into `TimeSeries` every
`CUTOUT_METRICS_INTERVAL_S` and writes them with `google-cloud-monitoring` in a worker thread.
Cloud Monitoring's limits are kept by construction: each series appears once per flush and
flushes are at least 5 s apart (one point per series per 5 s at most), and a call carries at
most 200 series. A failed write is logged and dropped; requests never wait for it.

Series are `custom.googleapis.com/cutout/<name>` on the `generic_task` monitored resource:
its labels (location, namespace, job = the Cloud Run revision, task_id = this instance) say
which instance wrote a point, which `global` cannot, and Cloud Monitoring does not accept
user-defined metrics on the `cloud_run_revision` resource. Cumulative series start when the
process started, so a restarted instance (a new task_id) starts new series.

The same figures are at GET /metrics in the Prometheus text format, for local use.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from service.telemetry import RequestRecord

if TYPE_CHECKING:
    from effects.engine import Engine
    from service.settings import Settings

log = logging.getLogger("cutout.metrics")

METRIC_PREFIX = "custom.googleapis.com/cutout/"
MAX_SERIES_PER_CALL = 200  # Cloud Monitoring's limit for one CreateTimeSeries call
MIN_WRITE_GAP_S = 5.0  # Cloud Monitoring's limit: one point per series per 5 s
WRITE_TIMEOUT_S = 10.0

STAGE_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000)
GPU_SECONDS_BOUNDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120)

Kind = Literal["counter", "gauge", "distribution"]
LabelKey = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Kind
    value_type: Literal["int", "double", "distribution"]
    unit: str
    description: str


DEFINITIONS = {
    d.name: d
    for d in (
        MetricDef("cache_requests", "counter", "int", "1", "Result cache lookups, by outcome (hit, miss, bypass)."),
        MetricDef("rate_limited", "counter", "int", "1", "Requests refused with 429, by route family."),
        MetricDef("stage_latency_ms", "distribution", "distribution", "ms", "Time spent in each stage of a request."),
        MetricDef(
            "gpu_seconds_per_image",
            "distribution",
            "distribution",
            "s",
            "Device seconds of the work done for each computed image (GPU time, waits excluded).",
        ),
        MetricDef(
            "cost_per_image_usd", "distribution", "distribution", "USD", "Device seconds x the L4 instance price."
        ),
        MetricDef("cold_start_seconds", "gauge", "double", "s", "Process start to every model loaded and warm."),
        MetricDef("gpu_memory_bytes", "gauge", "int", "By", "CUDA memory held by tensors: allocated now, and peak."),
        MetricDef("export_failures", "counter", "int", "1", "Metric writes to Cloud Monitoring that failed."),
    )
}


@dataclass
class Distribution:
    """Counts per explicit bucket plus the moments Cloud Monitoring wants (Welford's update)."""

    bounds: tuple[float, ...]
    bucket_counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0
    mean: float = 0.0
    sum_of_squared_deviation: float = 0.0

    def __post_init__(self) -> None:
        if not self.bucket_counts:
            self.bucket_counts = [0] * (len(self.bounds) + 1)  # underflow..overflow as Monitoring counts

    def observe(self, value: float) -> None:
        index = 0
        while index < len(self.bounds) and value >= self.bounds[index]:
            index += 1
        self.bucket_counts[index] += 1
        self.count += 1
        self.total += value
        delta = value - self.mean
        self.mean += delta / self.count
        self.sum_of_squared_deviation += delta * (value - self.mean)

    def copy(self) -> Distribution:
        return Distribution(
            self.bounds, list(self.bucket_counts), self.count, self.total, self.mean, self.sum_of_squared_deviation
        )


@dataclass(frozen=True)
class Sample:
    definition: MetricDef
    labels: dict[str, str]
    value: float | Distribution


def instance_id() -> str:
    """Unique per process: two instances writing one series would reject each other's points."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Metrics:
    """The process's aggregates; everything here is cheap enough for the end of a request."""

    def __init__(self, *, usd_per_second: float) -> None:
        self.usd_per_second = usd_per_second
        self.start_time = time.time()
        self.engine: Engine | None = None
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, LabelKey], float] = {}
        self._distributions: dict[tuple[str, LabelKey], Distribution] = {}
        self._changed = False
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_PrometheusView(self))

    # -------------------------------------------------------------- observations

    def observe_request(self, record: RequestRecord) -> None:
        with self._lock:
            for outcome in record.cache.values():
                self._add("cache_requests", {"outcome": outcome}, 1)
            for name, seconds in record.stages:
                self._observe("stage_latency_ms", {"stage": name}, seconds * 1000.0, STAGE_BOUNDS_MS)
            if record.computed:
                self._observe("gpu_seconds_per_image", {}, record.gpu_seconds, GPU_SECONDS_BOUNDS)
                cost_bounds = tuple(bound * self.usd_per_second for bound in GPU_SECONDS_BOUNDS)
                self._observe("cost_per_image_usd", {}, record.gpu_seconds * self.usd_per_second, cost_bounds)

    def count_rate_limited(self, family: str) -> None:
        with self._lock:
            self._add("rate_limited", {"family": family}, 1)

    def count_export_failure(self) -> None:
        with self._lock:
            self._add("export_failures", {}, 1)

    def take_changed(self) -> bool:
        """Whether anything was observed since the last call."""
        with self._lock:
            changed, self._changed = self._changed, False
            return changed

    def _add(self, name: str, labels: dict[str, str], amount: float) -> None:
        self._changed = True
        key = (name, tuple(sorted(labels.items())))
        self._counters[key] = self._counters.get(key, 0.0) + amount

    def _observe(self, name: str, labels: dict[str, str], value: float, bounds: tuple[float, ...]) -> None:
        self._changed = True
        key = (name, tuple(sorted(labels.items())))
        distribution = self._distributions.get(key)
        if distribution is None:
            distribution = self._distributions[key] = Distribution(bounds)
        distribution.observe(value)

    # -------------------------------------------------------------- reading

    def gauges(self) -> list[Sample]:
        """Values read now: the model load time and the device memory."""
        samples: list[Sample] = []
        engine = self.engine
        if engine is not None and engine.cold_start_seconds is not None:
            samples.append(Sample(DEFINITIONS["cold_start_seconds"], {}, float(engine.cold_start_seconds)))
        allocated, peak = gpu_memory(engine)
        samples.append(Sample(DEFINITIONS["gpu_memory_bytes"], {"kind": "allocated"}, float(allocated)))
        samples.append(Sample(DEFINITIONS["gpu_memory_bytes"], {"kind": "peak"}, float(peak)))
        return samples

    def snapshot(self) -> list[Sample]:
        with self._lock:
            samples = [
                Sample(DEFINITIONS[name], dict(labels), value) for (name, labels), value in self._counters.items()
            ]
            samples += [
                Sample(DEFINITIONS[name], dict(labels), distribution.copy())
                for (name, labels), distribution in self._distributions.items()
            ]
        return samples + self.gauges()

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)


def gpu_memory(engine: Engine | None) -> tuple[int, int]:
    """Bytes allocated by tensors on the engine's CUDA device, now and at peak; (0, 0) on CPU."""
    if engine is None or engine.device.type != "cuda":
        return 0, 0
    import torch

    return int(torch.cuda.memory_allocated(engine.device)), int(torch.cuda.max_memory_allocated(engine.device))


class _PrometheusView:
    """prometheus_client collector over `Metrics`: one aggregation, two renderings."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for sample in self.metrics.snapshot():
            definition = sample.definition
            name = f"cutout_{definition.name}"
            family = families.get(name)
            labels = sorted(sample.labels)
            if family is None:
                text = f"{definition.description} ({definition.unit})"
                if definition.kind == "counter":
                    family = CounterMetricFamily(name, text, labels=labels)
                elif definition.kind == "gauge":
                    family = GaugeMetricFamily(name, text, labels=labels)
                else:
                    family = HistogramMetricFamily(name, text, labels=labels)
                families[name] = family
            values = [sample.labels[label] for label in labels]
            value = sample.value
            if isinstance(value, Distribution):
                assert isinstance(family, HistogramMetricFamily)
                cumulative, buckets = 0, []
                for bound, count in zip(value.bounds, value.bucket_counts, strict=False):
                    cumulative += count
                    buckets.append((_le(bound), cumulative))
                buckets.append(("+Inf", value.count))
                family.add_metric(values, buckets, value.total)
            else:
                family.add_metric(values, value)  # type: ignore[attr-defined]
        yield from families.values()


def _le(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


# ------------------------------------------------------------------------ Cloud Monitoring


def monitoring_client(endpoint: str) -> Any:
    """A `MetricServiceClient`: Google's endpoint, another one, or plain gRPC on loopback (tests)."""
    from google.cloud.monitoring_v3 import MetricServiceClient

    if not endpoint:
        return MetricServiceClient()
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        return MetricServiceClient(client_options={"api_endpoint": endpoint})
    import grpc
    from google.cloud.monitoring_v3.services.metric_service.transports import MetricServiceGrpcTransport

    return MetricServiceClient(transport=MetricServiceGrpcTransport(channel=grpc.insecure_channel(endpoint)))


class MonitoringExporter:
    """Writes snapshots of `Metrics` to Cloud Monitoring from a background task."""

    def __init__(self, metrics: Metrics, settings: Settings, client: Any, *, task_id: str | None = None) -> None:
        self.metrics = metrics
        self.client = client
        self.project = settings.gcp_project
        self.interval_s = max(MIN_WRITE_GAP_S, settings.metrics_interval_s)
        self.resource_labels = {
            "project_id": settings.gcp_project,
            "location": settings.gcp_region,
            "namespace": "cutout",
            "job": settings.revision,
            "task_id": task_id or instance_id(),
        }
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._last_write = -math.inf

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cutout-metrics-export")

    async def stop(self) -> None:
        """Stop the flusher and write what changed since the last flush (waiting out the 5 s gap)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.metrics.take_changed():
            await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> int:
        """Write every series once; returns how many were written."""
        async with self._flush_lock:
            wait = self._last_write + MIN_WRITE_GAP_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.metrics.take_changed()
            series = self.time_series(self.metrics.snapshot(), time.time())
            written = 0
            for start in range(0, len(series), MAX_SERIES_PER_CALL):
                chunk = series[start : start + MAX_SERIES_PER_CALL]
                try:
                    await asyncio.to_thread(self._write, chunk)
                except Exception as exc:
                    # Telemetry must never hurt the service: log, count, drop these points.
                    self.metrics.count_export_failure()
                    log.warning(
                        "metrics export failed; %d series dropped: %s: %s", len(chunk), exc.__class__.__name__, exc
                    )
                    continue
                written += len(chunk)
            if written:
                self._last_write = time.monotonic()
            return written

    def _write(self, chunk: Sequence[Any]) -> None:
        self.client.create_time_series(
            name=f"projects/{self.project}", time_series=list(chunk), retry=None, timeout=WRITE_TIMEOUT_S
        )

    def time_series(self, samples: Sequence[Sample], now: float) -> list[Any]:
        from google.api import metric_pb2
        from google.cloud import monitoring_v3

        kinds = {
            "counter": metric_pb2.MetricDescriptor.MetricKind.CUMULATIVE,
            "distribution": metric_pb2.MetricDescriptor.MetricKind.CUMULATIVE,
            "gauge": metric_pb2.MetricDescriptor.MetricKind.GAUGE,
        }
        value_types = {
            "int": metric_pb2.MetricDescriptor.ValueType.INT64,
            "double": metric_pb2.MetricDescriptor.ValueType.DOUBLE,
            "distribution": metric_pb2.MetricDescriptor.ValueType.DISTRIBUTION,
        }
        end = _timestamp(now)
        start = _timestamp(min(self.metrics.start_time, now - 0.001))
        series: list[Any] = []
        for sample in samples:
            definition = sample.definition
            interval = {"end_time": end}
            if definition.kind != "gauge":
                interval["start_time"] = start
            value = sample.value
            if isinstance(value, Distribution):
                if value.count == 0:
                    continue
                typed: dict[str, Any] = {
                    "distribution_value": {
                        "count": value.count,
                        "mean": value.mean,
                        "sum_of_squared_deviation": value.sum_of_squared_deviation,
                        "bucket_options": {"explicit_buckets": {"bounds": list(value.bounds)}},
                        "bucket_counts": list(value.bucket_counts),
                    }
                }
            elif definition.value_type == "int":
                typed = {"int64_value": int(value)}
            else:
                typed = {"double_value": float(value)}
            series.append(
                monitoring_v3.TimeSeries(
                    {
                        "metric": {"type": METRIC_PREFIX + definition.name, "labels": sample.labels},
                        "resource": {"type": "generic_task", "labels": self.resource_labels},
                        "metric_kind": kinds[definition.kind],
                        "value_type": value_types[definition.value_type],
                        "points": [{"interval": interval, "value": typed}],
                    }
                )
            )
        return series


def _timestamp(seconds: float) -> dict[str, int]:
    whole = math.floor(seconds)
    return {"seconds": whole, "nanos": int((seconds - whole) * 1e9)}
