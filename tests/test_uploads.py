"""Hostile and unusual uploads, generated here: each gets the right 4xx or a correct result, never a 500."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service import imaging
from service.errors import ImageTooLarge, UnsupportedImage
from tests.support import photos

ORIGIN = "https://shop.example"


def roundtrip(client: TestClient, data: bytes) -> Any:
    return client.post(
        "/v1/process",
        data={"effects": "popart", "background": "none"},
        files={"image": ("upload.bin", data, "application/octet-stream")},
        headers={"Origin": ORIGIN},
    )


def exif_with_orientation(orientation: int, extra_bytes: int = 0) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x8825] = {2: (48.0, 51.0, 29.0), 1: "N"}  # GPS latitude: must never reach a result
    if extra_bytes:
        exif[0x927C] = b"x" * extra_bytes  # MakerNote padding: a huge EXIF block
    return exif.tobytes()


def hostile_corpus() -> list[tuple[str, bytes, int | None, tuple[int, int] | None]]:
    """(name, bytes, expected error status or None, expected result size or None)."""
    jpeg = photos.jpeg(80, 60)
    photo = photos.photo(40, 30)
    cmyk = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk, "JPEG", quality=95)
    sixteen = io.BytesIO()
    grey16 = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    Image.fromarray(grey16).save(sixteen, "PNG")
    gif = io.BytesIO()
    frames = [Image.fromarray(photos.photo(30, 20, seed=s)).convert("P") for s in range(3)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    webp = io.BytesIO()
    webp_frames = [Image.fromarray(photos.photo(30, 20, seed=s)) for s in range(3)]
    webp_frames[0].save(webp, "WEBP", save_all=True, append_images=webp_frames[1:], duration=50)
    heic = io.BytesIO()
    Image.fromarray(photo).save(heic, "HEIF", quality=90)
    rotated = io.BytesIO()
    Image.fromarray(photos.photo(60, 20)).save(rotated, "JPEG", exif=exif_with_orientation(6))
    huge_exif = io.BytesIO()
    Image.fromarray(photo).save(huge_exif, "JPEG", exif=exif_with_orientation(1, extra_bytes=60_000))
    palette = io.BytesIO()
    Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE).save(palette, "PNG", transparency=0)
    la = io.BytesIO()
    Image.fromarray(photo).convert("LA").save(la, "PNG")
    return [
        ("empty", b"", 415, None),
        ("truncated jpeg", jpeg[: len(jpeg) // 2], 415, None),
        ("jpeg header only", jpeg[:20], 415, None),
        ("text posing as png", b"\x89PNG\r\n\x1a\nthis is not an image at all" * 3, 415, None),
        ("plain text", b"hello, I am a cat", 415, None),
        ("html", b"<html><body>photo</body></html>", 415, None),
        ("png header bomb", photos.png_header_bomb(), 413, None),
        ("cmyk jpeg", cmyk.getvalue(), None, (40, 30)),
        ("16-bit greyscale png", sixteen.getvalue(), None, (40, 30)),
        ("animated gif", gif.getvalue(), None, (30, 20)),
        ("animated webp", webp.getvalue(), None, (30, 20)),
        ("heic", heic.getvalue(), None, (40, 30)),
        ("exif rotated jpeg", rotated.getvalue(), None, (20, 60)),
        ("huge exif", huge_exif.getvalue(), None, (40, 30)),
        ("palette png with transparency", palette.getvalue(), None, (40, 30)),
        ("grey + alpha png", la.getvalue(), None, (40, 30)),
    ]


CORPUS = hostile_corpus()


@pytest.mark.parametrize(("name", "data", "status", "size"), CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_corpus_over_http(
    client: TestClient, name: str, data: bytes, status: int | None, size: tuple[int, int] | None
) -> None:
    response = roundtrip(client, data)
    if status is not None:
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert body["code"] in ("unsupported_image", "image_too_large")
        assert response.headers["access-control-allow-origin"] == ORIGIN
    else:
        assert response.status_code == 200, (name, response.text)
        result = response.json()["results"]["popart"]
        assert (result["width"], result["height"]) == size
    assert client.get("/health").status_code == 200


def test_cmyk_and_16bit_colours_are_right() -> None:
    photo = photos.photo(40, 30)
    cmyk = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk, "JPEG", quality=98)
    decoded = imaging.decode(cmyk.getvalue(), 10**7)
    assert decoded.pixels.shape == (30, 40, 3)
    assert np.abs(decoded.pixels.astype(int) - photo.astype(int)).mean() < 12

    ramp = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    decoded = imaging.decode(buffer.getvalue(), 10**7)
    expected = np.rint(ramp / 65535 * 255).astype(int)
    assert np.abs(decoded.pixels[:, :, 0].astype(int) - expected).max() <= 1
    assert (decoded.pixels[:, :, 0] == decoded.pixels[:, :, 2]).all()


def test_exif_orientation_is_applied() -> None:
    array = photos.photo(60, 20)
    array[:5, :5] = (255, 0, 0)  # a red corner at the stored top-left
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", exif=exif_with_orientation(6))
    decoded = imaging.decode(buffer.getvalue(), 10**7)
    assert decoded.pixels.shape == (60, 20, 3)
    # Orientation 6 = rotate 90° clockwise to display: the stored top-left goes to the top-right.
    assert tuple(decoded.pixels[1, -2]) == (255, 0, 0)


def test_transparency_is_kept_as_alpha() -> None:
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[2:8, 3:9, 3] = 255
    decoded = imaging.decode(photos.encode(rgba, "PNG"), 10**7)
    assert decoded.has_alpha
    assert (decoded.pixels[..., 3] == rgba[..., 3]).all()


def test_format_is_sniffed_from_bytes_not_names() -> None:
    assert imaging.sniff_format(photos.jpeg()) == "JPEG"
    assert imaging.sniff_format(photos.png()) == "PNG"
    assert imaging.sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert imaging.sniff_format(b"\0\0\0\x18ftypheic\0\0\0\0") == "HEIF"
    assert imaging.sniff_format(b"\0\0\0\x18ftypisom\0\0\0\0") is None  # an MP4 is not a photo
    assert imaging.sniff_format(b"BM\0\0") is None


def test_decode_errors_are_domain_errors() -> None:
    with pytest.raises(UnsupportedImage, match="empty"):
        imaging.decode(b"", 10**7)
    with pytest.raises(ImageTooLarge, match="30000x30000"):
        imaging.decode(photos.png_header_bomb(), 10**7)


def test_results_carry_no_metadata(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.fromarray(photos.photo(40, 30)).save(buffer, "JPEG", exif=exif_with_orientation(1))
    assert Image.open(io.BytesIO(buffer.getvalue())).getexif().get(0x8825) is not None
    for fmt in ("png", "webp", "jpeg"):
        response = client.post(
            "/v1/effects/blackwhite",
            data={"background": "none", "format": fmt},
            files={"image": ("p.jpg", buffer.getvalue(), "image/jpeg")},
        )
        assert response.status_code == 200, response.text
        result = Image.open(io.BytesIO(response.content))
        assert not result.getexif(), fmt
        assert b"Exif" not in response.content
        assert "icc_profile" not in result.info


def test_black_and_white_results_are_stored_as_greyscale_png() -> None:
    grey = np.zeros((20, 30, 4), dtype=np.uint8)
    grey[..., :3] = np.arange(30, dtype=np.uint8)[None, :, None] * 8
    grey[..., 3] = 255
    opaque = Image.open(io.BytesIO(imaging.encode(grey, "png")))
    assert opaque.mode == "L"
    assert np.array_equal(np.asarray(opaque.convert("RGBA")), grey)
    grey[:5, :5, 3] = 0
    transparent = Image.open(io.BytesIO(imaging.encode(grey, "png")))
    assert transparent.mode == "LA"
    assert np.array_equal(np.asarray(transparent.convert("RGBA")), grey)
    colour = grey.copy()
    colour[0, 0, 0] ^= 1
    assert Image.open(io.BytesIO(imaging.encode(colour, "png"))).mode == "RGBA"
