"""Diffusion pipelines in the serving layout: fetched at image build, or tiny and random for tests.

    python scripts/diffusion_weights.py tiny MODELS_DIR [--effects upscale,enhance,comic,aged] [--seed N]
    python scripts/diffusion_weights.py fetch MODELS_DIR --model upscale=stabilityai/stable-diffusion-x4-upscaler ...

Layout (what `effects.diffusion.load_pipeline` reads, and the engine's manifest):

    MODELS_DIR/<effect>/model_index.json, unet/, vae/, text_encoder*/, tokenizer*/, scheduler/ ...
    MODELS_DIR/<effect>/model.json     manifest: `model_id` (names the exact files), source, pipeline

`fetch_pipelines` (network, at image build) downloads each pipeline, swaps in the configured VAE (the
SDXL refiner gets the fp16-fix VAE), converts to fp16 and saves plain safetensors with
`save_pretrained`, so the service loads local fp16 files and never needs a variant or the Hub.
`write_tiny_pipelines` (offline) writes pipelines of the same classes and layout with tiny random
UNet/VAE/CLIP models, so tests and benchmarks run the real loading code.

Both write into a temporary directory beside the target and rename it into place, then write the
manifest last: a pipeline directory with a manifest is complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effects.diffusion import DIFFUSION_EFFECTS, DiffusionSpec, diffusion_spec, disable_library_progress_bars

MANIFEST_FILE = "model.json"
CLIP_MAX_TOKENS = 77
TINY_VOCAB_SIZE = 2048

# --- Serving layout -------------------------------------------------------------------------------


def files_digest(directory: Path) -> str:
    """sha256 over every file of a pipeline directory (relative path, size, content), manifest excluded."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        relative = path.relative_to(directory).as_posix()
        digest.update(f"{relative}|{path.stat().st_size}\n".encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def save_pipeline(pipeline: Any, models_dir: Path, effect: str, source: str) -> Path:
    """`save_pretrained` as plain safetensors into MODELS_DIR/<effect>, atomically, manifest last."""
    spec = diffusion_spec(effect)
    disable_library_progress_bars()
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / effect
    partial = models_dir / f".{effect}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    pipeline.save_pretrained(str(partial), safe_serialization=True, variant=None)
    digest = files_digest(partial)
    if target.exists():
        shutil.rmtree(target)
    partial.replace(target)
    manifest = {
        "model_id": f"{effect}-{digest[:12]}",
        "pipeline": spec.pipeline_class_name,
        "files_sha256": digest,
        "source": source,
    }
    manifest_partial = target / f".{MANIFEST_FILE}.partial"
    manifest_partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    manifest_partial.replace(target / MANIFEST_FILE)
    return target


# --- Tiny random pipelines (offline) --------------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2, CLIP) uses for the bytes 0-255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codepoints = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codepoints.append(256 + extra)
            extra += 1
    return [chr(codepoint) for codepoint in codepoints]


# Words the tiny tokenizer gets merges for (besides every word of the effects' own prompts), so test
# prompts stay well inside CLIP's 77 tokens instead of costing one token per character.
_TINY_EXTRA_WORDS = frozenset({"red", "blue", "green", "scarf", "hat", "autumn", "winter", "summer", "light", "dog"})


def _tiny_words() -> list[str]:
    import re

    text = " ".join(
        f"{diffusion_spec(effect).prompt} {diffusion_spec(effect).negative_prompt}" for effect in DIFFUSION_EFFECTS
    )
    words = {*re.findall(r"[a-z0-9]+", text.lower()), *_TINY_EXTRA_WORDS}
    return sorted(word for word in words if len(word) > 1)


def tiny_clip_tokenizer() -> Any:
    """A CLIP tokenizer built in memory: every byte as a token (and as a word end), plus merges built
    from the effects' prompt words so prompts take a few tokens per word rather than one per letter.

    Token ids stay below `TINY_VOCAB_SIZE`, with `<|endoftext|>` the highest, as in the real CLIP
    vocabulary (the text model finds the end of the prompt at the largest id).
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    alphabet = _byte_level_alphabet()
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[f"{symbol}</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _tiny_words():
        # Merge left to right: ("d", "o") -> "do", ("do", "g</w>") -> "dog</w>".
        prefix = word[0]
        for index, char in enumerate(word[1:], start=1):
            last = index == len(word) - 1
            right = f"{char}</w>" if last else char
            merged = f"{prefix}{right}"
            if merged not in vocab:
                merges.append((prefix, right))
                vocab[merged] = len(vocab)
            prefix = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    if len(vocab) > TINY_VOCAB_SIZE:
        raise ValueError(f"the tiny vocabulary has {len(vocab)} tokens, over TINY_VOCAB_SIZE={TINY_VOCAB_SIZE}")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_TOKENS)


def _tiny_text_config(hidden_act: str) -> Any:
    from transformers import CLIPTextConfig

    # The sizes of diffusers' own fast tests, with room for the tiny tokenizer's vocabulary.
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=TINY_VOCAB_SIZE,
        hidden_act=hidden_act,
        projection_dim=32,
        max_position_embeddings=CLIP_MAX_TOKENS,
    )


def _sd_scheduler_config(prediction_type: str) -> dict[str, Any]:
    return {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "prediction_type": prediction_type,
    }


def _tiny_upscale(spec: DiffusionSpec) -> Any:
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=7,  # 4 latent channels + the 3 channels of the noised low-resolution image
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=1000,  # the noise level is the class label, as in the production UNet
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        sample_size=64,  # 16-latent tiles, so tests exercise the tiled decode the service relies on
        scaling_factor=0.08333,
    )
    text_encoder = CLIPTextModel(_tiny_text_config("gelu"))
    low_res_scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    scheduler = getattr(diffusers, spec.scheduler).from_config(
        {**_sd_scheduler_config("v_prediction"), "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": False}
    )
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        low_res_scheduler=low_res_scheduler,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=350,
    )


def _tiny_sd_img2img(spec: DiffusionSpec, *, sd2: bool) -> Any:
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    # SD 1.x (comic) and SD 2.x (aged) differ as the production models do: linear projections,
    # upcast attention, gelu text encoder and v-prediction on the SD 2 side.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(_tiny_text_config("gelu" if sd2 else "quick_gelu"))
    scheduler_class = getattr(diffusers, spec.scheduler)
    scheduler = scheduler_class.from_config(
        {**_sd_scheduler_config("v_prediction" if sd2 else "epsilon"), "clip_sample": False, "set_alpha_to_one": False}
    )
    return StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_sdxl_refiner(spec: DiffusionSpec) -> Any:
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    # Like the SDXL refiner: only the second (projected) text encoder, aesthetic-score conditioning
    # (5 time ids × 8 + the 32-wide pooled text = 72), an fp16-safe VAE config.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=72,
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        sample_size=128,
        force_upcast=False,
    )
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config("gelu"))
    scheduler = getattr(diffusers, spec.scheduler).from_config(
        {**_sd_scheduler_config("epsilon"), "timestep_spacing": "leading"}
    )
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )


def tiny_pipeline(effect: str, seed: int = 0) -> Any:
    """A pipeline of the effect's production class and layout with tiny random models (seeded)."""
    spec = diffusion_spec(effect)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.kind == "upscale":
            return _tiny_upscale(spec)
        if spec.kind == "sdxl_img2img":
            return _tiny_sdxl_refiner(spec)
        return _tiny_sd_img2img(spec, sd2=effect == "aged")


def write_tiny_pipelines(
    models_dir: Path, effects: Sequence[str] = DIFFUSION_EFFECTS, seed: int = 0
) -> dict[str, Path]:
    """Write tiny random pipelines for `effects` under MODELS_DIR; returns each effect's directory."""
    written: dict[str, Path] = {}
    for effect in effects:
        pipeline = tiny_pipeline(effect, seed)
        written[effect] = save_pipeline(pipeline, models_dir, effect, source=f"tiny random pipeline, seed {seed}")
    return written


# --- Production pipelines (network, at image build) -----------------------------------------------


def _load_options(spec: DiffusionSpec) -> dict[str, Any]:
    if spec.kind == "sdxl_img2img":
        return {"add_watermarker": False}
    if spec.kind == "sd_img2img":
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {"safety_checker": None, "feature_extractor": None, "watermarker": None}


@contextmanager
def _online() -> Iterator[None]:
    # The image build is the one place that downloads; make sure an inherited offline flag does not
    # turn the fetch into a confusing "file not found".
    previous = os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        yield
    finally:
        if previous is not None:
            os.environ["HF_HUB_OFFLINE"] = previous


def _from_pretrained_fp16(pipeline_class: Any, model_id: str, **kwargs: Any) -> Any:
    """fp16 weights: the repository's fp16 variant where it has one, else its fp32 files converted on load."""
    try:
        return pipeline_class.from_pretrained(model_id, dtype=torch.float16, variant="fp16", **kwargs)
    except (OSError, ValueError) as exc:
        print(f"  {model_id}: no fp16 variant ({type(exc).__name__}); loading the default files as fp16")
    return pipeline_class.from_pretrained(model_id, dtype=torch.float16, **kwargs)


def fetch_pipelines(
    models_dir: Path,
    effects: Sequence[str],
    model_ids: Mapping[str, str],
    vae_ids: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Download each effect's pipeline (from `model_ids[effect]`) and save it in the serving layout.

    `vae_ids[effect]`, when given, replaces the pipeline's VAE (the SDXL refiner takes
    madebyollin/sdxl-vae-fp16-fix, whose decoder does not overflow in fp16). Every pipeline is saved
    in fp16 as plain safetensors, with the effect's scheduler class, without safety checker,
    feature extractor or watermarker.
    """
    import diffusers
    from diffusers import AutoencoderKL

    vae_ids = vae_ids or {}
    missing = [effect for effect in effects if effect not in model_ids]
    if missing:
        raise ValueError(f"no model id given for {', '.join(missing)}; pass model_ids={{effect: hub id}}")
    written: dict[str, Path] = {}
    with _online():
        for effect in effects:
            spec = diffusion_spec(effect)
            model_id = model_ids[effect]
            started = time.perf_counter()
            components: dict[str, Any] = {}
            source = model_id
            if effect in vae_ids:
                components["vae"] = AutoencoderKL.from_pretrained(vae_ids[effect], dtype=torch.float16)
                source = f"{model_id} + vae {vae_ids[effect]}"
            pipeline_class = getattr(diffusers, spec.pipeline_class_name)
            pipeline = _from_pretrained_fp16(pipeline_class, model_id, **components, **_load_options(spec))
            pipeline.scheduler = getattr(diffusers, spec.scheduler).from_config(pipeline.scheduler.config)
            written[effect] = save_pipeline(pipeline, models_dir, effect, source=source)
            print(f"{effect}: {source} -> {written[effect]} ({time.perf_counter() - started:.0f} s)")
            del pipeline, components
    return written


# --- Command line ---------------------------------------------------------------------------------


def _parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        effect, sep, model_id = value.partition("=")
        if not sep or not effect or not model_id:
            raise SystemExit(f"{flag} takes EFFECT=HUB_ID, got {value!r}")
        pairs[effect] = model_id
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny", help="tiny random pipelines (offline)")
    tiny.add_argument("models_dir", type=Path)
    tiny.add_argument("--effects", default=",".join(DIFFUSION_EFFECTS))
    tiny.add_argument("--seed", type=int, default=0)
    fetch = commands.add_parser("fetch", help="download the production pipelines (network)")
    fetch.add_argument("models_dir", type=Path)
    fetch.add_argument("--model", action="append", default=[], metavar="EFFECT=HUB_ID", required=True)
    fetch.add_argument("--vae", action="append", default=[], metavar="EFFECT=HUB_ID")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.command == "tiny":
        effects = [name for name in args.effects.split(",") if name]
        written = write_tiny_pipelines(args.models_dir, effects, args.seed)
    else:
        model_ids = _parse_pairs(args.model, "--model")
        written = fetch_pipelines(args.models_dir, list(model_ids), model_ids, _parse_pairs(args.vae, "--vae"))
    for effect, directory in written.items():
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        print(f"{effect}: {manifest['model_id']} at {directory}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
