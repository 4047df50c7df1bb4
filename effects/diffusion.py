"""Diffusion effects: pipelines loaded once at start-up, one job at a time, the cutout's alpha kept.

Each diffusion effect (`upscale`, `enhance`, `comic`, `aged`) is a module holding its `Params`, its
`EFFECT` registry entry and a `DiffusionSpec` (`effects/diffusion_base.py`): which diffusers pipeline
runs it, its fixed prompt pair, its sampler and the largest image it works on. The runtime reads each
spec from the registry entry. This module holds what they share at run time:

- `load_pipeline` reads one pipeline from its directory under `MODELS_DIR` (local safetensors only,
  straight to the device, SDPA attention, no safety checker or watermarker) and embeds the effect's
  fixed prompts once, so a job without a prompt addition never runs a text encoder.
- `run_diffusion` runs one job: RGBA in, RGBA out, alpha carried around the pipeline, the same seed
  giving the same bytes.

diffusers and transformers are imported inside the functions that need them: importing them costs
about four seconds, which the effect registry (and every classic-effect test) should not pay.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import gc
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from effects import EFFECTS, diffusion_spec
from effects.base import MODEL_BUILD_LOCK, check_rgba
from effects.diffusion_base import PIPELINE_CLASS_NAMES, DiffusionParams, DiffusionSpec, Img2ImgParams, UpscaleParams

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

# Transparent pixels are flattened onto mid-grey before diffusion. Mid-grey is 0 in the [-1, 1]
# space the VAE works in, the least informative input it can see: the model neither invents a
# white studio backdrop nor a black void around the subject, and the half-transparent edge pixels
# (whose colour comes back from the pipeline and is re-used under the original alpha) drift towards
# a neutral tone that shows least on whatever background the customer composites onto later.
NEUTRAL_BACKGROUND = 0.5

# Every pipeline here needs sides divisible by 8 (the SD VAEs downsample by 8, the x4 upscaler's
# UNet by 8 in pixel space); the image is padded up and the result cropped back.
SIZE_MULTIPLE = 8


class PipelineUnavailable(RuntimeError):
    """A diffusion effect's pipeline cannot be loaded; that effect answers 503, the others keep working."""

    def __init__(self, effect: str, reason: str) -> None:
        super().__init__(f"diffusion effect {effect!r} is unavailable: {reason}")
        self.effect = effect
        self.reason = reason


# --- Loading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptEmbeddings:
    """A prompt pair run through the text encoder(s); `pooled_*` only for SDXL."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


@dataclass(frozen=True)
class LoadedPipeline:
    """A diffusion pipeline resident on its device, with its effect's fixed prompts already embedded.

    The text encoders stay resident (about 0.25 GB for CLIP ViT-L, 0.7 GB for OpenCLIP ViT-H, 1.4 GB for
    ViT-bigG in fp16) so that a request's `prompt_addition` can be encoded; requests without one reuse
    `embeddings` and never touch them.
    """

    effect: str
    spec: DiffusionSpec
    pipeline: DiffusionPipeline
    device: torch.device
    dtype: torch.dtype
    embeddings: PromptEmbeddings
    load_seconds: float
    weight_bytes: int
    cuda_allocated_delta: int | None

    @property
    def resident_bytes(self) -> int:
        """Bytes of weights this pipeline keeps on its device.

        The parameter count, not the allocator delta: models load in parallel at start-up, so the
        `cuda_allocated_delta` of one pipeline also catches whatever the others allocated meanwhile.
        """
        return self.weight_bytes


def disable_library_progress_bars() -> None:
    # Loading otherwise prints tqdm bars for every component into the service's structured logs.
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _read_model_index(effect_name: str, directory: Path, expected_class: str) -> None:
    if not directory.is_dir():
        raise PipelineUnavailable(
            effect_name,
            f"no pipeline directory at {directory}; build the image with scripts/fetch_weights.py "
            "(or scripts/make_test_weights.py for tests)",
        )
    index_path = directory / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PipelineUnavailable(
            effect_name, f"{index_path} is missing; the pipeline was not saved completely"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineUnavailable(effect_name, f"cannot read {index_path}: {exc}") from exc
    found_class = index.get("_class_name") if isinstance(index, dict) else None
    if found_class != expected_class:
        raise PipelineUnavailable(
            effect_name, f"{directory} holds a {found_class!r} pipeline, expected {expected_class!r}"
        )


def _module_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _weight_bytes(pipeline: DiffusionPipeline) -> int:
    return sum(_module_bytes(c) for c in pipeline.components.values() if isinstance(c, torch.nn.Module))


def _use_sdpa(pipeline: DiffusionPipeline) -> None:
    """Make every attention layer of the UNet and VAE use torch's scaled_dot_product_attention.

    diffusers already picks `AttnProcessor2_0` under torch 2; this checks it and repairs it if a
    saved config or a library default ever says otherwise.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    for name in ("unet", "vae"):
        model = getattr(pipeline, name)
        processors = model.attn_processors
        if processors and not all(isinstance(p, AttnProcessor2_0) for p in processors.values()):
            model.set_attn_processor(AttnProcessor2_0())


