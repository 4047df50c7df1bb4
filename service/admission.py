"""Admission control and draining: bounded work per instance, a deadline per request, a clean stop.

Admission
---------
Processing requests (every `POST` but `/warmup`) are counted from the moment they are admitted
to the moment their answer is sent. When `CUTOUT_MAX_QUEUE` of them are already in the
instance, the next one is refused at once with `503 overloaded` and `Retry-After`, on its
request line and headers alone: the body is never read, so a refusal costs microseconds and no
memory. Reads (results, the effects list, probes) are not counted; they take milliseconds.

The bound is a safety net under Cloud Run's own `max_instance_request_concurrency`, which sends
an instance no more than that many requests at once and queues or scales out beyond it. Keep
`CUTOUT_MAX_QUEUE` at or above that concurrency so Cloud Run's queueing acts first (a 503 from an
instance is not retried elsewhere by Cloud Run); see docs/capacity.md.

Deadline
--------
`CUTOUT_REQUEST_TIMEOUT_S` covers a processing request from admission to its answer: reading
the body (a slow-loris upload) and the work. Past it the request's task is cancelled and the
client gets `504 deadline_exceeded` naming what it was waiting for. Cancelling frees what can be
freed: a mask job still queued for the GPU is skipped by the batch worker (its future is
cancelled), a diffusion job or thread-pool job not yet started is dropped by its executor. A
thread already running (a forward pass, an encode) cannot be interrupted in Python; it finishes
and its result is discarded.

Draining
--------
On SIGTERM (`service.__main__`) the instance starts draining: `/ready` answers 503, new
processing requests get `503 shutting_down` with `Retry-After` and `Connection: close`, and
requests already admitted run to their end. The instance keeps listening (so new requests get
that answer, not a refused connection) until they have, or `CUTOUT_SHUTDOWN_GRACE_S` has passed;
then uvicorn stops, and the lifespan flushes telemetry in what is left of Cloud Run's 10 s
before SIGKILL. A request still running when the grace ends is cancelled by
uvicorn; it is answered `503 shutting_down` (retry elsewhere) rather than uvicorn's bare 500.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import CutoutError, DeadlineExceeded, Overloaded, ServiceUnavailable, error_response

log = logging.getLogger("cutout.admission")

WARMUP_PATH = "/warmup"
READY_PATH = "/ready"
# Cloud Run sends SIGKILL this long after SIGTERM.
CLOUD_RUN_SIGTERM_GRACE_S = 10.0
# Kept free at the end of that window so the process is exiting, not mid-write, when it ends.
EXIT_MARGIN_S = 0.5
# The least the telemetry flush is given, even after a long drain (a final metrics write is one call).
MIN_FLUSH_S = 0.5
# Short: another instance (or this one, a moment later) usually has room.
OVERLOADED_RETRY_AFTER_S = 2
# A draining instance never takes the request back; the retry lands on another instance.
DRAINING_RETRY_AFTER_S = 1


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class ClientClosedRequest(CutoutError):
    """Recorded (never seen by the client, who left): nginx's 499."""

    status_code = 499
    code = "client_closed_request"


def is_processing(scope: Scope) -> bool:
    """Uploads that may run the model: every POST except the authenticated warm-up."""
    return bool(scope["method"] == "POST" and scope["path"] != WARMUP_PATH)


