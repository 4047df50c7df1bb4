"""Benchmark the codecs: today's path and the new one side by side, in one run.

    .venv/bin/python scripts/bench_codecs.py [--parts decode,tolerance,encode,formats,request]
                                             [--runs 7] [--threads 2] [--request-runs 3]

Parts (every row prints min and median wall time over --runs after one warm-up; "ratio" is the
old median over the new median, higher is better; the load average is printed with each table):

* decode     A 12 MP JPEG (4032 x 3024, scikit-image's cat enlarged with sensor-like noise,
             quality 90) to the 2048-px working image: old = Pillow decode + float resize as
             `Engine.render_background` does on the CPU; new = `codecs.load` (libjpeg-turbo, DCT
             scaling when it applies, 8-bit resize). Also the same at max_size 1024, and the bare
             decoder at each DCT scale (why only 1/2, 1/4, 1/8 are used). Target: >= 3x.
* tolerance  max and p99.9 of the per-channel difference, new working image vs old, on seven
             scikit-image photos enlarged to 12 MP JPEGs, at max_size 2048, 1024 and 512.
* encode     Five 2048 x 1536 RGBA results (the cutout and four effects of it) as PNG: Pillow/zlib
             level 3 (today, one after another and concurrently as the flow ran them) against
             other encoders on PyPI that are installed (missing ones are listed); each is checked
             to decode to identical pixels. Target: >= 4x at <= 1.2x the bytes of zlib level 3.
* formats    WebP at each `method` and JPEG, one 2048 x 1536 result, to pick WebP's speed.
* request    The whole `cutout,blackwhite,dithering,popart,retro8bit` request for a 12 MP JPEG at
             the default max_size through the real app in-process (random fast 384-px weights on
             the CPU), old codecs patched in vs new, alternated, each on a photo never seen (no
             cache hits). Target: >= 2x. Ends with an L4 estimate of the request's server time.

The machine's cores are shared with other work: compare ratios measured in the same run, and
rerun when the load average is high. Needs scikit-image (requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effects import blackwhite, dithering, popart, retro8bit
from effects.engine import output_size
from scripts.measure import load_average, samples_ms, table
from service import codecs, imaging
from tests.support import photos

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")
TWELVE_MP = (4032, 3024)  # width, height: a 12 MP phone photo
RESULT = (2048, 1536)
BIG = 10**9
# README "The physical floor on an L4": one InSPyReNet SwinB forward at 1024 px at the L4's dense fp16 peak.
L4_MASK_FLOOR_MS = 12.9
L4_GOAL_MS = 300.0


def stats(samples: list[float]) -> tuple[float, float]:
    return min(samples), statistics.median(samples)


def host_upload(pixels: np.ndarray) -> torch.Tensor:
    """As `Engine.upload` on the CPU."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def to_working(image: torch.Tensor, max_size: int) -> torch.Tensor:
    """As `Engine.render_background`: float, resized to the output size on the device."""
    height, width = output_size(image.shape[1], image.shape[2], max_size)
    pixels = image.unsqueeze(0).to(torch.float32).div_(255.0)
    if (height, width) != tuple(image.shape[1:]):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return pixels


def old_working(data: bytes, max_size: int) -> torch.Tensor:
    return to_working(host_upload(imaging.decode(data, BIG).pixels), max_size)


def new_working(data: bytes, max_size: int, needs_mask: bool = True) -> torch.Tensor:
    loaded = codecs.load(data, BIG, max_size, torch.device("cpu"), host_upload, needs_mask)
    return to_working(loaded.image, max_size)


