"""The stage tree of a real request, collected with OpenTelemetry's in-memory exporter."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support import photos
from tests.support.telemetry import exporting_spans
from tests.support.weights import write_inspyrenet

TRACE_ID = "105445aa7843bc8bf206b12000100000"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tracing-models")
    write_inspyrenet(directory)
    return directory


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with exporting_spans(InMemorySpanExporter()) as exporter:
        yield exporter


def post(client: TestClient, headers: dict[str, str], **fields: str) -> None:
    response = client.post(
        "/v1/process",
        data=fields,
        files={"image": ("cat.jpg", photos.jpeg(120, 80), "image/jpeg")},
        headers=headers,
    )
    assert response.status_code == 200, response.text


def in_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.context.trace_id == trace_id]


def test_stage_tree_of_a_real_request(
    client_factory: Callable[..., TestClient], models_dir: Path, spans: InMemorySpanExporter
) -> None:
    client = client_factory(models_dir=models_dir)
    # Cloud Run's header: trace id / parent span id ; sampled.
    post(
        client,
        {"X-Cloud-Trace-Context": f"{TRACE_ID}/12345;o=1"},
        effects="cutout,popart",
        background="white",
    )
    trace_id = int(TRACE_ID, 16)
    tree = in_trace(spans, trace_id)
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in tree:
        by_name.setdefault(span.name, []).append(span)

    # The server span continues the incoming trace, under the caller's span id.
    (server,) = by_name["POST /v1/process"]
    assert server.parent is not None and server.parent.span_id == 12345
    stages = ["guard", "hash", "cache lookup", "decode", "mask", "background", "effect", "encode", "store"]
    for name in stages:
        assert name in by_name, f"no {name!r} span; got {sorted(by_name)}"
        for span in by_name[name]:
            assert span.parent is not None and span.parent.span_id == server.context.span_id, name
    assert len(by_name["effect"]) == len(by_name["encode"]) == len(by_name["store"]) == 2

    # The stages run in order.
    first = {name: min(span.start_time for span in by_name[name]) for name in stages}
    assert first["guard"] <= first["hash"] <= first["cache lookup"] <= first["decode"] <= first["mask"]
    assert first["mask"] <= first["background"] <= first["effect"] <= first["encode"] <= first["store"]

    # Useful attributes.
    (decode,) = by_name["decode"]
    assert decode.attributes["cutout.pixels"] == 120 * 80
    assert decode.attributes["cutout.bytes"] > 0
    (guard,) = by_name["guard"]
    assert guard.attributes["cutout.bytes"] >= decode.attributes["cutout.bytes"]
    (lookup,) = by_name["cache lookup"]
    assert lookup.attributes["cutout.hits"] == 0
    assert by_name["mask"][0].attributes["cutout.cache"] == "miss"
    assert {span.attributes["cutout.effect"] for span in by_name["effect"]} == {"cutout", "popart"}
    assert {span.attributes["cutout.cache"] for span in by_name["store"]} == {"miss"}
    assert all(span.attributes["cutout.bytes"] > 0 for span in by_name["encode"])

    # The mask batch runs on the engine's worker, in its own trace, linked to the request's mask stage.
    (mask,) = by_name["mask"]
    batches = [
        span
        for span in spans.get_finished_spans()
        if span.name == "mask batch" and any(link.context.span_id == mask.context.span_id for link in span.links)
    ]
    assert len(batches) == 1
    assert batches[0].attributes["cutout.batch_size"] == 1
    assert batches[0].attributes["cutout.input_size"] == 384
    assert batches[0].context.trace_id != trace_id

    # GPU-seconds of the request: device time (on the CPU, the working thread's CPU time) of its
    # upload (in decode), mask input, background and effects, plus its share of the mask batch (here
    # alone in it: all of it). Never more than the wall time of the stages that hold that work.
    def seconds(span: ReadableSpan) -> float:
        return (span.end_time - span.start_time) / 1e9

    batch_device_s = batches[0].attributes["cutout.device_seconds"]
    assert 0 < batch_device_s <= seconds(batches[0])
    holding = by_name["decode"] + by_name["mask"] + by_name["background"] + by_name["effect"]
    samples = client.app.state.metrics.snapshot()  # type: ignore[attr-defined]
    (gpu,) = [sample.value for sample in samples if sample.definition.name == "gpu_seconds_per_image"]
    assert gpu.count == 1
    assert batch_device_s < gpu.total <= sum(seconds(span) for span in holding)


def test_a_repeat_is_a_lookup_without_decoding(
    client_factory: Callable[..., TestClient], spans: InMemorySpanExporter
) -> None:
    client = client_factory()
    post(client, {}, effects="dithering", background="none")
    traceparent = f"00-{TRACE_ID[:-1]}7-00f067aa0ba902b7-01"  # the W3C header is honoured too
    post(client, {"traceparent": traceparent}, effects="dithering", background="none")
    names = {span.name: span for span in in_trace(spans, int(TRACE_ID[:-1] + "7", 16))}
    assert names["cache lookup"].attributes["cutout.hits"] == 1
    assert "decode" not in names and "effect" not in names


def test_exporters_without_credentials_leave_the_service_running(
    client_factory: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A credentials file that does not exist: google-auth fails at once, without any network.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/cutout-credentials.json")
    with caplog.at_level("ERROR"):
        client = client_factory(trace_export="cloud_trace", metrics_export="cloud_monitoring", gcp_project="p")
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("trace export disabled") for message in messages)
    assert any(message.startswith("metrics export disabled") for message in messages)
    post(client, {}, effects="dithering", background="none")
