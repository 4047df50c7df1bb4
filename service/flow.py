"""The request flow: hash → cache lookup → decode → mask → effects → encode → store.

Routes parse the form into a `Recipe`-ready `ProcessRequest` and call `process`. Blocking
work (hashing, decoding, tensor work, encoding, storage I/O) runs in worker threads, never on
the event loop. A failure of the store never fails a request: the result is served uncached,
the outcome is reported as `bypass`, and its `url` is a `data:` URL carrying the bytes, so every
URL in an answer fetches the picture it describes.

A request is one unit. Its effects run one after another on one working set (the device memory
it reserves from `MemoryBudget` does not grow with their number), each result's encode and store
overlapping the next effect; all of it runs in one task group, so when any part fails, or the
client goes away, or the deadline passes, the rest is cancelled, and a worker thread already
running is waited for: nothing of the request runs or is written after its answer.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from cache import masks
from cache.keys import Recipe, image_sha256, mask_object, result_object, upload_object
from cache.store import ResultStore, image_info
from effects import EFFECTS
from effects.base import Effect
from effects.engine import CUTOUT, Engine, ModelMissing, release_device_memory
from service import codecs, imaging
from service.admission import MemoryBudget
from service.errors import CutoutError, ImageNotCached, answer_for
from service.forms import ProcessRequest
from service.settings import Settings
from service.telemetry import note_results, stage

log = logging.getLogger("cutout.flow")

CacheOutcome = Literal["hit", "miss", "bypass"]
T = TypeVar("T")


@dataclass
class EffectResult:
    effect: str
    key: str
    url: str
    cache: CacheOutcome
    content_type: str
    width: int
    height: int
    size: int
    data: bytes | None = None

    @property
    def stored(self) -> bool:
        """The result is in the store, so its store URL serves it (a write that failed: not)."""
        return self.cache != "bypass"

    @property
    def location(self) -> str | None:
        """The store URL for a header such as Content-Location, only when it serves the result."""
        return self.url if self.stored else None

    def public_url(self) -> str:
        """A URL that fetches this result: the store's, or a `data:` URL with the bytes when it was not stored."""
        if self.stored:
            return self.url
        if self.data is None:  # a computed result always carries its bytes
            raise RuntimeError(f"result {self.effect} was not stored and has no bytes to carry")
        return f"data:{self.content_type};base64,{base64.b64encode(self.data).decode('ascii')}"

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.public_url(),
            "stored": self.stored,
            "key": self.key,
            "cache": self.cache,
            "width": self.width,
            "height": self.height,
            "content_type": self.content_type,
            "bytes": self.size,
        }


@dataclass(frozen=True)
class _Job:
    """The computing part of one request: the effects the store did not have, and the answer's timings."""

    image_hash: str
    request: ProcessRequest
    names: list[str]
    want_bytes: bool
    timings: dict[str, float]


@dataclass
class ProcessOutcome:
    image_sha256: str
    results: dict[str, EffectResult]
    timings_ms: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------ the flow


