"""Whatever a client sends, a running server answers 4xx JSON naming the problem, with CORS headers,
and stays healthy: deeply nested or oversized JSON in any field, numbers past every limit, images
whose container and codec disagree, decoders' own security limits.

Sent to a real `python -m service` over a socket, as a browser or a script would.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tests.support import photos
from tests.support.server import running_server, server_log

ORIGIN = "https://shop.example"
PHOTO = photos.jpeg(120, 90, seed=1)


def heic_with_small_container(width: int = 640, height: int = 512) -> bytes:
    """A real HEIC whose container (`ispe`) declares 16x16 while its HEVC stream holds width x height."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "HEIF", quality=50)
    data = buffer.getvalue()
    at = data.index(b"ispe")
    assert struct.unpack(">II", data[at + 8 : at + 16]) == (width, height)
    return data[: at + 8] + struct.pack(">II", 16, 16) + data[at + 16 :]


def png_text_bomb() -> bytes:
    """A small PNG with a compressed text chunk that inflates past Pillow's safety limit."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 80_000_000, zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    return PHOTO[: len(PHOTO) // 2]


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


HUGE_INT = "9" * 5000  # past Python's 4300-digit limit for int()

# (name, route, form fields, image bytes or None, expected status)
CASES: list[tuple[str, str, dict[str, str], bytes | None, int]] = [
    ("params nested 100k deep", "/v1/process", {"effects": "popart", "params": deep(100_000)}, PHOTO, 400),
    (
        "params nested in an effect",
        "/v1/process",
        {"effects": "popart", "params": '{"popart": ' + deep(5000) + "}"},
        PHOTO,
        400,
    ),
    (
        "params nested inside a value",
        "/v1/process",
        {"effects": "popart", "params": '{"popart": {"levels": ' + deep(50) + "}}"},
        PHOTO,
        400,
    ),
    (
        "params integer of 5000 digits",
        "/v1/process",
        {"effects": "popart", "params": '{"popart": {"x": ' + HUGE_INT + "}}"},
        PHOTO,
        400,
    ),
    ("params NaN", "/v1/process", {"effects": "blackwhite", "params": '{"blackwhite": {"grain": NaN}}'}, PHOTO, 400),
    (
        "params 1e999",
        "/v1/process",
        {"effects": "blackwhite", "params": '{"blackwhite": {"grain": 1e999}}'},
        PHOTO,
        400,
    ),
    (
        "params 1 MB long",
        "/v1/process",
        {"effects": "popart", "params": '{"popart": {}}' + " " * 1_000_000},
        PHOTO,
        400,
    ),
    ("effect route params nested", "/v1/effects/popart", {"params": deep(100_000)}, PHOTO, 400),
    ("effect route params huge integer", "/v1/effects/popart", {"params": '{"x": ' + HUGE_INT + "}"}, PHOTO, 400),
    ("max_size of 5000 digits", "/v1/process", {"effects": "popart", "max_size": HUGE_INT}, PHOTO, 422),
    ("seed of 5000 digits", "/v1/process", {"effects": "popart", "seed": HUGE_INT}, PHOTO, 422),
    ("seed 1e400", "/v1/process", {"effects": "popart", "seed": "1e400"}, PHOTO, 422),
    ("effects of 600 kB", "/v1/process", {"effects": "popart" * 100_000}, PHOTO, 400),
    ("background of 600 kB", "/v1/process", {"effects": "popart", "background": "blur" * 150_000}, PHOTO, 400),
    ("image_sha256 nested JSON", "/v1/process", {"effects": "popart", "image_sha256": deep(10_000)}, None, 400),
    ("HEIC container 16x16, codec 640x512", "/v1/process", {"effects": "popart"}, heic_with_small_container(), 415),
    ("PNG text chunk past the decoder limit", "/v1/process", {"effects": "popart"}, png_text_bomb(), 415),
    ("PNG header of 30000x30000", "/v1/process", {"effects": "popart"}, photos.png_header_bomb(), 413),
    ("truncated JPEG", "/v1/process", {"effects": "popart"}, truncated_jpeg(), 415),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    workdir = tmp_path_factory.mktemp("hostile")
    env = {"CUTOUT_LOG_FORMAT": "json", "CUTOUT_ALLOWED_ORIGINS": ORIGIN}
    with running_server(workdir, env) as server:
        yield server.url, workdir


@pytest.mark.parametrize(("name", "route", "fields", "image", "status"), CASES, ids=[case[0] for case in CASES])
def test_hostile_input_gets_a_4xx_naming_the_problem(
    server: tuple[str, Path], name: str, route: str, fields: dict[str, str], image: bytes | None, status: int
) -> None:
    base, workdir = server
    files = {"image": ("photo", image, "application/octet-stream")} if image is not None else None
    data = {"background": "none", **fields}
    with httpx.Client(base_url=base, timeout=60, headers={"Origin": ORIGIN}) as http:
        answer = http.post(route, data=data, files=files)
        assert answer.status_code == status, answer.text[:500]
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        body = answer.json()
        assert set(body) == {"detail", "code"}, body
        assert 10 < len(body["detail"]) < 1000, "names the problem, without echoing the input back"
        assert http.get("/health").status_code == 200
        fine = http.post("/v1/effects/popart", data={"background": "none"}, files={"image": ("p.jpg", PHOTO)})
        assert fine.status_code == 200
    assert not [
        entry for entry in server_log(workdir) if entry.get("status") == 500 or "unhandled" in entry.get("message", "")
    ]


def test_a_json_body_instead_of_a_form(server: tuple[str, Path]) -> None:
    base, _ = server
    with httpx.Client(base_url=base, timeout=60, headers={"Origin": ORIGIN}) as http:
        for content in (deep(100_000), '{"effects": ' + HUGE_INT + "}", "{" * 10_000):
            answer = http.post("/v1/process", content=content, headers={"Content-Type": "application/json"})
            assert 400 <= answer.status_code < 500, answer.text[:300]
            assert answer.headers["access-control-allow-origin"] == ORIGIN
            assert set(answer.json()) == {"detail", "code"}


def test_details_name_the_problem(server: tuple[str, Path]) -> None:
    base, _ = server
    expectations = {
        deep(5000): "nested too deeply",
        '{"popart": {"x": ' + HUGE_INT + "}}": "integer string conversion",
        '{"blackwhite": {"grain": 1e999}}': "too large",
    }
    with httpx.Client(base_url=base, timeout=60) as http:
        for params, words in expectations.items():
            effects = "blackwhite" if "blackwhite" in params else "popart"
            answer = http.post(
                "/v1/process",
                data={"effects": effects, "background": "none", "params": params},
                files={"image": ("p.jpg", PHOTO)},
            )
            assert words in answer.json()["detail"], answer.json()
        heic = http.post(
            "/v1/process",
            data={"effects": "popart", "background": "none"},
            files={"image": ("p.heic", heic_with_small_container())},
        )
        assert "HEIF" in heic.json()["detail"] and heic.json()["code"] == "unsupported_image"
