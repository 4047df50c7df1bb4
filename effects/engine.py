"""The engine: owns the device, the loaded models and the GPU work queue.

Mask requests from concurrent uploads are gathered into micro-batches (up to
`mask_batch_size`, waiting at most `mask_batch_wait_ms` for company) and run on one GPU
thread; diffusion jobs run one at a time on a thread of their own, so a long diffusion job
never holds up the short mask batches behind it. Everything between the upload and the
download (resize, normalise, forward, upsample, foreground estimation, compositing,
effects) is tensor work on the engine's device: an image goes to the GPU once and comes back
once per result.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from opentelemetry import context as otel_context
from opentelemetry import trace

from effects import device_time
from effects.background import Background, compose
from effects.base import Effect, EffectParams

if TYPE_CHECKING:
    from effects.inspyrenet import CutoutModel

log = logging.getLogger("cutout.engine")
# The OpenTelemetry API only: a no-op unless the service installed a tracer provider.
_tracer = trace.get_tracer("cutout.engine")
MASK_BATCH_SPAN = "mask batch"
# Peak device memory of one request's tensor work, in units of its (1, 4, h, w) float32 output
# image, on top of the 8-bit upload: measured by scripts/bench_memory.py (docs/capacity.md).
WORKING_SET_FACTOR = 4.0
# Device memory kept out of the requests' budget (docs/capacity.md; L4 estimates, no GPU measured):
# the CUDA context, cuDNN/cuBLAS workspaces and the caching allocator's fragmentation;
DEVICE_RESERVE_BYTES = 1536 * 1024**2
# the activations of one mask batch (SwinB at 1024 px in fp16), per image of the batch;
MASK_FORWARD_BYTES_PER_IMAGE = 300 * 1024**2
# the activations of the one diffusion job that runs at a time, when any pipeline is configured.
DIFFUSION_JOB_BYTES = 3 * 1024**3

CUTOUT = "cutout"
MANIFEST = "model.json"
ModelStatus = Literal["loading", "ready", "missing", "failed"]
# A transient load failure is retried after each of these delays, then the model is `failed`
# until POST /warmup asks again.
RETRY_DELAYS_S = (2.0, 8.0)
# After the cutout model is ready, diffusion loading waits for the storefront's requests to be
# served: no request in flight for this long (longer than the startup probe's period, so the
# requests Cloud Run held for the probe have arrived), or this long at most.
STOREFRONT_QUIET_S = 3.0
STOREFRONT_WAIT_S = 20.0
# Not imported before the cutout model is ready (the storefront's path never needs them).
DIFFUSION_LIBRARIES = ("diffusers", "transformers", "accelerate")


class EngineError(Exception):
    """Base of the engine's own failures; the service maps each to an HTTP answer."""


class ModelNotReady(EngineError):
    """The model is still loading (a cold start): retry shortly."""


class ModelMissing(EngineError):
    """The model's weights are absent or broken: the effects that need it are unavailable."""


class OutOfMemory(EngineError):
    """The device ran out of memory even for a single image; the memory was freed."""


@dataclass
class ModelState:
    name: str
    directory: Path
    status: ModelStatus = "loading"
    detail: str = "loading"
    model_id: str | None = None
    load_seconds: float | None = None
    resident_bytes: int | None = None
    read_bytes: int | None = None  # bytes of weight files read to load it
    attempts: int = 0
    # Seconds since the engine was created: when the weight read started and ended, when it was warm.
    load_started_s: float | None = None
    load_finished_s: float | None = None
    ready_s: float | None = None
    load_timings: dict[str, float] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "detail": self.detail,
            "model_id": self.model_id,
            "load_seconds": self.load_seconds,
            "resident_bytes": self.resident_bytes,
            "read_bytes": self.read_bytes,
            "attempts": self.attempts,
            "load_window_s": [self.load_started_s, self.load_finished_s],
            "ready_s": self.ready_s,
            "load_timings_s": self.load_timings,
        }


