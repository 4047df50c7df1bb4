"""Benchmark the cutout path against transparent-background's own, in the same run, on the same weights.

    .venv/bin/python scripts/bench_cutout.py [--parts foreground,flops,e2e,cold,throughput]
                                             [--repeats 3] [--clients 1,4,16] [--requests 4]

Parts (each prints a table; "ratio" is reference time / our time, higher is better):

* foreground   Foreground colour estimation alone on a 12 MP photo: ours (`effects.matting`)
               vs pymatting's `estimate_foreground_ml` (warm: compiled before timing). Two masks:
               a photo-like one (soft only along the subject's edge and hair) and the worst case
               (every pixel soft). Also the colour error of each against the known foreground.
               Target: ours >= 10x faster.
* flops        FLOPs of one InSPyReNet forward at 1024 x 1024 (and 384) from torch's FLOP counter,
               and the time that is on an NVIDIA L4 at its dense fp16 tensor-core peak: the floor.
* stages       The same cutout in-process, stage by stage, ours next to Remover's own steps.
* e2e          A 12 MP JPEG to a full-size RGBA PNG: our service (`python -m service`, POST
               /v1/effects/cutout, max_size=4096) vs `Remover(mode='fast').process(type='rgba')`
               + PIL save, warm, same random fast (384 px) weights. Target: ours >= 3x faster.
* cold         Process start -> `/ready` 200 with a random base (1024 px) checkpoint, vs a fresh
               process constructing `Remover(mode='base', ckpt=...)`. Target: ours <= 0.5x.
* throughput   Images per second through the service with 1, 4 and 16 concurrent clients
               (distinct photos, so no cache hits), fast weights.

Every run writes its own random weights to a temporary directory; nothing touches the network.
Times are wall-clock medians over --repeats. The machine's two cores are shared with other
work, so the table also prints the load average: rerun if it was high.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effects.matting import estimate_foreground
from scripts.measure import samples_ms, table
from service import codecs
from tests.support import photos
from tests.support.budget import flops_per_forward
from tests.support.photos import visible_error
from tests.support.server import Server, running_server
from tests.support.weights import write_inspyrenet

# NVIDIA L4 datasheet: 242 TFLOPS fp16 tensor core with structured sparsity, 121 TFLOPS dense.
L4_FP16_DENSE_FLOPS = 121e12
L4_NAME = "NVIDIA L4 fp16 tensor core, dense"
TWELVE_MP = (3000, 4000)  # height, width


def median_time(run: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `repeats` calls, the first one included."""
    return statistics.median(samples_ms(run, repeats, warmups=0)) / 1000.0


# ---------------------------------------------------------------------------------------------- parts


def part_foreground(repeats: int) -> None:
    from pymatting import estimate_foreground_ml

    height, width = TWELVE_MP
    image, alpha, truth = photos.composite(height, width, seed=7)
    worst = torch.rand(1, 1, height, width, generator=torch.Generator().manual_seed(1))
    # Remover hands pymatting the photo as float64 / 255 and its mask as float32.
    image_np = image[0].permute(1, 2, 0).double().numpy()
    estimate_foreground_ml(image_np[:64, :64], alpha[0, 0, :64, :64].numpy())  # compile
    estimate_foreground(image[..., :64, :64], alpha[..., :64, :64])
    rows = []
    for name, mask in (("photo-like mask", alpha), ("every pixel soft", worst)):
        mask_np = mask[0, 0].numpy()
        soft = float(((mask > 1 / 512) & (mask < 1 - 1 / 512)).float().mean())
        reference = median_time(lambda m=mask_np: estimate_foreground_ml(image_np, m), repeats)  # type: ignore[misc]
        ours = median_time(lambda m=mask: estimate_foreground(image, m), repeats)  # type: ignore[misc]
        rows.append([name, f"{soft:.1%}", f"{reference * 1000:.0f}", f"{ours * 1000:.0f}", f"{reference / ours:.1f}x"])
    table(
        f"Foreground estimation, {width} x {height} (12 MP), median of {repeats}, target ratio >= 10x",
        ["mask", "soft px", "pymatting ms", "ours ms", "ratio"],
        rows,
    )
    ours_error = visible_error(estimate_foreground(image, alpha)[0], truth, alpha[0, 0])
    reference_np = estimate_foreground_ml(image_np, alpha[0, 0].numpy())
    reference_error = visible_error(torch.from_numpy(reference_np).permute(2, 0, 1).float(), truth, alpha[0, 0])
    keep_error = visible_error(image[0], truth, alpha[0, 0])
    table(
        "Foreground colour error on the photo-like composite (alpha-weighted mean |F - F_true| on soft pixels)",
        ["estimate", "error", "vs pymatting"],
        [
            ["pymatting estimate_foreground_ml", f"{reference_error:.4f}", "1.00"],
            ["ours (effects.matting)", f"{ours_error:.4f}", f"{ours_error / reference_error:.2f}"],
            ["the photo itself (no estimation)", f"{keep_error:.4f}", f"{keep_error / reference_error:.2f}"],
        ],
    )


