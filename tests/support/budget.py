"""What the production models cost, counted offline on the `meta` device (no weights, no memory).

- `resident_weight_bytes`: the GPU weight budget of a set of diffusion effects, from the production
  architectures vendored under `effects/model_configs/<effect>/` (docs/diffusion.md, "GPU budget").
- `flops_per_forward`: the floating-point operations of one InSPyReNet forward (docs/capacity.md).

Used by the budget tests and the benchmarks; the service itself never counts either.
"""

from __future__ import annotations

import json
from functools import cache

import torch

from effects import diffusion_spec
from effects.diffusion_base import MODEL_CONFIGS_DIR
from effects.inspyrenet import _move_helper_kernels, _saliency_function, build_inspyrenet
from tests.support.weights import TINY_CONFIG, build_component


def production_model(effect_name: str, component: str) -> torch.nn.Module:
    """One model of an effect's production pipeline ('unet', 'vae', 'text_encoder', 'text_encoder_2'),
    built from its vendored config on the `meta` device: real shapes, no weights."""
    diffusion_spec(effect_name)
    path = MODEL_CONFIGS_DIR / effect_name / f"{component}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the production {component} config of {effect_name!r}")
    with torch.device("meta"):
        return build_component(component, json.loads(path.read_text(encoding="utf-8")))


@cache
def component_parameter_counts(effect_name: str) -> dict[str, int]:
    """Parameters (and buffers) of each model of an effect's production pipeline, e.g. {'unet': 859520964, ...}."""
    diffusion_spec(effect_name)
    directory = MODEL_CONFIGS_DIR / effect_name
    counts: dict[str, int] = {}
    for path in sorted(directory.glob("*.json")):
        if path.name == TINY_CONFIG:
            continue
        model = production_model(effect_name, path.stem)
        counts[path.stem] = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    if "unet" not in counts or "vae" not in counts:
        raise FileNotFoundError(f"{directory} must hold unet.json and vae.json of the production pipeline")
    return counts


def resident_weight_bytes(
    effect_names: list[str] | tuple[str, ...], dtype: torch.dtype = torch.float16
) -> dict[str, int]:
    """Bytes of weights each effect keeps resident on the GPU when loaded in `dtype`.

    Counts every model `load_pipeline` keeps: UNet, VAE (float32 where the spec keeps it so) and text
    encoder(s).
    """
    element_size = torch.empty((), dtype=dtype).element_size()
    sizes: dict[str, int] = {}
    for name in effect_names:
        spec = diffusion_spec(name)
        total = 0
        for component, count in component_parameter_counts(name).items():
            size = 4 if component == "vae" and spec.vae_in_float32 else element_size
            total += count * size
        sizes[name] = total
    return sizes


def flops_per_forward(size: int, batch: int = 1) -> int:
    """Floating-point operations of one InSPyReNet forward at `size` × `size` (torch's FLOP counter).

    Counts matrix multiplications and convolutions (2 per multiply-add), which is what bounds
    the forward on a GPU's tensor cores; elementwise work is not counted. Runs on `meta`
    tensors, so it takes no memory and no time beyond tracing. It runs the serving code's own
    forward (`_saliency_function`), so the count is of what the service runs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    net = build_inspyrenet(size, empty=True)
    net.to(torch.device("meta"))  # the remaining real buffers (index tables, kernels) follow
    _move_helper_kernels(net, torch.device("meta"))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _saliency_function(net)(torch.empty(batch, 3, size, size, device="meta"))
    return int(counter.get_total_flops())
