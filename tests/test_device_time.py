"""GPU-seconds count device time: the work done for a request, never the time it waited or shared.

On this machine the device is the CPU, timed by the working thread's CPU time; the CUDA-event path
has its own test, which runs only where CUDA exists.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from effects import device_time
from effects.device_time import DeviceMeter, DeviceWork, metered
from effects.engine import Engine
from tests.support import photos

CPU = torch.device("cpu")


def busy(seconds: float) -> None:
    """Tensor work on the CPU for about `seconds` of this thread's CPU time."""
    started = time.thread_time()
    a = torch.ones(64, 64)
    while time.thread_time() - started < seconds:
        a = (a @ a).clamp_(0.0, 1.0)


# ------------------------------------------------------------------------ the clock and the arithmetic


def test_cpu_work_counts_the_threads_compute_not_its_waits() -> None:
    meter = DeviceMeter()
    started = time.perf_counter()
    with metered(CPU, meter):
        time.sleep(0.4)  # waiting: no device work
        busy(0.1)
    wall = time.perf_counter() - started
    assert 0.09 <= meter.seconds < 0.3 < wall


def test_the_context_meter_is_charged_and_failed_work_still_counts() -> None:
    meter = DeviceMeter()
    token = device_time.bind(meter)
    try:
        with metered(CPU):
            busy(0.05)
        with pytest.raises(ValueError), metered(CPU):
            busy(0.05)
            raise ValueError("the step failed half-way")
    finally:
        device_time.unbind(token)
    assert meter.seconds >= 0.09
    with metered(CPU):  # no meter bound: nobody is charged, nothing fails
        busy(0.01)


class _Event:
    """Stands in for a recorded CUDA event: only the arithmetic is under test here."""

    def __init__(self, at_ms: float) -> None:
        self.at_ms = at_ms
        self.synchronized = False

    def synchronize(self) -> None:
        self.synchronized = True

    def elapsed_time(self, end: _Event) -> float:
        return end.at_ms - self.at_ms


