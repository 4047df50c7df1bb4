"""Wires rate limits, warm-up, tracing, metrics and access logs into the app (docs/operations.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from fastapi import FastAPI

from effects.engine import Engine
from service import telemetry
from service.logs import AccessLogMiddleware
from service.metrics import Metrics, MonitoringExporter, monitoring_client
from service.ratelimit import RateLimitMiddleware, RateLimits
from service.routes import ops
from service.settings import Settings
from service.telemetry import ColdStart, TraceExport
from service.warmup import Warmup, WarmupAuth

log = logging.getLogger("cutout.operations")


def install(app: FastAPI, settings: Settings) -> None:
    """The factory's part. Call before the CORS middleware is added, so CORS wraps these answers.

    Middleware order, outside in: CORS → access log (sees every answer, 429s included) → rate
    limit (before the body is read) → the rest of the app. The tracing server span wraps it all.
    """
    limits = RateLimits(settings)
    metrics = Metrics(usd_per_second=settings.l4_usd_per_second)
    cold_start = ColdStart()
    app.state.limiter = limits.limiter
    app.state.metrics = metrics
    app.state.warmup_auth = WarmupAuth(settings)
    app.include_router(ops.router)
    app.add_middleware(RateLimitMiddleware, limits=limits, on_limited=metrics.count_rate_limited)
    app.add_middleware(AccessLogMiddleware, metrics=metrics, cold_start=cold_start)
    telemetry.instrument(app)


class Running:
    """The lifespan's part: the trace exporter, the warm-up runner and the metrics flusher."""

    def __init__(self, app: FastAPI, settings: Settings, engine: Engine, loading: asyncio.Task[None] | None) -> None:
        self.trace_export = TraceExport(settings)
        metrics: Metrics = app.state.metrics
        metrics.engine = engine
        app.state.warmup = Warmup(engine, loading)
        self.exporter: MonitoringExporter | None = None
        if settings.metrics_export == "cloud_monitoring":
            try:
                client = monitoring_client(settings.metrics_endpoint)
            except Exception as exc:
                # No credentials or no client: the service runs on, without exported metrics.
                log.error("metrics export disabled: %s: %s", exc.__class__.__name__, exc)
            else:
                self.exporter = MonitoringExporter(metrics, settings, client)
                self.exporter.start()
        app.state.metrics_exporter = self.exporter

    async def stop(self) -> None:
        if self.exporter is not None:
            await self.exporter.stop()
        # The trace exporter's flush is network I/O: off the event loop, so /health and requests
        # still draining are answered meanwhile.
        await off_the_loop(self.trace_export.shutdown, "trace-flush")


def off_the_loop(work: Callable[[], object], name: str) -> asyncio.Future[None]:
    """Run blocking shutdown work on a daemon thread; the future resolves when it is done.

    Not the loop's default executor: `asyncio.run` joins that executor's threads before the process
    may exit, so a flush cut short by the shutdown budget would hold the exit until it ended. A
    daemon thread is left behind instead (`python -m service` exits without waiting for it).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            work()
        except Exception as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=f"cutout-{name}", daemon=True).start()
    return done


def start(app: FastAPI, settings: Settings, engine: Engine) -> Running:
    return Running(app, settings, engine, getattr(app.state, "loading", None))
