"""Fast decoding and encoding: decode only the pixels the answer needs, encode on every core.

Decoding (`decode`, `load`):

* JPEG uploads are decoded by libjpeg-turbo through `simplejpeg`, straight into a NumPy array
  (pixel-identical to Pillow's decode, which uses libjpeg-turbo too, but without Pillow's
  internal 4-byte layout and the copy out of it). When the answer is at most half the photo's
  size, the DCT is scaled down inside the decoder (1/2, 1/4 or 1/8: the scales libjpeg-turbo
  has SIMD code for; its other M/8 scales run plain C and are slower than a full decode), at
  the smallest scale that still covers the answer and keeps its exact output size.
* Everything else (PNG, WebP, GIF, HEIC, CMYK JPEGs, and any JPEG the fast path cannot read)
  goes through `service.imaging.decode`, whose errors are the service's 4xx answers.
* The pixel-bomb limit is checked against the size the file declares, before any pixel is
  decoded, whatever the decoder and whatever scale it decodes at. EXIF orientation and ICC
  conversion to sRGB apply on every path.
* On a CUDA device, baseline JPEGs in YCbCr or greyscale with no colour profile (or an sRGB
  one) are decoded on the GPU by nvJPEG (`torchvision.io.decode_jpeg(device="cuda")`);
  progressive, CMYK and colour-managed files and any decoder error fall back to the CPU path.
* On a CPU device the working image is shrunk to the output size right after decoding, in
  8-bit (torch's uint8 antialiased bilinear kernel: the filter the engine uses, computed in
  fixed point, within 1/255 of its float result); on a GPU the engine resizes on the device.

Encoding (`encode`, `encode_async`): PNG through libpng with zlib-ng
(`imagecodecs`) at the configured zlib level with the Up row filter instead of Pillow's
per-row adaptive filter search; JPEG (libjpeg-turbo) through Pillow as before, WebP through
Pillow at a faster `method`. Same PNG modes as before (greyscale results as L/LA, opaque ones
without alpha), no metadata, and the decoded PNG pixels are identical. Encodes run on a pool
with one thread per core the instance has.

The measured tolerance of reduced decoding and the benchmarks are in docs/codecs.md.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from effects import device_time
from effects.engine import output_size
from effects.inspyrenet import MODEL_SIZES
from service import imaging

log = logging.getLogger("cutout.codecs")

# libjpeg-turbo's DCT scales with SIMD code, largest reduction first.
JPEG_SCALES = (8, 4, 2)  # denominators: 1/8, 1/4, 1/2
# The subject mask is computed from a (S, S) resize of the working image and cached for every
# later max_size: an image that needs a mask is never decoded or shrunk below S on its short side.
MASK_INPUT_SIDE = max(MODEL_SIZES.values())
ORIENTATION_TAG = 0x0112
PNG_FILTER = imagecodecs.PNG.FILTER.UP
# WebP's effort stays at method 4, as before: a lower method is faster (method 2 at ~0.6x the time,
# docs/codecs.md `formats` table) but changes the lossy output, i.e. the pixels behind existing keys.
WEBP_QUALITY = 90
WEBP_METHOD = 4


@dataclass(frozen=True)
class Decoded:
    """8-bit RGB or RGBA pixels, (H, W, 3|4), possibly decoded at a reduced scale.

    `full_height` x `full_width` is the photo's size after orientation, as its file declares it:
    the output size is computed from it, so a reduced decode never changes the answer's size.
    """

    pixels: np.ndarray
    source_format: str
    full_height: int
    full_width: int
    decoder: str

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    def output_size(self, max_size: int) -> tuple[int, int]:
        return output_size(self.full_height, self.full_width, max_size)


@dataclass(frozen=True)
class Loaded:
    """The upload as a (C, H, W) uint8 tensor on the engine's device, ready for `render_background`."""

    image: torch.Tensor
    source_format: str
    decoder: str


# ------------------------------------------------------------------------ decoding


def decode(data: bytes, max_pixels: int, max_size: int | None = None, min_side: int = 0) -> Decoded:
    """Decode an upload; 4xx errors as `imaging.decode`.

    With `max_size`, a JPEG is decoded at the smallest DCT scale that still covers the output
    and keeps its short side at least `min_side` (or the photo's own, if smaller).
    """
    header = _jpeg_header(data)
    if header is not None:
        width, height = header.size
        if width * height <= max_pixels:  # over the limit: imaging.decode refuses it with its message
            fast = _decode_jpeg_cpu(data, header, max_size, min_side)
            if fast is not None:
                return fast
    decoded = imaging.decode(data, max_pixels)
    return Decoded(decoded.pixels, decoded.source_format, decoded.height, decoded.width, "pillow")


