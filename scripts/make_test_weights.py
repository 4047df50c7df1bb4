"""Write random weights in exactly the serving layout: no network needed.

    python scripts/make_test_weights.py MODELS_DIR [--size fast|base] [--seed N] [--pth OUT.pth]

The real architectures with random (seeded, deterministic) weights, saved where the
service reads them, so tests, benchmarks and offline development run the real loading
code. `--pth` also writes the same InSPyReNet weights as a torch state dict, which is what
`transparent_background.Remover(ckpt=...)` takes (the reference in tests and benchmarks).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effects.inspyrenet import MODEL_SIZES, build_inspyrenet, save_weights


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

    With `pth`, the identical weights are also saved there as a torch state dict.
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"size must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    state = random_inspyrenet_state(size, seed)
    path = save_weights(state, models_dir, MODEL_SIZES[size], source=f"random weights, seed {seed}")
    if pth is not None:
        pth.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, pth)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models_dir", type=Path, help="where the service reads weights (CUTOUT_MODELS_DIR)")
    parser.add_argument(
        "--size", choices=sorted(MODEL_SIZES), default="fast", help="InSPyReNet input size: fast=384, base=1024"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same weights)")
    parser.add_argument(
        "--pth", type=Path, default=None, help="also write the InSPyReNet weights as a .pth for Remover(ckpt=...)"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    path = write_inspyrenet(args.models_dir, args.size, args.seed, args.pth)
    elapsed = time.perf_counter() - started
    print(f"cutout: random InSPyReNet_SwinB ({args.size}, seed {args.seed}) -> {path} ({elapsed:.1f} s)")
    if args.pth is not None:
        print(f"cutout: same weights as a torch state dict -> {args.pth}")

    # Diffusion pipelines (scripts/diffusion_weights.py): tiny random pipelines in the serving layout.
    from scripts.diffusion_weights import write_tiny_pipelines

    written = write_tiny_pipelines(args.models_dir, seed=args.seed)
    print(f"diffusion: tiny random pipelines ({', '.join(written)}, seed {args.seed}) -> {args.models_dir}")

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