def weight_file_bytes(directory: Path) -> int:
    """Bytes of the weight files under a model directory (what loading it reads)."""
    return sum(path.stat().st_size for path in directory.rglob("*.safetensors") if path.is_file())


@dataclass
class _MaskJob:
    image: torch.Tensor
    future: asyncio.Future[torch.Tensor] = field(repr=False)
    span_context: trace.SpanContext = field(default=trace.INVALID_SPAN_CONTEXT, repr=False)
    meter: device_time.DeviceMeter | None = field(default=None, repr=False)  # charged its share of the batch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUTOUT_DEVICE=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def read_model_id(directory: Path) -> str:
    """A model's id comes from the manifest the weight scripts write beside the weights.

    It names the exact weights (with a digest), so results made with other weights never
    share a cache key with these.
    """
    manifest = directory / MANIFEST
    try:
        document = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelMissing(
            f"no weights at {directory} (missing {MANIFEST}); run scripts/fetch_weights.py, "
            "or scripts/make_test_weights.py for random test weights"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ModelMissing(f"unreadable {manifest}: {exc}") from exc
    model_id = document.get("model_id") if isinstance(document, dict) else None
    if not isinstance(model_id, str) or not model_id:
        raise ModelMissing(f"{manifest} has no model_id")
    return model_id


class Engine:
    # An explicit bound on the device memory for requests' tensor work (None: from the device).
    work_memory_limit: int | None = None

    def __init__(
        self,
        *,
        device: str,
        models_dir: Path,
        cutout_model: str,
        diffusion_effects: Sequence[str] = (),
        mask_batch_size: int = 8,
        mask_batch_wait_ms: float = 5.0,
        compile_model: bool = False,
        retry_delays_s: Sequence[float] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.models_dir = models_dir
        self.mask_batch_size = mask_batch_size
        self.mask_batch_wait_s = mask_batch_wait_ms / 1000.0
        self.compile_model = compile_model
        self.retry_delays_s = tuple(RETRY_DELAYS_S if retry_delays_s is None else retry_delays_s)
        self.states: dict[str, ModelState] = {CUTOUT: ModelState(CUTOUT, models_dir / cutout_model)}
        for name in diffusion_effects:
            self.states[name] = ModelState(name, models_dir / name, detail="waiting for the cutout model")
        for state in self.states.values():
            try:
                state.model_id = read_model_id(state.directory)
            except ModelMissing as exc:
                state.status, state.detail = "missing", str(exc)
        self._cutout: CutoutModel | None = None
        self._pipelines: dict[str, Any] = {}
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cutout-gpu")
        self._diffusion = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cutout-diffusion")
        # Weight reads and device copies, one thread per diffusion pipeline (they overlap for real).
        self._loader = ThreadPoolExecutor(max_workers=max(1, len(self.states) - 1), thread_name_prefix="cutout-load")
        self._mask_queue: asyncio.Queue[_MaskJob] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._retries: dict[str, asyncio.Task[None]] = {}
        self.cutout_settled = asyncio.Event()  # set when the cutout model is ready or given up on
        self._stopping = False
        self.created_at = time.monotonic()
        self.cutout_ready_seconds: float | None = None  # process start → the storefront's work can run
        self.cold_start_seconds: float | None = None  # process start → every model settled (ready or not)
        self.libraries_seconds: float | None = None  # importing diffusers & co. once, before the loaders
        # Whether diffusers or transformers had been imported when the cutout model became ready: never,
        # if the storefront's path is as lean as it should be.
        self.diffusion_imported_before_cutout: bool | None = None
        self.batches_run = 0  # mask batches served through the queue
        self.forwards_run = 0  # every real forward of the cutout model, warm-ups included

    # ----------------------------------------------------------------- lifecycle

    async def start(self, storefront_idle: Callable[[], bool] | None = None) -> None:
        """Bring the models up in stages, the storefront's first.

        1. The cutout model loads and runs its warm forward alone: the moment it is warm, the cutout
           and every classic effect can serve (`ready`), and nothing of diffusers or transformers has
           been imported yet. The next stage waits until `storefront_idle()` has held for
           `STOREFRONT_QUIET_S` (at most `STOREFRONT_WAIT_S`): the requests that woke the instance,
           held by Cloud Run until the startup probe passed, are served before anything competes
           with them for the CPU.
        2. diffusers, transformers and accelerate are imported and every pipeline class resolved once,
           on one thread (their lazy modules are not safe to race).
        3. The diffusion pipelines load in parallel, one thread each, and each effect becomes available
           when its pipeline has run its warm forward.

        A transient failure (a read error, device memory) is retried after each of `retry_delays_s`;
        absent or corrupt weights are not. Neither stops the other models.
        """
        self._worker = asyncio.create_task(self._mask_worker(), name="cutout-mask-batcher")
        cutout = self.states[CUTOUT]
        if cutout.status == "loading":
            await self._bring_up(cutout)
        self.cutout_ready_seconds = round(time.monotonic() - self.created_at, 3)
        self.cutout_settled.set()
        self.diffusion_imported_before_cutout = any(name in sys.modules for name in DIFFUSION_LIBRARIES)
        log.info(
            "cutout model %s after %.2f s; diffusers imported before it: %s",
            cutout.status,
            self.cutout_ready_seconds,
            self.diffusion_imported_before_cutout,
            extra={
                "model": CUTOUT,
                "status": cutout.status,
                "cutout_ready_s": self.cutout_ready_seconds,
                "diffusion_imported_before_cutout": self.diffusion_imported_before_cutout,
                "load_timings_s": cutout.load_timings,
            },
        )
        pending = [state for name, state in self.states.items() if name != CUTOUT and state.status == "loading"]
        if pending:
            if storefront_idle is not None and cutout.status == "ready":
                await wait_quiet(storefront_idle, STOREFRONT_QUIET_S, STOREFRONT_WAIT_S)
            for state in pending:
                state.detail = "loading"
            if await self._prepare_libraries(pending):
                await asyncio.gather(*(self._bring_up(state) for state in pending))
        self.cold_start_seconds = time.monotonic() - self.created_at
        log.info(
            "engine started",
            extra={"cold_start_s": round(self.cold_start_seconds, 3), "models": self.describe_models()},
        )

    async def _prepare_libraries(self, pending: list[ModelState]) -> bool:
        from effects.diffusion import prepare_libraries

        loop = asyncio.get_running_loop()
        try:
            seconds = await loop.run_in_executor(
                self._loader, prepare_libraries, tuple(state.directory for state in pending)
            )
        except Exception as exc:
            for state in pending:
                state.status, state.detail = "failed", f"importing the diffusion libraries failed: {exc!r}"
            log.exception("importing the diffusion libraries failed; diffusion effects are unavailable")
            return False
        self.libraries_seconds = round(seconds, 3)
        log.info("diffusion libraries imported in %.2f s", seconds, extra={"libraries_s": self.libraries_seconds})
        return True

    async def stop(self) -> None:
        """Stop the workers without blocking the event loop.

        A forward or a weight read already running on a worker thread cannot be interrupted; it is left
        to finish on its own (the process exits past it), and nothing queued behind it starts.
        """
        self._stopping = True
        tasks = [task for task in (self._worker, *self._retries.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pool in (self._gpu, self._diffusion, self._loader):
            pool.shutdown(wait=False, cancel_futures=True)

    async def _bring_up(self, state: ModelState) -> None:
        """Load and warm one model, retrying transient failures after each of `retry_delays_s`."""
        delays = list(self.retry_delays_s)
        attempt = 0
        while not self._stopping:
            attempt += 1
            state.status, state.attempts = "loading", attempt
            try:
                await self._load_and_warm(state)
            except ModelMissing as exc:
                state.status, state.detail = "missing", str(exc)
                log.error("model %s unavailable: %s", state.name, exc)
                return
            except Exception as exc:
                reason = f"{exc.__class__.__name__}: {exc}"
                if delays and not self._stopping:
                    delay = delays.pop(0)
                    state.detail = f"attempt {attempt} failed ({reason}); retrying in {delay:g} s"
                    log.warning("model %s: %s", state.name, state.detail)
                    await asyncio.sleep(delay)
                    continue
                # A broken model must not take the service down: the effects that need it are
                # reported unavailable, everything else keeps working, and /warmup tries again.
                state.status, state.detail = "failed", f"{reason} (after {attempt} attempt(s); POST /warmup retries)"
                log.error("model %s failed after %d attempt(s): %s", state.name, attempt, reason, exc_info=exc)
                return
            state.status, state.detail = "ready", "loaded and warm"
            state.ready_s = round(time.monotonic() - self.created_at, 3)
            return

    async def _load_and_warm(self, state: ModelState) -> None:
        loop = asyncio.get_running_loop()
        loaded = self._pipelines.get(state.name) if state.name != CUTOUT else self._cutout
        if loaded is None:  # a retry after a failed warm-up keeps what was loaded
            state.detail = "loading"
            await loop.run_in_executor(self._loader, self._load, state)
        state.detail = "loaded, warming up"
        started = time.perf_counter()
        if state.name == CUTOUT:
            await self._warm_cutout()
        else:
            from effects.diffusion import warm_pipeline

            await loop.run_in_executor(self._diffusion, warm_pipeline, self._pipelines[state.name])
        state.load_timings["warm_forward_s"] = round(time.perf_counter() - started, 4)

    def _load(self, state: ModelState) -> None:
        """Read one model's weights onto the device (a loader thread). Raises ModelMissing when they are
        absent or corrupt; any other exception is worth a retry."""
        started = time.perf_counter()
        state.load_started_s = round(time.monotonic() - self.created_at, 3)
        log.info("loading model %s", state.name, extra={"model": state.name, "phase": "load_start"})
        if state.name == CUTOUT:
            from effects.inspyrenet import ModelLoadError, load_cutout_model

            try:
                cutout = load_cutout_model(
                    state.directory / "model.safetensors", self.device, self.dtype, compile_model=self.compile_model
                )
            except ModelLoadError as exc:
                raise ModelMissing(str(exc)) from exc
            state.resident_bytes = cutout.resident_bytes
            state.read_bytes = cutout.weight_file_bytes
            state.load_timings.update(cutout.load_timings)
            self._cutout = cutout
        else:
            from effects.diffusion import PipelineUnavailable, load_pipeline

            try:
                loaded = load_pipeline(state.name, state.directory, self.device, self.dtype)
            except PipelineUnavailable as exc:
                raise ModelMissing(str(exc)) from exc
            state.resident_bytes = loaded.resident_bytes
            state.read_bytes = weight_file_bytes(state.directory)
            state.load_timings["load_s"] = round(loaded.load_seconds, 4)
            self._pipelines[state.name] = loaded
        state.load_seconds = round(time.perf_counter() - started, 3)
        state.load_finished_s = round(time.monotonic() - self.created_at, 3)
        log.info(
            "model loaded",
            extra={
                "model": state.name,
                "phase": "load_end",
                "load_s": state.load_seconds,
                "load_window_s": [state.load_started_s, state.load_finished_s],
                "read_bytes": state.read_bytes,
                "resident_bytes": state.resident_bytes,
            },
        )

    async def warmup(self) -> dict[str, float]:
        """One tiny real forward through every ready model; returns milliseconds per model.

        Models whose loading failed for a transient reason are loaded again, in the background; their
        state says so. Models still loading are left alone.
        """
        timings: dict[str, float] = {}
        for name, state in self.states.items():
            if state.status == "failed":
                self.retry(name)
                continue
            if state.status != "ready":
                continue
            started = time.perf_counter()
            try:
                if name == CUTOUT:
                    await self._warm_cutout()
                else:
                    from effects.diffusion import warm_pipeline

                    loaded = self._pipelines[name]
                    await asyncio.get_running_loop().run_in_executor(self._diffusion, warm_pipeline, loaded)
            except Exception as exc:
                log.warning("model %s failed a warm-up forward (%s); it stays in service", name, exc)
                continue
            timings[name] = round((time.perf_counter() - started) * 1000.0, 2)
        return timings

    def retry(self, name: str) -> bool:
        """Load a failed model again in the background; False if it is not failed or a retry runs."""
        state = self.states[name]
        running = self._retries.get(name)
        if state.status != "failed" or (running is not None and not running.done()) or self._stopping:
            return False
        state.status, state.detail = "loading", "loading again (POST /warmup)"
        self._retries[name] = asyncio.create_task(self._retry(state), name=f"cutout-retry-{name}")
        return True

    async def _retry(self, state: ModelState) -> None:
        if state.name != CUTOUT:
            from effects.diffusion import prepare_libraries

            try:
                await asyncio.get_running_loop().run_in_executor(self._loader, prepare_libraries, (state.directory,))
            except Exception as exc:
                state.status, state.detail = "failed", f"importing the diffusion libraries failed: {exc!r}"
                return
        await self._bring_up(state)

    async def _warm_cutout(self) -> None:
        # A real forward through every layer on the GPU thread: at model size on CUDA (kernels
        # chosen, memory reserved for the real shape), small on the CPU where size warms nothing.
        model = self._require_cutout()
        await asyncio.get_running_loop().run_in_executor(self._gpu, model.warm_up)
        self.forwards_run += 1

    # ----------------------------------------------------------------- status

    @property
    def ready(self) -> bool:
        """The storefront's work can run: the cutout model is warm (classic effects need no model)."""
        return self.states[CUTOUT].status == "ready"

    @property
    def all_ready(self) -> bool:
        return all(state.status == "ready" for state in self.states.values())

    def describe_models(self) -> dict[str, dict[str, Any]]:
        return {name: state.describe() for name, state in self.states.items()}

    def describe_startup(self) -> dict[str, Any]:
        """The staged start in figures, for /ready and /warmup."""
        return {
            "cutout_ready_s": self.cutout_ready_seconds,
            "all_models_settled_s": None if self.cold_start_seconds is None else round(self.cold_start_seconds, 3),
            "diffusion_libraries_s": self.libraries_seconds,
            "diffusion_imported_before_cutout": self.diffusion_imported_before_cutout,
        }

    def effect_state(self, effect: Effect) -> ModelStatus | Literal["ready"]:
        """What an effect can do now: a classic effect is always ready; a model effect follows its model."""
        if effect.model is None:
            return "ready"
        state = self.states.get(CUTOUT if effect.model == CUTOUT else effect.name)
        return "missing" if state is None else state.status

    def model_id(self, model: str) -> str | None:
        state = self.states.get(model)
        return state.model_id if state is not None else None

    def check_available(self, effect: Effect) -> None:
        """Raise when an effect cannot run now: still loading, or its weights are absent."""
        if effect.model is None:
            return
        model = CUTOUT if effect.model == CUTOUT else effect.name
        self.check_model(model)

    def check_model(self, model: str) -> None:
        state = self.states.get(model)
        if state is None:
            raise ModelMissing(f"{model} is not configured on this service")
        if state.status == "loading":
            raise ModelNotReady(f"{model} is still loading ({state.detail}); retry in a few seconds")
        if state.status in ("missing", "failed"):
            raise ModelMissing(f"{model} is unavailable: {state.detail}")

    def is_available(self, effect: Effect) -> bool:
        try:
            self.check_available(effect)
        except EngineError:
            return False
        return True

    def _require_cutout(self) -> CutoutModel:
        if self._cutout is None:
            raise ModelMissing(f"{CUTOUT} is unavailable: {self.states[CUTOUT].detail}")
        return self._cutout

    # ----------------------------------------------------------------- tensor work (call from worker threads)

    def upload(self, pixels: np.ndarray) -> torch.Tensor:
        """(H, W, C) uint8 on the host → (C, H, W) uint8 on the device: the one upload."""
        with warnings.catch_warnings():
            # Decoded pixels are read-only views; they are only ever copied from, never written.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(pixels).permute(2, 0, 1)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.contiguous()

    def prepare_mask_input(self, image: torch.Tensor) -> torch.Tensor:
        with device_memory_guard("preparing the mask input"), device_time.metered(self.device):
            return self._require_cutout().prepare(image[:3])

    def render_background(
        self, image: torch.Tensor, mask: torch.Tensor | None, background: Background, max_size: int
    ) -> torch.Tensor:
        """The uploaded image at output size with its background treated: (1, 4, h, w) float.

        The upload is brought to the output size one channel at a time, so the float work never
        holds more than one full-size plane next to the 8-bit upload: for a 12 MP photo at
        max_size 2048 that is 48 MB instead of a 192 MB RGBA float copy. Each channel is resized
        on its own either way, so the pixels are the same as resizing all four at once.
        """
        height, width = output_size(image.shape[1], image.shape[2], max_size)
        with (
            device_memory_guard("compositing the background"),
            device_time.metered(self.device),
            torch.inference_mode(),
        ):
            pixels = torch.empty((1, image.shape[0], height, width), dtype=torch.float32, device=image.device)
            if (height, width) == (image.shape[1], image.shape[2]):
                pixels[0].copy_(image).div_(255.0)  # already the output size: converted in place
            else:
                for channel in range(image.shape[0]):
                    plane = image[channel].view(1, 1, *image.shape[1:]).to(torch.float32).div_(255.0)
                    pixels[:, channel : channel + 1] = F.interpolate(
                        plane, size=(height, width), mode="bilinear", antialias=True, align_corners=False
                    )
                    del plane
            rgb = pixels[:, :3].clamp_(0.0, 1.0)
            source_alpha = pixels[:, 3:4].clamp_(0.0, 1.0) if image.shape[0] == 4 else None
            alpha = None
            if mask is not None:
                alpha = self._require_cutout().to_alpha(mask, height, width).to(torch.float32)
            return compose(rgb, alpha, source_alpha, background)

    def apply_classic(self, effect: Effect, image: torch.Tensor, params: EffectParams, seed: int) -> torch.Tensor:
        if effect.apply is None:
            raise ValueError(f"{effect.name} is not a classic effect")
        with device_memory_guard(f"running {effect.name}"), device_time.metered(self.device), torch.inference_mode():
            return effect.apply(image, params, seed)

    def download(self, image: torch.Tensor) -> np.ndarray:
        """(1, 4, h, w) float on the device → (h, w, 4) uint8 on the host: the one download."""
        with device_memory_guard("downloading the result"), device_time.metered(self.device), torch.inference_mode():
            quantised = image[0].clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)  # one float copy
            return np.ascontiguousarray(quantised.permute(1, 2, 0).cpu().numpy())

    def upload_guarded(self, pixels: np.ndarray) -> torch.Tensor:
        """`upload`, with the device running out of memory answered as `OutOfMemory`."""
        with device_memory_guard("uploading the photo"), device_time.metered(self.device):
            return self.upload(pixels)

    def working_bytes(self, height: int, width: int, channels: int, max_size: int, *, mask: bool) -> int:
        """The most device memory one request holds at once, from its sizes alone.

        Effects run one after another, so this does not grow with their number: the 8-bit
        upload, the float output image and the most one step needs next to them (a classic
        effect's planes, or the background's foreground estimate), plus the mask's model input.
        `WORKING_SET_FACTOR` is measured by `scripts/bench_memory.py` (docs/capacity.md).
        """
        out_h, out_w = output_size(height, width, max_size)
        upload = height * width * channels
        image = out_h * out_w * 4 * 4  # (1, 4, h, w) float32
        total = upload + int(WORKING_SET_FACTOR * image)
        if mask and self._cutout is not None:
            side = int(self._cutout.base_size)
            total += 3 * side * side * 4 * 2 + height * width * 3 * 4  # model input, float resize on CUDA
        return total

    def work_memory_bytes(self) -> int | None:
        """Device memory requests' tensor work may hold at once (`MemoryBudget`'s capacity).

        On CUDA: the device's memory less the resident weights of every loaded model, the
        context's reserve, one mask batch's activations and (with diffusion effects configured)
        one diffusion job's: those run one at a time on their own threads, outside the budget.
        Elsewhere None (unbounded) unless `work_memory_limit` is set.
        """
        if self.work_memory_limit is not None:
            return self.work_memory_limit
        if self.device.type != "cuda":
            return None
        total = int(torch.cuda.get_device_properties(self.device).total_memory)
        resident = sum(state.resident_bytes or 0 for state in self.states.values())
        shared = DEVICE_RESERVE_BYTES + self.mask_batch_size * MASK_FORWARD_BYTES_PER_IMAGE
        if len(self.states) > 1:
            shared += DIFFUSION_JOB_BYTES
        return max(0, total - resident - shared)

    # ----------------------------------------------------------------- the GPU queue

    async def mask(self, model_input: torch.Tensor) -> torch.Tensor:
        """The subject probability map of one prepared image, computed in a micro-batch.

        Returns a (1, 1, S, S) float tensor on the device, already quantised to 16 bits,
        exactly as it is stored in and read back from the mask cache.
        """
        self._require_cutout()
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        job = _MaskJob(model_input, future, trace.get_current_span().get_span_context(), device_time.current())
        await self._mask_queue.put(job)
        return await future

    async def _mask_worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._mask_queue.get()]
            deadline = loop.time() + self.mask_batch_wait_s
            while len(batch) < self.mask_batch_size:
                try:
                    batch.append(self._mask_queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(remaining, 0.001))
            jobs = [job for job in batch if not job.future.done()]
            if not jobs:
                continue
            # Images of different aspect ratios can have different model input shapes.
            groups: dict[tuple[int, ...], list[_MaskJob]] = {}
            for job in jobs:
                groups.setdefault(tuple(job.image.shape), []).append(job)
            for group in groups.values():
                # A batch serves several requests: its own trace, linked to each request it serves.
                with _tracer.start_as_current_span(
                    MASK_BATCH_SPAN,
                    context=otel_context.Context(),
                    links=[trace.Link(job.span_context) for job in group if job.span_context.is_valid],
                    attributes={
                        "cutout.batch_size": len(group),
                        "cutout.input_size": int(group[0].image.shape[-1]),
                        "cutout.device": str(self.device),
                    },
                ) as span:
                    try:
                        results, work = await loop.run_in_executor(
                            self._gpu, self._timed_forward, [j.image for j in group]
                        )
                    except Exception as exc:
                        span.set_status(trace.Status(trace.StatusCode.ERROR, exc.__class__.__name__))
                        for job in group:
                            if not job.future.done():
                                job.future.set_exception(exc)
                        continue
                    work.charge([job.meter for job in group])  # one equal share per image
                    if work.known_seconds is not None:
                        span.set_attribute("cutout.device_seconds", work.known_seconds)
                    for job, result in zip(group, results, strict=True):
                        if not job.future.done():
                            job.future.set_result(result)

    def _timed_forward(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], device_time.DeviceWork]:
        """A batch on the GPU thread, with its device time (not the time it queued for the thread)."""
        with device_time.DeviceWork(self.device) as work:
            results = self._forward_split(images)
        return results, work

    def _forward_split(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run a batch; on out-of-memory free what we can and retry it in halves."""
        try:
            return self._forward(images)
        except torch.OutOfMemoryError as exc:
            release_device_memory()
            if len(images) == 1:
                raise OutOfMemory("the GPU ran out of memory for this image; retry shortly") from exc
            half = len(images) // 2
            log.warning("out of memory on a batch of %d; retrying in halves", len(images))
            return self._forward_split(images[:half]) + self._forward_split(images[half:])

    def _forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        from effects.inspyrenet import dequantise_mask, quantise_mask

        model = self._require_cutout()
        batch = torch.stack(images)
        probabilities = model.forward(batch)
        self.batches_run += 1
        self.forwards_run += 1
        return [dequantise_mask(quantise_mask(p.unsqueeze(0))) for p in probabilities]

    async def diffuse(
        self, effect: Effect, image: torch.Tensor, params: EffectParams, seed: int, max_size: int
    ) -> torch.Tensor:
        """Run a diffusion effect, one job at a time on the diffusion thread.

        `max_size` bounds the output's long side for effects that enlarge (the 4x upscaler):
        their input is shrunk first, so the request's max_size holds for every result.
        """
        from effects import diffusion_spec
        from effects.diffusion import run_diffusion
        from effects.diffusion_base import DiffusionParams

        self.check_available(effect)
        loaded = self._pipelines[effect.name]
        if not isinstance(params, DiffusionParams):
            raise TypeError(f"{effect.name} expects diffusion parameters, got {type(params).__name__}")
        spec = diffusion_spec(effect.name)
        meter = device_time.current()  # the job runs on the diffusion thread, outside the request's context

        def job() -> torch.Tensor:
            with device_memory_guard(f"running {effect.name}"), device_time.metered(self.device, meter):
                source = image
                height, width = spec.output_size(image.shape[-2], image.shape[-1])
                if max(height, width) > max_size:
                    scale = max_size / max(height, width)
                    size = (max(1, int(image.shape[-2] * scale)), max(1, int(image.shape[-1] * scale)))
                    with torch.inference_mode():
                        source = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
                return run_diffusion(loaded, source, params, seed)

        return await asyncio.get_running_loop().run_in_executor(self._diffusion, job)


async def wait_quiet(idle: Callable[[], bool], quiet_s: float, at_most_s: float) -> None:
    """Return once `idle()` has held for `quiet_s` in a row, or after `at_most_s` whatever happens."""
    loop = asyncio.get_running_loop()
    started = quiet_since = loop.time()
    while loop.time() - started < at_most_s:
        if not idle():
            quiet_since = loop.time()
        elif loop.time() - quiet_since >= quiet_s:
            return
        await asyncio.sleep(0.05)


def output_size(height: int, width: int, max_size: int) -> tuple[int, int]:
    """Scale the long side down to `max_size`; never up."""
    longest = max(height, width)
    if longest <= max_size:
        return height, width
    scale = max_size / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def release_device_memory() -> None:
    gc.collect()  # tensors held by the failed frame's traceback go first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def device_memory_guard(doing: str) -> Iterator[None]:
    """Answer the device running out of memory, anywhere in tensor work, as `OutOfMemory`.

    The memory the failed step held is released before the error leaves (the traceback that
    pins its tensors is dropped first), so the next request starts with a clean device.
    """
    try:
        yield
    except torch.OutOfMemoryError:
        failed = True
    else:
        failed = False
    if failed:  # outside the except block: its traceback (and the tensors its frames hold) is gone
        release_device_memory()
        raise OutOfMemory(f"the GPU ran out of memory {doing}; retry shortly")