class Admission:
    """The instance's admission state: processing requests in flight, and whether it is draining."""

    def __init__(self, *, max_queue: int, request_timeout_s: float, shutdown_grace_s: float) -> None:
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.shutdown_grace_s = shutdown_grace_s
        self.in_flight = 0
        self.peak_in_flight = 0
        self.refused_overloaded = 0
        self.refused_draining = 0
        self.deadlines_exceeded = 0
        self.cut_by_shutdown = 0
        self.client_gone = 0
        self.completed = 0
        self.draining_since: float | None = None

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def drain(self) -> None:
        """Refuse new work from now on; safe to call from a signal handler, and more than once."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            log.info(
                "draining: new work is refused, requests in flight finish",
                extra={"in_flight": self.in_flight, "shutdown_grace_s": self.shutdown_grace_s},
            )

    def flush_budget_s(self) -> float:
        """Seconds left for the telemetry flush before Cloud Run's SIGKILL, counted from the drain."""
        if self.draining_since is None:
            return CLOUD_RUN_SIGTERM_GRACE_S - EXIT_MARGIN_S
        spent = time.monotonic() - self.draining_since
        return max(MIN_FLUSH_S, CLOUD_RUN_SIGTERM_GRACE_S - EXIT_MARGIN_S - spent)

    def overloaded_detail(self) -> str:
        return (
            f"this instance is already processing {self.in_flight} requests, its limit "
            f"(CUTOUT_MAX_QUEUE={self.max_queue}); retry in {OVERLOADED_RETRY_AFTER_S} s"
        )

    def deadline_detail(self, *, body_read: bool, received: int) -> str:
        limit = f"{self.request_timeout_s:g} s"
        if not body_read:
            return (
                f"the upload was not received within the request deadline of {limit} "
                f"({received} bytes arrived); send the photo over a faster connection, or a smaller photo"
            )
        return (
            f"the request took longer than its deadline of {limit} (CUTOUT_REQUEST_TIMEOUT_S) and was "
            "cancelled; the service is busy or the request is heavy: retry later, or ask for fewer effects "
            "or a smaller max_size"
        )


