"""Cold start, measured in fresh processes: how soon the storefront's first cutout is answered.

    .venv/bin/python scripts/bench_startup.py [--repeats 3] [--size fast|base] [--workdir DIR]

Three fresh processes per round, one after another, on the same random InSPyReNet weights:

* ours, no diffusion     `python -m service` with CUTOUT_DIFFUSION_EFFECTS="", polled on /ready every
                         50 ms, then one POST /v1/process (effects=cutout) of a 640 x 480 photo; the
                         time is from process start to that answer.
* ours, four pipelines   the same with upscale, enhance, comic and aged configured (tiny random
                         pipelines: what matters is that the storefront never waits for them).
                         Target: <= 1.1x the first.
* reference              a fresh process importing transparent_background, constructing
                         `Remover(mode=..., ckpt=<the same weights as a .pth>)` and running its first
                         `process` on the same photo. Target: ours (no diffusion) <= 0.5x.

Then where the time went (from /ready's body: the process before the engine existed, then each
model's phases) and an L4 estimate of the cold start, with the bytes each production model reads.
Every figure is this machine's (CPU, float32) unless labelled an L4 estimate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effects import DIFFUSION_EFFECTS  # noqa: E402
from scripts.measure import table  # noqa: E402
from tests.support import photos  # noqa: E402
from tests.support.server import running_server  # noqa: E402
from tests.support.weights import write_inspyrenet, write_tiny_pipelines  # noqa: E402

# L4 estimate assumptions (see docs/capacity.md, "Cold start"): throughput of reading weights from the
# container image (Cloud Run streams image layers; no figure is published, so a range), of the host
# to device copy over PCIe Gen4 x16 from pageable memory, and the first forward's kernel selection.
L4_READ_GBPS = (0.5, 2.0)
L4_H2D_GBPS = 6.0
L4_WARM_S = {"cutout": 1.0, "upscale": 3.0, "enhance": 3.0, "comic": 2.0, "aged": 2.0}


def first_cutout(models_dir: Path, workdir: Path, photo: bytes, diffusion: bool) -> dict[str, Any]:
    """Process start → the first cutout answered; then (with diffusion) every model settled."""
    env = {
        "CUTOUT_MODELS_DIR": str(models_dir),
        # An empty cache: the first cutout is computed, never found.
        "CUTOUT_CACHE_DIR": tempfile.mkdtemp(prefix="cache-", dir=workdir),
        "CUTOUT_DIFFUSION_EFFECTS": ",".join(DIFFUSION_EFFECTS) if diffusion else "",
    }
    with running_server(workdir, env, wait_for="/ready", timeout_s=600) as server:
        assert server.ready_after_s is not None
        url, started = server.url, server.started
        answer = httpx.post(
            f"{url}/v1/process",
            files={"image": ("pet.png", photo, "image/png")},
            data={"effects": "cutout"},
            timeout=300,
        )
        answer.raise_for_status()
        first_s = time.perf_counter() - started
        uptime = httpx.get(f"{url}/health", timeout=5).json()["uptime_s"]
        before_engine_s = (time.perf_counter() - started) - uptime
        while True:
            body: dict[str, Any] = httpx.get(f"{url}/ready", timeout=10).json()
            if all(model["status"] != "loading" for model in body["models"].values()):
                break
            time.sleep(0.2)
        all_s = time.perf_counter() - started
    return {
        "ready_s": server.ready_after_s,
        "first_s": first_s,
        "before_engine_s": before_engine_s,
        "all_s": all_s,
        "body": body,
    }


def reference(pth: Path, size: str, workdir: Path, photo: bytes) -> float:
    photo_path = workdir / "photo.png"
    photo_path.write_bytes(photo)
    code = (
        "import warnings; warnings.filterwarnings('ignore'); from PIL import Image; "
        "from transparent_background import Remover; "
        f"r = Remover(mode={size!r}, jit=False, device='cpu', ckpt={str(pth)!r}); "
        f"r.process(Image.open({str(photo_path)!r}).convert('RGB'), type='rgba')"
    )
    env = {**os.environ, "TRANSPARENT_BACKGROUND_FILE_PATH": str(workdir), "NO_ALBUMENTATIONS_UPDATE": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def production_bytes() -> dict[str, int]:
    """Bytes each production model reads: the cutout's fp16 base checkpoint, each pipeline in fp16."""
    import torch

    from effects.inspyrenet import build_inspyrenet
    from tests.support.budget import resident_weight_bytes

    net = build_inspyrenet(1024, empty=True)
    cutout = sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in net.state_dict().values())
    return {"cutout": cutout, **resident_weight_bytes(list(DIFFUSION_EFFECTS), torch.float16)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", choices=("fast", "base"), default="fast")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        models_dir = workdir / "models"
        pth = workdir / f"ckpt_{args.size}.pth"
        if not (models_dir / "inspyrenet-swinb" / "model.json").exists() or not pth.exists():
            write_inspyrenet(models_dir, args.size, seed=0, pth=pth)
        if not (models_dir / "upscale" / "model.json").exists():
            write_tiny_pipelines(models_dir)
        photo = photos.png(640, 480, seed=7)

        plain: list[dict[str, Any]] = []
        staged: list[dict[str, Any]] = []
        remover: list[float] = []
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits all three
            plain.append(first_cutout(models_dir, workdir, photo, diffusion=False))
            staged.append(first_cutout(models_dir, workdir, photo, diffusion=True))
            remover.append(reference(pth, args.size, workdir, photo))

        def median(runs: list[dict[str, Any]], key: str) -> float:
            return statistics.median(run[key] for run in runs)

        reference_s = statistics.median(remover)
        plain_s, staged_s = median(plain, "first_s"), median(staged, "first_s")
        table(
            f"Process start -> first cutout answered ({args.size} weights, 640 x 480 photo, median of {args.repeats})",
            ["what", "seconds", "vs no diffusion", "vs Remover", "target"],
            [
                ["Remover: import, build, load, first process", f"{reference_s:.1f}", "", "1.00", ""],
                ["ours, no diffusion configured", f"{plain_s:.1f}", "1.00", f"{plain_s / reference_s:.2f}", "<= 0.5x"],
                [
                    "ours, four diffusion pipelines configured",
                    f"{staged_s:.1f}",
                    f"{staged_s / plain_s:.2f}",
                    f"{staged_s / reference_s:.2f}",
                    "<= 1.1x",
                ],
                ["  of which /ready 200 (no diffusion)", f"{median(plain, 'ready_s'):.1f}", "", "", ""],
                ["  every model settled (four pipelines)", f"{median(staged, 'all_s'):.1f}", "", "", ""],
            ],
        )

        body = staged[-1]["body"]
        rows = [
            ["process start -> engine created (python, torch, fastapi imports)", f"{staged[-1]['before_engine_s']:.2f}"]
        ]
        for phase, seconds in body["models"]["cutout"]["load_timings_s"].items():
            rows.append([f"cutout: {phase.removesuffix('_s').replace('_', ' ')}", f"{seconds:.2f}"])
        rows.append(
            ["diffusion libraries: import, resolve classes (once)", f"{body['startup']['diffusion_libraries_s']:.2f}"]
        )
        for name in DIFFUSION_EFFECTS:
            model = body["models"][name]
            start, end = model["load_window_s"]
            rows.append(
                [
                    f"{name}: load {model['load_timings_s'].get('load_s', 0):.2f} s in [{start:.1f}, {end:.1f}] s, "
                    f"warm forward",
                    f"{model['load_timings_s'].get('warm_forward_s', 0):.2f}",
                ]
            )
        table(
            "Where the time goes (last run with four pipelines; seconds since engine creation in brackets)",
            ["phase", "seconds"],
            rows,
        )

        sizes = production_bytes()
        imports_s = staged[-1]["before_engine_s"] + body["models"]["cutout"]["load_timings_s"].get("import_s", 0)
        libraries_s = body["startup"]["diffusion_libraries_s"] or 0.0
        rows = []
        low, high = L4_READ_GBPS
        cutout_lo = imports_s + sizes["cutout"] / 1e9 / high + sizes["cutout"] / 1e9 / L4_H2D_GBPS + L4_WARM_S["cutout"]
        cutout_hi = imports_s + sizes["cutout"] / 1e9 / low + sizes["cutout"] / 1e9 / L4_H2D_GBPS + L4_WARM_S["cutout"]
        rows.append(["cutout", f"{sizes['cutout'] / 1e9:.2f}", f"{cutout_lo:.0f}-{cutout_hi:.0f}"])
        # Pipelines read in parallel but share the image's read throughput: each is ready when the bytes of
        # the pipelines read alongside it are in, plus its own copy and warm forward (one at a time).
        total = sum(sizes[name] for name in DIFFUSION_EFFECTS)
        for name in DIFFUSION_EFFECTS:
            read_lo, read_hi = total / 1e9 / high, total / 1e9 / low
            own = sizes[name] / 1e9 / L4_H2D_GBPS + L4_WARM_S[name]
            soonest = cutout_lo + libraries_s + read_lo + own
            latest = cutout_hi + libraries_s + read_hi + own
            rows.append([name, f"{sizes[name] / 1e9:.2f}", f"{soonest:.0f}-{latest:.0f} (at most)"])
        table(
            f"L4 estimate: process start -> ready, reading {low}-{high} GB/s from the image, {L4_H2D_GBPS} GB/s to the "
            "GPU, imports as measured here (add ~5 s for the instance and GPU)",
            ["model", "GB read (fp16)", "seconds"],
            rows,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