def shrink(decoded: Decoded, max_size: int, min_side: int = 0) -> np.ndarray:
    """The decoded pixels at the output size for `max_size`, resized in 8-bit on the CPU.

    Left as decoded when the output's short side would fall below `min_side` (the mask needs
    more pixels than the answer): the engine then resizes them to the output as before.
    """
    height, width = decoded.output_size(max_size)
    pixels = decoded.pixels
    if (height, width) == pixels.shape[:2]:
        return pixels
    if min(height, width) < min(min_side, decoded.full_height, decoded.full_width):
        return pixels
    with warnings.catch_warnings():
        # Decoded pixels may be read-only views; they are only read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)  # channels-last
    with torch.inference_mode():
        resized = F.interpolate(source, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(resized[0].permute(1, 2, 0).numpy())


def load(
    data: bytes,
    max_pixels: int,
    max_size: int,
    device: torch.device,
    upload: Callable[[np.ndarray], torch.Tensor],
    needs_mask: bool = True,
) -> Loaded:
    """Decode an upload onto the engine's device: nvJPEG on CUDA when it can, the CPU path otherwise.

    `upload` is the engine's host-to-device copy. On the CPU the image is shrunk to the output
    size here; on a GPU the engine resizes it on the device. `needs_mask`: the image feeds the
    subject mask too, so it keeps at least `MASK_INPUT_SIDE` pixels on its short side.
    """
    min_side = MASK_INPUT_SIDE if needs_mask else 0
    if device.type == "cuda":
        header = _jpeg_header(data)
        if header is not None and gpu_decodable(header):
            width, height = header.size
            if width * height <= max_pixels:
                try:
                    with device_time.metered(device):  # decoding on the GPU is the request's device work
                        return Loaded(_nvjpeg(data, device, _orientation(header)), "JPEG", "nvjpeg")
                except Exception as exc:  # any decoder failure: the CPU path decides
                    log.info("GPU JPEG decode failed, decoding on the CPU: %s: %s", exc.__class__.__name__, exc)
    decoded = decode(data, max_pixels, max_size, min_side)
    pixels = shrink(decoded, max_size, min_side) if device.type == "cpu" else decoded.pixels
    return Loaded(upload(pixels), decoded.source_format, decoded.decoder)


def _jpeg_header(data: bytes) -> Image.Image | None:
    """The JPEG's header as a lazily opened Pillow image (no pixels decoded), or None."""
    if imaging.sniff_format(data) != "JPEG":
        return None
    try:
        return Image.open(io.BytesIO(data), formats=["JPEG"])
    except Exception:  # unreadable header: imaging.decode gives the client the reason
        return None


def gpu_decodable(header: Image.Image) -> bool:
    """Whether nvJPEG gives the same image as the CPU path: baseline YCbCr/grey, no colour management to do."""
    if header.mode not in ("RGB", "L"):
        return False  # CMYK/YCCK: nvJPEG through torchvision cannot convert them to RGB
    if header.info.get("progressive") or header.info.get("progression"):
        return False
    icc = header.info.get("icc_profile")
    return not icc or _is_srgb(icc)


def _is_srgb(icc: bytes) -> bool:
    from PIL import ImageCms

    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return "srgb" in (ImageCms.getProfileDescription(profile) or "").lower()
    except (ImageCms.PyCMSError, OSError, ValueError):
        return False


def jpeg_scale(width: int, height: int, max_size: int | None, min_side: int = 0) -> int:
    """The denominator of the smallest DCT scale that keeps the output exactly as a full decode's.

    The scaled image must still be at least as large as the output, its short side at least
    `min_side` (or the photo's, if smaller), and its output size (the long side brought to
    `max_size`) must equal the full image's, so nothing the client sees changes size.
    """
    if max_size is None or max(width, height) <= max_size:
        return 1
    wanted = output_size(height, width, max_size)
    short = min(min_side, width, height)
    for denominator in JPEG_SCALES:
        scaled_w, scaled_h = math.ceil(width / denominator), math.ceil(height / denominator)
        if max(scaled_w, scaled_h) < max_size or min(scaled_w, scaled_h) < short:
            continue
        if output_size(scaled_h, scaled_w, max_size) == wanted:
            return denominator
    return 1


def _decode_jpeg_cpu(data: bytes, header: Image.Image, max_size: int | None, min_side: int) -> Decoded | None:
    """libjpeg-turbo at a reduced scale; None sends the file to Pillow (CMYK, odd files, decoder errors)."""
    icc = header.info.get("icc_profile")
    if header.mode not in ("RGB", "L") or (header.mode == "L" and icc):
        return None
    width, height = header.size
    denominator = jpeg_scale(width, height, max_size, min_side)
    expected = (math.ceil(height / denominator), math.ceil(width / denominator))
    try:
        pixels = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB" if header.mode == "RGB" else "GRAY",
            min_height=expected[0],
            min_width=expected[1],
            strict=True,
        )
    except Exception as exc:  # corrupt, truncated, or anything libjpeg-turbo warns about
        log.info("fast JPEG decode refused the file, decoding with Pillow: %s", exc)
        return None
    if pixels.shape[:2] != expected:
        log.info("fast JPEG decode gave %s, expected %s; decoding with Pillow", pixels.shape[:2], expected)
        return None
    if pixels.ndim == 2 or pixels.shape[2] == 1:
        pixels = np.repeat(pixels.reshape(*expected, 1), 3, axis=2)
    if icc and not _is_srgb(icc):
        pixels = _icc_to_srgb(pixels, icc)
    orientation = _orientation(header)
    pixels = np.ascontiguousarray(orient(pixels, orientation))
    full_w, full_h = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    scale = "" if denominator == 1 else f" 1/{denominator}"
    return Decoded(pixels, "JPEG", full_h, full_w, f"libjpeg-turbo{scale}")


