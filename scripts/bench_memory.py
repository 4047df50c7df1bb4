"""Peak extra memory of one request: the request path of before (a reference kept here) against now.

    .venv/bin/python scripts/bench_memory.py [--megapixels 12] [--sizes 2048,4096] [--threads 2]

The request: a 12 MP JPEG (4000 x 3000), `cutout` plus the four classic effects, background
transparent, PNG, at `max_size` 2048 and 4096. Measured for

* **before**: the path as it was, reproduced in `reference_request` — the upload converted to
  float at full size and then resized, the effects run concurrently (`asyncio.gather`), each on
  its own full-size float copies, then encoded;
* **after**: the service's own `Flow.process` (effects one after another under the memory
  budget, encodes and stores overlapping the next effect);
* **after, one effect**: the same request with only the single most expensive effect, the
  reference for "the 5-effect request costs at most 1.3x its most expensive effect".

The cutout mask comes from the mask cache in every measured run (written by one run beforehand):
the model's forward is the same for every request size (its input is resized to the model's
size) and is measured on its own, in the line "mask forward".

Memory on the CPU (no GPU here): the peak resident set size (`VmHWM`) during the call, reset
before it through /proc/self/clear_refs, minus the resident size just before it. glibc's mmap
threshold is pinned at 128 KiB and `malloc_trim(0)` runs before each call, so memory freed by
earlier calls is back with the OS and cannot hide a call's footprint. On CUDA the same runs
report `torch.cuda.max_memory_allocated` over the call instead (device memory). Each row is the
maximum over `--repeat` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache.store import LocalStore
from effects import EFFECTS
from effects.background import Background, compose
from effects.engine import CUTOUT, Engine, output_size
from service import imaging
from service.flow import Flow
from service.forms import ProcessRequest, parse_request
from service.settings import Settings
from tests.support import photos
from tests.support.weights import write_inspyrenet

CLASSIC = ("blackwhite", "dithering", "popart", "retro8bit")
MB = 1024 * 1024
M_MMAP_THRESHOLD = -3


def glibc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


LIBC = glibc()


def settle() -> None:
    gc.collect()
    if LIBC is not None:
        LIBC.malloc_trim(0)


def rss_bytes(field: str) -> int:
    with Path("/proc/self/status").open(encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(call: Callable[[], object], device: torch.device) -> tuple[int, float]:
    """(peak extra bytes, seconds) of one call."""
    settle()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        with Path("/proc/self/clear_refs").open("w", encoding="ascii") as refs:
            refs.write("5")  # resets VmHWM to the current resident size
        before = rss_bytes("VmRSS")
    started = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = rss_bytes("VmHWM")
    del result
    return peak - before, seconds


def photo_jpeg(megapixels: float) -> bytes:
    """A photo-like 4:3 JPEG of about `megapixels`."""
    height = int((megapixels * 1e6 * 3 / 4) ** 0.5)
    return photos.jpeg(height * 4 // 3, height, seed=3, quality=90)


# ------------------------------------------------------------------------ before


def reference_render_background(
    engine: Engine, image: torch.Tensor, mask: torch.Tensor | None, background: Background, max_size: int
) -> torch.Tensor:
    """The background step as it was: the whole upload as float at full size, then resized."""
    height, width = output_size(image.shape[1], image.shape[2], max_size)
    with torch.inference_mode():
        pixels = image.unsqueeze(0).to(torch.float32).div_(255.0)
        if (height, width) != (image.shape[1], image.shape[2]):
            pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        rgb = pixels[:, :3].clamp(0.0, 1.0)
        source_alpha = pixels[:, 3:4].clamp(0.0, 1.0) if image.shape[0] == 4 else None
        alpha = None
        if mask is not None:
            assert engine._cutout is not None
            alpha = engine._cutout.to_alpha(mask, height, width).to(torch.float32)
        return compose(rgb, alpha, source_alpha, background)


def reference_request(engine: Engine, upload: bytes, mask: torch.Tensor, request: ProcessRequest) -> list[bytes]:
    """The request path as it was: decode, upload, background, then every effect at once."""
    decoded = imaging.decode(upload, 50_000_000)
    image = engine.upload(decoded.pixels)
    del decoded
    base = reference_render_background(engine, image, mask, request.background, request.max_size)
    del image

    def one(name: str) -> bytes:
        effect = EFFECTS[name]
        rendered = base if effect.kind == "model" else engine.apply_classic(effect, base, request.params[name], 0)
        pixels = engine.download(rendered)
        del rendered
        return imaging.encode(pixels, request.format, 3)

    with ThreadPoolExecutor(max_workers=len(request.effects)) as pool:  # asyncio.gather over to_thread
        return list(pool.map(one, request.effects))


# ------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if LIBC is not None:
        LIBC.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    load_before = os.getloadavg()

    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    write_inspyrenet(workdir / "models", "fast", seed=0)
    settings = Settings(
        models_dir=workdir / "models",
        cache_dir=workdir / "cache",
        diffusion_effects=[],
        device=args.device,
        public_url="http://127.0.0.1",
    )
    engine = Engine(device=settings.device, models_dir=settings.models_dir, cutout_model=settings.cutout_model)
    device = engine.device
    upload = photo_jpeg(args.megapixels)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    store = LocalStore(settings.cache_dir, settings.public_url)
    flow = Flow(engine, store, settings)
    names = (CUTOUT, *CLASSIC)
    seed = iter(range(1, 1_000_000))

    def request_for(effects: tuple[str, ...], max_size: int) -> ProcessRequest:
        return parse_request(
            effects=",".join(effects),
            background="transparent",
            output_format="png",
            max_size=max_size,
            params=None,
            seed=next(seed),  # a new result key every run: computed, never a cache hit
            settings=settings,
        )

    # One run fills the mask cache; the mask forward is measured on its own.
    loop.run_until_complete(flow.process(upload, request_for((CUTOUT,), 2048)))
    decoded = imaging.decode(upload, 50_000_000)
    image = engine.upload(decoded.pixels)
    model_input = engine.prepare_mask_input(image)
    forward_bytes, _ = measure(lambda: loop.run_until_complete(engine.mask(model_input)), device)
    mask = loop.run_until_complete(engine.mask(model_input))
    del decoded, image

    def after(effects: tuple[str, ...], max_size: int) -> Callable[[], object]:
        return lambda: loop.run_until_complete(flow.process(upload, request_for(effects, max_size)))

    def before(effects: tuple[str, ...], max_size: int) -> Callable[[], object]:
        return lambda: reference_request(engine, upload, mask, request_for(effects, max_size))

    def worst(call: Callable[[], Callable[[], object]]) -> tuple[int, float]:
        runs = [measure(call(), device) for _ in range(args.repeat)]
        return max(run[0] for run in runs), min(run[1] for run in runs)

    print(f"device {device} ({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'peak RSS, no GPU'})")
    print(f"photo {len(upload) / MB:.1f} MiB JPEG, {args.megapixels:g} MP; torch threads {args.threads}")
    model_size = engine._cutout.base_size if engine._cutout else "?"
    print(f"mask forward (model input {model_size} px): {forward_bytes / MB:.0f} MB")
    print()
    header = f"{'max_size':>8}  {'request':<34} {'peak extra MB':>13} {'s':>6}  ratio"
    print(header)
    print("-" * len(header))
    for max_size in [int(size) for size in args.sizes.split(",")]:
        singles = {
            name: worst(lambda name=name, size=max_size: after((CUTOUT, name), size))  # type: ignore[misc]
            for name in CLASSIC
        }
        heaviest = max(singles, key=lambda name: singles[name][0])
        reference, reference_s = worst(lambda size=max_size: before(names, size))  # type: ignore[misc]
        now, now_s = worst(lambda size=max_size: after(names, size))  # type: ignore[misc]
        single, single_s = singles[heaviest]
        rows = [
            ("before: cutout + 4 classic", reference, reference_s, ""),
            ("after:  cutout + 4 classic", now, now_s, f"{now / reference:.2f}x before"),
            (f"after:  cutout + {heaviest} (heaviest)", single, single_s, f"5-effect = {now / single:.2f}x this"),
        ]
        for label, peak, seconds, ratio in rows:
            print(f"{max_size:>8}  {label:<34} {peak / MB:>13.0f} {seconds:>6.2f}  {ratio}")
    print()
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    loop.run_until_complete(engine.stop())
    loop.close()


if __name__ == "__main__":
    main()
