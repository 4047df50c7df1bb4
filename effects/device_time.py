"""Device time: how long the engine's device worked for a request, not how long the request waited.

A request's GPU-seconds (and its cost) are the sum of the stretches of device work done for it:
its upload, mask input, background, effects and download, its diffusion runs, and its share of
each mask batch it rode in (a batch of N images charges each 1/N). Waiting is never counted: for
admission, the memory budget, a mask batch to fill, the GPU or diffusion thread to be free.

How a stretch is timed, on the thread that does the work:
- CUDA: a pair of timing events (`torch.cuda.Event(enable_timing=True)`) recorded on the thread's
  current stream before and after the work. The pair is read when the request's figure is asked
  for (the access log, at the request's end, after its results came back to the host), so timing
  never stalls the stream mid-request. Kernels of another thread queued on the same stream between
  the two events are inside the pair too (one device, one legacy default stream).
- CPU: the thread's CPU time over the work (`time.thread_time()`): a thread that waits (for a queue,
  a lock, a core another request holds) uses none. Work torch hands to its intra-op threads is not
  on the calling thread's clock, so on a many-core CPU the figure is a lower bound; the CPU serves
  development and tests, production's device is the L4.

Who is charged: the `DeviceMeter` bound to the current context (`bind`), which the service binds per
request and which `asyncio.to_thread`-style calls carry into worker threads; work queued to the
engine's own threads captures the meter when it is queued (`current()`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import TracebackType

import torch


class DeviceWork:
    """One stretch of device work on the calling thread, as a context manager."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._started = 0.0
        self._seconds: float | None = None

    def __enter__(self) -> DeviceWork:
        if self.device.type == "cuda" and torch.cuda.is_available():
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record(torch.cuda.current_stream(self.device))
            self._events = (start, end)
        else:
            self._started = time.thread_time()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._events is not None:
            self._events[1].record(torch.cuda.current_stream(self.device))
        else:
            self._seconds = time.thread_time() - self._started

    @property
    def seconds(self) -> float:
        """The stretch's device time; on CUDA this waits for its end event (already past at a request's end)."""
        if self._seconds is None:
            if self._events is None:
                return 0.0  # never started
            start, end = self._events
            end.synchronize()
            self._seconds = float(start.elapsed_time(end)) / 1000.0
        return self._seconds

    @property
    def known_seconds(self) -> float | None:
        """The stretch's device time if known without waiting on the device (the CPU's clock), else None."""
        return self._seconds

    def charge(self, meters: Sequence[DeviceMeter | None]) -> None:
        """Split this stretch among the requests it served, one equal share each (None: a warm-up)."""
        if meters:
            for meter in meters:
                if meter is not None:
                    meter.add(self, 1.0 / len(meters))


class DeviceMeter:
    """The device time of one request: shares of `DeviceWork`, added from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shares: list[tuple[DeviceWork, float]] = []
        self._settled = 0.0

    def add(self, work: DeviceWork, share: float = 1.0) -> None:
        with self._lock:
            self._shares.append((work, share))

    @property
    def seconds(self) -> float:
        """Seconds of device work so far; call once the request's work has ended (see `DeviceWork.seconds`)."""
        with self._lock:
            shares, self._shares = self._shares, []
            self._settled += sum(work.seconds * share for work, share in shares)
            return self._settled


_meter: ContextVar[DeviceMeter | None] = ContextVar("cutout_device_meter", default=None)


def bind(meter: DeviceMeter | None) -> Token[DeviceMeter | None]:
    return _meter.set(meter)


def unbind(token: Token[DeviceMeter | None]) -> None:
    _meter.reset(token)


def current() -> DeviceMeter | None:
    return _meter.get()


@contextmanager
def metered(device: torch.device, meter: DeviceMeter | None = None) -> Iterator[DeviceWork]:
    """Time the enclosed device work and charge it to `meter` (default: the context's)."""
    target = meter if meter is not None else current()
    work = DeviceWork(device)
    try:
        with work:
            yield work
    finally:  # work that failed half-way still held the device
        if target is not None:
            target.add(work)