def test_cuda_milliseconds_become_seconds_split_in_equal_shares() -> None:
    work = DeviceWork(torch.device("cuda"))
    start, end = _Event(1000.0), _Event(1750.0)
    work._events = (start, end)  # type: ignore[assignment]  # what __enter__/__exit__ record on CUDA
    assert work.known_seconds is None  # not read before the request's end: no stall mid-request
    meters = [DeviceMeter(), DeviceMeter(), DeviceMeter()]
    work.charge([*meters, None])  # a batch of four images, one of them a warm-up nobody pays for
    assert [meter.seconds for meter in meters] == [0.1875] * 3
    assert end.synchronized and work.known_seconds == 0.75
    other = DeviceWork(CPU)
    with other:
        busy(0.02)
    meters[0].add(other)
    assert meters[0].seconds == pytest.approx(0.1875 + other.seconds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the event-timed path runs only on a GPU")
def test_cuda_events_time_the_device_work() -> None:
    device = torch.device("cuda")
    a = torch.randn(4096, 4096, dtype=torch.float16, device=device)
    torch.cuda.synchronize(device)
    meter = DeviceMeter()
    started = time.perf_counter()
    with metered(device, meter):
        for _ in range(20):
            a = a @ a
            a = a / a.abs().amax()
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - started
    assert 0 < meter.seconds <= wall
    shares = [DeviceMeter(), DeviceMeter()]
    with DeviceWork(device) as work:
        b = a @ a
    work.charge(shares)
    del b
    assert shares[0].seconds == shares[1].seconds == pytest.approx(work.seconds / 2)


# ------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def engine_factory(models_dir: Path) -> Callable[..., Engine]:
    def make(**options: Any) -> Engine:
        values: dict[str, Any] = {"device": "cpu", "models_dir": models_dir, "cutout_model": "inspyrenet-swinb"}
        values.update(options)
        return Engine(**values)

    return make


def photo(seed: int) -> torch.Tensor:
    return torch.from_numpy(photos.photo(96, 64, seed=seed)).permute(2, 0, 1).contiguous()


async def metered_mask(engine: Engine, model_input: torch.Tensor) -> DeviceMeter:
    meter = DeviceMeter()  # each request's own, bound in its own task's context
    device_time.bind(meter)
    await engine.mask(model_input)
    return meter


def test_a_mask_batch_splits_its_device_time_among_its_images(engine_factory: Callable[..., Engine]) -> None:
    async def scenario() -> None:
        engine = engine_factory(mask_batch_size=8, mask_batch_wait_ms=300.0)
        await engine.start()
        try:
            inputs = [engine.prepare_mask_input(photo(seed)) for seed in range(3)]  # one shape: one batch
            alone = await metered_mask(engine, inputs[0])
            batches = engine.batches_run
            meters = await asyncio.gather(*(metered_mask(engine, x) for x in inputs))
            assert engine.batches_run == batches + 1
            shares = [meter.seconds for meter in meters]
            assert shares[0] > 0 and shares[0] == shares[1] == shares[2]
            assert sum(shares) > alone.seconds  # together they paid for the forward of three images
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_time_queued_for_the_gpu_thread_is_not_device_time(engine_factory: Callable[..., Engine]) -> None:
    async def scenario() -> None:
        engine = engine_factory(mask_batch_size=1, mask_batch_wait_ms=0.0)
        await engine.start()
        try:
            model_input = engine.prepare_mask_input(photo(7))
            release = threading.Event()
            blocker = engine._gpu.submit(release.wait, 30)  # the GPU thread busy with other work
            started = time.perf_counter()
            waiting = asyncio.ensure_future(metered_mask(engine, model_input))
            await asyncio.sleep(1.0)
            assert not waiting.done()
            released = time.perf_counter()
            release.set()
            meter = await waiting
            finished = time.perf_counter()
            blocker.result()
            # The forward could only start once the thread was free: the second it queued is not
            # the device's, only (at most) the time from the release on.
            assert 0 < meter.seconds <= finished - released
            assert finished - started >= 1.0
        finally:
            await engine.stop()

    asyncio.run(scenario())


# ------------------------------------------------------------------------ through the service


def gpu_distribution(client: TestClient) -> tuple[int, float]:
    samples = client.app.state.metrics.snapshot()  # type: ignore[attr-defined]
    values = [sample.value for sample in samples if sample.definition.name == "gpu_seconds_per_image"]
    return (values[0].count, values[0].total) if values else (0, 0.0)  # type: ignore[union-attr]


def process(client: TestClient, effects: str, seed: int, **fields: str) -> float:
    """One computed request; returns its latency in seconds."""
    started = time.perf_counter()
    response = client.post(
        "/v1/process",
        data={"effects": effects, "seed": str(seed), "background": "none", **fields},
        files={"image": ("pet.png", photos.png(48, 40, seed=seed), "image/png")},
    )
    assert response.status_code == 200, response.text
    assert any(result["cache"] != "hit" for result in response.json()["results"].values())
    return time.perf_counter() - started


def test_a_diffusion_run_queued_behind_another_counts_only_its_own_work(model_client: TestClient) -> None:
    engine = model_client.app.state.engine  # type: ignore[attr-defined]
    params = json.dumps({"upscale": {"steps": 5}})
    release = threading.Event()
    blocker = engine._diffusion.submit(release.wait, 30)  # the diffusion thread runs another job
    count, total = gpu_distribution(model_client)
    timer = threading.Timer(3.0, release.set)
    timer.start()
    try:
        latency = process(model_client, "upscale", seed=int(time.time()), params=params)
    finally:
        release.set()
        timer.cancel()
    blocker.result()
    new_count, new_total = gpu_distribution(model_client)
    assert new_count == count + 1
    gpu_seconds = new_total - total
    assert latency >= 3.0
    # Its decode and background ran inside the 3 s window, then it queued until the window closed;
    # that wait (over 2 s, unless those steps took a second) is not device time.
    assert 0 < gpu_seconds <= latency - 2.0


def test_overlapping_requests_report_no_more_than_the_compute_they_used(model_client: TestClient) -> None:
    count, total = gpu_distribution(model_client)
    seed = int(time.time() * 1000) % 2**31
    cpu_started = time.process_time()
    with ThreadPoolExecutor(max_workers=4) as pool:
        latencies = list(pool.map(lambda i: process(model_client, "blackwhite,popart,dithering", seed + i), range(4)))
    cpu_used = time.process_time() - cpu_started
    new_count, new_total = gpu_distribution(model_client)
    assert new_count == count + 4
    # Four requests on two cores at once: each one's wall time holds the others' work too; their
    # device seconds add up to no more than the CPU the whole process spent meanwhile.
    assert 0 < new_total - total <= cpu_used
    assert new_total - total <= sum(latencies)
