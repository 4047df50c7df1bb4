"""Diffusion effects through the real loading and running code, on tiny random pipelines (CPU).

The pipelines are written by `tests/support/weights.py` in the serving layout and read back by
`load_pipeline` exactly as the service does; only the model sizes are tiny.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from effects import DIFFUSION_EFFECTS, EFFECTS, comic, diffusion_spec, enhance
from effects.base import EffectParams
from effects.diffusion import LoadedPipeline, PipelineUnavailable, load_pipeline, run_diffusion, warm_pipeline
from effects.diffusion_base import DiffusionParams
from effects.inspyrenet import MANIFEST_FILE
from effects.weights import fetch_pipelines
from tests.support.weights import write_tiny_pipelines

CPU = torch.device("cpu")


def upscales(effect: str) -> bool:
    return diffusion_spec(effect).kind == "upscale"


def fast_params(effect: str, **overrides: Any) -> DiffusionParams:
    """The fewest steps each effect's bounds allow, so a job takes a fraction of a second."""
    values: dict[str, Any] = {"steps": 5} if upscales(effect) else {"steps": 10, "strength": 0.3}
    values.update(overrides)
    params = EFFECTS[effect].params(**values)
    assert isinstance(params, DiffusionParams)
    return params


def cutout_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """An RGBA cutout: coloured subject, fully transparent 4 px border, a half-transparent edge column."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand((1, 4, height, width), generator=generator)
    image[:, 3] = 0.0
    image[:, 3, 4:-4, 4:-4] = 1.0
    image[:, 3, 4:-4, 4] = 0.5
    return image


@pytest.fixture(scope="module")
def diffusion_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    write_tiny_pipelines(directory, DIFFUSION_EFFECTS, seed=0)
    return directory


@pytest.fixture(scope="module")
def pipelines(diffusion_models_dir: Path) -> dict[str, LoadedPipeline]:
    return {
        effect: load_pipeline(effect, diffusion_models_dir / effect, CPU, torch.float32) for effect in DIFFUSION_EFFECTS
    }


# Upscale works in pixel space at 4×: a smaller input keeps its job as quick as the others.
INPUT_SIZES = {effect: (16, 24) if upscales(effect) else (32, 48) for effect in DIFFUSION_EFFECTS}


@pytest.fixture(scope="module")
def first_results(pipelines: dict[str, LoadedPipeline]) -> dict[str, torch.Tensor]:
    return {
        effect: run_diffusion(pipelines[effect], cutout_image(*INPUT_SIZES[effect]), fast_params(effect), seed=7)
        for effect in DIFFUSION_EFFECTS
    }


# --- Loading ------------------------------------------------------------------------------------


def test_tiny_pipelines_are_written_in_the_serving_layout(diffusion_models_dir: Path) -> None:
    for effect in DIFFUSION_EFFECTS:
        directory = diffusion_models_dir / effect
        assert (directory / "model_index.json").is_file()
        assert (directory / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (directory / "vae" / "diffusion_pytorch_model.safetensors").is_file()
        assert not list(directory.rglob("*.bin")), "weights must be safetensors only"
        manifest = (directory / MANIFEST_FILE).read_text(encoding="utf-8")
        assert f'"model_id": "{effect}-' in manifest
    assert (diffusion_models_dir / "enhance" / "text_encoder_2" / "model.safetensors").is_file()
    assert not (diffusion_models_dir / "enhance" / "text_encoder").exists(), (
        "the SDXL refiner has no first text encoder"
    )
    assert (diffusion_models_dir / "upscale" / "low_res_scheduler" / "scheduler_config.json").is_file()


def test_loaded_pipelines_are_ready_to_serve(pipelines: dict[str, LoadedPipeline]) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    for effect, loaded in pipelines.items():
        pipeline = loaded.pipeline
        assert type(pipeline).__name__ == diffusion_spec(effect).pipeline_class_name
        for model in (pipeline.unet, pipeline.vae):
            assert all(isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values())
        parameter_bytes = sum(
            t.numel() * t.element_size()
            for c in pipeline.components.values()
            if isinstance(c, torch.nn.Module)
            for t in [*c.parameters(), *c.buffers()]
        )
        assert loaded.weight_bytes == parameter_bytes == loaded.resident_bytes > 0
        assert loaded.load_seconds > 0
        assert loaded.cuda_allocated_delta is None
        assert loaded.embeddings.prompt_embeds.shape == loaded.embeddings.negative_prompt_embeds.shape
        assert pipeline.unet.device == CPU and pipeline.unet.dtype == torch.float32
    assert pipelines["comic"].pipeline.safety_checker is None
    assert pipelines["aged"].pipeline.safety_checker is None
    assert pipelines["upscale"].pipeline.safety_checker is None
    assert pipelines["upscale"].pipeline.watermarker is None
    assert pipelines["enhance"].pipeline.watermark is None
    assert pipelines["enhance"].embeddings.pooled_prompt_embeds is not None
    assert pipelines["upscale"].pipeline.vae.use_tiling


def test_load_logs_one_line_with_time_and_memory(diffusion_models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="effects.diffusion"):
        loaded = load_pipeline("comic", diffusion_models_dir / "comic", CPU, torch.float32)
    records = [r for r in caplog.records if r.name == "effects.diffusion"]
    assert len(records) == 1
    record = records[0]
    assert record.effect == "comic"  # type: ignore[attr-defined]
    assert record.weight_bytes == loaded.weight_bytes  # type: ignore[attr-defined]
    assert "seconds=" in record.getMessage() and f"weight_bytes={loaded.weight_bytes}" in record.getMessage()


def test_missing_directory_makes_only_that_effect_unavailable(diffusion_models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineUnavailable) as caught:
        load_pipeline("comic", tmp_path / "nowhere" / "comic", CPU, torch.float32)
    assert caught.value.effect == "comic"
    assert "comic" in str(caught.value) and str(tmp_path / "nowhere" / "comic") in str(caught.value)
    assert "fetch_weights" in str(caught.value)
    # The other effects load and run as before.
    loaded = load_pipeline("aged", diffusion_models_dir / "aged", CPU, torch.float32)
    result = run_diffusion(loaded, cutout_image(32, 48), fast_params("aged"), seed=1)
    assert result.shape == (1, 4, 32, 48)


def test_corrupt_weights_are_a_clear_load_error(diffusion_models_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "comic"
    shutil.copytree(diffusion_models_dir / "comic", broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(PipelineUnavailable) as caught:
        load_pipeline("comic", broken, CPU, torch.float32)
    assert caught.value.effect == "comic"
    assert "cannot load" in caught.value.reason and str(broken) in caught.value.reason


def test_incomplete_or_wrong_pipeline_directories_are_refused(diffusion_models_dir: Path, tmp_path: Path) -> None:
    incomplete = tmp_path / "aged"
    shutil.copytree(diffusion_models_dir / "aged", incomplete)
    (incomplete / "model_index.json").unlink()
    with pytest.raises(PipelineUnavailable, match=r"model_index\.json is missing"):
        load_pipeline("aged", incomplete, CPU, torch.float32)
    with pytest.raises(PipelineUnavailable, match="holds a 'StableDiffusionImg2ImgPipeline' pipeline, expected"):
        load_pipeline("enhance", diffusion_models_dir / "comic", CPU, torch.float32)


def test_unknown_effect_and_cpu_half_precision_are_refused(diffusion_models_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a diffusion effect"):
        load_pipeline("popart", diffusion_models_dir / "comic", CPU, torch.float32)
    with pytest.raises(ValueError, match="float16 diffusion runs on CUDA only"):
        load_pipeline("comic", diffusion_models_dir / "comic", CPU, torch.float16)


def test_fetch_saves_fp16_safetensors_with_the_vae_swapped(diffusion_models_dir: Path, tmp_path: Path) -> None:
    # The image-build path, offline: local directories stand in for the Hub repositories (they have no
    # fp16 variant, like the upscaler's and Ghibli's, so the fp32-and-convert fallback runs too).
    sources = tmp_path / "sources"
    write_tiny_pipelines(sources, ("enhance", "comic"), seed=1)
    served = tmp_path / "served"
    written = fetch_pipelines(
        served,
        ["enhance", "comic"],
        {"enhance": str(sources / "enhance"), "comic": str(sources / "comic")},
        vae_ids={"enhance": str(diffusion_models_dir / "enhance" / "vae")},
    )
    assert set(written) == {"enhance", "comic"}
    from safetensors import safe_open

    for effect in written:
        assert not list((served / effect).rglob("*.bin")) and not list((served / effect).rglob("*fp16*"))
        with safe_open(str(served / effect / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
            assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16
        assert "model_id" in (served / effect / MANIFEST_FILE).read_text(encoding="utf-8")
    # The swapped-in VAE (seed 0) replaced the source pipeline's own (seed 1).
    with (
        safe_open(str(served / "enhance" / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as fetched,
        safe_open(str(diffusion_models_dir / "enhance" / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as vae,
    ):
        name = next(iter(vae.keys()))
        assert torch.equal(fetched.get_tensor(name), vae.get_tensor(name).half())
    loaded = load_pipeline("comic", served / "comic", CPU, torch.float32)
    assert run_diffusion(loaded, cutout_image(32, 48), fast_params("comic"), seed=0).shape == (1, 4, 32, 48)


# --- Running ------------------------------------------------------------------------------------


@pytest.mark.parametrize("effect", DIFFUSION_EFFECTS)
def test_result_size_range_and_alpha(
    effect: str, first_results: dict[str, torch.Tensor], pipelines: dict[str, LoadedPipeline]
) -> None:
    height, width = INPUT_SIZES[effect]
    image = cutout_image(height, width)
    result = first_results[effect]
    assert result.dtype == torch.float32 and result.device == CPU
    assert torch.isfinite(result).all()
    assert result.min() >= 0.0 and result.max() <= 1.0
    if effect == "upscale":
        assert result.shape == (1, 4, 4 * height, 4 * width)
        expected_alpha = F.interpolate(image[:, 3:], size=(4 * height, 4 * width), mode="bicubic", align_corners=False)
        torch.testing.assert_close(result[:, 3:], expected_alpha.clamp(0, 1))
        assert result[:, 3, :8, :].max() < 0.05, "the transparent border stays transparent"
        assert result[:, 3, 24:40, 24:72].min() > 0.95, "the subject stays opaque"
    else:
        assert result.shape == (1, 4, height, width)
        assert torch.equal(result[:, 3:], image[:, 3:]), "image-to-image effects never touch alpha"
    # The pipeline changed the colours: the result is not the input handed back.
    if effect != "upscale":
        opaque = (image[:, 3:] == 1.0).expand(-1, 3, -1, -1)
        assert not torch.allclose(result[:, :3][opaque], image[:, :3][opaque])
    assert diffusion_spec(effect).output_size(height, width) == tuple(result.shape[-2:])


@pytest.mark.parametrize("effect", DIFFUSION_EFFECTS)
def test_same_seed_same_bytes_other_seed_other_bytes(
    effect: str, first_results: dict[str, torch.Tensor], pipelines: dict[str, LoadedPipeline]
) -> None:
    image = cutout_image(*INPUT_SIZES[effect])
    again = run_diffusion(pipelines[effect], image, fast_params(effect), seed=7)
    assert torch.equal(again, first_results[effect])
    other = run_diffusion(pipelines[effect], image, fast_params(effect), seed=8)
    assert not torch.equal(other[:, :3], first_results[effect][:, :3])


@pytest.mark.parametrize("effect", ["enhance", "aged"])
def test_prompt_addition_changes_the_result_deterministically(
    effect: str, first_results: dict[str, torch.Tensor], pipelines: dict[str, LoadedPipeline]
) -> None:
    image = cutout_image(*INPUT_SIZES[effect])
    params = fast_params(effect, prompt_addition="  red   scarf,\tautumn light ")
    assert params.prompt_addition == "red scarf, autumn light"
    with_addition = run_diffusion(pipelines[effect], image, params, seed=7)
    assert not torch.equal(with_addition, first_results[effect])
    assert torch.equal(with_addition, run_diffusion(pipelines[effect], image, params, seed=7))


def test_large_inputs_are_capped_for_upscale_and_resized_back_for_img2img(
    pipelines: dict[str, LoadedPipeline],
) -> None:
    # The production caps are 512 / 768 / 1024 px; a small cap gives the same code path at test size.
    capped_upscale = dataclasses.replace(
        pipelines["upscale"], spec=dataclasses.replace(pipelines["upscale"].spec, max_side=16)
    )
    image = cutout_image(24, 40)
    result = run_diffusion(capped_upscale, image, fast_params("upscale"), seed=3)
    assert result.shape == (1, 4, 40, 64)  # 24×40 capped to 10×16, then 4×
    expected_alpha = F.interpolate(image[:, 3:], size=(40, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(result[:, 3:], expected_alpha)

    capped_comic = dataclasses.replace(
        pipelines["comic"], spec=dataclasses.replace(pipelines["comic"].spec, max_side=16)
    )
    image = cutout_image(32, 48)
    result = run_diffusion(capped_comic, image, fast_params("comic"), seed=3)
    assert result.shape == (1, 4, 32, 48)
    assert torch.equal(result[:, 3:], image[:, 3:])


def test_odd_sizes_are_padded_and_cropped_back(pipelines: dict[str, LoadedPipeline]) -> None:
    image = cutout_image(27, 37)
    assert run_diffusion(pipelines["comic"], image, fast_params("comic"), seed=0).shape == (1, 4, 27, 37)
    upscaled = run_diffusion(pipelines["upscale"], cutout_image(13, 19), fast_params("upscale"), seed=0)
    assert upscaled.shape == (1, 4, 52, 76)


def test_batches_and_non_rgba_inputs_are_refused(pipelines: dict[str, LoadedPipeline]) -> None:
    with pytest.raises(ValueError, match="one image"):
        run_diffusion(pipelines["comic"], torch.rand(2, 4, 16, 16), fast_params("comic"), seed=0)
    with pytest.raises(ValueError, match="RGBA"):
        run_diffusion(pipelines["comic"], torch.rand(1, 3, 16, 16), fast_params("comic"), seed=0)
    with pytest.raises(TypeError, match="noise_level"):
        run_diffusion(pipelines["upscale"], cutout_image(16, 16), fast_params("comic"), seed=0)


def test_timings_split_pipeline_from_pre_and_post_processing(pipelines: dict[str, LoadedPipeline]) -> None:
    timings: dict[str, float] = {}
    run_diffusion(pipelines["aged"], cutout_image(32, 48), fast_params("aged"), seed=0, timings=timings)
    assert set(timings) == {"prepare_ms", "pipeline_ms", "finish_ms"}
    assert timings["pipeline_ms"] > timings["prepare_ms"] and timings["pipeline_ms"] > timings["finish_ms"]


def test_warm_up_runs_every_pipeline(pipelines: dict[str, LoadedPipeline]) -> None:
    for loaded in pipelines.values():
        warm_pipeline(loaded)


@contextmanager
def lockstep(unet: torch.nn.Module) -> Iterator[list[str]]:
    """Make two concurrent jobs alternate UNet calls step by step (a barrier before every forward).

    Yields the names of the threads in the order their UNet calls started.
    """
    barrier = threading.Barrier(2, timeout=60)
    order: list[str] = []

    def wait_for_partner(module: torch.nn.Module, args: Any) -> None:
        barrier.wait()
        order.append(threading.current_thread().name)

    handle = unet.register_forward_pre_hook(wait_for_partner)
    try:
        yield order
    finally:
        barrier.abort()
        handle.remove()


def test_concurrent_jobs_give_the_sequential_results(pipelines: dict[str, LoadedPipeline]) -> None:
    # Euler keeps a step index and sigmas per run: jobs sharing one scheduler would corrupt each other.
    loaded = pipelines["enhance"]
    jobs = {"a": (cutout_image(32, 48, seed=1), 11), "b": (cutout_image(32, 48, seed=2), 12)}
    params = fast_params("enhance", strength=0.4)
    concurrent: dict[str, torch.Tensor] = {}
    failures: list[BaseException] = []

    def run(name: str) -> None:
        image, seed = jobs[name]
        try:
            concurrent[name] = run_diffusion(loaded, image, params, seed)
        except BaseException as exc:
            failures.append(exc)

    with lockstep(loaded.pipeline.unet) as order:
        threads = [threading.Thread(target=run, args=(name,), name=name) for name in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not failures, failures
    assert sorted(order[:2]) == ["a", "b"] and len(order) >= 4, "the two jobs ran step by step together"
    for name, (image, seed) in jobs.items():
        assert torch.equal(concurrent[name], run_diffusion(loaded, image, params, seed)), name
    # The shared pipeline's own scheduler never ran: every job had its own copy.
    assert loaded.pipeline.scheduler.num_inference_steps is None


def test_out_of_memory_propagates_without_the_job_and_the_pipeline_keeps_working(
    pipelines: dict[str, LoadedPipeline],
) -> None:
    loaded = pipelines["comic"]
    image = cutout_image(32, 48)
    before = run_diffusion(loaded, image, fast_params("comic"), seed=5)

    def exhaust(module: torch.nn.Module, args: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = loaded.pipeline.unet.register_forward_pre_hook(exhaust)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError, match="comic: CUDA out of memory") as caught:
            run_diffusion(loaded, image, fast_params("comic"), seed=5)
    finally:
        handle.remove()
    error = caught.value
    assert error.__cause__ is None and error.__context__ is None
    frames = traceback.extract_tb(error.__traceback__)
    assert not any("diffusers" in frame.filename for frame in frames), "the pipeline's frames must be released"
    assert torch.equal(run_diffusion(loaded, image, fast_params("comic"), seed=5), before)


# --- Params -------------------------------------------------------------------------------------


def _bounds(params_class: type[EffectParams]) -> dict[str, tuple[float, float]]:
    schema = params_class.model_json_schema()["properties"]
    return {
        name: (field["minimum"], field["maximum"])
        for name, field in schema.items()
        if "minimum" in field and "maximum" in field
    }


@pytest.mark.parametrize("effect", DIFFUSION_EFFECTS)
def test_params_are_bounded_and_described(effect: str) -> None:
    params_class = EFFECTS[effect].params
    schema = params_class.model_json_schema()
    for name, field in schema["properties"].items():
        assert field.get("description"), f"{effect}.{name} needs a description for the public schema"
    bounds = _bounds(params_class)
    expected = {"steps", "guidance_scale"} | ({"noise_level"} if upscales(effect) else {"strength"})
    assert set(bounds) == expected
    defaults = params_class()
    for name, (low, high) in bounds.items():
        assert low <= getattr(defaults, name) <= high
        step = 1 if isinstance(low, int) else 0.01
        for value in (low - step, high + step):
            with pytest.raises(ValidationError) as caught:
                params_class(**{name: value})
            assert caught.value.errors()[0]["loc"] == (name,)
    with pytest.raises(ValidationError) as caught:
        params_class(seed=3)
    assert caught.value.errors()[0]["loc"] == ("seed",)


def test_prompt_addition_is_cleaned_and_bounded() -> None:
    assert comic.Params(prompt_addition="   ").prompt_addition is None
    assert comic.Params(prompt_addition="Ünïcode café, 2 dogs!").prompt_addition == "Ünïcode café, 2 dogs!"
    for bad in ("a (dog:1.5)", "<script>", "line\x00break", "x" * 121, "weights [high]"):
        with pytest.raises(ValidationError) as caught:
            comic.Params(prompt_addition=bad)
        assert caught.value.errors()[0]["loc"] == ("prompt_addition",)
    with pytest.raises(ValidationError, match="U\\+0000"):
        comic.Params(prompt_addition="line\x00break")


def test_strength_and_steps_must_leave_a_denoising_step() -> None:
    with pytest.raises(ValidationError, match="at least one denoising step"):
        enhance.Params(steps=10, strength=0.05)
    assert enhance.Params(steps=20, strength=0.05).strength == 0.05
