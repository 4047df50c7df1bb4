"""Random weights in exactly the serving layout, offline: the real InSPyReNet and tiny diffusion pipelines.

`write_inspyrenet` builds the real InSPyReNet_SwinB with random (seeded) weights and saves it where the
service reads it. `write_tiny_pipelines` writes, for each registered diffusion effect, a pipeline of
the effect's production class and layout whose models are tiny and random: the architecture comes from
the effect's `effects/model_configs/<effect>/tiny.json`, so adding a diffusion effect adds a file there
and no code here. Both save through the production code (`effects.inspyrenet.save_weights`,
`effects.weights.save_pipeline`), so tests and benchmarks run the real loading code on them.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from effects import DIFFUSION_EFFECTS, diffusion_spec
from effects.diffusion_base import MODEL_CONFIGS_DIR
from effects.inspyrenet import MODEL_SIZES, build_inspyrenet, save_weights
from effects.weights import save_pipeline

TINY_CONFIG = "tiny.json"
CLIP_MAX_TOKENS = 77

# --- InSPyReNet -----------------------------------------------------------------------------------


def random_inspyrenet_state(size: str, seed: int) -> dict[str, torch.Tensor]:
    """A randomly initialised InSPyReNet_SwinB state dict (the package's own initialisation)."""
    base_size = MODEL_SIZES[size]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = build_inspyrenet(base_size, empty=False)
    finally:
        torch.random.set_rng_state(generator_state)
    return {name: tensor.detach().clone() for name, tensor in net.state_dict().items()}


def write_inspyrenet(models_dir: Path, size: str = "fast", seed: int = 0, pth: Path | None = None) -> Path:
    """Random InSPyReNet weights at MODELS_DIR/inspyrenet-swinb/; returns the safetensors path.

    With `pth`, the identical weights are also saved there as a torch state dict (what
    `transparent_background.Remover(ckpt=...)` takes: the reference in tests and benchmarks).
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"size must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    state = random_inspyrenet_state(size, seed)
    path = save_weights(state, models_dir, MODEL_SIZES[size], source=f"random weights, seed {seed}")
    if pth is not None:
        pth.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, pth)
    return path


# --- Models of a diffusion pipeline, from a config ------------------------------------------------


def build_component(component: str, config: dict[str, Any]) -> torch.nn.Module:
    """One model of a diffusion pipeline ('unet', 'vae', 'text_encoder', 'text_encoder_2') from its config.

    Keys starting with '_' (comments, library versions) are not part of the architecture. Under
    `torch.device("meta")` this builds shapes only (the GPU budget count); otherwise random weights.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    architecture = {key: value for key, value in config.items() if not key.startswith("_")}
    if component == "unet":
        return UNet2DConditionModel.from_config(architecture)  # type: ignore[no-any-return]
    if component == "vae":
        return AutoencoderKL.from_config(architecture)  # type: ignore[no-any-return]
    if component == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**architecture))
    if component == "text_encoder_2":
        return CLIPTextModelWithProjection(CLIPTextConfig(**architecture))
    raise ValueError(f"no model class for component {component!r}; add one to tests/support/weights.py")


# --- Tiny tokenizer -------------------------------------------------------------------------------


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
    specs = [diffusion_spec(effect) for effect in DIFFUSION_EFFECTS]
    text = " ".join(f"{spec.prompt} {spec.negative_prompt}" for spec in specs)
    words = {*re.findall(r"[a-z0-9]+", text.lower()), *_TINY_EXTRA_WORDS}
    return sorted(word for word in words if len(word) > 1)


def tiny_clip_tokenizer(vocab_size: int) -> Any:
    """A CLIP tokenizer built in memory: every byte as a token (and as a word end), plus merges built
    from the effects' prompt words so prompts take a few tokens per word rather than one per letter.

    Token ids stay below `vocab_size` (the tiny text encoder's), with `<|endoftext|>` the highest, as in
    the real CLIP vocabulary (the text model finds the end of the prompt at the largest id).
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
    if len(vocab) > vocab_size:
        raise ValueError(
            f"the tiny vocabulary has {len(vocab)} tokens, over the text encoder's vocab_size {vocab_size}"
        )
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_TOKENS)


# --- Tiny pipelines -------------------------------------------------------------------------------


def tiny_config(effect: str) -> dict[str, Any]:
    """The effect's tiny test architecture: `effects/model_configs/<effect>/tiny.json`."""
    diffusion_spec(effect)
    path = MODEL_CONFIGS_DIR / effect / TINY_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the tiny test pipeline of {effect!r} (model_configs/README.md)")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return config


def tiny_pipeline(effect: str, seed: int = 0) -> Any:
    """A pipeline of the effect's production class and layout with tiny random models (seeded).

    Each entry of the tiny config is one pipeline component: models (`unet`, `vae`, `text_encoder*`,
    each text encoder with a tiny tokenizer of the same suffix), schedulers (`*scheduler`: the class
    named by `_class_name`, else the effect's own sampler), and `pipeline` for constructor options.
    Components the pipeline class takes but the config leaves out (the SDXL refiner's first text
    encoder, safety checkers) are None, as the production pipelines are saved.
    """
    import diffusers

    spec = diffusion_spec(effect)
    config = tiny_config(effect)
    pipeline_class = getattr(diffusers, spec.pipeline_class_name)
    parts: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, part in config.items():
            if name.startswith("_") or name == "pipeline":
                continue
            if name.endswith("scheduler"):
                parts[name] = getattr(diffusers, part.get("_class_name", spec.scheduler)).from_config(part)
                continue
            parts[name] = build_component(name, part)
            if name.startswith("text_encoder"):
                parts[name.replace("text_encoder", "tokenizer")] = tiny_clip_tokenizer(part["vocab_size"])
    accepted = inspect.signature(pipeline_class.__init__).parameters
    arguments = {**spec.pipeline_options, **config.get("pipeline", {}), **parts}
    unknown = sorted(set(arguments) - set(accepted))
    if unknown:
        raise ValueError(
            f"{effect}'s tiny config names {', '.join(unknown)}, which {pipeline_class.__name__} does not take"
        )
    for name, parameter in accepted.items():
        if name != "self" and parameter.default is inspect.Parameter.empty and name not in arguments:
            arguments[name] = None
    return pipeline_class(**arguments)


def write_tiny_pipelines(
    models_dir: Path, effects: Sequence[str] = DIFFUSION_EFFECTS, seed: int = 0
) -> dict[str, Path]:
    """Write tiny random pipelines for `effects` under MODELS_DIR; returns each effect's directory."""
    written: dict[str, Path] = {}
    for effect in effects:
        pipeline = tiny_pipeline(effect, seed)
        written[effect] = save_pipeline(pipeline, models_dir, effect, source=f"tiny random pipeline, seed {seed}")
    return written
