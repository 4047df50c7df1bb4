"""Diffusion effects: runner overhead on tiny pipelines (CPU), and an L4 latency estimate per effect.

    python scripts/bench_diffusion.py [--runs 5] [--size 64] [--no-estimate]

Part 1 writes tiny random pipelines (tests/support/weights.py) to a temporary MODELS_DIR, loads
them with the service's `load_pipeline` and runs `run_diffusion` on a 64 px RGBA cutout with 4
denoising steps (5 for the upscaler, its lower bound). It prints the median of `--runs` runs after one
warm-up, split into the pipeline call (the reference: diffusers' own work) and the runner's pre- and
post-processing around it, with the ratio total / pipeline. With tiny models the pipeline call is
cheap, so this is where runner overhead would show.

Part 2 estimates each effect's latency on an NVIDIA L4 at its production defaults and sizes. The
FLOPs of one UNet step (batch 2: classifier-free guidance) and of the VAE passes are counted on the
production architectures (meta device, torch's FlopCounterMode); time = FLOPs / effective throughput,
with the throughput taken from one published figure (see ANCHOR_* below and docs/diffusion.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effects import DIFFUSION_EFFECTS, EFFECTS, diffusion_spec
from effects.diffusion import load_pipeline, run_diffusion
from tests.support.budget import production_model
from tests.support.weights import write_tiny_pipelines


def upscales(effect: str) -> bool:
    return diffusion_spec(effect).kind == "upscale"


# Published anchor: Stable Diffusion 1.5, 512x512, 50 steps, fp16 PyTorch on an NVIDIA A10: 2.95 s per
# image (Deci AI, DeciDiffusion-v1-0 model card, "PyTorch 50 iterations" row).
ANCHOR_SECONDS = 2.95
ANCHOR_STEPS = 50
# The L4 has the A10's dense fp16 tensor throughput (121 vs 125 TFLOPS) but half its memory bandwidth
# (300 vs 600 GB/s) and a 72 W power cap; it is taken as 0.85 × an A10 for these convolution-heavy UNets.
L4_VS_A10 = 0.85


# --- Part 1: runner overhead on tiny pipelines ------------------------------------------------------


def bench_params(effect: str) -> Any:
    if upscales(effect):
        return EFFECTS[effect].params.model_validate({"steps": 5})
    return EFFECTS[effect].params.model_validate({"steps": 10, "strength": 0.4})


def effective_steps(effect: str, params: Any) -> int:
    return int(params.steps if upscales(effect) else params.steps * params.strength)


def cutout(size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand((1, 4, size, size), generator=generator)
    image[:, 3] = 0.0
    image[:, 3, size // 8 : -size // 8, size // 8 : -size // 8] = 1.0
    return image


def bench_overhead(runs: int, size: int) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        models_dir = Path(scratch)
        write_tiny_pipelines(models_dir, DIFFUSION_EFFECTS, seed=0)
        image = cutout(size)
        header = (
            f"{'effect':<8} {'in':>7} {'out':>9} {'steps':>5} {'load s':>7} {'total ms':>9} {'pipeline ms':>11} "
            f"{'pre ms':>7} {'post ms':>8} {'overhead':>9} {'total/pipeline':>14}"
        )
        print(f"Part 1: tiny pipelines on CPU ({torch.get_num_threads()} threads), median of {runs} runs")
        print(header)
        print("-" * len(header))
        for effect in DIFFUSION_EFFECTS:
            started = time.perf_counter()
            loaded = load_pipeline(effect, models_dir / effect, torch.device("cpu"), torch.float32)
            load_seconds = time.perf_counter() - started
            params = bench_params(effect)
            run_diffusion(loaded, image, params, seed=0)  # warm-up
            totals: list[float] = []
            parts: dict[str, list[float]] = {"prepare_ms": [], "pipeline_ms": [], "finish_ms": []}
            output_shape: tuple[int, ...] = ()
            for run in range(runs):
                timings: dict[str, float] = {}
                started = time.perf_counter()
                output = run_diffusion(loaded, image, params, seed=run, timings=timings)
                totals.append((time.perf_counter() - started) * 1000)
                for key in parts:
                    parts[key].append(timings[key])
                output_shape = tuple(output.shape)
            total = statistics.median(totals)
            pipeline = statistics.median(parts["pipeline_ms"])
            overhead = total - pipeline
            print(
                f"{effect:<8} {f'{size}x{size}':>7} {f'{output_shape[2]}x{output_shape[3]}':>9} "
                f"{effective_steps(effect, params):>5} {load_seconds:>7.2f} {total:>9.1f} {pipeline:>11.1f} "
                f"{statistics.median(parts['prepare_ms']):>7.2f} {statistics.median(parts['finish_ms']):>8.2f} "
                f"{overhead:>6.1f} ms {total / pipeline:>14.3f}"
            )


# --- Part 2: L4 estimate from FLOPs ---------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    effect: str
    input_side: int  # the square image the pipeline works on at production caps
    output_side: int
    steps: int  # denoising steps actually run with the default params


def production_workloads() -> list[Workload]:
    workloads = []
    for effect in DIFFUSION_EFFECTS:
        spec = diffusion_spec(effect)
        defaults = EFFECTS[effect].params()
        side = spec.max_side
        workloads.append(Workload(effect, side, side * spec.scale, effective_steps(effect, defaults)))
    return workloads


def _flops(run: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return float(counter.get_total_flops())


def unet_step_flops(effect: str, side: int) -> float:
    """FLOPs of one UNet call with classifier-free guidance (batch 2) at the working size."""
    unet: Any = production_model(effect, "unet")
    config = unet.config
    with torch.device("meta"):
        latent = side if upscales(effect) else side // 8
        sample = torch.randn(2, config.in_channels, latent, latent)
        timestep = torch.tensor([500, 500])
        context = torch.randn(2, 77, config.cross_attention_dim)
        extra: dict[str, Any] = {}
        if upscales(effect):
            extra["class_labels"] = torch.tensor([20, 20])
        if effect == "enhance":
            text_embeds = torch.randn(2, 1280)
            extra["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": torch.randn(2, 5)}
    return _flops(lambda: unet(sample, timestep, encoder_hidden_states=context, **extra))


def vae_flops(effect: str, side: int, output_side: int, tiled: bool | None = None) -> float:
    """FLOPs of the VAE passes of one job: decode always, encode for image-to-image.

    A tiled decode (the upscaler's) is counted as diffusers runs it: full tiles of `sample_size`
    pixels every 3/4 tile, which also keeps the decoder's mid-block attention per tile instead of
    over the whole 2048 px image.
    """
    vae: Any = production_model(effect, "vae")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_side = output_side // factor
    if tiled is None:
        tiled = diffusion_spec(effect).vae_tiling
    tile = vae.config.sample_size // factor
    tiles_per_side = 1
    if tiled and latent_side > tile:
        stride = int(tile * 0.75)  # diffusers' default tile_overlap_factor of 0.25
        tiles_per_side = len(range(0, latent_side, stride))
        latent_side = tile
    with torch.device("meta"):
        latents = torch.randn(1, 4, latent_side, latent_side)
        image = torch.randn(1, 3, side, side)
    total = _flops(lambda: vae.decode(latents)) * tiles_per_side**2
    if not upscales(effect):
        total += _flops(lambda: vae.encode(image))
    return total


def estimate_l4() -> None:
    anchor_flops_per_step = unet_step_flops("comic", 512)  # SD 1.5 at 512 px: the anchor's model and size
    anchor_step_seconds = ANCHOR_SECONDS / ANCHOR_STEPS
    a10_flops_per_second = anchor_flops_per_step / anchor_step_seconds
    l4_flops_per_second = a10_flops_per_second * L4_VS_A10
    print()
    print(
        f"Part 2: L4 estimate. Anchor: SD 1.5 UNet step at 512 px = {anchor_flops_per_step / 1e12:.2f} TFLOP, "
        f"{anchor_step_seconds * 1000:.0f} ms on an A10 -> {a10_flops_per_second / 1e12:.1f} TFLOP/s effective; "
        f"L4 = {L4_VS_A10} x A10 = {l4_flops_per_second / 1e12:.1f} TFLOP/s"
    )
    header = (
        f"{'effect':<8} {'work px':>8} {'out px':>7} {'steps':>5} {'TFLOP/step':>10} {'step ms':>8} "
        f"{'UNet s':>7} {'VAE TFLOP':>9} {'VAE s':>6} {'total s':>8}"
    )
    print(header)
    print("-" * len(header))
    for workload in production_workloads():
        step = unet_step_flops(workload.effect, workload.input_side)
        vae = vae_flops(workload.effect, workload.input_side, workload.output_side)
        step_seconds = step / l4_flops_per_second
        unet_seconds = step_seconds * workload.steps
        vae_seconds = vae / l4_flops_per_second
        print(
            f"{workload.effect:<8} {workload.input_side:>8} {workload.output_side:>7} {workload.steps:>5} "
            f"{step / 1e12:>10.2f} {step_seconds * 1000:>8.0f} {unet_seconds:>7.1f} {vae / 1e12:>9.2f} "
            f"{vae_seconds:>6.1f} {unet_seconds + vae_seconds:>8.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per effect (median reported)")
    parser.add_argument("--size", type=int, default=64, help="side of the square RGBA test cutout")
    parser.add_argument("--no-estimate", action="store_true", help="skip the L4 estimate (part 2)")
    args = parser.parse_args(argv)
    import diffusers.utils.logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    bench_overhead(args.runs, args.size)
    if not args.no_estimate:
        estimate_l4()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