def part_flops() -> None:
    rows = []
    for size in (1024, 384):
        flops = flops_per_forward(size)
        floor_ms = flops / L4_FP16_DENSE_FLOPS * 1000
        rows.append([f"{size} x {size}", f"{flops / 1e9:.1f}", f"{floor_ms:.2f}", f"{1000 / floor_ms:.0f}"])
    table(
        f"InSPyReNet SwinB forward cost (torch FLOP counter: matmuls + convolutions) on an {L4_NAME}"
        f" ({L4_FP16_DENSE_FLOPS / 1e12:.0f} TFLOPS)",
        ["input", "GFLOP / image", "floor ms / image", "ceiling images / s"],
        rows,
    )


def part_cold_start(workdir: Path, repeats: int) -> None:
    models_dir = workdir / "models-base"
    pth = workdir / "ckpt_base.pth"
    write_inspyrenet(models_dir, "base", seed=0, pth=pth)
    reference_code = (
        "import os, warnings; warnings.filterwarnings('ignore'); "
        "from transparent_background import Remover; "
        f"Remover(mode='base', jit=False, device='cpu', ckpt={str(pth)!r})"
    )
    env = {**os.environ, "TRANSPARENT_BACKGROUND_FILE_PATH": str(workdir), "NO_ALBUMENTATIONS_UPDATE": "1"}
    ours, reference = [], []
    for _ in range(repeats):
        env = {"CUTOUT_MODELS_DIR": str(models_dir)}
        with running_server(workdir, env, wait_for="/ready", timeout_s=900) as service:
            assert service.ready_after_s is not None
            ours.append(service.ready_after_s)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", reference_code], env=env, check=True, capture_output=True)
        reference.append(time.perf_counter() - started)
    ours_s, reference_s = statistics.median(ours), statistics.median(reference)
    table(
        f"Cold start with a random base (1024 px) checkpoint, median of {repeats}, target ratio <= 0.5",
        ["what", "seconds", "ratio"],
        [
            ["Remover(mode='base', ckpt=...) in a fresh process", f"{reference_s:.1f}", "1.00"],
            [
                "python -m service -> /ready 200 (load + warm-up forward)",
                f"{ours_s:.1f}",
                f"{ours_s / reference_s:.2f}",
            ],
        ],
    )


