"""The app factory: settings in, a FastAPI app out, with everything built once in the lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from cache.store import LocalStore, ResultStore
from effects.engine import Engine
from service import operations
from service.admission import Admission, AdmissionMiddleware, IdleMemoryRelease
from service.errors import CatchAllMiddleware, install_error_handlers
from service.flow import Flow
from service.links import LinkBaseMiddleware
from service.routes import compat, meta, orders, process, results
from service.settings import Settings, get_settings
from service.upload import UploadLimitMiddleware

log = logging.getLogger("cutout.app")
STATIC_DIR = Path(__file__).resolve().parent / "static"


def build_store(settings: Settings) -> ResultStore:
    if settings.cache_backend == "gcs":
        from cache.gcs import GcsStore

        return GcsStore(
            bucket=settings.gcs_bucket,
            cdn_url=settings.cdn_url,
            timeout_s=settings.gcs_timeout_s,
            retry_deadline_s=settings.gcs_retry_deadline_s,
            failure_cooldown_s=settings.gcs_failure_cooldown_s,
            kept_max_age_days=settings.kept_max_age_days,
        )
    return LocalStore(settings.cache_dir, settings.public_url, default_url=f"http://{settings.host}:{settings.port}")


def build_engine(settings: Settings) -> Engine:
    return Engine(
        device=settings.device,
        models_dir=settings.models_dir,
        cutout_model=settings.cutout_model,
        diffusion_effects=settings.diffusion_effects,
        mask_batch_size=settings.mask_batch_size,
        mask_batch_wait_ms=settings.mask_batch_wait_ms,
        compile_model=settings.compile_model,
    )


def _loading_finished(app: FastAPI, task: asyncio.Task[None]) -> None:
    """The staged start ended. If it crashed (a bug: every model failure is caught inside it), the
    process cannot serve: it asks the server to exit with status 3, so Cloud Run restarts it."""
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    log.critical("model loading crashed; the process cannot serve and exits", exc_info=exc)
    fail = getattr(app.state, "fail", None)
    if fail is not None:
        fail(EXIT_CANNOT_SERVE)


# The exit status of a process that cannot serve, as uvicorn's own for a failed lifespan start-up.
EXIT_CANNOT_SERVE = 3


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = build_store(settings)
        engine = build_engine(settings)
        app.state.settings = settings
        app.state.store = store
        app.state.engine = engine
        app.state.flow = Flow(engine, store, settings)
        # Models load in the background, the cutout model first (effects.engine.Engine.start), so
        # /health answers at once and /ready turns 200 as soon as the storefront's work can run.
        loading = asyncio.create_task(
            engine.start(storefront_idle=lambda: admission.in_flight == 0), name="cutout-model-loading"
        )
        loading.add_done_callback(lambda task: _loading_finished(app, task))
        app.state.loading = loading
        running = operations.start(app, settings, engine)
        memory = IdleMemoryRelease(admission)
        memory.start()
        try:
            yield
        finally:
            # Reached after uvicorn has drained (SIGTERM) or when a test client closes.
            admission.drain()
            budget_s = admission.flush_budget_s()
            try:
                async with asyncio.timeout(budget_s):
                    await running.stop()  # the metrics flusher's last write, the trace exporter's flush
            except TimeoutError:
                log.warning("telemetry flush cut short after %.1f s, before Cloud Run's SIGKILL", budget_s)
            await memory.stop()
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await engine.stop()
            try:
                async with asyncio.timeout(2.0):
                    await operations.off_the_loop(store.close, "store-close")
            except TimeoutError:
                log.warning("closing the result store took over 2 s; left behind")

    app = FastAPI(
        title="Cutout",
        summary="Background removal and image effects for pet photos.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    admission = Admission(
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        shutdown_grace_s=settings.shutdown_grace_s,
    )
    app.state.admission = admission
    install_error_handlers(app)
    app.include_router(process.router)
    app.include_router(results.router)
    app.include_router(meta.router)
    app.include_router(compat.router)
    app.include_router(orders.router)
    # The storefront client (`cutout.js`) and its demo page: plain files, no build step.
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(UploadLimitMiddleware, max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(LinkBaseMiddleware)  # local links follow the host and port the client used
    # Outside the upload guard, inside the rate limit: refusals come before the body is read.
    app.add_middleware(AdmissionMiddleware, admission=admission)
    operations.install(app, settings)  # rate limits, access log, tracing, /warmup, /metrics
    # Just inside CORS: a bug anywhere inside is answered as JSON that CORS then wraps.
    app.add_middleware(CatchAllMiddleware)
    # Added last, so it wraps everything: every answer, errors included, carries CORS headers.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_origin_regex=settings.allowed_origin_regex or None,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["X-Cache", "ETag", "Content-Location", "Retry-After", "X-Request-Id"],
        max_age=600,
    )
    return app
