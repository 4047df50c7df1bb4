"""The fast codecs: same pixels as the reference path (or within the stated tolerance), same errors, same sizes."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image, ImageCms

from effects.engine import output_size
from effects.inspyrenet import MODEL_SIZES
from service import codecs, imaging
from service.errors import ImageTooLarge, UnsupportedImage
from tests.support import photos

BIG = 10**9


def with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def reference_working_image(data: bytes, max_size: int) -> np.ndarray:
    """Today's CPU path: Pillow decode, float resize as `Engine.render_background`, quantised."""
    pixels = imaging.decode(data, BIG).pixels
    height, width = output_size(pixels.shape[0], pixels.shape[1], max_size)
    image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0).float().div(255.0)
    if (height, width) != pixels.shape[:2]:
        image = F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return image[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def new_working_image(data: bytes, max_size: int) -> tuple[np.ndarray, str]:
    decoded = codecs.decode(data, BIG, max_size)
    return codecs.shrink(decoded, max_size), decoded.decoder


# ------------------------------------------------------------------------ decoding


@pytest.mark.parametrize(
    ("name", "options", "grey"),
    [
        ("4:2:0", {"quality": 90, "subsampling": 2}, False),
        ("4:2:2", {"quality": 90, "subsampling": 1}, False),
        ("4:4:4", {"quality": 95, "subsampling": 0}, False),
        ("progressive", {"quality": 85, "progressive": True}, False),
        ("greyscale", {"quality": 90}, True),
    ],
)
def test_full_scale_jpeg_decode_is_pixel_identical_to_pillow(name: str, options: dict[str, Any], grey: bool) -> None:
    array = photos.photo(203, 131, seed=3)
    data = photos.encode(array[:, :, 0] if grey else array, "JPEG", **options)
    decoded = codecs.decode(data, BIG)
    assert decoded.decoder == "libjpeg-turbo", name
    assert decoded.pixels.shape == (131, 203, 3)
    assert np.array_equal(decoded.pixels, imaging.decode(data, BIG).pixels), name


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_at_full_and_reduced_scale(orientation: int) -> None:
    data = photos.encode(photos.photo(160, 96, seed=1), "JPEG", quality=92, exif=with_orientation(orientation))
    reference = imaging.decode(data, BIG).pixels
    decoded = codecs.decode(data, BIG)
    assert np.array_equal(decoded.pixels, reference)
    assert (decoded.full_height, decoded.full_width) == reference.shape[:2]

    reduced = codecs.decode(data, BIG, max_size=80)
    assert reduced.decoder == "libjpeg-turbo 1/2"  # 1/4 (40 x 24) would not cover an 80-px output
    assert (reduced.full_height, reduced.full_width) == reference.shape[:2]
    transposed = orientation in (5, 6, 7, 8)
    assert reduced.pixels.shape[:2] == ((80, 48) if transposed else (48, 80))
    assert reduced.output_size(80) == output_size(*reference.shape[:2], 80)
    # The reduced image is the full one, smaller: same orientation, close colours.
    shrunk = np.asarray(Image.fromarray(reference).resize(reduced.pixels.shape[1::-1], Image.Resampling.BOX))
    assert np.abs(shrunk.astype(int) - reduced.pixels.astype(int)).mean() < 3.0


@pytest.mark.parametrize(
    ("width", "height", "max_size", "min_side", "expected"),
    [
        (4032, 3024, 2048, 1024, 1),  # the default request on a 12 MP phone photo: 1/2 would be 2016 px
        (4032, 3024, 2016, 0, 2),
        (4032, 3024, 1024, 1024, 2),  # the mask keeps the short side at 1024 or more
        (4032, 3024, 1024, 0, 2),  # 1/4 is 1008 px < 1024
        (4032, 3024, 512, 0, 4),
        (4032, 3024, 256, 0, 8),
        (3024, 4032, 256, 1024, 2),
        (1000, 10, 120, 0, 4),  # 1/8 (125 x 2) would answer 120 x 2 instead of 120 x 1
        (640, 480, 2048, 1024, 1),  # never enlarged
    ],
)
def test_jpeg_scale_covers_the_output_and_keeps_its_size(
    width: int, height: int, max_size: int, min_side: int, expected: int
) -> None:
    denominator = codecs.jpeg_scale(width, height, max_size, min_side)
    assert denominator == expected
    scaled_w, scaled_h = -(-width // denominator), -(-height // denominator)
    assert max(scaled_w, scaled_h) >= min(max_size, max(width, height))
    assert min(scaled_w, scaled_h) >= min(min_side, width, height)
    assert output_size(scaled_h, scaled_w, max_size) == output_size(height, width, max_size)


def test_jpeg_scale_never_changes_the_output_size_and_steps_up_when_rounding_would() -> None:
    stepped_up = 0
    for width in range(1001, 1400, 7):
        for height in (31, 333, 750, 999):
            for max_size in (64, 130, 250, 500):
                denominator = codecs.jpeg_scale(width, height, max_size)
                scaled_w, scaled_h = -(-width // denominator), -(-height // denominator)
                assert max(scaled_w, scaled_h) >= max_size
                assert output_size(scaled_h, scaled_w, max_size) == output_size(height, width, max_size)
                coarser = denominator * 2
                if coarser <= 8 and -(-width // coarser) >= max_size:
                    # A coarser scale still covered the output: only a size change can have refused it.
                    assert output_size(-(-height // coarser), -(-width // coarser), max_size) != output_size(
                        height, width, max_size
                    )
                    stepped_up += 1
    assert stepped_up > 0


def test_mask_input_side_is_the_largest_model_input() -> None:
    assert max(MODEL_SIZES.values()) == codecs.MASK_INPUT_SIDE


def test_reduced_decode_stays_within_the_documented_tolerance_on_a_real_photo() -> None:
    data = photos.encode(photos.real_photo(1600, 1200), "JPEG", quality=90)
    # Full-scale decode with the 8-bit resize: within 1/255 of today's float resize.
    new, decoder = new_working_image(data, 1024)
    assert decoder == "libjpeg-turbo"
    difference = np.abs(new.astype(int) - reference_working_image(data, 1024).astype(int))
    assert difference.max() <= 1
    # DCT-scaled decodes (1/2 and 1/4): the bounds docs/codecs.md states.
    for max_size, scale in ((600, "1/2"), (300, "1/4")):
        new, decoder = new_working_image(data, max_size)
        assert decoder == f"libjpeg-turbo {scale}"
        reference = reference_working_image(data, max_size)
        assert new.shape == reference.shape
        difference = np.abs(new.astype(int) - reference.astype(int))
        assert difference.max() <= 16, (max_size, difference.max())
        assert np.quantile(difference, 0.999) <= 6, (max_size, np.quantile(difference, 0.999))
        assert difference.mean() < 0.5


def test_shrink_is_the_engine_resize_within_one_level_and_respects_the_mask_side() -> None:
    data = photos.encode(photos.photo(1200, 900, seed=2), "JPEG", quality=92)
    decoded = codecs.decode(data, BIG, 400)
    assert decoded.decoder == "libjpeg-turbo 1/2"
    shrunk = codecs.shrink(decoded, 400)
    assert shrunk.shape == (300, 400, 3)
    source = torch.from_numpy(decoded.pixels.copy()).permute(2, 0, 1).unsqueeze(0).float().div(255.0)
    expected = F.interpolate(source, size=(300, 400), mode="bilinear", antialias=True, align_corners=False)
    expected_u8 = expected[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(shrunk.astype(int) - expected_u8.astype(int)).max() <= 1
    # The mask needs 1024 px on the short side: the 400-px output is not enough, nothing is shrunk.
    assert codecs.shrink(decoded, 400, min_side=1024) is decoded.pixels


def test_pixel_bomb_is_refused_on_the_declared_size_even_when_decoding_would_be_small() -> None:
    data = photos.encode(photos.photo(400, 300), "JPEG", quality=90)
    with pytest.raises(ImageTooLarge, match="400x300"):
        codecs.decode(data, max_pixels=100_000, max_size=64)  # a 1/8 decode would be 50 x 38
    fake = torch.device("cuda")
    with pytest.raises(ImageTooLarge):
        codecs.load(data, 100_000, 64, fake, _host_upload)


def test_header_bomb_jpeg_is_refused_before_decoding() -> None:
    # A 16 x 16 JPEG whose frame header claims 30000 x 30000 pixels: decoding it would allocate 2.7 GB.
    small = photos.encode(photos.photo(16, 16), "JPEG", quality=90)
    sof = small.index(b"\xff\xc0")
    bomb = bytearray(small)
    bomb[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") * 2
    with pytest.raises(ImageTooLarge, match="30000x30000"):
        codecs.decode(bytes(bomb), max_pixels=50_000_000, max_size=2048)
    with pytest.raises(ImageTooLarge, match="30000x30000"):
        codecs.load(bytes(bomb), 50_000_000, 2048, torch.device("cuda"), _host_upload)


def test_cmyk_corrupt_and_colour_managed_files_take_the_pillow_path() -> None:
    photo = photos.photo(64, 48)
    cmyk = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk, "JPEG", quality=95)
    decoded = codecs.decode(cmyk.getvalue(), BIG, 32)
    assert decoded.decoder == "pillow"
    assert np.array_equal(decoded.pixels, imaging.decode(cmyk.getvalue(), BIG).pixels)

    truncated = photos.jpeg(300, 200)[:900]
    with pytest.raises(UnsupportedImage):
        codecs.decode(truncated, BIG, 100)
    with pytest.raises(UnsupportedImage):
        codecs.decode(b"\xff\xd8\xff\xe0 not a jpeg at all", BIG, 100)

    png = photos.png(80, 60)
    decoded = codecs.decode(png, BIG, 40)
    assert decoded.decoder == "pillow" and decoded.pixels.shape == (60, 80, 3)


def _non_srgb_profile() -> bytes:
    """lcms's sRGB profile renamed: a profile whose description is not sRGB, so it is converted."""
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return srgb.replace("sRGB".encode("utf-16-be"), "wRGB".encode("utf-16-be"))


def test_icc_profiles_are_converted_as_imaging_does() -> None:
    icc = _non_srgb_profile()
    data = photos.encode(photos.photo(120, 90), "JPEG", quality=92, icc_profile=icc)
    header = Image.open(io.BytesIO(data))
    assert not codecs.gpu_decodable(header)  # colour management stays on the CPU
    decoded = codecs.decode(data, BIG)
    assert decoded.decoder == "libjpeg-turbo"
    assert np.array_equal(decoded.pixels, imaging.decode(data, BIG).pixels)


def test_gpu_decodable_only_for_baseline_ycbcr_or_grey_without_colour_management() -> None:
    photo = photos.photo(64, 48)
    baseline = Image.open(io.BytesIO(photos.encode(photo, "JPEG", quality=90)))
    progressive = Image.open(io.BytesIO(photos.encode(photo, "JPEG", quality=90, progressive=True)))
    grey = Image.open(io.BytesIO(photos.encode(photo[:, :, 1], "JPEG", quality=90)))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = Image.open(io.BytesIO(photos.encode(photo, "JPEG", quality=90, icc_profile=srgb)))
    cmyk_buffer = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk_buffer, "JPEG")
    cmyk = Image.open(cmyk_buffer)
    assert codecs.gpu_decodable(baseline) and codecs.gpu_decodable(grey) and codecs.gpu_decodable(tagged)
    assert not codecs.gpu_decodable(progressive)
    assert not codecs.gpu_decodable(cmyk)


def _host_upload(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).contiguous()


def test_load_on_cuda_falls_back_to_the_cpu_when_nvjpeg_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def broken(data: bytes, device: torch.device, orientation: int) -> torch.Tensor:
        calls.append(orientation)
        raise RuntimeError("nvjpegDecode failed: NVJPEG_STATUS_BAD_JPEG")

    monkeypatch.setattr(codecs, "_nvjpeg", broken)
    data = photos.encode(photos.photo(300, 200), "JPEG", quality=90, exif=with_orientation(6))
    loaded = codecs.load(data, BIG, 2048, torch.device("cuda"), _host_upload)
    assert calls == [6]
    assert loaded.decoder == "libjpeg-turbo"
    assert np.array_equal(loaded.image.permute(1, 2, 0).numpy(), imaging.decode(data, BIG).pixels)


def test_load_on_cuda_never_tries_nvjpeg_for_files_it_cannot_take(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(data: bytes, device: torch.device, orientation: int) -> torch.Tensor:
        raise AssertionError("nvJPEG tried on a file it cannot decode like the CPU")

    monkeypatch.setattr(codecs, "_nvjpeg", must_not_run)
    photo = photos.photo(300, 200)
    cmyk = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk, "JPEG")
    for data in (photos.encode(photo, "JPEG", progressive=True), cmyk.getvalue(), photos.png(300, 200)):
        loaded = codecs.load(data, BIG, 100, torch.device("cuda"), _host_upload)
        # On a GPU the engine resizes: the CPU decode is handed over unshrunk (JPEGs DCT-scaled at most).
        assert loaded.image.shape[1:] in ((200, 300), (100, 150))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_gpu_path_orients_and_matches_the_cpu_decode(monkeypatch: pytest.MonkeyPatch, orientation: int) -> None:
    """The nvJPEG route run with torchvision's CPU decoder: the same call, only the device differs."""
    real = codecs._nvjpeg
    monkeypatch.setattr(codecs, "_nvjpeg", lambda data, device, o: real(data, torch.device("cpu"), o))
    data = photos.encode(photos.photo(150, 100, seed=4), "JPEG", quality=92, exif=with_orientation(orientation))
    loaded = codecs.load(data, BIG, 2048, torch.device("cuda"), _host_upload)
    assert loaded.decoder == "nvjpeg"
    reference = imaging.decode(data, BIG).pixels
    got = loaded.image.permute(1, 2, 0).numpy()
    assert got.shape == reference.shape
    assert np.abs(got.astype(int) - reference.astype(int)).max() <= 2  # nvJPEG's IDCT is not libjpeg's bit for bit


def test_load_on_cpu_hands_the_engine_the_output_size() -> None:
    data = photos.encode(photos.photo(1600, 1200), "JPEG", quality=90, exif=with_orientation(6))
    loaded = codecs.load(data, BIG, 800, torch.device("cpu"), _host_upload, needs_mask=False)
    assert loaded.decoder == "libjpeg-turbo 1/2"
    assert tuple(loaded.image.shape) == (3, 800, 600)
    kept = codecs.load(data, BIG, 800, torch.device("cpu"), _host_upload, needs_mask=True)
    assert tuple(kept.image.shape) == (3, 1600, 1200)  # 600 px would starve the 1024-px mask input


# ------------------------------------------------------------------------ encoding


def result_pixels(kind: str) -> np.ndarray:
    photo = photos.photo(257, 171, seed=5)
    alpha = np.zeros(photo.shape[:2], np.uint8)
    alpha[30:150, 40:220] = 255
    alpha[60:90, 60:90] = 128
    grey = photo[:, :, 1:2].repeat(3, axis=2)
    colour = {"rgba": photo, "rgb": photo, "grey": grey, "grey-alpha": grey}[kind]
    opaque = kind in ("rgb", "grey")
    return np.ascontiguousarray(np.dstack([colour, np.full_like(alpha, 255) if opaque else alpha]))


@pytest.mark.parametrize("kind", ["rgba", "rgb", "grey", "grey-alpha"])
def test_png_encode_keeps_pixels_and_mode_of_the_reference(kind: str) -> None:
    pixels = result_pixels(kind)
    fast = codecs.encode(pixels, "png", 1)
    reference = imaging.encode(pixels, "png", 3)
    with Image.open(io.BytesIO(fast)) as mine, Image.open(io.BytesIO(reference)) as theirs:
        assert mine.mode == theirs.mode
        assert np.array_equal(np.asarray(mine.convert("RGBA")), np.asarray(theirs.convert("RGBA")))
        assert np.array_equal(np.asarray(mine.convert("RGBA")), pixels)
        assert not mine.info.get("icc_profile") and not mine.getexif()


def test_jpeg_is_the_reference_bytes_webp_as_good_and_bad_input_is_refused() -> None:
    pixels = result_pixels("rgb")
    assert codecs.encode(pixels, "jpeg") == imaging.encode(pixels, "jpeg")
    for kind in ("rgb", "rgba"):
        pixels = result_pixels(kind)
        fast, reference = codecs.encode(pixels, "webp"), imaging.encode(pixels, "webp")
        with Image.open(io.BytesIO(fast)) as mine, Image.open(io.BytesIO(reference)) as theirs:
            assert mine.format == "WEBP" and mine.mode == theirs.mode and mine.size == theirs.size
            assert not mine.getexif() and not mine.info.get("icc_profile")
            ours = np.asarray(mine.convert("RGBA")).astype(float)
            before = np.asarray(theirs.convert("RGBA")).astype(float)
        visible = pixels[:, :, 3] > 0
        ours_error = ((ours[..., :3] - pixels[..., :3]) ** 2)[visible].mean()
        reference_error = ((before[..., :3] - pixels[..., :3]) ** 2)[visible].mean()
        assert ours_error <= reference_error * 1.15  # within ~0.6 dB PSNR of the previous setting
        assert np.array_equal(ours[..., 3], pixels[..., 3].astype(float))  # alpha stays lossless
        assert len(fast) <= len(reference) * 1.15
    with pytest.raises(ValueError, match="RGBA"):
        codecs.encode(pixels[:, :, :3].copy(), "png")
    with pytest.raises(ValueError, match="RGBA"):
        codecs.encode(pixels[:, :, :3].copy(), "webp")


def test_encode_async_keeps_order_and_runs_on_the_pool_threads() -> None:
    items = [result_pixels(kind) for kind in ("rgba", "rgb", "grey", "grey-alpha", "rgba")]

    async def all_of_them() -> list[bytes]:
        return list(await asyncio.gather(*(codecs.encode_async(pixels, "png", 1) for pixels in items)))

    encoded = asyncio.run(all_of_them())
    for data, pixels in zip(encoded, items, strict=True):
        with Image.open(io.BytesIO(data)) as image:
            assert np.array_equal(np.asarray(image.convert("RGBA")), pixels)
    assert codecs.encode_pool()._max_workers == codecs.instance_cores()

    seen: list[str] = []

    async def one() -> bytes:
        original = codecs.encode

        def spy(*args: Any) -> bytes:
            seen.append(threading.current_thread().name)
            return original(*args)

        codecs.encode = spy  # type: ignore[assignment]
        try:
            return await codecs.encode_async(items[0], "png", 1)
        finally:
            codecs.encode = original  # type: ignore[assignment]

    data = asyncio.run(one())
    assert data == codecs.encode(items[0], "png", 1)
    assert seen and seen[0].startswith("encode")


def test_instance_cores_is_within_the_affinity() -> None:
    import os

    assert 1 <= codecs.instance_cores() <= len(os.sched_getaffinity(0))


def test_service_answers_with_the_reduced_decode_at_the_same_size(client: TestClient) -> None:
    """Through the real app: a rotated 1600 x 1200 JPEG at max_size 400 comes back 300 x 400, as before."""
    data = photos.encode(photos.photo(1600, 1200, seed=6), "JPEG", quality=90, exif=with_orientation(6))
    response = client.post(
        "/v1/process",
        data={"effects": "popart", "background": "none", "max_size": "400"},
        files={"image": ("photo.jpg", data, "image/jpeg")},
        headers={"Origin": "https://shop.example"},
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"]["popart"]
    assert (result["width"], result["height"]) == (300, 400)