def _icc_to_srgb(pixels: np.ndarray, icc: bytes) -> np.ndarray:
    """The same colour conversion as `imaging`, on the (reduced) decoded pixels."""
    image = Image.fromarray(pixels, "RGB")
    image.info["icc_profile"] = icc
    return imaging._to_8bit_array(image)


def _orientation(header: Image.Image) -> int:
    try:
        value = header.getexif().get(ORIENTATION_TAG, 1)
        return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1
    except (SyntaxError, ValueError, TypeError, KeyError, OSError) as exc:
        # As imaging: a malformed EXIF block is no reason to refuse a decodable photo.
        log.info("ignoring unreadable EXIF orientation: %s", exc)
        return 1


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to (H, W, C) pixels exactly as `ImageOps.exif_transpose` does (a view)."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.transpose(1, 0, 2)
    if orientation == 6:
        return pixels.transpose(1, 0, 2)[:, ::-1]
    if orientation == 7:
        return pixels.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return pixels.transpose(1, 0, 2)[::-1]
    return pixels


def orient_tensor(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """`orient` for a (C, H, W) tensor on any device."""
    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1, 2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return image.transpose(1, 2).flip(2)
    if orientation == 7:
        return image.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return image.transpose(1, 2).flip(1)
    return image


def _nvjpeg(data: bytes, device: torch.device, orientation: int) -> torch.Tensor:
    """Decode a JPEG with nvJPEG into a (3, H, W) uint8 tensor on `device`, oriented. CUDA only."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its image IO deprecated (moving to TorchCodec)
        image = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    assert isinstance(image, torch.Tensor)
    return orient_tensor(image, orientation).contiguous()


# ------------------------------------------------------------------------ encoding


def instance_cores() -> int:
    """The CPUs this process may use: its affinity, bounded by a cgroup v2 CPU quota if one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="ascii").split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


_pool: ThreadPoolExecutor | None = None


def encode_pool() -> ThreadPoolExecutor:
    """One encoder thread per core: the codecs release the GIL, so results encode in parallel."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=instance_cores(), thread_name_prefix="encode")
    return _pool


def encode(pixels: np.ndarray, output_format: str, png_compress_level: int = 3) -> bytes:
    """Encode (H, W, 4) 8-bit RGBA as png, webp or jpeg, with no metadata (PNG: the pixels `imaging.encode` writes)."""
    if output_format not in ("png", "webp"):
        return imaging.encode(pixels, output_format, png_compress_level)
    if pixels.ndim != 3 or pixels.shape[2] != 4 or pixels.dtype != np.uint8:
        raise ValueError(f"encode expects (H, W, 4) uint8 RGBA, got {pixels.shape} {pixels.dtype}")
    opaque = bool(pixels[:, :, 3].min() == 255)
    if output_format == "webp":
        image = Image.fromarray(pixels[:, :, :3] if opaque else pixels, "RGB" if opaque else "RGBA")
        buffer = io.BytesIO()
        image.save(buffer, "WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
        return buffer.getvalue()
    if imaging._is_grey(pixels):
        samples = pixels[:, :, 0] if opaque else pixels[:, :, (0, 3)]
    else:
        samples = pixels[:, :, :3] if opaque else pixels
    data = imagecodecs.png_encode(np.ascontiguousarray(samples), level=png_compress_level, filter=PNG_FILTER)
    return bytes(data)


async def encode_async(pixels: np.ndarray, output_format: str, png_compress_level: int = 3) -> bytes:
    """`encode` on the encoder pool, so a request's results encode concurrently, one per core."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(encode_pool(), encode, pixels, output_format, png_compress_level)


def describe() -> dict[str, Any]:
    """Versions of the codec libraries, for benchmarks and logs."""
    return {
        "simplejpeg": getattr(simplejpeg, "__version__", "?"),
        "imagecodecs": imagecodecs.__version__,
        "libpng": imagecodecs.png_version(),
        "cores": instance_cores(),
    }
