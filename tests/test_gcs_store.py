"""The `gcs` result store with the real google-cloud-storage client against a local emulator.

The emulator (PyPI `gcp-storage-emulator`) runs on loopback; the client finds it through its
own `STORAGE_EMULATOR_HOST`. The emulator ignores `ifGenerationMatch`, so a recording proxy in
front of it shows the precondition on the wire and answers the 412 real storage would send.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from PIL import Image

import cache.gcs
from cache.gcs import GcsStore
from cache.store import IMMUTABLE_CACHE_CONTROL, StoreError
from tests.support import photos
from tests.support.client import send_process
from tests.support.recording_proxy import Recorded, RecordingProxy
from tests.support.server import free_port

BUCKET = "cutout-results-test"
CDN = "https://cdn.example"
ORIGIN = "https://shop.example"


class Emulator:
    """`gcp-storage-emulator` in memory on a loopback port, with one bucket."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gcp_storage_emulator",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--in-memory",
                "--default-bucket",
                BUCKET,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the storage emulator exited: {log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the storage emulator did not open its port in 30 s") from None
                time.sleep(0.05)

    def client(self) -> storage.Client:
        """A client talking straight to the emulator, bypassing any proxy (for test set-up)."""
        return storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.url}
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    running = Emulator(tmp_path / "emulator.log")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def proxy(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingProxy]:
    with RecordingProxy(emulator.url) as recording:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", recording.url)
        yield recording


def is_upload(request: Recorded) -> bool:
    return request.method == "POST" and request.path.startswith(f"/upload/storage/v1/b/{BUCKET}/o")


def is_result_upload(request: Recorded) -> bool:
    """An upload of a result (the flow also holds each processed photo under uploads/)."""
    return is_upload(request) and b'"name": "results/' in request.body


def storage_error(status: int, reason: str) -> bytes:
    return json.dumps({"error": {"code": status, "message": reason, "errors": [{"reason": reason}]}}).encode()


def make_store(**options: Any) -> GcsStore:
    return GcsStore(bucket=BUCKET, cdn_url=CDN, **options)


# ---------------------------------------------------------------------------------- the store alone