def quantise(image: torch.Tensor) -> np.ndarray:
    return image[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------ parts


def part_decode(runs: int) -> None:
    data = photos.encode(photos.real_photo(*TWELVE_MP, "chelsea"), "JPEG", quality=90)
    rows = []
    for max_size, needs_mask in ((2048, True), (1024, True), (1024, False)):
        old = samples_ms(lambda m=max_size: old_working(data, m), runs)
        new = samples_ms(lambda m=max_size, k=needs_mask: new_working(data, m, k), runs)
        decoder = codecs.decode(data, BIG, max_size, codecs.MASK_INPUT_SIDE if needs_mask else 0).decoder
        shrunk = max_size == 2048 or not needs_mask
        new_name = f"new: {decoder} + " + ("8-bit resize" if shrunk else "float resize (mask needs 1024 px)")
        for name, samples in (("old: Pillow + float resize", old), (new_name, new)):
            low, median = stats(samples)
            ratio = statistics.median(old) / median
            rows.append(
                [f"{max_size}{'' if needs_mask else ', no mask'}", name, f"{low:.0f}", f"{median:.0f}", f"{ratio:.2f}x"]
            )
    table(
        f"Decode a {TWELVE_MP[0]} x {TWELVE_MP[1]} JPEG ({len(data) / 1e6:.1f} MB) to the working image, "
        f"{runs} runs, target >= 3x at 2048",
        ["max_size", "path", "min ms", "median ms", "ratio"],
        rows,
    )
    rows = []
    width, height = TWELVE_MP
    pillow = samples_ms(lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), runs)
    rows.append(["Pillow, full size, to NumPy", f"{width} x {height}", *(f"{v:.0f}" for v in stats(pillow))])
    for numerator, denominator in ((1, 1), (7, 8), (5, 8), (1, 2), (1, 4), (1, 8)):
        w, h = -(-width * numerator // denominator), -(-height * numerator // denominator)
        samples = samples_ms(lambda w=w, h=h: simplejpeg.decode_jpeg(data, "RGB", min_width=w, min_height=h), runs)
        shape = simplejpeg.decode_jpeg(data, "RGB", min_width=w, min_height=h).shape
        rows.append(
            [
                f"libjpeg-turbo at {numerator}/{denominator}",
                f"{shape[1]} x {shape[0]}",
                *(f"{v:.0f}" for v in stats(samples)),
            ]
        )
    table(
        "The bare decoder at each DCT scale (SIMD IDCT only at 1/1, 1/2, 1/4, 1/8)",
        ["decoder", "size", "min ms", "median ms"],
        rows,
    )


def part_tolerance() -> None:
    rows = []
    worst: dict[int, tuple[int, float]] = {}
    for index, name in enumerate(PHOTOS):
        data = photos.encode(photos.real_photo(*TWELVE_MP, name, seed=index), "JPEG", quality=90)
        for max_size in (2048, 1024, 512):
            old = quantise(old_working(data, max_size))
            new = quantise(new_working(data, max_size, needs_mask=max_size == 2048))
            assert old.shape == new.shape, (name, max_size, old.shape, new.shape)
            difference = np.abs(old.astype(np.int16) - new.astype(np.int16))
            high, tail = int(difference.max()), float(np.quantile(difference, 0.999))
            decoder = codecs.decode(data, BIG, max_size, codecs.MASK_INPUT_SIDE if max_size == 2048 else 0).decoder
            rows.append([name, str(max_size), decoder, str(high), f"{tail:.0f}", f"{difference.mean():.3f}"])
            previous = worst.get(max_size, (0, 0.0))
            worst[max_size] = (max(previous[0], high), max(previous[1], tail))
    table(
        "Tolerance: new working image vs old, per-channel |difference| in 8-bit levels (12 MP JPEGs, quality 90)",
        ["photo", "max_size", "new decoder", "max", "p99.9", "mean"],
        rows,
    )
    print("worst: " + ", ".join(f"max_size {m}: max {h}, p99.9 {t:.0f}" for m, (h, t) in sorted(worst.items())))


def five_results() -> list[np.ndarray]:
    """The cutout of a real photo (soft elliptical matte) and the four classic effects of it, 8-bit RGBA."""
    width, height = RESULT
    rgb = photos.real_photo(*RESULT)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    alpha = np.clip(
        (1 - ((xx - width / 2) / (width * 0.36)) ** 2 - ((yy - height / 2) / (height * 0.44)) ** 2) * 30, 0, 1
    )
    cutout = torch.from_numpy(np.dstack([rgb.astype(np.float32) / 255.0, alpha])).permute(2, 0, 1).unsqueeze(0)
    cutout[:, :3] *= cutout[:, 3:]
    rendered = [cutout]
    for module in (blackwhite, dithering, popart, retro8bit):
        effect = module.EFFECT
        assert effect.apply is not None
        with torch.inference_mode():
            rendered.append(effect.apply(cutout, effect.params(), 7))
    return [np.ascontiguousarray(quantise(image)) for image in rendered]


def _samples(pixels: np.ndarray) -> np.ndarray:
    """The array the service writes: greyscale as L/LA, opaque without alpha (as `imaging.encode`)."""
    opaque = bool(pixels[:, :, 3].min() == 255)
    if imaging._is_grey(pixels):
        return np.ascontiguousarray(pixels[:, :, 0] if opaque else pixels[:, :, (0, 3)])
    return np.ascontiguousarray(pixels[:, :, :3] if opaque else pixels)


def png_candidates() -> tuple[dict[str, Callable[[np.ndarray], bytes]], list[str]]:
    import imagecodecs

    sub, up = imagecodecs.PNG.FILTER.SUB, imagecodecs.PNG.FILTER.UP

    def pillow(level: int) -> Callable[[np.ndarray], bytes]:
        return lambda pixels: imaging.encode(pixels, "png", level)

    def libpng(level: int) -> Callable[[np.ndarray], bytes]:
        return lambda pixels: codecs.encode(pixels, "png", level)

    candidates: dict[str, Callable[[np.ndarray], bytes]] = {
        "Pillow zlib-ng 3 (today)": pillow(3),
        "Pillow zlib-ng 1": pillow(1),
        "imagecodecs libpng+zlib-ng 1 Up (new)": libpng(1),
        "imagecodecs libpng+zlib-ng 3 Up": libpng(3),
        "imagecodecs libpng+zlib-ng 1 Sub": lambda p: bytes(imagecodecs.png_encode(_samples(p), level=1, filter=sub)),
        "imagecodecs libpng+zlib-ng 1 Up RLE": lambda p: bytes(
            imagecodecs.png_encode(_samples(p), level=1, filter=up, strategy=imagecodecs.PNG.STRATEGY.RLE)
        ),
        "imagecodecs libpng+zlib-ng 1 adaptive": lambda p: bytes(imagecodecs.png_encode(_samples(p), level=1)),
        "imagecodecs libspng 1": lambda p: bytes(imagecodecs.spng_encode(_samples(p), level=1)),
    }
    missing = []
    try:
        import cv2

        def opencv(pixels: np.ndarray) -> bytes:
            samples = _samples(pixels)
            if samples.ndim == 3 and samples.shape[2] == 2:  # OpenCV has no grey+alpha PNG
                return imaging.encode(pixels, "png", 1)
            if samples.ndim == 3:
                samples = np.ascontiguousarray(samples[:, :, [2, 1, 0, 3][: samples.shape[2]]])
            ok, encoded = cv2.imencode(".png", samples, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            assert ok
            return bytes(encoded.tobytes())

        candidates[f"OpenCV {cv2.__version__} libpng+zlib 1"] = opencv
    except ImportError:
        missing.append("opencv-python")
    try:
        import pyspng

        candidates["pyspng-seunglab libspng 1"] = lambda p: bytes(pyspng.encode(_samples(p), compress_level=1))
    except ImportError:
        missing.append("pyspng-seunglab")
    try:
        import pyvips

        def vips(pixels: np.ndarray) -> bytes:
            samples = _samples(pixels)
            bands = 1 if samples.ndim == 2 else samples.shape[2]
            image = pyvips.Image.new_from_memory(samples.data, samples.shape[1], samples.shape[0], bands, "uchar")
            return bytes(image.pngsave_buffer(compression=1, filter="none"))

        candidates["pyvips libspng 1 (no filter)"] = vips
    except (ImportError, OSError):
        missing.append("pyvips")
    missing.append("fpnge (not on PyPI)")
    return candidates, missing


def part_encode(runs: int) -> dict[str, float]:
    results = five_results()
    candidates, missing = png_candidates()
    reference_bytes = sum(len(imaging.encode(p, "png", 3)) for p in results)
    cores = codecs.instance_cores()
    rows = []
    measured: dict[str, float] = {}
    today_concurrent: list[float] = []
    with ThreadPoolExecutor(max_workers=len(results)) as threads:
        # Today's flow: every result encoded in its own worker thread as its effect finished.
        today_concurrent = samples_ms(lambda: list(threads.map(candidates["Pillow zlib-ng 3 (today)"], results)), runs)
    for name, encode in candidates.items():
        encoded = [encode(pixels) for pixels in results]
        identical = all(
            np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")), pixels)
            for data, pixels in zip(encoded, results, strict=True)
        )
        size = sum(map(len, encoded))
        sequential = samples_ms(lambda e=encode: [e(pixels) for pixels in results], runs)
        pool = codecs.encode_pool()
        pooled = samples_ms(lambda e=encode, q=pool: [f.result() for f in [q.submit(e, p) for p in results]], runs)
        measured[name] = statistics.median(sequential) / len(results)
        for how, samples in (("one after another", sequential), (f"pool of {cores}", pooled)):
            low, median = stats(samples)
            rows.append(
                [
                    name,
                    how,
                    f"{low:.0f}",
                    f"{median:.0f}",
                    f"{size / 1e6:.2f}",
                    f"{size / reference_bytes:.2f}",
                    "yes" if identical else "NO",
                    f"{statistics.median(today_concurrent) / median:.2f}x",
                ]
            )
    low, median = stats(today_concurrent)
    rows.insert(
        1,
        [
            "Pillow zlib-ng 3 (today)",
            "5 threads, as the flow",
            f"{low:.0f}",
            f"{median:.0f}",
            "",
            "1.00",
            "yes",
            "1.00x",
        ],
    )
    table(
        f"PNG encode of five {RESULT[0]} x {RESULT[1]} RGBA results, {runs} runs; ratio = today's concurrent median / "
        "this median; target >= 4x at <= 1.2x bytes",
        ["encoder", "how", "min ms", "median ms", "MB", "bytes/zlib3", "identical", "ratio"],
        rows,
    )
    chosen = candidates["imagecodecs libpng+zlib-ng 1 Up (new)"]
    per_result = [len(chosen(p)) / len(imaging.encode(p, "png", 3)) for p in results]
    names = ("cutout", "blackwhite", "dithering", "popart", "retro8bit")
    print(
        "new encoder's bytes / zlib 3, per result: "
        + ", ".join(f"{n} {r:.2f}" for n, r in zip(names, per_result, strict=True))
    )
    print("not installed / not available: " + ", ".join(missing))
    return measured


def part_formats(runs: int) -> None:
    pixels = five_results()[0]
    visible = pixels[:, :, 3] > 0

    def psnr(data: bytes) -> float:
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")).astype(np.float64)
        error = ((decoded[..., :3] - pixels[..., :3]) ** 2)[visible].mean()
        return float(10 * np.log10(255.0**2 / error))

    rows = []
    for method in range(7):
        image = Image.fromarray(pixels, "RGBA")

        def webp(m: int = method, i: Image.Image = image) -> bytes:
            buffer = io.BytesIO()
            i.save(buffer, "WEBP", quality=90, method=m)
            return buffer.getvalue()

        low, median = stats(samples_ms(webp, runs))
        used = " (new)" if method == codecs.WEBP_METHOD else " (before)" if method == 4 else ""
        encoded = webp()
        rows.append(
            [
                f"WebP quality 90 method {method}{used}",
                f"{low:.0f}",
                f"{median:.0f}",
                f"{len(encoded) / 1e6:.2f}",
                f"{psnr(encoded):.2f}",
            ]
        )
    opaque = pixels.copy()
    opaque[:, :, 3] = 255
    low, median = stats(samples_ms(lambda: codecs.encode(opaque, "jpeg"), runs))
    rows.append(
        [
            "JPEG quality 92 4:4:4 (libjpeg-turbo)",
            f"{low:.0f}",
            f"{median:.0f}",
            f"{len(codecs.encode(opaque, 'jpeg')) / 1e6:.2f}",
            "",
        ]
    )
    table(
        f"One {RESULT[0]} x {RESULT[1]} result in the other formats, {runs} runs (PSNR of the visible pixels)",
        ["format", "min ms", "median ms", "MB", "PSNR dB"],
        rows,
    )


def _old_codecs() -> SimpleNamespace:
    """Today's decode and encode, patched into the flow for the comparison."""

    def load(data: bytes, max_pixels: int, max_size: int, device: torch.device, upload: Any, needs_mask: bool) -> Any:
        decoded = imaging.decode(data, max_pixels)
        return codecs.Loaded(upload(decoded.pixels), decoded.source_format, "pillow")

    async def encode_async(pixels: np.ndarray, output_format: str, level: int) -> bytes:
        return await asyncio.to_thread(imaging.encode, pixels, output_format, 3)

    return SimpleNamespace(load=load, encode_async=encode_async)


def _with_comment(data: bytes, counter: int) -> bytes:
    """The same JPEG with a COM segment: new bytes, new hash, same pixels."""
    text = f"run {counter}".encode("ascii")
    return data[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + data[2:]


def part_request(runs: int, encode_ms: dict[str, float]) -> None:
    from fastapi.testclient import TestClient

    from service import flow
    from service.app import create_app
    from service.settings import Settings
    from tests.support.weights import write_inspyrenet

    data = photos.encode(photos.real_photo(*TWELVE_MP, "chelsea"), "JPEG", quality=90)
    form = {"effects": "cutout,blackwhite,dithering,popart,retro8bit", "background": "transparent", "format": "png"}
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as scratch:
        workdir = Path(scratch)
        write_inspyrenet(workdir / "models", "fast", seed=0)
        settings = Settings(
            models_dir=workdir / "models",
            cache_dir=workdir / "cache",
            diffusion_effects=[],
            public_url="http://testserver",
            device="cpu",
            rate_limit_process="100000/minute",
            rate_limit_read="100000/minute",
        )
        new_codecs = flow.codecs
        old_codecs = _old_codecs()
        times: dict[str, list[float]] = {"old": [], "new": []}
        stages: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        with TestClient(create_app(settings)) as client:
            logging.disable(logging.INFO)  # no access log lines between the tables
            while client.get("/ready").status_code != 200:
                time.sleep(0.1)
            counter = 0
            for index in range(runs + 1):
                for which, module in (("old", old_codecs), ("new", new_codecs)):
                    flow.codecs = module  # type: ignore[assignment]
                    counter += 1
                    started = time.perf_counter()
                    response = client.post(
                        "/v1/process", data=form, files={"image": ("p.jpg", _with_comment(data, counter))}
                    )
                    elapsed = (time.perf_counter() - started) * 1000.0
                    response.raise_for_status()
                    body = response.json()
                    assert all(
                        r["cache"] == "miss" and (r["width"], r["height"]) == RESULT for r in body["results"].values()
                    )
                    if index:  # the first round warms both paths
                        times[which].append(elapsed)
                        stages[which].append(body["timings_ms"])
            flow.codecs = new_codecs  # type: ignore[assignment]
    rows = []
    for which in ("old", "new"):
        low, median = stats(times[which])
        parts = {key: statistics.median(t[key] for t in stages[which]) for key in stages[which][0]}
        rows.append(
            [
                which,
                f"{low:.0f}",
                f"{median:.0f}",
                f"{statistics.median(times['old']) / median:.2f}x",
                " ".join(f"{k} {v:.0f}" for k, v in parts.items() if k != "total"),
            ]
        )
    table(
        f"Whole request {form['effects']} on a 12 MP JPEG, max_size 2048, fast weights on the CPU, {runs} runs "
        "each (alternated), target >= 2x",
        ["codecs", "min ms", "median ms", "ratio", "server stages, median ms (encode summed over results)"],
        rows,
    )
    l4_estimate(data, encode_ms)


def cpu_ms(call: Callable[[], object], runs: int = 5) -> float:
    """The least CPU time of the calling thread for `call`: what an uncontended core would take."""
    call()
    best = float("inf")
    for _ in range(runs):
        started = time.thread_time()
        call()
        best = min(best, (time.thread_time() - started) * 1000.0)
    return best


def l4_estimate(data: bytes, encode_ms: dict[str, float]) -> None:
    """The request's server time on an L4 instance (8 vCPUs), from CPU times measured in this run.

    CPU times (not wall times) because this machine's cores are shared: they are what one
    uncontended core takes, assumed as fast as one of the instance's vCPUs.
    """
    hash_ms = cpu_ms(lambda: hashlib.sha256(data).hexdigest())
    cpu_decode_ms = cpu_ms(lambda: simplejpeg.decode_jpeg(data, "RGB"))
    results = five_results()
    per_result = [cpu_ms(lambda p=p: codecs.encode(p, "png", 1), 3) for p in results]
    # Five results on 8 vCPUs: all encode at once; the slowest one sets the wall time.
    encode_wall = max(per_result)
    download_ms = 5 * RESULT[0] * RESULT[1] * 4 / 25e9 * 1000  # PCIe 4.0 x16, ~25 GB/s effective
    rows = [
        ["sha256 of the upload (CPU time, measured here)", f"{hash_ms:.0f}"],
        [
            f"nvJPEG decode, 12 MP: hybrid backend's CPU Huffman <= 1/2 of libjpeg-turbo's {cpu_decode_ms:.0f} ms",
            f"{cpu_decode_ms / 2:.0f}",
        ],
        ["mask forward 1024 px: FLOP floor x 2 (README)", f"{2 * L4_MASK_FLOOR_MS:.0f}"],
        ["resize, mask upsample, foreground, compose, 4 classic effects on the GPU", "10"],
        [f"download 5 results ({5 * RESULT[0] * RESULT[1] * 4 / 1e6:.0f} MB over PCIe)", f"{download_ms:.0f}"],
        [
            "PNG encode of 5 results in parallel, the slowest one (CPU ms each: "
            + ", ".join(f"{v:.0f}" for v in per_result)
            + ")",
            f"{encode_wall:.0f}",
        ],
    ]
    total = hash_ms + cpu_decode_ms / 2 + 2 * L4_MASK_FLOOR_MS + 10 + download_ms + encode_wall
    rows.append(["total server time, store writes excluded", f"{total:.0f}"])
    rows.append(["goal", f"{L4_GOAL_MS:.0f}"])
    table(
        "L4 estimate of the same request (an estimate, not a measurement; store writes to GCS not counted)",
        ["stage", "ms"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="decode,tolerance,encode,formats,request")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--request-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    unknown = parts - {"decode", "tolerance", "encode", "formats", "request"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    print(
        f"codecs: {codecs.describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {load_average()}"
    )
    encode_ms: dict[str, float] = {}
    if "decode" in parts:
        part_decode(args.runs)
    if "tolerance" in parts:
        part_tolerance()
    if "encode" in parts:
        encode_ms = part_encode(args.runs)
    if "formats" in parts:
        part_formats(args.runs)
    if "request" in parts:
        part_request(args.request_runs, encode_ms)
    print(f"\nend: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
