"""Faults: the store failing or lying, exporters down, the model out of memory, clients that hang up
or dribble, more work than the instance admits. Real parts throughout: the real app, the real
LocalStore on disk, real sockets against a real `python -m service`.

After every fault: no 500, no wrong result (bytes compared with a clean computation of the same
request), no partial object in the store, and the service still healthy.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from PIL import Image

from service.app import create_app
from tests.support import ROOT, photos
from tests.support.app import make_settings, wait_loaded
from tests.support.client import (
    assert_store_clean,
    connect,
    multipart_body,
    multipart_head,
    read_answer,
    send_effect,
    send_process,
)
from tests.support.server import free_port, running_server, server_log
from tests.support.telemetry import exporting_spans

CLASSIC = ("blackwhite", "dithering", "popart", "retro8bit")


# ------------------------------------------------------------------------ helpers


@dataclass
class FaultRecord:
    statuses: list[int] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


# Every fault of this module: the statuses its requests saw, every URL of every 200 fetched, and
# any answer whose picture could not be fetched. Printed as a table at the end (run with -s).
FAULTS: dict[str, FaultRecord] = {}


@pytest.fixture(scope="module", autouse=True)
def fault_table() -> Iterator[None]:
    yield
    width = max([len(name) for name in FAULTS] + [5])
    lines = ["", f"{'fault':<{width}} {'statuses':<24} {'URLs fetched':<18} lost", "-" * (width + 50)]
    for name, record in FAULTS.items():
        seen = ", ".join(f"{status}x{record.statuses.count(status)}" for status in sorted(set(record.statuses)))
        kinds = sorted({url.split(":", 1)[0] for url in record.urls})
        fetched = f"{len(record.urls)} ({'/'.join(kinds)})" if record.urls else "0"
        lines.append(f"{name:<{width}} {seen:<24} {fetched:<18} {len(record.lost)}")
    print("\n".join(lines))


def fetch_url(client: TestClient | httpx.Client, url: str) -> tuple[int, bytes]:
    """What a browser gets for a URL of an answer: a data: URL carries its bytes, any other is fetched."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        assert header.endswith(";base64"), header
        return 200, base64.b64decode(payload, validate=True)
    return (answer := client.get(url)).status_code, answer.content


def follow(
    fault: str, client: TestClient | httpx.Client, response: Any, expected: dict[str, bytes] | None = None
) -> Any:
    """Record an answer under `fault`; for a 200, fetch every URL it holds and check the bytes.

    A /v1/process answer: each result's `url` fetches an image of the declared type, size and
    byte count (and the expected bytes when known). A /v1/effects answer: its Content-Location,
    when present, fetches the body's bytes. Anything else is a lost picture: the test fails.
    """
    record = FAULTS.setdefault(fault, FaultRecord())
    record.statuses.append(response.status_code)
    if response.status_code != 200:
        return response
    if response.headers["content-type"].startswith("application/json"):
        for name, result in response.json()["results"].items():
            status, data = fetch_url(client, result["url"])
            record.urls.append(result["url"][:60])
            ok = status == 200 and len(data) == result["bytes"]
            ok = ok and (expected is None or name not in expected or data == expected[name])
            if ok:
                with Image.open(io.BytesIO(data)) as image:
                    ok = image.size == (result["width"], result["height"])
                    ok = ok and Image.MIME[image.format] == result["content_type"]
            ok = ok and result["stored"] == (not result["url"].startswith("data:"))
            if not ok:
                record.lost.append(f"{name}: {result['url'][:80]} → {status}")
    else:
        location = response.headers.get("content-location")
        if location is not None:
            status, data = fetch_url(client, location)
            record.urls.append(location[:60])
            if status != 200 or data != response.content:
                record.lost.append(f"{location} → {status}")
        else:
            assert response.headers["x-cache"] == "BYPASS", "only a result the store could not keep has no URL"
    assert not record.lost, f"{fault}: answers whose picture cannot be fetched: {record.lost}"
    return response


def current_fault() -> str:
    """The running test's name: the fault its answers are recorded under."""
    return os.environ.get("PYTEST_CURRENT_TEST", "unknown").split("::")[-1].split(" ")[0].removeprefix("test_")