def _encode_pair(pipeline: DiffusionPipeline, spec: DiffusionSpec, device: torch.device) -> PromptEmbeddings:
    """Embed the effect's fixed prompt and negative prompt (classifier-free guidance needs both)."""
    with torch.no_grad():
        if spec.kind == "sdxl_img2img":
            embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
                prompt=spec.prompt,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=spec.negative_prompt,
            )
            return PromptEmbeddings(embeds, negative, pooled, negative_pooled)
        embeds, negative = pipeline.encode_prompt(spec.prompt, device, 1, True, spec.negative_prompt)
        return PromptEmbeddings(embeds, negative)


def _encode_with_addition(loaded: LoadedPipeline, addition: str) -> PromptEmbeddings:
    """Embed `<effect prompt>, <addition>`; the negative side is the one embedded at load."""
    prompt = f"{loaded.spec.prompt}, {addition}"
    fixed = loaded.embeddings
    with torch.no_grad():
        if loaded.spec.kind == "sdxl_img2img":
            embeds, _, pooled, _ = loaded.pipeline.encode_prompt(
                prompt=prompt, device=loaded.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return PromptEmbeddings(embeds, fixed.negative_prompt_embeds, pooled, fixed.negative_pooled_prompt_embeds)
        embeds, _ = loaded.pipeline.encode_prompt(prompt, loaded.device, 1, False)
        return PromptEmbeddings(embeds, fixed.negative_prompt_embeds)


# --- Libraries, once per process ------------------------------------------------------------------

_LIBRARIES_LOCK = threading.Lock()
_LIBRARIES_READY = False
_BUILDING = threading.local()

# Read errors that say nothing about the files themselves: worth a retry (a network file system, a
# lazily fetched container image layer). A missing or malformed file is not.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ENOMEM, errno.EBUSY})


class TransientLoadError(RuntimeError):
    """Loading failed for a reason that may pass (a read error, device memory): worth a retry."""


def prepare_libraries(directories: list[Path] | tuple[Path, ...] = ()) -> float:
    """Import diffusers, transformers and accelerate and resolve every class the pipelines need, on this thread.

    Call once before loading pipelines on several threads; later calls return at once. It does what the
    libraries would otherwise do lazily, or process-wide, from whichever loader thread got there first:

    - diffusers and transformers are lazy modules: a class looked up on them while another thread is
      still importing the same submodule is not there yet (`AttributeError: module 'diffusers' has no
      attribute 'StableDiffusionImg2ImgPipeline'`). Every pipeline class, and every component class
      named in the `model_index.json` of `directories`, is resolved here first.
    - building a model patches the process: diffusers sets torch's default dtype and replaces
      `torch.nn.init` and `nn.Module.register_parameter` (accelerate's `init_empty_weights`) for the
      duration; transformers does the same in its own contexts and when it initialises missing
      weights. Two threads doing that at once can leave the patches in place for good. Those contexts
      are wrapped to hold `MODEL_BUILD_LOCK` (the cutout model's builder holds it too), so builds run
      one at a time while weight reads and device copies, outside those contexts, run in parallel.

    Returns the seconds it took (0 when the libraries were ready already).
    """
    global _LIBRARIES_READY
    with _LIBRARIES_LOCK:
        if _LIBRARIES_READY:
            return 0.0
        started = time.perf_counter()
        import accelerate  # noqa: F401  (diffusers imports it lazily inside from_pretrained)
        import diffusers
        import diffusers.models.modeling_utils as diffusers_modeling
        import transformers
        import transformers.modeling_utils as transformers_modeling

        for name in PIPELINE_CLASS_NAMES.values():
            getattr(diffusers, name)
        for effect in EFFECTS.values():
            if effect.diffusion is not None:
                getattr(diffusers, effect.diffusion.scheduler)
        libraries = {"diffusers": diffusers, "transformers": transformers}
        for directory in directories:
            for library, class_name in _component_classes(directory):
                module = libraries.get(library)
                if module is not None:
                    getattr(module, class_name, None)
        from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: F401

        _serialise_builds(diffusers_modeling, transformers_modeling)
        disable_library_progress_bars()
        _LIBRARIES_READY = True
        return time.perf_counter() - started


def _component_classes(directory: Path) -> list[tuple[str, str]]:
    try:
        index = json.loads((directory / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # load_pipeline reports it, naming the effect
    if not isinstance(index, dict):
        return []
    return [
        (str(value[0]), str(value[1]))
        for key, value in index.items()
        if not key.startswith("_") and isinstance(value, list) and len(value) == 2 and None not in value
    ]


def _empty_weights_per_thread() -> None:
    """accelerate's `init_empty_weights`, for the calling thread only.

    accelerate's own replaces `nn.Module.register_parameter` for the whole process while a model is
    built, so a parameter that another thread assigns meanwhile (a pipeline loading its weights in
    parallel) lands on `meta`, empty: "Cannot copy out of meta tensor". Here `register_parameter` is
    replaced once, for good, by one that moves new parameters to `meta` only on a thread that is inside
    `init_empty_weights`; diffusers looks the function up on the accelerate module at each load.
    """
    import accelerate

    if getattr(accelerate.init_empty_weights, "_per_thread", False):
        return
    original_register = torch.nn.Module.register_parameter
    original_init_empty_weights = accelerate.init_empty_weights

    def register_parameter(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original_register(module, name, param)
        device = getattr(_BUILDING, "empty_device", None)
        if device is None or param is None:
            return
        registered = module._parameters[name]
        assert registered is not None
        attributes = dict(registered.__dict__)
        flagged = attributes.pop("_is_hf_initialized", None)
        moved = type(registered)(registered.to(device), requires_grad=param.requires_grad, **attributes)
        if flagged is not None:
            moved._is_hf_initialized = flagged  # type: ignore[attr-defined]
        module._parameters[name] = moved

    @contextlib.contextmanager
    def init_empty_weights(include_buffers: bool | None = None) -> Iterator[None]:
        if include_buffers:  # not what diffusers asks for; keep the library's own behaviour
            with MODEL_BUILD_LOCK, original_init_empty_weights(include_buffers=True):
                yield
            return
        previous = getattr(_BUILDING, "empty_device", None)
        _BUILDING.empty_device = torch.device("meta")
        try:
            yield
        finally:
            _BUILDING.empty_device = previous

    init_empty_weights._per_thread = True  # type: ignore[attr-defined]
    torch.nn.Module.register_parameter = register_parameter  # type: ignore[method-assign, assignment]
    accelerate.init_empty_weights = init_empty_weights


def _serialise_builds(diffusers_modeling: Any, transformers_modeling: Any) -> None:
    """Make the libraries' model-building contexts hold `MODEL_BUILD_LOCK` (see `prepare_libraries`)."""

    def locked(contexts: type[Any], *, apply_dtype: bool) -> type[Any]:
        class Locked(contexts):  # type: ignore[misc]
            def __enter__(self) -> None:
                MODEL_BUILD_LOCK.acquire()
                self._restore_dtype: torch.dtype | None = None
                try:
                    pending = getattr(_BUILDING, "dtype", None) if apply_dtype else None
                    if pending is not None:
                        _BUILDING.dtype = None
                        self._restore_dtype = torch.get_default_dtype()
                        torch.set_default_dtype(pending)
                    super().__enter__()
                except BaseException:
                    self._release()
                    raise

            def __exit__(self, *args: Any, **kwargs: Any) -> Any:
                try:
                    return super().__exit__(*args, **kwargs)
                finally:
                    self._release()

            def _release(self) -> None:
                if self._restore_dtype is not None:
                    torch.set_default_dtype(self._restore_dtype)
                    self._restore_dtype = None
                MODEL_BUILD_LOCK.release()

        Locked.__name__ = Locked.__qualname__ = f"Locked{contexts.__name__}"
        return Locked

    def defer_default_dtype(cls: type[Any], dtype: torch.dtype) -> None:
        # diffusers sets torch's process-wide default dtype before entering its build contexts and
        # restores it after leaving them; here it is set inside them instead, under the lock.
        if not dtype.is_floating_point:
            raise ValueError(f"Can't instantiate {cls.__name__} model under dtype={dtype}: not a floating point dtype")
        _BUILDING.dtype = dtype

    def locked_initialize_weights(original: Any) -> Any:
        def initialize_weights(self: Any) -> Any:
            with MODEL_BUILD_LOCK:  # patches torch.nn.init for the whole process while it runs
                return original(self)

        return initialize_weights

    _empty_weights_per_thread()
    diffusers_modeling.ContextManagers = locked(diffusers_modeling.ContextManagers, apply_dtype=True)
    diffusers_modeling.ModelMixin._set_default_torch_dtype = classmethod(defer_default_dtype)
    transformers_modeling.ContextManagers = locked(transformers_modeling.ContextManagers, apply_dtype=False)
    pretrained = transformers_modeling.PreTrainedModel
    pretrained.initialize_weights = locked_initialize_weights(pretrained.initialize_weights)


# --- Loading, per pipeline -------------------------------------------------------------------------


def load_pipeline(effect_name: str, directory: Path, device: torch.device, dtype: torch.dtype) -> LoadedPipeline:
    """Load one diffusion effect's pipeline from `directory` onto `device`, ready to serve.

    Local files only, safetensors only, `dtype` weights placed straight on `device`; no safety checker
    and no watermarker; SDPA attention; the fixed prompt pair embedded once. Logs one line with the
    load time and resident memory. Raises `PipelineUnavailable` naming the effect and the problem when
    the directory is missing, incomplete, of the wrong pipeline class or its files are broken.
    """
    spec = diffusion_spec(effect_name)
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 diffusion runs on CUDA only; load with dtype=torch.float32 on the CPU")
    _read_model_index(effect_name, directory, spec.pipeline_class_name)

    import diffusers
    from safetensors import SafetensorError

    prepare_libraries((directory,))
    pipeline_class = getattr(diffusers, spec.pipeline_class_name)

    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
    allocated_before = torch.cuda.memory_allocated(device) if on_cuda else 0
    started = time.perf_counter()
    try:
        # Builds hold MODEL_BUILD_LOCK inside (see prepare_libraries); weight reads run in parallel.
        pipeline = pipeline_class.from_pretrained(
            str(directory),
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            # Weights go from the safetensors files straight to the device, not through CPU copies.
            device_map=device.type,
            **spec.pipeline_options,
        )
        pipeline.to(device)
    except torch.OutOfMemoryError as exc:
        raise TransientLoadError(f"{effect_name}: the device ran out of memory while loading: {exc}") from exc
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise TransientLoadError(f"{effect_name}: reading {directory} failed: {exc}") from exc
        raise PipelineUnavailable(effect_name, f"cannot load {directory}: {type(exc).__name__}: {exc}") from exc
    except (ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        raise PipelineUnavailable(effect_name, f"cannot load {directory}: {type(exc).__name__}: {exc}") from exc

    if spec.vae_in_float32 and dtype != torch.float32:
        pipeline.vae.to(dtype=torch.float32)
    if spec.vae_tiling:
        # The x4 upscaler decodes a 512 px input into 2048 px: tiles bound the decoder's activations.
        pipeline.vae.enable_tiling()
    _use_sdpa(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    embeddings = _encode_pair(pipeline, spec, device)

    if on_cuda:
        torch.cuda.synchronize(device)
    load_seconds = time.perf_counter() - started
    cuda_allocated_delta = torch.cuda.memory_allocated(device) - allocated_before if on_cuda else None
    weight_bytes = _weight_bytes(pipeline)
    loaded = LoadedPipeline(
        effect=effect_name,
        spec=spec,
        pipeline=pipeline,
        device=device,
        dtype=dtype,
        embeddings=embeddings,
        load_seconds=load_seconds,
        weight_bytes=weight_bytes,
        cuda_allocated_delta=cuda_allocated_delta,
    )
    logger.info(
        "diffusion pipeline loaded: effect=%s pipeline=%s device=%s dtype=%s seconds=%.2f weight_bytes=%d "
        "cuda_allocated_delta=%s attention=sdpa",
        effect_name,
        spec.pipeline_class_name,
        device,
        str(dtype).removeprefix("torch."),
        load_seconds,
        weight_bytes,
        cuda_allocated_delta,
        extra={
            "effect": effect_name,
            "pipeline": spec.pipeline_class_name,
            "load_seconds": round(load_seconds, 3),
            "weight_bytes": weight_bytes,
            "cuda_allocated_delta_bytes": cuda_allocated_delta,
        },
    )
    return loaded


# --- Running ---------------------------------------------------------------------------------------


def _pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    pad_bottom = -height % multiple
    pad_right = -width % multiple
    if pad_bottom == 0 and pad_right == 0:
        return image
    return F.pad(image, (0, pad_right, 0, pad_bottom), mode="replicate")


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    shrinking = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    resized = F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=shrinking)
    return resized.clamp(0.0, 1.0)


def _job_pipeline(loaded: LoadedPipeline) -> DiffusionPipeline:
    """A shallow copy of the pipeline with its own schedulers.

    Schedulers keep per-run state (timesteps, step index, sigmas) and the pipeline object keeps the
    running job's guidance scale and step count, so two jobs must never share either. The copy shares
    every model (no weights are duplicated) and costs microseconds.
    """
    import diffusers

    pipeline = loaded.pipeline
    job = copy.copy(pipeline)
    scheduler_class = getattr(diffusers, loaded.spec.scheduler)
    job.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    if loaded.spec.kind == "upscale":
        job.low_res_scheduler = type(pipeline.low_res_scheduler).from_config(pipeline.low_res_scheduler.config)
    return job


def _pipeline_arguments(
    loaded: LoadedPipeline, params: DiffusionParams, embeddings: PromptEmbeddings
) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "prompt_embeds": embeddings.prompt_embeds,
        "negative_prompt_embeds": embeddings.negative_prompt_embeds,
        "num_inference_steps": params.steps,
        "guidance_scale": params.guidance_scale,
        "output_type": "pt",
    }
    kind = loaded.spec.kind
    if kind == "upscale":
        if not isinstance(params, UpscaleParams):
            raise TypeError(f"{loaded.effect} needs upscale params with a noise_level, got {type(params).__name__}")
        arguments["noise_level"] = params.noise_level
    else:
        if not isinstance(params, Img2ImgParams):
            raise TypeError(f"{loaded.effect} needs image-to-image params with a strength, got {type(params).__name__}")
        arguments["strength"] = params.strength
    if kind == "sdxl_img2img":
        arguments.update(
            pooled_prompt_embeds=embeddings.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=embeddings.negative_pooled_prompt_embeds,
            aesthetic_score=loaded.spec.aesthetic_score,
            negative_aesthetic_score=loaded.spec.negative_aesthetic_score,
        )
    return arguments


def warm_pipeline(loaded: LoadedPipeline) -> None:
    """One tiny real job (64 px, one denoising step) through the UNet, the VAE and the scheduler.

    Run once after loading (and by `/warmup`) so CUDA kernels and allocator pools exist before the
    first customer's job; the result is thrown away.
    """
    arguments: dict[str, Any] = {
        "prompt_embeds": loaded.embeddings.prompt_embeds,
        "negative_prompt_embeds": loaded.embeddings.negative_prompt_embeds,
        "num_inference_steps": 2,
        "guidance_scale": 2.0,
        "output_type": "pt",
    }
    if loaded.spec.kind == "upscale":
        arguments["noise_level"] = 20
    else:
        arguments["strength"] = 0.5
    if loaded.spec.kind == "sdxl_img2img":
        arguments.update(
            pooled_prompt_embeds=loaded.embeddings.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=loaded.embeddings.negative_pooled_prompt_embeds,
        )
    probe = torch.full((1, 3, 64, 64), NEUTRAL_BACKGROUND, device=loaded.device)
    generator = torch.Generator(device=loaded.device).manual_seed(0)
    _job_pipeline(loaded)(image=probe, generator=generator, **arguments)
    _synchronize(loaded.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_diffusion(
    loaded: LoadedPipeline,
    image: torch.Tensor,
    params: DiffusionParams,
    seed: int,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """Run one diffusion job on a (1, 4, H, W) straight-alpha RGBA image in [0, 1].

    Returns a (1, 4, H', W') float32 RGBA image on the pipeline's device: H', W' = 4 × the capped input
    for `upscale` (alpha resized to match), the input's own size for image-to-image effects (alpha
    untouched). The same seed gives the same bytes on the same device.

    `timings`, when given, receives `prepare_ms`, `pipeline_ms` and `finish_ms`.

    A CUDA out-of-memory error propagates as `torch.cuda.OutOfMemoryError`, re-raised without the
    pipeline's frames (whose tensors would otherwise stay alive with the traceback) and after the
    allocator's cache is released, so the caller can answer 503 and carry on.
    """
    check_rgba(image)
    if image.shape[0] != 1:
        raise ValueError(f"a diffusion job takes one image, got a batch of {image.shape[0]}")
    out_of_memory: str | None = None
    try:
        return _run(loaded, image, params, seed, timings)
    except torch.cuda.OutOfMemoryError as exc:
        out_of_memory = str(exc)
    # Outside the `except` block the original exception and its traceback are gone, so the job's
    # tensors can be collected before the cache is emptied.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise torch.cuda.OutOfMemoryError(f"{loaded.effect}: {out_of_memory}")


def _run(
    loaded: LoadedPipeline,
    image: torch.Tensor,
    params: DiffusionParams,
    seed: int,
    timings: dict[str, float] | None,
) -> torch.Tensor:
    spec = loaded.spec
    device = loaded.device
    started = time.perf_counter()

    rgba = image.to(device=device, dtype=torch.float32)
    alpha = rgba[:, 3:4]
    rgb = rgba[:, :3] * alpha + NEUTRAL_BACKGROUND * (1.0 - alpha)
    height, width = rgb.shape[-2:]
    working_height, working_width = spec.working_size(height, width)
    working = _pad_to_multiple(_resize(rgb, (working_height, working_width)), SIZE_MULTIPLE)

    embeddings = loaded.embeddings
    if params.prompt_addition is not None:
        embeddings = _encode_with_addition(loaded, params.prompt_addition)
    arguments = _pipeline_arguments(loaded, params, embeddings)
    job = _job_pipeline(loaded)
    generator = torch.Generator(device=device).manual_seed(seed)
    if timings is not None:
        _synchronize(device)
        prepared = time.perf_counter()

    result = job(image=working, generator=generator, **arguments).images
    del job, working, arguments
    if timings is not None:
        _synchronize(device)
        diffused = time.perf_counter()

    output_height, output_width = working_height * spec.scale, working_width * spec.scale
    rgb_out = result[:, :, :output_height, :output_width].to(torch.float32)
    if spec.scale == 1:
        rgb_out = _resize(rgb_out, (height, width))
        alpha_out = alpha
    else:
        # Resized from the original alpha, not the capped one, so a capped input loses no edge detail.
        alpha_out = _resize(alpha, (output_height, output_width))
    output = torch.cat([rgb_out, alpha_out], dim=1).contiguous()

    if timings is not None:
        _synchronize(device)
        finished = time.perf_counter()
        timings["prepare_ms"] = (prepared - started) * 1000
        timings["pipeline_ms"] = (diffused - prepared) * 1000
        timings["finish_ms"] = (finished - diffused) * 1000
    return output