def part_end_to_end(service: Server, workdir: Path, pth: Path, repeats: int) -> None:
    import httpx

    height, width = TWELVE_MP
    uploads = [photos.composite_jpeg(height, width, seed=100 + i) for i in range(repeats + 1)]
    os.environ["TRANSPARENT_BACKGROUND_FILE_PATH"] = str(workdir)
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    from transparent_background import Remover

    remover = Remover(mode="fast", jit=False, device="cpu", ckpt=str(pth))

    def reference(data: bytes) -> bytes:
        with Image.open(io.BytesIO(data)) as opened:
            rgba = remover.process(opened.convert("RGB"), type="rgba")
        buffer = io.BytesIO()
        rgba.save(buffer, "PNG")
        return buffer.getvalue()

    def ours(data: bytes) -> bytes:
        response = httpx.post(
            f"{service.url}/v1/effects/cutout",
            files={"image": ("photo.jpg", data, "image/jpeg")},
            data={"background": "transparent", "format": "png", "max_size": "4096"},
            timeout=600.0,
        )
        response.raise_for_status()
        return response.content

    reference(uploads[0])  # warm: pymatting compiled, buffers allocated
    ours(uploads[0])
    reference_times, our_times = [], []
    for data in uploads[1:]:  # a new photo each time: no mask or result cache hits
        started = time.perf_counter()
        reference_bytes = reference(data)
        reference_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        our_bytes = ours(data)
        our_times.append(time.perf_counter() - started)
    with Image.open(io.BytesIO(our_bytes)) as result:
        assert result.size == (width, height) and result.mode == "RGBA", (result.size, result.mode)
    reference_s, ours_s = statistics.median(reference_times), statistics.median(our_times)
    table(
        f"End to end: {width} x {height} JPEG -> full-size RGBA PNG, fast weights, median of {repeats},"
        " target ratio >= 3x",
        ["path", "seconds", "PNG MB", "ratio"],
        [
            [
                "Remover.process(type='rgba') + PIL save",
                f"{reference_s:.2f}",
                f"{len(reference_bytes) / 1e6:.1f}",
                "1.0x",
            ],
            [
                "service POST /v1/effects/cutout",
                f"{ours_s:.2f}",
                f"{len(our_bytes) / 1e6:.1f}",
                f"{reference_s / ours_s:.1f}x",
            ],
        ],
    )