def note(status: int) -> None:
    """Record a status seen on a raw socket (no URL to follow: only 200s carry them)."""
    assert status != 200, "a 200 is recorded through follow(), which fetches its URLs"
    FAULTS.setdefault(current_fault(), FaultRecord()).statuses.append(status)


def post_effect(http: TestClient | httpx.Client, upload: bytes, effect: str, **fields: str) -> Any:
    return follow(current_fault(), http, send_effect(http, upload, effect, **fields))


def post_process(http: TestClient | httpx.Client, upload: bytes, **fields: str) -> Any:
    return follow(current_fault(), http, send_process(http, upload, **fields))


def result_path(cache_dir: Path, response: Any, extension: str = "png") -> Path:
    return cache_dir / "results" / f"{response.headers['etag'].strip(chr(34))}.{extension}"


def clean_results(client: TestClient, upload: bytes, effects: tuple[str, ...], **fields: str) -> dict[str, bytes]:
    """The bytes each effect should give, computed by an app with nothing wrong with it."""
    expected = {}
    for effect in effects:
        response = post_effect(client, upload, effect, **fields)
        assert response.status_code == 200, response.text
        expected[effect] = response.content
    return expected


# ------------------------------------------------------------------------ the store


def test_a_store_failing_mid_request_serves_right_bytes_and_leaves_no_partial_object(
    client_factory: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload = photos.jpeg(160, 120, seed=3)
    expected = clean_results(client_factory(cache_dir=tmp_path / "clean"), upload, CLASSIC)
    cache_dir = tmp_path / "faulty"
    client = client_factory(cache_dir=cache_dir)

    # The disk fills up: every fsync from the third on fails, so some writes die after their
    # sidecar, some after writing part of the object into the temporary file.
    real_fsync = os.fsync
    fsyncs = 0

    def filling_disk(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        if fsyncs > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", filling_disk)
    several = post_process(client, upload, effects=",".join(CLASSIC), background="none")
    assert several.status_code == 200, several.text
    results = several.json()["results"]
    outcomes = {name: result["cache"] for name, result in results.items()}
    assert set(outcomes) == set(CLASSIC)
    assert "bypass" in outcomes.values(), outcomes
    assert set(outcomes.values()) <= {"miss", "bypass"}
    for name, outcome in outcomes.items():
        url = results[name]["url"]
        assert fetch_url(client, url) == (200, expected[name]), f"{name}: the answer's URL gives the right bytes"
        if outcome == "miss":
            assert results[name]["stored"] and url.startswith("http://testserver/v1/results/")
        else:
            # Not stored: the answer carries the picture itself, and the store URL it would have
            # had serves nothing (absent, never partial).
            assert not results[name]["stored"] and url.startswith("data:image/png;base64,")
            stored_url = f"http://testserver/v1/results/{results[name]['key']}.png"
            assert client.get(stored_url).status_code == 404, "a result whose write failed is absent, never partial"
    for effect in CLASSIC:
        answer = post_effect(client, upload, effect)
        assert answer.status_code == 200, answer.text
        assert answer.content == expected[effect], f"{effect}: wrong bytes while the store fails"
        assert answer.headers["x-cache"] in ("HIT", "BYPASS")
        assert ("content-location" in answer.headers) == (answer.headers["x-cache"] == "HIT")
    assert client.app.state.flow.store_errors >= 1  # type: ignore[attr-defined]
    assert_store_clean(cache_dir)

    monkeypatch.setattr(os, "fsync", real_fsync)  # the disk has room again
    for effect in CLASSIC:
        assert post_effect(client, upload, effect).content == expected[effect]
        again = post_effect(client, upload, effect)
        assert again.headers["x-cache"] == "HIT" and again.content == expected[effect]
    assert assert_store_clean(cache_dir) == len(CLASSIC)
    # And the photo, held for an order to keep (uploads/<sha256>, written beside the first miss).
    assert (cache_dir / "uploads" / hashlib.sha256(upload).hexdigest()).read_bytes() == upload
    assert client.get("/health").status_code == 200


def test_corrupt_stored_bytes_are_never_served_and_are_repaired(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    client = client_factory(cache_dir=cache_dir)
    upload = photos.jpeg(160, 120, seed=4)
    first = post_effect(client, upload, "popart")
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    stored = result_path(cache_dir, first)
    url = first.headers["content-location"]

    for damage in ("flipped", "truncated", "garbage"):
        data = bytearray(stored.read_bytes())
        if damage == "flipped":
            data[len(data) // 2] ^= 0x01  # one bit: still decodes as an image, wrong bytes
        elif damage == "truncated":
            data = data[: len(data) // 3]  # what a torn write would leave
        else:
            data = bytearray(os.urandom(len(data)))
        stored.write_bytes(bytes(data))
        assert client.get(url).status_code == 404, f"{damage}: a corrupt object is not served"
        listed = post_process(client, upload, effects="popart", background="none")
        assert listed.status_code == 200
        assert listed.json()["results"]["popart"]["cache"] == "miss", f"{damage}: corrupt reads as a miss"
        # The miss recomputed the result and the write replaced the corrupt object.
        repaired = post_effect(client, upload, "popart")
        assert repaired.headers["x-cache"] == "HIT", damage
        assert repaired.content == first.content, f"{damage}: repaired with the right bytes"
        assert client.get(url).content == first.content
        assert_store_clean(cache_dir)


# ------------------------------------------------------------------------ exporters


class DownExporter(SpanExporter):  # type: ignore[misc]
    """A trace exporter whose backend is unreachable: every export raises."""

    def __init__(self) -> None:
        self.attempts = 0
        self.enabled = True

    def export(self, spans: Any) -> SpanExportResult:
        if not self.enabled:
            return SpanExportResult.SUCCESS
        self.attempts += 1
        raise ConnectionRefusedError("trace collector unreachable")

    def shutdown(self) -> None:
        self.enabled = False


@pytest.fixture
def trace_exporter_down() -> Iterator[DownExporter]:
    # Synchronous: the failing export runs at the end of every span, inside the request itself.
    with exporting_spans(DownExporter()) as exporter:
        yield exporter


def test_metrics_and_trace_exporters_down_leave_requests_alone(
    client_factory: Callable[..., TestClient], tmp_path: Path, trace_exporter_down: DownExporter
) -> None:
    upload = photos.jpeg(160, 120, seed=5)
    trace_exporter_down.enabled = False
    expected = clean_results(client_factory(cache_dir=tmp_path / "clean"), upload, ("dithering", "retro8bit"))
    trace_exporter_down.enabled = True
    client = client_factory(
        cache_dir=tmp_path / "cache",
        metrics_export="cloud_monitoring",
        metrics_endpoint=f"127.0.0.1:{free_port()}",  # nothing listens there
        gcp_project="cutout-test-project",
        metrics_interval_s=5.0,
    )
    for effect in ("dithering", "retro8bit"):
        answer = post_effect(client, upload, effect)
        assert answer.status_code == 200, answer.text
        assert answer.content == expected[effect]
    exporter = client.app.state.metrics_exporter  # type: ignore[attr-defined]
    assert client.portal is not None
    assert client.portal.call(exporter.flush) == 0
    assert trace_exporter_down.attempts > 0, "spans were exported (and failed) on the request path"
    assert post_effect(client, upload, "dithering").headers["x-cache"] == "HIT"
    assert "cutout_export_failures_total 1.0" in client.get("/metrics").text
    assert_store_clean(tmp_path / "cache")
    assert client.get("/health").status_code == 200


# ------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def model_app(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """An app with the cutout model (random weights, fast size) whose mask batches wait long
    enough for concurrent requests to share them."""
    settings = make_settings(tmp_path_factory.mktemp("faults-model"), models_dir=models_dir, mask_batch_wait_ms=400.0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_loaded(client)
        assert client.get("/ready").status_code == 200, client.get("/ready").text
        yield client


def empty_store(client: TestClient) -> Path:
    cache_dir: Path = client.app.state.settings.cache_dir  # type: ignore[attr-defined]
    for folder in ("results", "masks"):
        shutil.rmtree(cache_dir / folder)
        (cache_dir / folder).mkdir()
    return cache_dir


def concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run blocking calls at the same moment, one thread each; their answers in order."""
    answers: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        answers[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return answers


def cutout_request(client: TestClient, upload: bytes) -> Callable[[], Any]:
    return lambda: post_effect(client, upload, "popart", background="white")


def test_out_of_memory_inside_a_batch(model_app: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    uploads = [photos.jpeg(160, 120, seed=seed) for seed in (11, 12, 13)]
    cache_dir = empty_store(model_app)
    # Clean computation: one request at a time, so every mask is a batch of one.
    expected = [cutout_request(model_app, upload)() for upload in uploads]
    assert all(answer.status_code == 200 for answer in expected)
    engine = model_app.app.state.engine  # type: ignore[attr-defined]
    real_forward = engine._forward
    batch_sizes: list[int] = []

    def out_of_memory_above(limit: int) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        def forward(images_: list[torch.Tensor]) -> list[torch.Tensor]:
            batch_sizes.append(len(images_))
            if len(images_) > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {len(images_)}")
            return list(real_forward(images_))

        return forward

    # The device holds one image at a time: the batch is split in halves down to single images.
    empty_store(model_app)
    monkeypatch.setattr(engine, "_forward", out_of_memory_above(1))
    answers = concurrently([cutout_request(model_app, upload) for upload in uploads])
    assert max(batch_sizes) > 1, f"the requests never shared a batch: {batch_sizes}"
    for answer, clean in zip(answers, expected, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.content == clean.content, "a split batch gives the same bytes"
    assert_store_clean(cache_dir)

    # Not even one image fits: 503 out_of_memory with Retry-After, nothing stored.
    empty_store(model_app)
    batch_sizes.clear()
    monkeypatch.setattr(engine, "_forward", out_of_memory_above(0))
    answers = concurrently([cutout_request(model_app, upload) for upload in uploads])
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["code"] == "out_of_memory"
        assert int(answer.headers["retry-after"]) > 0
    assert assert_store_clean(cache_dir) == 0

    monkeypatch.setattr(engine, "_forward", real_forward)  # the memory is back
    for upload, clean in zip(uploads, expected, strict=True):
        answer = cutout_request(model_app, upload)()
        assert answer.status_code == 200 and answer.content == clean.content
    assert model_app.get("/ready").status_code == 200
    assert_store_clean(cache_dir)


def test_a_corrupt_cached_mask_is_recomputed(model_app: TestClient) -> None:
    upload = photos.jpeg(160, 120, seed=14)
    cache_dir = empty_store(model_app)
    first = cutout_request(model_app, upload)()
    assert first.status_code == 200
    (mask,) = (cache_dir / "masks").glob("*.png")
    mask.write_bytes(mask.read_bytes()[:100])  # a torn mask
    again = post_effect(model_app, upload, "retro8bit", background="white")  # a new result: needs the mask
    assert again.status_code == 200
    empty_store(model_app)
    clean = post_effect(model_app, upload, "retro8bit", background="white")
    assert again.content == clean.content, "the corrupt mask was recomputed, not used"
    assert_store_clean(cache_dir)


def test_the_deadline_cancels_work_still_queued(model_app: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the deadline: 504 at once, and a mask job still waiting for the GPU is never run."""
    cache_dir = empty_store(model_app)
    engine = model_app.app.state.engine  # type: ignore[attr-defined]
    admission = model_app.app.state.admission  # type: ignore[attr-defined]
    real_forward = engine._forward
    forwarded: list[int] = []

    def slow_forward(images_: list[torch.Tensor]) -> list[torch.Tensor]:
        forwarded.append(len(images_))
        time.sleep(2.5)  # a long batch; the thread cannot be interrupted
        return list(real_forward(images_))

    monkeypatch.setattr(engine, "_forward", slow_forward)
    monkeypatch.setattr(engine, "mask_batch_size", 1)  # the second request waits behind the first
    monkeypatch.setattr(admission, "request_timeout_s", 1.5)
    uploads = [photos.jpeg(160, 120, seed=seed) for seed in (21, 22)]
    started = time.monotonic()
    answers = concurrently([cutout_request(model_app, upload) for upload in uploads])
    elapsed = time.monotonic() - started
    for answer in answers:
        assert answer.status_code == 504, answer.text
        body = answer.json()
        assert body["code"] == "deadline_exceeded"
        assert "1.5 s" in body["detail"] and "CUTOUT_REQUEST_TIMEOUT_S" in body["detail"]
    assert elapsed < 2.5, "the answers did not wait for the batch that was running"
    time.sleep(3.5)  # the running batch ends; the queued job is taken off the queue and skipped
    assert forwarded == [1], f"the cancelled job still ran: batches {forwarded}"
    assert admission.in_flight == 0
    assert assert_store_clean(cache_dir) == 0, "nothing of a cancelled request is stored"

    monkeypatch.setattr(admission, "request_timeout_s", 290.0)
    monkeypatch.setattr(engine, "_forward", real_forward)
    answer = cutout_request(model_app, uploads[1])()
    assert answer.status_code == 200
    empty_store(model_app)
    assert cutout_request(model_app, uploads[1])().content == answer.content


def out_of_memory(*_: Any, **__: Any) -> Any:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


ORIGIN = {"Origin": "https://shop.example"}


@pytest.mark.parametrize(
    "step",
    ["upload", "mask-input", "background", "classic-effect", "download", "mask-encode-unguarded"],
)
def test_out_of_memory_at_every_step_answers_503_and_frees_the_device(
    model_app: TestClient, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    import dataclasses

    import effects.engine as engine_module
    import service.flow as flow_module
    from effects import EFFECTS

    cache_dir = empty_store(model_app)
    engine = model_app.app.state.engine  # type: ignore[attr-defined]
    flow = model_app.app.state.flow  # type: ignore[attr-defined]
    admission = model_app.app.state.admission  # type: ignore[attr-defined]
    upload = photos.jpeg(160, 120, seed=40 + len(step))
    fields = {"background": "white"}
    released: list[int] = []
    real_release = engine_module.release_device_memory

    def counting_release() -> None:
        released.append(1)
        real_release()

    monkeypatch.setattr(engine_module, "release_device_memory", counting_release)
    monkeypatch.setattr(flow_module, "release_device_memory", counting_release)
    with monkeypatch.context() as fault:
        if step == "upload":
            fault.setattr(engine, "upload", out_of_memory)
        elif step == "mask-input":
            fault.setattr(engine._cutout, "prepare", out_of_memory)
        elif step == "background":
            fault.setattr(engine_module, "compose", out_of_memory)
        elif step == "classic-effect":
            fault.setitem(EFFECTS, "popart", dataclasses.replace(EFFECTS["popart"], apply=out_of_memory))
        elif step == "download":
            fields = {"background": "none"}  # no mask: the first tensor to leave the device is the result
            fault.setattr(torch.Tensor, "cpu", out_of_memory)
        else:
            fault.setattr(flow_module, "_encode_mask", out_of_memory)
        answer = model_app.post(
            "/v1/effects/popart", data=fields, files={"image": ("p.jpg", upload, "image/jpeg")}, headers=ORIGIN
        )
    follow(current_fault(), model_app, answer)
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "out_of_memory"
    assert int(answer.headers["retry-after"]) > 0
    assert answer.headers["access-control-allow-origin"] == "https://shop.example"
    assert released, "the device memory was released"
    assert flow.memory.reserved == 0 and admission.in_flight == 0
    assert_store_clean(cache_dir)  # the mask may be stored (written before the answer); no result is
    assert not list((cache_dir / "results").glob("*.png"))

    again = post_effect(model_app, upload, "popart", **fields)
    assert again.status_code == 200, again.text
    empty_store(model_app)
    clean = post_effect(model_app, upload, "popart", **fields)
    assert again.content == clean.content


def test_a_failed_effect_cancels_the_rest_and_nothing_is_written_after_the_answer(
    client_factory: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from effects import EFFECTS

    cache_dir = tmp_path / "cache"
    client = client_factory(cache_dir=cache_dir)
    upload = photos.jpeg(320, 240, seed=50)
    ran: list[str] = []
    originals = dict(EFFECTS)

    def spy(name: str) -> Any:
        real = originals[name].apply
        assert real is not None

        def apply(image: torch.Tensor, params: Any, seed: int) -> torch.Tensor:
            ran.append(name)
            return real(image, params, seed)

        return apply

    def failing(kind: str) -> Any:
        def apply(*_: Any) -> Any:
            ran.append("dithering")
            if kind == "oom":
                out_of_memory()
            raise ValueError("a bug in an effect")

        return apply

    for kind, status in (("oom", 503), ("bug", 500)):
        for name, apply in (("popart", spy("popart")), ("retro8bit", spy("retro8bit")), ("dithering", failing(kind))):
            monkeypatch.setitem(EFFECTS, name, dataclasses.replace(originals[name], apply=apply))
        ran.clear()
        answer = client.post(
            "/v1/process",
            data={"effects": "popart,dithering,retro8bit", "background": "none", "seed": str(status)},
            files={"image": ("p.jpg", upload, "image/jpeg")},
            headers=ORIGIN,
        )
        follow(current_fault(), client, answer)
        assert answer.status_code == status, answer.text
        assert answer.headers["access-control-allow-origin"] == "https://shop.example"
        assert ran == ["popart", "dithering"], f"effects run one after another, none after the failure: {ran}"
        at_answer = sorted(path.name for path in cache_dir.rglob("*") if path.is_file())
        time.sleep(1.0)
        after = sorted(path.name for path in cache_dir.rglob("*") if path.is_file())
        assert after == at_answer, "nothing is written after the answer"
        assert_store_clean(cache_dir)
        assert client.app.state.admission.in_flight == 0  # type: ignore[attr-defined]
        assert client.app.state.flow.memory.reserved == 0  # type: ignore[attr-defined]
        if kind == "bug":
            body = answer.json()
            assert body["code"] == "internal_error" and len(body["request_id"]) == 32
            assert answer.headers["x-request-id"] == body["request_id"]
    monkeypatch.undo()
    fine = post_process(client, upload, effects="popart,dithering,retro8bit", background="none")
    assert fine.status_code == 200


def test_the_device_memory_budget_queues_work_instead_of_running_out(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    """Two requests whose working sets together pass the budget run one after the other."""
    client = client_factory(cache_dir=tmp_path / "cache")
    engine = client.app.state.engine  # type: ignore[attr-defined]
    flow = client.app.state.flow  # type: ignore[attr-defined]
    uploads = [photos.jpeg(640, 480, seed=seed) for seed in (60, 61)]
    one = engine.working_bytes(480, 640, 3, 2048, mask=False)
    engine.work_memory_limit = int(one * 1.5)  # room for one request, not two
    answers = concurrently(
        [
            lambda upload=upload: post_process(client, upload, effects=",".join(CLASSIC), background="none")  # type: ignore[misc]
            for upload in uploads
        ]
    )
    assert [answer.status_code for answer in answers] == [200, 200]
    assert flow.memory.peak_reserved <= engine.work_memory_limit
    assert flow.memory.waited >= 1, "the second request waited for the first's memory"
    assert flow.memory.reserved == 0


# ------------------------------------------------------------------------ sockets against a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real `python -m service`: at most 2 processing requests at once, a 3 s deadline."""
    workdir = tmp_path_factory.mktemp("faults-server")
    env = {"CUTOUT_MAX_QUEUE": "2", "CUTOUT_REQUEST_TIMEOUT_S": "3", "CUTOUT_LOG_FORMAT": "json"}
    with running_server(workdir, env) as server:
        yield server.url, workdir


def access_statuses(workdir: Path) -> list[int]:
    """The statuses of the server's access log lines; no request may have ended in an unhandled error."""
    entries = server_log(workdir)
    assert not [entry for entry in entries if entry.get("message") == "unhandled error"], entries
    return [int(entry["status"]) for entry in entries if entry.get("logger") == "cutout.access"]


def assert_server_healthy(base: str, workdir: Path, upload: bytes, expected: bytes) -> None:
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/health").status_code == 200
        answer = post_effect(http, upload, "popart")
        assert answer.status_code == 200, answer.text
        assert answer.content == expected
    assert 500 not in access_statuses(workdir)
    assert_store_clean(workdir / "cache")


@pytest.fixture
def expected_popart(client_factory: Callable[..., TestClient]) -> tuple[bytes, bytes]:
    upload = photos.jpeg(200, 150, seed=31)
    return upload, clean_results(client_factory(), upload, ("popart",))["popart"]


def test_clients_hanging_up_mid_upload(server: tuple[str, Path], expected_popart: tuple[bytes, bytes]) -> None:
    base, workdir = server
    upload, expected = expected_popart
    body = multipart_body(upload)
    head = multipart_head(base, len(body))
    for cut in (0, 40, len(body) // 2, len(body) - 3, len(body)):
        sock = connect(base)
        sock.sendall(head + body[:cut])
        time.sleep(0.1)
        sock.close()  # the last one hangs up with the whole body sent, while its answer is computed
    sock = connect(base)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, no FIN
    sock.sendall(head + body[: len(body) // 2])
    sock.close()
    time.sleep(1.0)  # let the server notice each hang-up and finish the request that had its body
    assert_server_healthy(base, workdir, upload, expected)


def test_a_slow_loris_upload_meets_the_deadline(server: tuple[str, Path], expected_popart: tuple[bytes, bytes]) -> None:
    base, workdir = server
    upload, expected = expected_popart
    body = multipart_body(upload)
    # A client that never finishes its headers: uvicorn has no timeout for them, but such a
    # connection is never admitted (admission starts with a complete request head).
    stalled_head = connect(base)
    stalled_head.sendall(b"POST /v1/process HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/")
    sock = connect(base)
    sock.sendall(multipart_head(base, len(body)))
    started = time.monotonic()
    sock.setblocking(False)
    answer = b""
    sent = 0
    while time.monotonic() - started < 10 and not answer:
        try:
            sock.send(body[sent : sent + 8])  # a few bytes every 0.2 s: far too slow for the deadline
            sent += 8
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.2)
        try:
            answer = sock.recv(65536)
        except BlockingIOError:
            answer = b""
    sock.setblocking(True)
    elapsed = time.monotonic() - started
    status, headers, raw = read_answer(sock, data=answer)
    sock.close()
    note(status)
    assert status == 504, raw
    detail = json.loads(raw)
    assert detail["code"] == "deadline_exceeded"
    assert "upload was not received" in detail["detail"]
    assert headers.get("connection") == "close"
    assert 2.5 < elapsed < 6.0, elapsed
    assert sent < len(body)
    assert_server_healthy(base, workdir, upload, expected)  # with the stalled head still open
    stalled_head.close()


def test_beyond_max_queue_requests_are_refused_at_once_without_reading_the_body(
    server: tuple[str, Path], expected_popart: tuple[bytes, bytes]
) -> None:
    base, workdir = server
    upload, expected = expected_popart
    body = multipart_body(upload)
    # Two uploads that stall half way hold the instance's two places (CUTOUT_MAX_QUEUE=2).
    holders = [connect(base) for _ in range(2)]
    for sock in holders:
        sock.sendall(multipart_head(base, len(body)) + body[: len(body) // 2])
    time.sleep(0.5)
    try:
        # A 20 MB upload announced: refused on its headers, before a byte of its body is sent.
        sock = connect(base)
        started = time.monotonic()
        sock.sendall(multipart_head(base, 20_000_000))
        status, headers, raw = read_answer(sock)
        elapsed = time.monotonic() - started
        sock.close()
        note(status)
        assert status == 503, raw
        answer = json.loads(raw)
        assert answer["code"] == "overloaded"
        assert "CUTOUT_MAX_QUEUE=2" in answer["detail"]
        assert headers["retry-after"] == "2"
        assert elapsed < 1.0
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.get("/health").status_code == 200, "reads are not counted"
            # The probe gives its own verdict, never `overloaded`: here (no weights) "the cutout model is missing".
            ready = http.get("/ready")
            assert ready.status_code == 503 and ready.json()["code"] == "not_ready", ready.text
            assert ready.json()["models"]["cutout"]["status"] == "missing", ready.text
    finally:
        for sock in holders:
            sock.close()
    time.sleep(0.5)
    assert_server_healthy(base, workdir, upload, expected)


def test_clients_exactly_at_max_queue_are_never_refused(server: tuple[str, Path]) -> None:
    """A place is free again as soon as its answer is out: two clients sending back to back
    against CUTOUT_MAX_QUEUE=2 are never refused, uploads large enough to spool to disk included."""
    base, workdir = server
    upload = photos.big_jpeg(1.5)

    def client_loop() -> list[int]:
        with httpx.Client(base_url=base, timeout=30) as http:
            return [post_effect(http, upload, "popart").status_code for _ in range(20)]

    with httpx.Client(base_url=base, timeout=30) as http:
        # One photo of this size first: the process's first large photo pays for fresh memory
        # (page faults), which on two busy shared cores can pass this server's 3 s deadline.
        post_effect(http, upload, "popart", seed="1")
    refused_before = access_statuses(workdir).count(503)
    loops = concurrently([client_loop, client_loop])
    assert loops == [[200] * 20, [200] * 20]
    assert access_statuses(workdir).count(503) == refused_before


# Loaded by a real server's interpreter at start (PYTHONPATH), before `service`: photos of some
# widths meet an injected fault inside the background step, every other photo is processed as usual.
FAULT_INJECTOR = """
import time

import torch

import effects.engine as engine

_compose = engine.compose


def compose(rgb, alpha, source_alpha, background):
    width = rgb.shape[-1]
    if width == 301:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    if width == 302:
        raise ValueError("an injected bug")
    if width == 303:
        time.sleep(2.0)
    return _compose(rgb, alpha, source_alpha, background)


engine.compose = compose
"""


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    workdir = tmp_path_factory.mktemp("faults-injected")
    (workdir / "inject").mkdir()
    (workdir / "inject" / "sitecustomize.py").write_text(FAULT_INJECTOR)
    env = {
        "PYTHONPATH": f"{workdir / 'inject'}{os.pathsep}{ROOT}",
        "CUTOUT_LOG_FORMAT": "json",
        "CUTOUT_ALLOWED_ORIGINS": "https://shop.example",
    }
    with running_server(workdir, env) as server:
        yield server.url, workdir


def test_a_real_server_answers_out_of_memory_and_bugs_as_json_with_cors(faulty_server: tuple[str, Path]) -> None:
    base, workdir = faulty_server
    with httpx.Client(base_url=base, timeout=30, headers={"Origin": "https://shop.example"}) as http:
        oom = post_effect(http, photos.jpeg(301, 200, seed=70), "popart")
        assert oom.status_code == 503, oom.text
        assert oom.json()["code"] == "out_of_memory" and int(oom.headers["retry-after"]) > 0
        assert oom.headers["access-control-allow-origin"] == "https://shop.example"

        bug = post_effect(http, photos.jpeg(302, 200, seed=71), "popart")
        assert bug.status_code == 500, bug.text
        body = bug.json()
        assert body["code"] == "internal_error"
        assert bug.headers["access-control-allow-origin"] == "https://shop.example", "CORS wraps a bug's answer"
        assert bug.headers["x-request-id"] == body["request_id"]
        fine = post_effect(http, photos.jpeg(300, 200, seed=72), "popart")
        assert fine.status_code == 200
    logged = [entry for entry in server_log(workdir) if entry.get("request_id") == body["request_id"]]
    assert logged and "ValueError: an injected bug" in logged[0]["message"], "the log carries the request id"


def test_a_client_going_away_cancels_its_work(faulty_server: tuple[str, Path]) -> None:
    base, workdir = faulty_server
    upload = photos.jpeg(303, 200, seed=73)  # its background step takes 2 s
    fields = {"effects": "popart,dithering,retro8bit", "background": "none"}
    body = multipart_body(upload, fields)
    results = workdir / "cache" / "results"
    before = set(results.glob("*"))
    sock = connect(base)
    sock.sendall(multipart_head(base, len(body)) + body)
    time.sleep(0.7)  # the request is inside its background step
    sock.close()
    time.sleep(3.0)  # longer than the step: had the work gone on, its results would be stored by now
    statuses = [entry.get("status") for entry in server_log(workdir) if entry.get("logger") == "cutout.access"]
    assert 499 in statuses, statuses
    note(499)
    assert set(results.glob("*")) == before, "no effect ran or was stored after the hang-up"
    with httpx.Client(base_url=base, timeout=30) as http:
        again = post_process(http, upload, **fields)
        assert again.status_code == 200
        assert len(set(results.glob("*.png")) - before) == 3