def test_write_read_lookup_and_urls(proxy: RecordingProxy, emulator: Emulator) -> None:
    store = make_store()
    name = "results/" + "a" * 64 + ".png"
    data = photos.png(40, 30, seed=1)
    assert store.get(name) is None
    assert store.lookup(name) is None

    store.put(name, data, "image/png", {"width": "40", "height": "30"})

    assert store.get(name) == data
    assert store.lookup(name) == (40, 30, len(data))
    assert store.result_url("a" * 64, "png") == f"{CDN}/cache/results/{'a' * 64}.png"
    blob = emulator.client().bucket(BUCKET).get_blob(name)
    assert blob.content_type == "image/png"
    assert blob.cache_control == IMMUTABLE_CACHE_CONTROL == "public, max-age=31536000, immutable"
    assert blob.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    assert blob.metadata["md5"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert (blob.metadata["width"], blob.metadata["height"]) == ("40", "30")
    assert store.failures == 0
    store.close()


def test_lookup_without_size_metadata_reads_and_verifies_the_bytes(proxy: RecordingProxy) -> None:
    store = make_store()
    name = "masks/" + "b" * 64 + "-model.png"
    data = photos.png(24, 16, seed=2)
    store.put(name, data, "image/png")
    assert store.lookup(name) == (24, 16, len(data))
    downloads = proxy.recorded(lambda r: r.method == "GET" and r.query.get("alt") == ["media"])
    assert downloads, "a lookup without width/height metadata must read the object"


def test_every_upload_says_if_generation_match_0(proxy: RecordingProxy) -> None:
    store = make_store()
    store.put("results/" + "c" * 64 + ".webp", b"RIFF....WEBP", "image/webp", {"width": "1", "height": "1"})
    uploads = proxy.recorded(is_upload)
    assert len(uploads) == 1
    assert uploads[0].query["ifGenerationMatch"] == ["0"]
    assert uploads[0].query["uploadType"] == ["multipart"]
    # The object's properties travel in the same request as its bytes: no window without them.
    assert b'"cacheControl": "public, max-age=31536000, immutable"' in uploads[0].body
    assert b'"contentType": "image/webp"' in uploads[0].body


def test_412_from_storage_means_already_stored(proxy: RecordingProxy, emulator: Emulator) -> None:
    store = make_store()
    name = "results/" + "d" * 64 + ".png"
    first, second = photos.png(40, 30, seed=3), photos.png(40, 30, seed=4)
    store.put(name, first, "image/png", {"width": "40", "height": "30"})
    # What real storage answers a second writer; the emulator would have overwritten instead.
    proxy.inject(
        412, when=is_upload, headers={"Content-Type": "application/json"}, body=storage_error(412, "conditionNotMet")
    )

    store.put(name, second, "image/png", {"width": "40", "height": "30"})  # no exception: already stored

    assert [r.status for r in proxy.recorded(is_upload)] == [200, 412]
    assert store.failures == 0
    assert store.get(name) == first, "the first writer's object stays"


def test_a_corrupt_object_is_a_miss_and_the_repair_replaces_exactly_that_version(
    proxy: RecordingProxy, emulator: Emulator
) -> None:
    store = make_store()
    name = "results/" + "e" * 64 + ".png"
    good, bad = photos.png(40, 30, seed=5), photos.png(40, 30, seed=6)
    store.put(name, good, "image/png", {"width": "40", "height": "30"})
    corrupt_generation = corrupt(emulator, name, bad)

    assert store.lookup(name) is None, "the md5 storage computed differs from the writer's: a miss"
    assert store.get(name) is None, "bytes that fail their sha256 are never served"

    proxy.clear()
    store.put(name, good, "image/png", {"width": "40", "height": "30"})
    (repair,) = proxy.recorded(is_upload)
    assert repair.query["ifGenerationMatch"] == [str(corrupt_generation)]
    assert store.get(name) == good
    assert store.lookup(name) == (40, 30, len(good))

    proxy.clear()
    store.put(name, good, "image/png", {"width": "40", "height": "30"})
    assert proxy.recorded(is_upload)[0].query["ifGenerationMatch"] == ["0"], "once repaired, back to first-writer-wins"


def corrupt(emulator: Emulator, name: str, data: bytes) -> int:
    """Replace an object's bytes but keep its metadata (as a faulty writer would); its new generation."""
    bucket = emulator.client().bucket(BUCKET)
    original = bucket.get_blob(name)
    blob = bucket.blob(name)
    blob.metadata = dict(original.metadata)
    blob.cache_control = original.cache_control
    blob.upload_from_string(data, content_type=original.content_type)
    return int(bucket.get_blob(name).generation)


def test_storage_errors_raise_store_error_then_skip_the_store_for_the_cooldown(proxy: RecordingProxy) -> None:
    store = make_store(retry_deadline_s=0.3, failure_cooldown_s=60.0)
    name = "results/" + "f" * 64 + ".png"
    proxy.inject(
        503,
        when=lambda r: True,
        times=1000,
        headers={"Content-Type": "application/json"},
        body=storage_error(503, "backendError"),
    )
    started = time.perf_counter()
    with pytest.raises(StoreError, match="ServiceUnavailable"):
        store.get(name)
    first = time.perf_counter() - started
    attempts = len(proxy.recorded())
    assert attempts >= 2, "a 503 is retried"

    started = time.perf_counter()
    for _ in range(5):
        with pytest.raises(StoreError, match="skipping"):
            store.put(name, b"x", "image/png")
    skipped = time.perf_counter() - started
    assert len(proxy.recorded()) == attempts, "during the cool-down the store is not called at all"
    assert store.failures == 1
    print(f"\nstore 503: first call {first * 1000:.0f} ms ({attempts} attempts); ", end="")
    print(f"5 calls in the cool-down {skipped * 1000:.1f} ms")
    assert first < 5.0, "retries stop at the deadline instead of the client's 120 s default"


# ---------------------------------------------------------------------------------- through the service


def post_effect(client: TestClient, data: bytes, effect: str = "dithering") -> Any:
    return client.post(
        f"/v1/effects/{effect}",
        data={"background": "none"},
        files={"image": ("photo.png", data, "image/png")},
        headers={"Origin": ORIGIN},
    )


@pytest.fixture
def gcs_client(client_factory: Callable[..., TestClient]) -> Callable[..., TestClient]:
    def make(**overrides: Any) -> TestClient:
        settings: dict[str, Any] = {
            "cache_backend": "gcs",
            "gcs_bucket": BUCKET,
            "cdn_url": CDN,
            "gcs_retry_deadline_s": 0.5,
            "gcs_failure_cooldown_s": 30.0,
        }
        settings.update(overrides)
        return client_factory(**settings)

    return make


def test_service_results_live_in_the_bucket_with_cdn_urls(
    proxy: RecordingProxy, emulator: Emulator, gcs_client: Callable[..., TestClient]
) -> None:
    client = gcs_client()
    upload = photos.png(48, 32, seed=7)
    response = send_process(client, upload, effects="dithering,popart", background="none")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    bucket = emulator.client().bucket(BUCKET)
    for name, result in results.items():
        assert result["cache"] == "miss", name
        assert result["url"] == f"{CDN}/cache/results/{result['key']}.png"
        blob = bucket.get_blob(f"results/{result['key']}.png")
        assert blob.size == result["bytes"]
        assert blob.metadata["width"] == "48" and blob.metadata["height"] == "32"
        assert blob.cache_control == IMMUTABLE_CACHE_CONTROL and blob.content_type == "image/png"

    # Hash-first: every result is in the bucket, so the photo need not be sent again.
    proxy.clear()
    again = client.post(
        "/v1/process",
        data={"image_sha256": hashlib.sha256(upload).hexdigest(), "effects": "dithering,popart", "background": "none"},
    )
    assert again.status_code == 200, again.text
    assert {name: r["cache"] for name, r in again.json()["results"].items()} == {"dithering": "hit", "popart": "hit"}
    assert not proxy.recorded(lambda r: r.query.get("alt") == ["media"]), "a hash-first hit reads metadata only"
    missing = client.post(
        "/v1/process",
        data={"image_sha256": hashlib.sha256(upload).hexdigest(), "effects": "retro8bit", "background": "none"},
        headers={"Origin": ORIGIN},
    )
    assert missing.status_code == 404 and missing.json()["code"] == "image_not_cached"
    assert missing.headers["access-control-allow-origin"] == ORIGIN


def test_service_recomputes_and_repairs_a_corrupt_result(
    proxy: RecordingProxy, emulator: Emulator, gcs_client: Callable[..., TestClient]
) -> None:
    client = gcs_client()
    upload = photos.png(48, 32, seed=8)
    first = post_effect(client, upload)
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    assert post_effect(client, upload).headers["x-cache"] == "HIT"
    key = first.headers["etag"].strip('"')
    generation = corrupt(emulator, f"results/{key}.png", photos.png(48, 32, seed=9))

    proxy.clear()
    recomputed = post_effect(client, upload)
    assert recomputed.status_code == 200
    assert recomputed.headers["x-cache"] == "MISS", "a corrupt object is a miss, never served"
    assert recomputed.content == first.content
    (repair,) = proxy.recorded(is_result_upload)
    assert repair.query["ifGenerationMatch"] == [str(generation)]

    repaired = post_effect(client, upload)
    assert repaired.headers["x-cache"] == "HIT"
    assert repaired.content == first.content
    assert client.app.state.flow.store_errors == 0  # type: ignore[attr-defined]


def test_a_412_on_a_concurrent_write_is_a_miss_not_a_bypass(
    proxy: RecordingProxy, gcs_client: Callable[..., TestClient]
) -> None:
    client = gcs_client()
    proxy.inject(
        412,
        when=is_result_upload,
        headers={"Content-Type": "application/json"},
        body=storage_error(412, "conditionNotMet"),
    )
    response = post_effect(client, photos.png(48, 32, seed=10))
    assert response.status_code == 200
    assert response.headers["x-cache"] == "MISS"
    assert [r.status for r in proxy.recorded(is_result_upload)] == [412]
    assert client.app.state.flow.store_errors == 0  # type: ignore[attr-defined]


def test_storage_going_away_mid_test_serves_uncached_quickly(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, gcs_client: Callable[..., TestClient]
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    client = gcs_client()
    upload = photos.png(48, 32, seed=11)
    before = post_effect(client, upload)
    assert before.headers["x-cache"] == "MISS"
    assert post_effect(client, upload).headers["x-cache"] == "HIT"

    emulator.stop()

    latencies = []
    for effect in ("dithering", "dithering", "popart", "retro8bit"):
        started = time.perf_counter()
        response = post_effect(client, upload, effect)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        assert response.headers["x-cache"] == "BYPASS"
        Image.open(io.BytesIO(response.content)).verify()
    assert post_effect(client, upload).content == before.content, "served uncached, same bytes"
    listing = client.post(
        "/v1/process",
        data={"effects": "blackwhite,popart", "background": "none"},
        files={"image": ("p.png", upload, "image/png")},
    )
    assert listing.status_code == 200
    assert {r["cache"] for r in listing.json()["results"].values()} == {"bypass"}
    hash_first = client.post(
        "/v1/process",
        data={"image_sha256": hashlib.sha256(upload).hexdigest(), "background": "none", "effects": "dithering"},
        headers={"Origin": ORIGIN},
    )
    assert hash_first.status_code == 404 and hash_first.json()["code"] == "image_not_cached"

    flow = client.app.state.flow  # type: ignore[attr-defined]
    assert flow.store_errors >= 4
    assert flow.cache_counts["bypass"] >= 6
    print("\nstore down, request latency (ms): " + ", ".join(f"{s * 1000:.0f}" for s in latencies))
    # The first request pays for the bounded retries; the cool-down spares the ones after it.
    assert latencies[0] < 5.0
    assert max(latencies[1:]) < 2.0


# ---------------------------------------------------------------------------------- kept pictures


def kept_name(data: bytes, extension: str = "png") -> str:
    return f"kept/{hashlib.sha256(data).hexdigest()}.{extension}"


def is_patch(request: Recorded) -> bool:
    return request.method == "PATCH" and request.path.startswith(f"/storage/v1/b/{BUCKET}/o/")


def in_days(days: float) -> dt.datetime:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).replace(microsecond=0)


def test_keep_writes_once_with_its_date_in_the_same_request(proxy: RecordingProxy, emulator: Emulator) -> None:
    store = make_store()
    data = photos.png(40, 30, seed=20)
    name = kept_name(data)
    until = in_days(7)

    assert store.keep(name, data, "image/png", until) == until

    (upload,) = proxy.recorded(is_upload)
    assert upload.query["ifGenerationMatch"] == ["0"], "a kept picture is never written over another"
    # The keep-until date travels with the bytes: no moment where the object exists without it.
    assert f'"customTime": "{until.strftime("%Y-%m-%dT%H:%M:%S")}'.encode() in upload.body
    blob = emulator.client().bucket(BUCKET).get_blob(name)
    assert blob.custom_time == until
    assert blob.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    assert store.get(name) == data
    assert store.kept_url(name) == f"{CDN}/cache/{name}"
    with pytest.raises(ValueError, match="sha256"):
        store.keep(kept_name(photos.png(40, 30, seed=21)), data, "image/png", until)


def test_a_later_keep_lengthens_an_earlier_one_never_shortens(proxy: RecordingProxy, emulator: Emulator) -> None:
    store = make_store()
    data = photos.png(40, 30, seed=22)
    name = kept_name(data)
    week, half_year = in_days(7), in_days(180)
    store.keep(name, data, "image/png", week)
    generation = emulator.client().bucket(BUCKET).get_blob(name).generation

    proxy.clear()
    assert store.keep(name, data, "image/png", half_year) == half_year
    assert not proxy.recorded(is_upload), "lengthening is a metadata patch, not a second upload"
    (patch,) = proxy.recorded(is_patch)
    assert "ifMetagenerationMatch" in patch.query
    assert json.loads(patch.body) == {"customTime": half_year.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}

    proxy.clear()
    assert store.keep(name, data, "image/png", week) == half_year, "a shorter keep leaves the longer date"
    assert not proxy.recorded(is_upload) and not proxy.recorded(is_patch)
    blob = emulator.client().bucket(BUCKET).get_blob(name)
    assert blob.custom_time == half_year and blob.generation == generation


def test_a_keep_racing_another_reads_again_instead_of_overwriting(proxy: RecordingProxy, emulator: Emulator) -> None:
    store = make_store()
    data = photos.png(40, 30, seed=23)
    name = kept_name(data)
    store.keep(name, data, "image/png", in_days(7))
    # Real storage answers 412 when the metageneration moved (another keep patched first).
    proxy.inject(
        412, when=is_patch, headers={"Content-Type": "application/json"}, body=storage_error(412, "conditionNotMet")
    )
    proxy.clear()
    target = in_days(30)
    assert store.keep(name, data, "image/png", target) == target
    patches = proxy.recorded(is_patch)
    assert [p.status for p in patches] == [412, 200]
    assert not proxy.recorded(is_upload)
    assert store.failures == 0


def test_a_corrupt_kept_object_is_replaced_with_the_right_bytes(proxy: RecordingProxy, emulator: Emulator) -> None:
    store = make_store()
    data = photos.png(40, 30, seed=24)
    name = kept_name(data)
    store.keep(name, data, "image/png", in_days(30))
    corrupt_generation = corrupt(emulator, name, photos.png(40, 30, seed=25))

    assert store.get(name) is None, "bytes that fail their sha256 are never served"

    proxy.clear()
    week = in_days(7)
    assert store.keep(name, data, "image/png", week) == week
    (repair,) = proxy.recorded(is_upload)
    assert repair.query["ifGenerationMatch"] == [str(corrupt_generation)], "exactly the corrupt version is replaced"
    assert store.get(name) == data


def test_keeping_past_the_backstop_age_renews_the_object(
    proxy: RecordingProxy, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a 10-day backstop (the bucket deletes kept objects 10 days after they were written), an
    # object written 8 days ago cannot be promised 5 more days by a date alone: the same bytes are
    # written as a new generation, which restarts the object's age, and the date is carried over.
    store = make_store(kept_max_age_days=10)
    data = photos.png(40, 30, seed=26)
    name = kept_name(data)
    store.keep(name, data, "image/png", in_days(5))
    generation = emulator.client().bucket(BUCKET).get_blob(name).generation

    eight_days_on = dt.datetime.now(dt.UTC) + dt.timedelta(days=8)
    monkeypatch.setattr(cache.gcs, "now_utc", lambda: eight_days_on)
    proxy.clear()
    target = (eight_days_on + dt.timedelta(days=5)).replace(microsecond=0)
    assert store.keep(name, data, "image/png", target) == target
    (renewal,) = proxy.recorded(is_upload)
    assert renewal.query["ifGenerationMatch"] == [str(generation)], "exactly the version that was read"
    blob = emulator.client().bucket(BUCKET).get_blob(name)
    assert blob.custom_time == target and blob.generation != generation
    assert store.get(name) == data


def test_a_keep_longer_than_the_backstop_allows_is_refused_not_promised(proxy: RecordingProxy) -> None:
    store = make_store(kept_max_age_days=10)
    data = photos.png(40, 30, seed=29)
    with pytest.raises(StoreError, match="backstop"):
        store.keep(kept_name(data), data, "image/png", in_days(30))
    assert not proxy.recorded(is_upload)


def test_service_keeps_an_orders_pictures_in_the_bucket(
    proxy: RecordingProxy, emulator: Emulator, gcs_client: Callable[..., TestClient]
) -> None:
    client = gcs_client()
    upload = photos.png(48, 32, seed=27)
    processed = send_process(client, upload, effects="dithering,popart", background="none")
    assert processed.status_code == 200, processed.text
    sha = hashlib.sha256(upload).hexdigest()
    bucket = emulator.client().bucket(BUCKET)
    held = bucket.get_blob(f"uploads/{sha}")
    assert held is not None and held.download_as_bytes() == upload, "the processed photo is held for the order"

    urls = [result["url"] for result in processed.json()["results"].values()]
    kept = client.post(
        "/v1/keep",
        data={"results": " ".join(urls), "image_sha256": sha, "tier": "order_completed"},
        headers={"Origin": ORIGIN},
    )
    assert kept.status_code == 200, kept.text
    assert kept.headers["access-control-allow-origin"] == ORIGIN
    answer = kept.json()
    entries = [*answer["results"].values(), answer["original"]]
    assert answer["original"]["sha256"] == sha
    for entry in entries:
        name = f"kept/{entry['sha256']}.png"
        assert entry["url"] == f"{CDN}/cache/{name}"
        blob = bucket.get_blob(name)
        assert blob.custom_time.isoformat().replace("+00:00", "Z") == entry["kept_until"]
        assert blob.custom_time - dt.datetime.now(dt.UTC) > dt.timedelta(days=179)
        assert hashlib.sha256(blob.download_as_bytes()).hexdigest() == entry["sha256"]
    for result in processed.json()["results"].values():
        kept_bytes = bucket.get_blob(f"kept/{answer['results'][result['key'] + '.png']['sha256']}.png")
        assert kept_bytes.download_as_bytes() == bucket.get_blob(f"results/{result['key']}.png").download_as_bytes()


def test_service_answers_503_when_a_keep_cannot_be_written(
    proxy: RecordingProxy, gcs_client: Callable[..., TestClient]
) -> None:
    client = gcs_client()
    proxy.inject(
        503,
        when=lambda r: True,
        times=1000,
        headers={"Content-Type": "application/json"},
        body=storage_error(503, "backendError"),
    )
    response = client.post(
        "/store-image",
        data={"session_id": "pet_1_1", "image_type": "original", "tier": "temporary"},
        files={"file": ("cat.png", photos.png(40, 30, seed=28), "image/png")},
        headers={"Origin": ORIGIN},
    )
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "service_unavailable"
    assert "not kept yet" in response.json()["detail"]
    assert response.headers["retry-after"]
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert client.get("/health").status_code == 200