class Flow:
    """One request flow per app: the engine, the store and the settings it runs with."""

    def __init__(self, engine: Engine, store: ResultStore, settings: Settings) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.store_errors = 0
        self.memory = MemoryBudget(engine.work_memory_bytes)

    def recipe(self, image_hash: str, name: str, request: ProcessRequest) -> Recipe | None:
        """The recipe of one result, or None when a model it needs has no weights (so no id)."""
        effect = EFFECTS[name]
        model_ids: list[str | None] = []
        if request.background.needs_mask:
            model_ids.append(self.engine.model_id(CUTOUT))
        if effect.kind == "diffusion":
            model_ids.append(self.engine.model_id(name))
        if None in model_ids:
            return None
        return Recipe(
            image_sha256=image_hash,
            effect=name,
            effect_version=effect.version,
            model_id="+".join(m for m in model_ids if m) or None,
            params=request.params[name].model_dump(mode="json"),
            background=request.background.canonical(),
            format=request.format,
            max_size=request.max_size,
            seed=request.seed,
        )

    def result_key(self, image_hash: str, name: str, request: ProcessRequest) -> str:
        recipe = self.recipe(image_hash, name, request)
        if recipe is None:  # check_models ran first, so every needed model has its id
            raise ModelMissing(f"{name} needs a model whose weights are absent")
        return recipe.result_key()

    def check_models(self, request: ProcessRequest, names: list[str]) -> None:
        """Refuse before any work when a model the request needs cannot run now (still loading, or absent)."""
        if request.background.needs_mask:
            self.engine.check_model(CUTOUT)
        for name in names:
            self.engine.check_available(EFFECTS[name])

    async def lookup(self, image_hash: str, request: ProcessRequest, *, want_bytes: bool) -> dict[str, EffectResult]:
        """Results already in the store, by effect name; the effects are looked up concurrently."""
        found = await asyncio.gather(
            *(self._lookup_one(image_hash, name, request, want_bytes=want_bytes) for name in request.effects)
        )
        return {result.effect: result for result in found if result is not None}

    async def _lookup_one(
        self, image_hash: str, name: str, request: ProcessRequest, *, want_bytes: bool
    ) -> EffectResult | None:
        recipe = self.recipe(image_hash, name, request)
        if recipe is None:
            return None  # a model whose weights are absent: nothing can have been stored under its id
        key = recipe.result_key()
        obj = result_object(key, request.format)
        data: bytes | None = None
        try:
            if want_bytes:
                data = await asyncio.to_thread(self.store.get, obj)
                info = image_info(data) if data is not None else None
            else:
                info = await asyncio.to_thread(self.store.lookup, obj)
        except Exception as exc:
            self._store_failed("lookup", obj, exc)
            return None
        if info is None:
            return None
        width, height, size = info
        return EffectResult(
            effect=name,
            key=key,
            url=self.store.result_url(key, request.format),
            cache="hit",
            content_type=imaging.OUTPUT_FORMATS[request.format],
            width=width,
            height=height,
            size=size,
            data=data,
        )

    async def from_hash(self, image_hash: str, request: ProcessRequest, *, want_bytes: bool) -> ProcessOutcome:
        """Hash-first: answer from the store alone, or tell the client to upload the photo."""
        started = time.perf_counter()
        with stage("cache lookup", effects=len(request.effects)) as span:
            found = await self.lookup(image_hash, request, want_bytes=want_bytes)
            span.set_attribute("cutout.hits", len(found))
        missing = [name for name in request.effects if name not in found]
        if missing:
            raise ImageNotCached(
                f"no stored result for {', '.join(missing)} of image {image_hash}; upload the photo in `image`"
            )
        note_results(found.values())
        return ProcessOutcome(image_hash, found, {"total": _ms_since(started)})

    async def process(self, upload: bytes, request: ProcessRequest, *, want_bytes: bool = False) -> ProcessOutcome:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        with stage("hash", bytes=len(upload)):
            image_hash = await asyncio.to_thread(image_sha256, upload)
        with stage("cache lookup", effects=len(request.effects)) as span:
            results = await self.lookup(image_hash, request, want_bytes=want_bytes)
            span.set_attribute("cutout.hits", len(results))
        missing = [name for name in request.effects if name not in results]
        if missing:
            self.check_models(request, missing)
            # Held briefly, beside the computation, so an order can keep this photo by its hash (POST /v1/keep).
            held = asyncio.create_task(self._store(upload_object(image_hash), upload, "application/octet-stream"))
            try:
                job = _Job(image_hash, request, missing, want_bytes, timings)
                results.update(await self._compute(upload, job))
            finally:
                await held
        timings["total"] = _ms_since(started)
        note_results(results.values())
        return ProcessOutcome(image_hash, {name: results[name] for name in request.effects}, timings)

    async def _compute(self, upload: bytes, job: _Job) -> dict[str, EffectResult]:
        try:
            try:
                clock = time.perf_counter()
                with stage("decode", bytes=len(upload)) as span:
                    # The photo at the size the answer needs, already on the device: libjpeg-turbo's
                    # reduced DCT scales or nvJPEG (service/codecs.py); the upload maps out-of-memory.
                    loaded = await run_thread(
                        codecs.load,
                        upload,
                        self.settings.max_pixels,
                        job.request.max_size,
                        self.engine.device,
                        self.engine.upload_guarded,
                        job.request.background.needs_mask,
                    )
                    channels, height, width = loaded.image.shape
                    span.set_attribute("cutout.pixels", int(height * width))
                    span.set_attribute("cutout.decoder", loaded.decoder)
                job.timings["decode"] = _ms_since(clock)
                needed = self.engine.working_bytes(
                    height, width, channels, job.request.max_size, mask=job.request.background.needs_mask
                )
                # Handed over in a list the callee empties, so no frame keeps the upload alive
                # once the background step has made the output-size image from it.
                handoff = [loaded.image]
                del loaded
                async with self.memory.reserve(needed):
                    return await self._compute_on_device(handoff, job)
            except BaseExceptionGroup as group:
                raise _first_error(group) from None
        except torch.OutOfMemoryError:  # a step no guard covers: freed here, answered like the guarded ones
            release_device_memory()
            raise

    async def _compute_on_device(self, handoff: list[torch.Tensor], job: _Job) -> dict[str, EffectResult]:
        engine = self.engine
        image_hash, request, timings = job.image_hash, job.request, job.timings
        image = handoff.pop()
        clock = time.perf_counter()
        mask = None
        mask_write: tuple[str, bytes] | None = None
        if request.background.needs_mask:
            with stage("mask") as span:
                mask, mask_write = await self._mask(image_hash, image)
                span.set_attribute("cutout.cache", "hit" if mask_write is None else "miss")
        timings["mask"] = _ms_since(clock)

        clock = time.perf_counter()
        with stage("background", background=request.background.canonical()):
            base = await run_thread(engine.render_background, image, mask, request.background, request.max_size)
        del image, mask
        timings["background"] = _ms_since(clock)

        effect_ms: list[float] = []
        encode_ms: list[float] = []
        store_ms: list[float] = []

        async def finish(name: str, pixels: np.ndarray) -> EffectResult:
            clock = time.perf_counter()
            with stage("encode", format=request.format) as span:
                data = await codecs.encode_async(pixels, request.format, self.settings.png_compress_level)
                span.set_attribute("cutout.bytes", len(data))
            encode_ms.append(_ms_since(clock))
            key = self.result_key(image_hash, name, request)
            clock = time.perf_counter()
            with stage("store", effect=name, bytes=len(data)) as span:
                outcome = await self._store(
                    result_object(key, request.format),
                    data,
                    imaging.OUTPUT_FORMATS[request.format],
                    {"width": str(pixels.shape[1]), "height": str(pixels.shape[0])},
                )
                span.set_attribute("cutout.cache", outcome)
            store_ms.append(_ms_since(clock))
            return EffectResult(
                effect=name,
                key=key,
                url=self.store.result_url(key, request.format),
                cache=outcome,
                content_type=imaging.OUTPUT_FORMATS[request.format],
                width=int(pixels.shape[1]),
                height=int(pixels.shape[0]),
                size=len(data),
                # Kept when the answer carries them (the bytes route, or a data: URL for a result
                # the store could not keep); otherwise let go at once, not at the request's end.
                data=data if job.want_bytes or outcome == "bypass" else None,
            )

        finishing: dict[str, asyncio.Task[EffectResult]] = {}
        async with asyncio.TaskGroup() as group:
            if mask_write is not None:
                group.create_task(self._store(*mask_write, "image/png"))
            # One effect at a time on the one working set; its encode and store overlap the next.
            for name in job.names:
                effect = EFFECTS[name]
                clock = time.perf_counter()
                with stage("effect", effect=name, kind=effect.kind):
                    rendered = await self._apply(effect, base, request)
                    host = await run_thread(engine.download, rendered)
                del rendered
                effect_ms.append(_ms_since(clock))
                finishing[name] = group.create_task(finish(name, host))
                del host
            del base  # the device's share of the request ends here; encodes and stores may still run
        timings["effects"] = round(sum(effect_ms), 2)
        timings["encode"] = round(sum(encode_ms), 2)
        timings["store"] = round(sum(store_ms), 2)
        return {name: task.result() for name, task in finishing.items()}

    async def _apply(self, effect: Effect, image: torch.Tensor, request: ProcessRequest) -> torch.Tensor:
        params = request.params[effect.name]
        if effect.kind == "classic":
            return await run_thread(self.engine.apply_classic, effect, image, params, request.seed)
        if effect.kind == "diffusion":
            return await self.engine.diffuse(effect, image, params, request.seed, request.max_size)
        return image  # cutout: the background step did the work

    async def _mask(self, image_hash: str, image: torch.Tensor) -> tuple[torch.Tensor, tuple[str, bytes] | None]:
        """The subject mask: from the mask cache, or from the model (then the write to cache it)."""
        from effects.inspyrenet import dequantise_mask, quantise_mask

        model_id = self.engine.model_id(CUTOUT)
        if model_id is None:
            raise ModelMissing(f"{CUTOUT} has no weights")
        name = mask_object(image_hash, model_id)
        try:
            stored = await asyncio.to_thread(self.store.get, name)
        except Exception as exc:
            self._store_failed("mask lookup", name, exc)
            stored = None
        if stored is not None:
            quantised = await asyncio.to_thread(masks.decode_mask, stored)
            if quantised is not None:
                mask = dequantise_mask(quantised.to(self.engine.device))
                return mask, None
        model_input = await run_thread(self.engine.prepare_mask_input, image)
        mask = await self.engine.mask(model_input)
        del model_input
        data = await run_thread(masks.encode_mask, quantise_mask(mask))
        return mask, (name, data)

    async def _store(
        self, name: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None
    ) -> CacheOutcome:
        try:
            await run_thread(self.store.put, name, data, content_type, metadata)
        except Exception as exc:
            self._store_failed("write", name, exc)
            return "bypass"
        return "miss"

    def _store_failed(self, action: str, name: str, exc: Exception) -> None:
        # The cache is an optimisation: its failure is logged and counted, never answered.
        self.store_errors += 1
        log.warning("result store %s failed for %s: %s: %s", action, name, exc.__class__.__name__, exc)


async def run_thread(function: Callable[..., T], *args: Any) -> T:
    """`asyncio.to_thread`, except that a cancelled call never leaves its thread running.

    A call not yet started is dropped. One already running cannot be interrupted, so the
    cancelled caller waits for it to end before the cancellation goes on: the request's work
    (and the admission place it holds) ends with its answer, and no write lands after it.
    """
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(context.run(function, *args))
        except BaseException as exc:
            future.set_exception(exc)

    loop.run_in_executor(None, run)
    waiter = asyncio.wrap_future(future)
    try:
        return await asyncio.shield(waiter)
    except asyncio.CancelledError:
        if not future.cancel():  # running: it ends before the cancellation goes on
            await asyncio.wait([waiter])
            if not waiter.cancelled():
                waiter.exception()  # retrieved: the caller is gone, its outcome is moot
        raise


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a failed task group is answered with: the first one the error map answers (a bug else)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = list(error.exceptions)
        else:
            leaves.append(error)
    answered = [leaf for leaf in leaves if answer_for(leaf) is not None]
    # A client's mistake explains the failure better than the engine's (memory, models) it caused.
    answered.sort(key=lambda leaf: not isinstance(leaf, CutoutError))
    return answered[0] if answered else leaves[0]


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 2)
