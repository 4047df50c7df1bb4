"""Decoding uploads and encoding results: the only place image files are read or written.

Formats are sniffed from magic bytes, never from the client's Content-Type or file name.
Decoding applies the EXIF orientation, converts colour-managed images to sRGB, normalises
every mode (CMYK, 16-bit, palette, greyscale, with or without alpha) to 8-bit RGB or RGBA,
and takes the first frame of animations. Encoding writes no metadata at all (no EXIF, no
GPS, no ICC), so nothing about the customer's camera or location leaves in a result.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidParameter, UnsupportedImage

log = logging.getLogger("cutout.imaging")

pillow_heif.register_heif_opener()
# Pixel bombs are refused against the configured limit from the header, before any pixel is
# decoded (see `decode`); Pillow's fixed global guard would refuse them earlier but with a limit
# that is not ours, so it is switched off in favour of the setting.
Image.MAX_IMAGE_PIXELS = None

SUPPORTED = "JPEG, PNG, WebP, GIF or HEIC/HEIF"
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_SRGB = ImageCms.createProfile("sRGB")


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name of an upload, judged by its first bytes only."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIF"
    return None


@dataclass(frozen=True)
class DecodedImage:
    """8-bit pixels, (H, W, 3) or (H, W, 4), C-contiguous; `has_alpha` when the file had transparency."""

    pixels: np.ndarray
    source_format: str

    @property
    def has_alpha(self) -> bool:
        return bool(self.pixels.shape[2] == 4)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def decode(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode an upload or raise the 4xx error that tells the client what is wrong with it."""
    if not data:
        raise UnsupportedImage(f"the upload is empty; send a {SUPPORTED} file")
    image_format = sniff_format(data)
    if image_format is None:
        raise UnsupportedImage(f"the upload is not a supported image; send a {SUPPORTED} file")
    try:
        opened = Image.open(io.BytesIO(data), formats=[image_format])
        width, height = opened.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}. "
                "Resize it before uploading."
            )
        opened.seek(0)  # animations: the first frame
        opened.load()
        if opened.size[0] * opened.size[1] > max_pixels:  # the codec disagreed with the header
            raise ImageTooLarge(
                f"the image decodes to {opened.size[0]}x{opened.size[1]} pixels although its header says "
                f"{width}x{height}; the limit is {max_pixels}"
            )
        pixels = _to_8bit_array(_apply_orientation(opened))
    except (ImageTooLarge, UnsupportedImage):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"the image has too many pixels to decode safely: {exc}") from exc
    except MemoryError as exc:  # a decoder asked for more than the header promised
        raise ImageTooLarge(f"the {image_format} file needs more memory to decode than its size allows") from exc
    # RuntimeError: libheif's own refusals (a codec stream larger than its container says, its
    # security limits), raised from inside `load()`.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, RuntimeError) as exc:
        raise UnsupportedImage(
            f"the {image_format} file could not be decoded ({exc.__class__.__name__}: {exc}); "
            "it may be truncated or corrupt"
        ) from exc
    return DecodedImage(pixels=pixels, source_format=image_format)


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError) as exc:
        # A malformed EXIF block is no reason to refuse a decodable photo: keep it as stored.
        log.info("ignoring unreadable EXIF orientation: %s", exc)
        return image


def _to_8bit_array(image: Image.Image) -> np.ndarray:
    """Every Pillow mode to 8-bit sRGB RGB or RGBA."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey16 = np.asarray(image).astype(np.float32)
        peak = 65535.0 if mode.startswith("I;16") or grey16.max(initial=0) > 255 else 255.0
        grey8 = np.clip(np.rint(grey16 * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))
    if mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        scale = 255.0 if grey.max(initial=0) <= 1.0 else 1.0
        grey8 = np.clip(np.rint(grey * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))

    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    icc = image.info.get("icc_profile")
    if mode == "CMYK" and not icc:
        image = image.convert("RGB")
    elif icc and mode in ("RGB", "RGBA", "CMYK", "L", "LA"):
        image = _to_srgb(image, icc, has_alpha)
    target = "RGBA" if has_alpha else "RGB"
    if image.mode != target:
        image = image.convert(target)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _to_srgb(image: Image.Image, icc: bytes, has_alpha: bool) -> Image.Image:
    """Convert an embedded colour profile (Display P3 from phones, CMYK print profiles) to sRGB."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = ImageCms.getProfileDescription(source) or ""
        if "srgb" in description.lower() and image.mode in ("RGB", "RGBA"):
            return image
        alpha = image.getchannel("A") if has_alpha and "A" in image.getbands() else None
        base = image.convert("RGB") if image.mode in ("L", "LA") else image
        if base.mode == "RGBA":
            base = base.convert("RGB")
        converted = ImageCms.profileToProfile(base, source, _SRGB, outputMode="RGB")
        if converted is None:
            return image
        if alpha is not None:
            converted.putalpha(alpha)
        return converted
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        log.info("ignoring unusable colour profile: %s", exc)
        return image


OUTPUT_FORMATS = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


def encode(pixels: np.ndarray, output_format: str, png_compress_level: int = 3) -> bytes:
    """Encode (H, W, 4) 8-bit RGBA as png, webp or jpeg, with no metadata."""
    if pixels.ndim != 3 or pixels.shape[2] != 4 or pixels.dtype != np.uint8:
        raise ValueError(f"encode expects (H, W, 4) uint8 RGBA, got {pixels.shape} {pixels.dtype}")
    image = Image.fromarray(pixels, "RGBA")
    opaque = bool(pixels[:, :, 3].min() == 255)
    buffer = io.BytesIO()
    if output_format == "png":
        # Black-and-white results (blackwhite, dithering) are stored as greyscale: a third of the
        # samples to compress, so faster to encode and smaller, with the same pixels.
        grey = _is_grey(pixels)
        mode = ("L" if opaque else "LA") if grey else ("RGB" if opaque else "RGBA")
        image.convert(mode).save(buffer, "PNG", compress_level=png_compress_level)
    elif output_format == "webp":
        (image.convert("RGB") if opaque else image).save(buffer, "WEBP", quality=90, method=4)
    elif output_format == "jpeg":
        if not opaque:
            raise InvalidParameter("format=jpeg needs an opaque image; use png or webp to keep transparency")
        image.convert("RGB").save(buffer, "JPEG", quality=92, optimize=False, subsampling=0)
    else:
        raise InvalidParameter(f"unknown format {output_format!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    return buffer.getvalue()


def _is_grey(pixels: np.ndarray) -> bool:
    red = pixels[:, :, 0]
    return bool(np.array_equal(red, pixels[:, :, 1]) and np.array_equal(red, pixels[:, :, 2]))
