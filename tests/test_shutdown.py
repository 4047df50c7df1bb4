"""Graceful shutdown: SIGTERM to a real `python -m service` with requests in flight.

Cloud Run sends SIGTERM, then SIGKILL 10 s later. In between, the instance must finish what it
admitted, refuse what comes new, flush its telemetry and exit.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from tests.support import photos
from tests.support.client import assert_store_clean, multipart_body
from tests.support.client import send_effect as post_effect
from tests.support.server import running_server
from tests.support.telemetry import PROJECT, LocalMonitoring

CLASSIC = ("blackwhite", "dithering", "popart", "retro8bit")
CLOUD_RUN_SIGKILL_AFTER_S = 10.0


def test_a_draining_instance_refuses_new_work_and_says_it_is_not_ready(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory()
    upload = photos.jpeg(96, 64)
    assert post_effect(client, upload, "popart").status_code == 200
    client.app.state.admission.drain()  # type: ignore[attr-defined]  # what SIGTERM does

    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["code"] == "shutting_down"
    refused = post_effect(client, upload, "popart")
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "shutting_down"
    assert "another instance" in refused.json()["detail"]
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"
    assert client.get("/health").status_code == 200, "liveness holds while draining"
    assert client.get("/v1/effects").status_code == 200, "reads are served to the end"


def dribbled(
    body: bytes,
    started: threading.Event,
    pieces: int = 10,
    pause_s: float = 0.25,
    last_piece_after: threading.Event | None = None,
) -> Iterator[bytes]:
    """A body sent in pieces over a few seconds: an upload still arriving when SIGTERM comes.

    With `last_piece_after`, the last piece waits for that event: the request stays in flight until then."""
    step = -(-len(body) // pieces)
    offsets = range(0, len(body), step)
    for offset in offsets:
        if offset == offsets[-1] and last_piece_after is not None:
            assert last_piece_after.wait(30), "the test never let the upload finish"
        yield body[offset : offset + step]
        started.set()
        time.sleep(pause_s)


def send_in_threads(
    url: str,
    answers: dict[str, Any],
    heavy: list[tuple[bytes, dict[str, str]]],
    slow_body: bytes,
    **dribble: Any,
) -> list[threading.Thread]:
    """Heavy requests (four classic effects each, `heavy`: photo and extra fields) and one slow
    upload of `slow_body`, each in its own thread, answers into `answers`; returns once the slow
    upload has begun arriving."""
    slow_started = threading.Event()

    def send_heavy(index: int) -> None:
        upload, fields = heavy[index]
        answers[f"heavy-{index}"] = httpx.post(
            f"{url}/v1/process",
            data={"effects": ",".join(CLASSIC), "background": "none", **fields},
            files={"image": ("big.jpg", upload, "image/jpeg")},
            timeout=60,
        )

    def send_slow() -> None:
        answers["slow"] = httpx.post(
            f"{url}/v1/process",
            content=dribbled(slow_body, slow_started, **dribble),
            headers={"Content-Type": "multipart/form-data; boundary=cutoutboundary"},
            timeout=60,
        )

    threads = [threading.Thread(target=send_heavy, args=(index,)) for index in range(len(heavy))]
    threads.append(threading.Thread(target=send_slow))
    for thread in threads:
        thread.start()
    assert slow_started.wait(10)
    return threads


def test_sigterm_finishes_requests_in_flight_refuses_new_ones_flushes_metrics_and_exits_0(
    tmp_path: Path, client_factory: Callable[..., TestClient]
) -> None:
    heavy_uploads = [photos.jpeg(2400, 1800, seed=seed) for seed in (1, 2)]
    slow_upload = photos.jpeg(320, 240, seed=3)
    monitoring = LocalMonitoring()
    env = {
        "CUTOUT_METRICS_EXPORT": "cloud_monitoring",
        "CUTOUT_METRICS_ENDPOINT": monitoring.endpoint,
        "CUTOUT_GCP_PROJECT": PROJECT,
        "CUTOUT_METRICS_INTERVAL_S": "3600",  # no periodic write: whatever arrives is the final flush
        "CUTOUT_LOG_FORMAT": "json",
    }
    answers: dict[str, Any] = {}
    try:
        with running_server(tmp_path, env) as server:
            url = server.url

            probes_done = threading.Event()
            threads = send_in_threads(
                url,
                answers,
                [(upload, {}) for upload in heavy_uploads],
                multipart_body(slow_upload),  # popart on the original background
                # In flight until the probes below are done: the instance keeps listening meanwhile.
                last_piece_after=probes_done,
            )
            time.sleep(0.5)  # the heavy uploads are in, their effects are running
            assert not answers, f"the requests finished before SIGTERM; make them heavier: {answers}"

            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.05)  # the signal handler runs between two bytecodes of the server's main thread
            refusals = []
            for _ in range(5):  # new work on new connections while the admitted requests run
                with httpx.Client(base_url=url, timeout=5) as fresh_client:
                    refusals.append(post_effect(fresh_client, slow_upload, "dithering"))
                time.sleep(0.1)
            probes_done.set()
            exit_code = server.process.wait(timeout=30)
            exited_after = time.monotonic() - signalled
            for thread in threads:
                thread.join(timeout=30)
    finally:
        monitoring.stop()

    print(f"\nSIGTERM to exit: {exited_after:.2f} s; new requests after SIGTERM: {[r.status_code for r in refusals]}")
    assert exit_code == 0, server.log_tail()
    assert exited_after < CLOUD_RUN_SIGKILL_AFTER_S, f"exited {exited_after:.1f} s after SIGTERM"
    # New work after SIGTERM is refused by the draining app, with an answer to retry elsewhere.
    for refused in refusals:
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "shutting_down"
        assert "another instance" in refused.json()["detail"]
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"

    # Everything admitted before SIGTERM finished, with the right bytes, stored whole.
    assert set(answers) == {"heavy-0", "heavy-1", "slow"}
    for name, answer in answers.items():
        assert answer.status_code == 200, f"{name}: {answer.status_code} {answer.text[:300]}"
    clean = client_factory(cache_dir=tmp_path / "clean")
    cache_dir = tmp_path / "cache"
    for index, upload in enumerate(heavy_uploads):
        results = answers[f"heavy-{index}"].json()["results"]
        for effect in CLASSIC:
            expected = post_effect(clean, upload, effect)
            assert results[effect]["key"] == expected.headers["etag"].strip('"')
            stored = cache_dir / "results" / f"{results[effect]['key']}.png"
            assert stored.read_bytes() == expected.content, f"heavy-{index} {effect}"
    slow_result = answers["slow"].json()["results"]["popart"]
    stored = cache_dir / "results" / f"{slow_result['key']}.png"
    assert stored.read_bytes() == post_effect(clean, slow_upload, "popart").content
    assert_store_clean(cache_dir)

    # The final metrics write happened after the requests finished, and counted them.
    log = server.log_path.read_text()
    assert "draining: new work is refused" in log
    misses = [
        series.points[0].value.int64_value
        for series in monitoring.series()
        if series.metric.type.endswith("/cache_requests") and series.metric.labels["outcome"] == "miss"
    ]
    assert misses == [2 * len(CLASSIC) + 1], misses


def test_requests_outliving_the_grace_period_get_a_retryable_503_not_a_500(tmp_path: Path) -> None:
    heavy_upload = photos.jpeg(2400, 1800, seed=4)
    body = multipart_body(photos.jpeg(320, 240, seed=5))
    answers: dict[str, Any] = {}
    with running_server(tmp_path, {"CUTOUT_SHUTDOWN_GRACE_S": "0.5"}) as server:
        url = server.url

        heavy = [(heavy_upload, {"seed": str(index)}) for index in range(2)]
        threads = send_in_threads(url, answers, heavy, body, pieces=12)  # 3 s: far beyond the grace period
        time.sleep(0.3)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        exit_code = server.process.wait(timeout=30)
        exited_after = time.monotonic() - signalled
        for thread in threads:
            thread.join(timeout=30)

    assert exit_code == 0 and exited_after < CLOUD_RUN_SIGKILL_AFTER_S, (exit_code, exited_after)
    assert set(answers) == {"heavy-0", "heavy-1", "slow"}
    slow_answer = answers["slow"]
    assert slow_answer.status_code == 503, slow_answer.text
    assert slow_answer.json()["code"] == "shutting_down"
    assert "0.5 s" in slow_answer.json()["detail"]
    assert slow_answer.headers["retry-after"] == "1"
    for name in ("heavy-0", "heavy-1"):  # finished in time, or cut the same way
        answer = answers[name]
        assert answer.status_code == 200 or (answer.status_code, answer.json()["code"]) == (503, "shutting_down")
    log = server.log_path.read_text()
    assert "Exception in ASGI application" not in log
    assert '"status": 500' not in log
    assert_store_clean(tmp_path / "cache")