class AdmissionMiddleware:
    """Applies `Admission` to every request; sits inside the rate limit, outside the upload guard."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admission = self.admission
        if admission.draining and scope["path"] == READY_PATH:
            await _refuse(scope, receive, send, ShuttingDown("this instance is shutting down"), close=False)
            return
        if not is_processing(scope):
            await self.app(scope, receive, send)
            return
        if admission.draining:
            admission.refused_draining += 1
            refusal = ShuttingDown(
                "this instance is shutting down and takes no new work; retry, another instance will answer",
                retry_after=DRAINING_RETRY_AFTER_S,
            )
            await _refuse(scope, receive, send, refusal, close=True)
            return
        if admission.in_flight >= admission.max_queue:
            admission.refused_overloaded += 1
            overloaded = Overloaded(admission.overloaded_detail(), retry_after=OVERLOADED_RETRY_AFTER_S)
            await _refuse(scope, receive, send, overloaded, close=False)
            return
        admission.in_flight += 1
        admission.peak_in_flight = max(admission.peak_in_flight, admission.in_flight)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                admission.in_flight -= 1
                admission.completed += 1

        try:
            await self._run_with_deadline(scope, receive, send, release)
        finally:
            release()

    async def _run_with_deadline(self, scope: Scope, receive: Receive, send: Send, release: Callable[[], None]) -> None:
        answered = False
        body_read = False
        received = 0
        client_gone = False
        request_task = asyncio.current_task()
        watcher: asyncio.Task[None] | None = None

        async def watch_disconnect() -> None:
            # The body has been read: the next message is the client hanging up (or the answer
            # being complete). A client gone before its answer cancels the request's work.
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect" and not answered and request_task is not None:
                client_gone = True
                request_task.cancel()

        async def tracked_receive() -> Message:
            nonlocal body_read, received, watcher
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_read = body_read or not message.get("more_body", False)
                if body_read and watcher is None:
                    watcher = asyncio.create_task(watch_disconnect(), name="cutout-disconnect-watch")
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted until the answer is out, not until the clean-up after it (closing the
                # spooled upload is one more thread hop): a client sending its next request as
                # soon as it has the answer must find its place free.
                release()

        try:
            async with asyncio.timeout(self.admission.request_timeout_s) as deadline:
                await self.app(scope, tracked_receive, tracked_send)
        except asyncio.CancelledError:
            if client_gone and request_task is not None and request_task.uncancel() == 0:
                # The work was cancelled and has ended. The answer goes nowhere (the server drops
                # it), but the access log and the metrics record 499, not a failure of ours.
                self.admission.client_gone += 1
                log.info("client went away before its answer; its work was cancelled", extra={"path": scope["path"]})
                gone = ClientClosedRequest("the client closed the connection before its answer")
                await _refuse(scope, receive, send, gone, close=True)
                return
            if not self.admission.draining or answered:
                raise
            # uvicorn cancels what still runs when the shutdown grace ends, and would answer 500
            # for it; the client gets a 503 it can retry on another instance instead.
            self.admission.cut_by_shutdown += 1
            stopped = ShuttingDown(
                f"this instance stopped before the request finished (its shutdown grace is "
                f"{self.admission.shutdown_grace_s:g} s); retry, another instance will answer",
                retry_after=DRAINING_RETRY_AFTER_S,
            )
            await _refuse(scope, receive, send, stopped, close=True)
        except TimeoutError:
            if not deadline.expired():
                raise  # a timeout inside the app is the app's own failure, not the deadline
            self.admission.deadlines_exceeded += 1
            if answered:
                # The answer had started; there is nothing to replace it with. uvicorn closes the
                # connection, so the client sees a cut answer, never a wrong one.
                log.warning("request deadline passed while its answer was being sent", extra={"path": scope["path"]})
                return
            detail = self.admission.deadline_detail(body_read=body_read, received=received)
            await _refuse(scope, receive, send, DeadlineExceeded(detail), close=not body_read)
        finally:
            if watcher is not None:
                watcher.cancel()


class IdleMemoryRelease:
    """Hands the memory freed after a burst back to the OS once the instance is idle.

    glibc keeps freed heap memory in its arenas for reuse, so after a burst of large photos the
    RSS stays at the burst's peak although nothing holds it (a load test at concurrency 8 on the
    CPU left ~400 MB that way; `malloc_trim` brought the process back below its size at start).
    Every `interval_s`, if no processing request is in flight and some finished since the last
    pass, `malloc_trim(0)` runs in a worker thread (ctypes releases the GIL). Never under load:
    there the memory is the working set and is reused. A no-op where the C library is not glibc.
    """

    def __init__(self, admission: Admission, interval_s: float = 2.0) -> None:
        self.admission = admission
        self.interval_s = interval_s
        self.trims = 0
        self._malloc_trim = _glibc_malloc_trim()
        self._seen = admission.completed
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._malloc_trim is not None:
            self._task = asyncio.create_task(self._run(), name="cutout-idle-memory-release")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        assert self._malloc_trim is not None
        while True:
            await asyncio.sleep(self.interval_s)
            if self.admission.in_flight == 0 and self.admission.completed != self._seen:
                self._seen = self.admission.completed
                await asyncio.to_thread(self._malloc_trim, 0)
                self.trims += 1


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None
    return function


async def _refuse(scope: Scope, receive: Receive, send: Send, error: CutoutError, *, close: bool) -> None:
    response = error_response(error.status_code, error.code, error.detail, error.retry_after)
    if close:
        # The rest of the body is never read: the connection cannot carry another request.
        response.headers["Connection"] = "close"
    await response(scope, receive, send)


class MemoryBudget:
    """Device memory for requests' tensor work, admitted in bytes rather than in requests.

    Each request reserves its working set (`Engine.working_bytes`: the upload, the output
    image and one step's planes, independent of how many effects it asks for) before its
    tensor work starts and returns it when that work ends. When the reservations would pass the
    capacity, the request waits its turn (first come, first served) inside its deadline instead
    of running the device out of memory. A request larger than the whole capacity runs alone.

    `capacity` is read at every reservation (the resident weights are known only once the models
    have loaded); None means unbounded (the CPU, where Cloud Run's memory limit and the request
    count bound the host's RAM).
    """

    def __init__(self, capacity: Callable[[], int | None]) -> None:
        self._capacity = capacity
        self.reserved = 0
        self.peak_reserved = 0
        self.waited = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[int]:
        capacity = self._capacity()
        if capacity is not None:
            nbytes = max(0, min(nbytes, capacity))
        if capacity is not None and (self._waiters or self.reserved + nbytes > capacity):
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((nbytes, granted))
            self.waited += 1
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release(nbytes)  # granted in the same instant the request was cancelled
                else:
                    self._waiters = deque(entry for entry in self._waiters if entry[1] is not granted)
                    self._grant()
                raise
        else:
            self._take(nbytes)
        try:
            yield nbytes
        finally:
            self._release(nbytes)

    def _take(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _release(self, nbytes: int) -> None:
        self.reserved -= nbytes
        self._grant()

    def _grant(self) -> None:
        capacity = self._capacity()
        while self._waiters:
            nbytes, granted = self._waiters[0]
            if granted.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if capacity is not None and self.reserved > 0 and self.reserved + nbytes > capacity:
                return
            self._waiters.popleft()
            self._take(nbytes)
            granted.set_result(None)