def part_stages(workdir: Path, pth: Path, safetensors: Path) -> None:
    """Where the end-to-end time goes, stage by stage, in-process: ours vs Remover's own steps."""
    import cv2
    from pymatting import estimate_foreground_ml

    from effects.inspyrenet import load_cutout_model

    height, width = TWELVE_MP
    data = photos.composite_jpeg(height, width, seed=200)
    os.environ["TRANSPARENT_BACKGROUND_FILE_PATH"] = str(workdir)
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    from transparent_background import Remover

    remover = Remover(mode="fast", jit=False, device="cpu", ckpt=str(pth))
    model = load_cutout_model(safetensors, torch.device("cpu"), torch.float32)
    estimate_foreground_ml(np.zeros((8, 8, 3)), np.zeros((8, 8)))

    def timed(stages: list[tuple[str, float]], name: str, run: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = run()
        stages.append((name, time.perf_counter() - started))
        return result

    def run_reference() -> list[tuple[str, float]]:
        reference: list[tuple[str, float]] = []
        photo = timed(reference, "decode JPEG (PIL)", lambda: Image.open(io.BytesIO(data)).convert("RGB"))
        x = timed(reference, "resize + normalise (PIL, numpy)", lambda: remover.transform(photo).unsqueeze(0))
        with torch.no_grad():
            pred = timed(reference, "forward 384 px", lambda: remover.model(x))
        mask = timed(
            reference,
            "upsample mask, to numpy",
            lambda: F.interpolate(pred, photo.size[::-1], mode="bilinear", align_corners=True).numpy().squeeze(),
        )
        pixels = np.array(photo)
        colours = timed(reference, "pymatting estimate_foreground_ml", lambda: remover.matting_fn(pixels / 255.0, mask))
        rgba = timed(
            reference,
            "to 8 bit, cv2.merge",
            lambda: cv2.merge(
                [*cv2.split((255 * np.clip(colours, 0.0, 1.0) + 0.5).astype(np.uint8)), (mask * 255).astype(np.uint8)]
            ),
        )
        timed(reference, "PNG encode (PIL default, level 6)", lambda: Image.fromarray(rgba).save(io.BytesIO(), "PNG"))
        return reference

    def run_ours() -> tuple[list[tuple[str, float]], torch.Tensor]:
        ours: list[tuple[str, float]] = []
        with torch.inference_mode():
            array = timed(ours, "decode JPEG (libjpeg-turbo)", lambda: codecs.decode(data, 10**9).pixels)
            image = timed(ours, "to a (3, H, W) tensor", lambda: torch.from_numpy(array).permute(2, 0, 1).contiguous())
            prepared = timed(ours, "prepare (resize + normalise)", lambda: model.prepare(image))
            probability = timed(ours, "forward 384 px", lambda: model.forward(prepared[None]))
            alpha = timed(ours, "to_alpha (upsample mask)", lambda: model.to_alpha(probability, height, width))
            rgb = timed(ours, "photo to float", lambda: image[None].to(torch.float32).div_(255.0))
            output = torch.empty(1, 4, height, width)
            timed(
                ours,
                "estimate_foreground (into the output)",
                lambda: estimate_foreground(rgb, alpha, out=output[:, :3]),
            )
            output[:, 3:] = alpha
            quantised = timed(
                ours,
                "to 8 bit, (H, W, 4) on the host",
                lambda: output[0].mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous().numpy(),
            )
        timed(ours, "PNG encode (libpng + zlib-ng, level 1)", lambda: codecs.encode(quantised, "png", 1))
        return ours, alpha

    run_reference()  # warm: first forwards allocate, pymatting's compiled code loads
    run_ours()
    reference = run_reference()
    ours, alpha = run_ours()
    soft = float(((alpha > 1 / 512) & (alpha < 1 - 1 / 512)).float().mean())
    title = f"Stages of one {width} x {height} cutout, in-process, fast weights (mask soft on {soft:.1%} of pixels)"
    for who, stages in (("Remover", reference), ("ours", ours)):
        rows = [[name, f"{seconds * 1000:.0f}"] for name, seconds in stages]
        rows.append([f"{who} total", f"{sum(seconds for _, seconds in stages) * 1000:.0f}"])
        table(f"{title}: {who}", ["stage", "ms"], rows)


def part_throughput(service: Server, clients: list[int], requests_per_client: int, size: tuple[int, int]) -> None:
    import httpx

    height, width = size
    rows = []
    seed = 10_000

    async def level(count: int, first_seed: int) -> float:
        uploads = [
            [photos.composite_jpeg(height, width, first_seed + c * 1000 + r) for r in range(requests_per_client)]
            for c in range(count)
        ]
        async with httpx.AsyncClient(base_url=service.url, timeout=1200.0) as client:

            async def one_client(mine: list[bytes]) -> None:
                for data in mine:
                    response = await client.post(
                        "/v1/effects/cutout",
                        files={"image": ("photo.jpg", data, "image/jpeg")},
                        data={"background": "transparent", "format": "png"},
                    )
                    response.raise_for_status()

            started = time.perf_counter()
            await asyncio.gather(*(one_client(mine) for mine in uploads))
            return time.perf_counter() - started

    for count in clients:
        elapsed = asyncio.run(level(count, seed))
        seed += 100_000
        total = count * requests_per_client
        rows.append(
            [str(count), str(total), f"{elapsed:.1f}", f"{total / elapsed:.2f}", f"{elapsed / total * 1000:.0f}"]
        )
    table(
        f"Throughput: {width} x {height} JPEG -> cutout PNG through the service, fast weights, CPU",
        ["clients", "images", "seconds", "images / s", "ms / image"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="flops,foreground,stages,e2e,cold,throughput")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the throughput part")
    parser.add_argument("--throughput-size", default="1200x1600", help="HxW of the throughput photos")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    unknown = parts - {"foreground", "flops", "stages", "e2e", "cold", "throughput"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")

    if "flops" in parts:
        part_flops()
    if "foreground" in parts:
        part_foreground(args.repeats)
    with tempfile.TemporaryDirectory(prefix="bench-cutout-") as scratch:
        workdir = Path(scratch)
        if parts & {"stages", "e2e", "throughput"}:
            models_dir = workdir / "models-fast"
            pth = workdir / "ckpt_fast.pth"
            safetensors = write_inspyrenet(models_dir, "fast", seed=0, pth=pth)
            if "stages" in parts:
                part_stages(workdir, pth, safetensors)
        if parts & {"e2e", "throughput"}:
            env = {"CUTOUT_MODELS_DIR": str(models_dir)}
            with running_server(workdir, env, wait_for="/ready", timeout_s=900) as service:
                if "e2e" in parts:
                    part_end_to_end(service, workdir, pth, args.repeats)
                if "throughput" in parts:
                    height, width = (int(v) for v in args.throughput_size.lower().split("x"))
                    clients = [int(c) for c in args.clients.split(",")]
                    part_throughput(service, clients, args.requests, (height, width))
        if "cold" in parts:
            part_cold_start(workdir, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
