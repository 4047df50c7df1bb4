"""Write random weights in exactly the serving layout: no network needed.

    python scripts/make_test_weights.py MODELS_DIR [--size fast|base] [--seed N] [--pth OUT.pth]
                                        [--effects upscale,enhance,comic,aged]

The real InSPyReNet architecture with random (seeded, deterministic) weights, and a tiny random
pipeline of each diffusion effect's production class (its architecture from
`effects/model_configs/<effect>/tiny.json`), saved where the service reads them, so tests, benchmarks
and offline development run the real loading code. `--pth` also writes the same InSPyReNet weights as
a torch state dict, which is what `transparent_background.Remover(ckpt=...)` takes. The builders are
`tests/support/weights.py`; this is their command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effects import DIFFUSION_EFFECTS
from effects.inspyrenet import MODEL_SIZES
from tests.support.weights import write_inspyrenet, write_tiny_pipelines


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
    parser.add_argument(
        "--effects", default=",".join(DIFFUSION_EFFECTS), help="diffusion effects to write tiny pipelines for"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    path = write_inspyrenet(args.models_dir, args.size, args.seed, args.pth)
    elapsed = time.perf_counter() - started
    print(f"cutout: random InSPyReNet_SwinB ({args.size}, seed {args.seed}) -> {path} ({elapsed:.1f} s)")
    if args.pth is not None:
        print(f"cutout: same weights as a torch state dict -> {args.pth}")

    effects = [name for name in args.effects.split(",") if name]
    written = write_tiny_pipelines(args.models_dir, effects, seed=args.seed)
    print(f"diffusion: tiny random pipelines ({', '.join(written)}, seed {args.seed}) -> {args.models_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
