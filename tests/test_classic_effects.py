"""Behaviour of the four classic effects: blackwhite, dithering, popart, retro8bit.

Small seeded images on the CPU; no timing here (see scripts/bench_effects.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from effects import blackwhite, dithering, popart, retro8bit
from effects._tensor import hex_palette
from effects.base import Effect

EFFECTS: dict[str, Effect] = {
    "blackwhite": blackwhite.EFFECT,
    "dithering": dithering.EFFECT,
    "popart": popart.EFFECT,
    "retro8bit": retro8bit.EFFECT,
}
# Each effect with its defaults, plus the variants that take a different code path.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("blackwhite", {}),
    ("blackwhite", {"filter": "red", "grain": 1.0, "grain_size": 4.0, "halation": 1.0}),
    ("dithering", {}),
    ("dithering", {"dots": 16, "adaptive": 0.0}),
    ("popart", {}),
    ("popart", {"grid": True, "levels": 6}),
    ("retro8bit", {}),
    ("retro8bit", {"pixels": 16, "dither": 0.0, "outline": False}),
]
VARIANT_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(VARIANTS)]


def expected_alpha(image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Every effect returns the input's alpha, except the pop-art grid: an opaque poster."""
    return torch.ones_like(image[:, 3]) if params.get("grid") else image[:, 3]


def pet_like(height: int = 48, width: int = 64, seed: int = 0, n: int = 1) -> torch.Tensor:
    """A soft-edged textured blob (the subject) on alpha = 0, with loud random RGB underneath."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    radius = torch.sqrt((xx / 0.7) ** 2 + (yy / 0.8) ** 2)
    alpha = (1.0 - radius).mul(6.0).clamp(0.0, 1.0)
    texture = torch.rand((n, 1, height, width), generator=generator) * 0.3
    rgb = torch.stack([0.75 - 0.3 * yy, 0.5 + 0.2 * xx, 0.3 + 0.1 * yy]).unsqueeze(0) + texture - 0.15
    rgb = rgb.clamp(0.0, 1.0)
    garbage = torch.rand((n, 3, height, width), generator=generator)
    rgb = torch.where(alpha > 0, rgb, garbage)
    return torch.cat([rgb, alpha.expand(n, 1, height, width)], dim=1).contiguous()


def opaque(image: torch.Tensor) -> torch.Tensor:
    out = image.clone()
    out[:, 3] = 1.0
    return out


def run(name: str, image: torch.Tensor, seed: int = 0, **params: Any) -> torch.Tensor:
    effect = EFFECTS[name]
    assert effect.apply is not None
    return effect.apply(image, effect.params(**params), seed)


# --- the contract, for every effect and variant ------------------------------------------------


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=VARIANT_IDS)
def test_shape_dtype_device_and_range_are_kept(name: str, params: dict[str, Any]) -> None:
    image = pet_like()
    out = run(name, image, **params)
    assert out.shape == image.shape
    assert out.dtype == image.dtype
    assert out.device == image.device
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=VARIANT_IDS)
def test_alpha_is_the_inputs(name: str, params: dict[str, Any]) -> None:
    image = pet_like()
    out = run(name, image, **params)
    assert torch.equal(out[:, 3], expected_alpha(image, params))


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=VARIANT_IDS)
def test_same_seed_gives_the_same_output(name: str, params: dict[str, Any]) -> None:
    image = pet_like()
    assert torch.equal(run(name, image, seed=11, **params), run(name, image, seed=11, **params))


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=VARIANT_IDS)
def test_input_is_not_modified(name: str, params: dict[str, Any]) -> None:
    image = pet_like()
    before = image.clone()
    run(name, image, **params)
    assert torch.equal(image, before)


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=VARIANT_IDS)
def test_hidden_rgb_under_transparent_pixels_does_not_leak(name: str, params: dict[str, Any]) -> None:
    """Two cutouts differing only in the RGB under alpha = 0 look the same wherever visible."""
    image = pet_like(seed=1)
    other = image.clone()
    hidden = (image[:, 3:4] == 0).expand(-1, 3, -1, -1)
    other[:, :3][hidden] = 1.0 - other[:, :3][hidden]
    visible = (image[:, 3:4] > 0).expand(-1, 3, -1, -1)
    a, b = run(name, image, **params), run(name, other, **params)
    if params.get("grid"):
        # Grid panels are flattened onto their background everywhere: compare whole images.
        visible = torch.ones_like(visible)
    assert torch.allclose(a[:, :3][visible], b[:, :3][visible], atol=1e-5)


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 5), (5, 3), (2, 2)])
def test_tiny_images_work(name: str, params: dict[str, Any], height: int, width: int) -> None:
    image = torch.rand((1, 4, height, width), generator=torch.Generator().manual_seed(height * 10 + width))
    out = run(name, image, **params)
    assert out.shape == image.shape
    assert torch.equal(out[:, 3], expected_alpha(image, params))
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=VARIANT_IDS)
def test_fully_transparent_image_does_not_crash(name: str, params: dict[str, Any]) -> None:
    image = pet_like()
    image[:, 3] = 0.0
    out = run(name, image, **params)
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out[:, 3], expected_alpha(image, params))


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=VARIANT_IDS)
def test_batch_items_equal_processing_each_alone(name: str, params: dict[str, Any]) -> None:
    first, second = pet_like(seed=2), opaque(pet_like(seed=3))
    batch = torch.cat([first, second])
    out = run(name, batch, seed=5, **params)
    assert torch.allclose(out[0:1], run(name, first, seed=5, **params), atol=1e-6)
    assert torch.allclose(out[1:2], run(name, second, seed=5, **params), atol=1e-6)


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=VARIANT_IDS)
def test_channels_last_and_strided_inputs_give_the_same_result(name: str, params: dict[str, Any]) -> None:
    image = pet_like(40, 56)
    expected = run(name, image, **params)
    channels_last = image.contiguous(memory_format=torch.channels_last)
    strided = torch.cat([image, image])[::2]
    assert torch.allclose(run(name, channels_last, **params), expected, atol=1e-6)
    assert torch.allclose(run(name, strided, **params), expected, atol=1e-6)


def test_a_non_rgba_tensor_is_refused() -> None:
    with pytest.raises(ValueError, match="RGBA"):
        run("popart", torch.rand(1, 3, 8, 8))


# --- parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EFFECTS))
def test_defaults_are_valid_and_every_field_is_described(name: str) -> None:
    effect = EFFECTS[name]
    assert effect.kind == "classic" and effect.name == name and effect.version >= 1
    effect.params()  # defaults validate
    schema = effect.params_schema()
    for field, spec in schema["properties"].items():
        assert spec.get("description"), f"{name}.{field} has no description"
        if spec.get("type") in ("integer", "number"):
            assert "minimum" in spec and "maximum" in spec, f"{name}.{field} is unbounded"


OUT_OF_BOUNDS: list[tuple[str, str, object]] = [
    ("blackwhite", "grain", 1.5),
    ("blackwhite", "contrast", -0.1),
    ("blackwhite", "grain_size", 0.5),
    ("blackwhite", "filter", "purple"),
    ("dithering", "dots", 8),
    ("dithering", "dots", 5000),
    ("dithering", "dot_scale", 3.0),
    ("popart", "levels", 2),
    ("popart", "levels", 9),
    ("popart", "palette", "sepia"),
    ("retro8bit", "pixels", 4),
    ("retro8bit", "saturation", 5.0),
]


@pytest.mark.parametrize(("name", "field", "value"), OUT_OF_BOUNDS)
def test_out_of_bounds_params_are_rejected_naming_the_field(name: str, field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        EFFECTS[name].params.model_validate({field: value})
    assert [error["loc"] for error in caught.value.errors()] == [(field,)]


@pytest.mark.parametrize("name", list(EFFECTS))
def test_unknown_params_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        EFFECTS[name].params.model_validate({"strength": 1.0})
    assert caught.value.errors()[0]["loc"] == ("strength",)


# --- blackwhite --------------------------------------------------------------------------------


def test_blackwhite_is_grey() -> None:
    out = run("blackwhite", pet_like())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_blackwhite_grain_depends_on_the_seed() -> None:
    image = pet_like()
    a, b = run("blackwhite", image, seed=1), run("blackwhite", image, seed=2)
    visible = image[:, 3] > 0.5
    difference = (a[:, 0] - b[:, 0])[visible].abs()
    assert difference.mean() > 0.01
    # Without grain the seed no longer matters.
    assert torch.equal(run("blackwhite", image, seed=1, grain=0.0), run("blackwhite", image, seed=2, grain=0.0))


def test_blackwhite_lens_filter_changes_how_red_renders() -> None:
    red = torch.zeros((1, 4, 16, 16))
    red[:, 0] = 0.8
    red[:, 1] = 0.2
    red[:, 2] = 0.2
    red[:, 3] = 1.0
    half = red.clone()
    half[..., 8:] = torch.tensor([0.2, 0.2, 0.8, 1.0]).view(1, 4, 1, 1)  # a red and a blue patch
    quiet: dict[str, Any] = {"grain": 0.0, "halation": 0.0, "clarity": 0.0, "sharpness": 0.0}
    red_filter = run("blackwhite", half, filter="red", **quiet)
    none_filter = run("blackwhite", half, filter="none", **quiet)
    # A red filter renders red lighter than blue; bare panchromatic film much less so.
    red_gap = red_filter[0, 0, 4, 2] - red_filter[0, 0, 4, 12]
    none_gap = none_filter[0, 0, 4, 2] - none_filter[0, 0, 4, 12]
    assert red_gap > 0.5
    assert red_gap > none_gap + 0.2


def test_blackwhite_edge_of_a_flat_cutout_has_no_halo() -> None:
    """A flat grey disc on transparency stays flat up to its soft edge (alpha-weighted blurs)."""
    image = pet_like(96, 96)
    image[:, :3] = torch.where(image[:, 3:4] > 0, torch.full_like(image[:, :3], 0.5), image[:, :3])
    out = run("blackwhite", image, grain=0.0, halation=0.0, sharpness=1.5, clarity=1.0)
    visible = out[:, 0][image[:, 3] > 0]
    assert visible.max() - visible.min() < 0.02


def test_blackwhite_s_curve_adds_contrast() -> None:
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 3, 8, 64)
    image = torch.cat([ramp, torch.ones(1, 1, 8, 64)], dim=1).contiguous()
    quiet: dict[str, Any] = {"grain": 0.0, "halation": 0.0, "clarity": 0.0, "sharpness": 0.0, "auto_levels": 0.0}
    flat = run("blackwhite", image, contrast=0.0, **quiet)[0, 0, 4]
    curved = run("blackwhite", image, contrast=1.0, **quiet)[0, 0, 4]
    assert curved[8] < flat[8] and curved[56] > flat[56]  # darker shadows, brighter highlights
    assert torch.all(curved[1:] >= curved[:-1])  # still monotonic


# --- dithering ---------------------------------------------------------------------------------


def test_dithering_is_nearly_binary_dots_on_white() -> None:
    image = pet_like(96, 128)
    out = run("dithering", image, dots=16)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    visible = out[:, 0][image[:, 3] > 0]
    binary = (visible < 0.02) | (visible > 0.98)
    assert binary.float().mean() > 0.85  # only the anti-aliased rims of the dots are grey
    assert (visible < 0.02).float().mean() > 0.05  # there is ink
    assert (visible > 0.98).float().mean() > 0.2  # and paper


def test_dithering_brightness_removes_ink() -> None:
    image = opaque(pet_like(64, 64))
    normal = run("dithering", image, adaptive=0.0)
    brighter = run("dithering", image, adaptive=0.0, brightness=0.3)
    darker = run("dithering", image, adaptive=0.0, brightness=-0.3)
    ink = [(1.0 - out[:, 0]).mean() for out in (brighter, normal, darker)]
    assert ink[0] < ink[1] < ink[2]


def test_dithering_transparent_area_is_blank_paper() -> None:
    image = pet_like(64, 64)
    out = run("dithering", image, dots=32)
    cell = max(1, round(64 / 32))
    coverage = torch.nn.functional.avg_pool2d(image[:, 3:4], cell, ceil_mode=True)
    empty_cells = torch.nn.functional.interpolate((coverage == 0).float(), scale_factor=cell)[:, 0] > 0
    assert (out[:, 0][empty_cells] == 1.0).all()


def test_dithering_dot_count_follows_the_dots_param() -> None:
    image = opaque(pet_like(64, 64))
    few = run("dithering", image, dots=16)
    many = run("dithering", image, dots=64)

    # Bigger cells give bigger dots: fewer separate ink-to-paper transitions along a row.
    def transitions(out: torch.Tensor) -> int:
        row = out[0, 0] < 0.5
        return int((row[:, 1:] != row[:, :-1]).sum())

    assert transitions(few) < transitions(many)


# --- popart ------------------------------------------------------------------------------------


def palette_colours(name: str, levels: int) -> torch.Tensor:
    colours, _ = popart.PALETTES[name]
    return hex_palette([colours[i] for i in popart.BAND_COLOURS[levels]], torch.zeros(1))


def test_popart_paints_the_palette_in_luminance_order() -> None:
    image = opaque(pet_like(64, 64))
    out = run("popart", image, levels=4, detail=0.0)
    colours = palette_colours("marilyn", 4)
    pixels = out[0, :3].reshape(3, -1).T
    distance = torch.cdist(pixels, colours)
    nearest = distance.argmin(dim=1)
    # Almost every pixel is (close to) a palette colour: flat bands with thin anti-aliased edges.
    assert (distance.min(dim=1).values < 0.02).float().mean() > 0.75
    # Every band is used, and brighter input lands in lighter bands on average.
    assert set(nearest.tolist()) == {0, 1, 2, 3}
    luma = (image[0, :3] * torch.tensor([0.2126, 0.7152, 0.0722]).view(3, 1, 1)).sum(0).reshape(-1)
    means = [luma[nearest == band].mean() for band in range(4)]
    assert means == sorted(means)


def test_popart_grid_has_four_distinct_panels() -> None:
    image = pet_like(64, 96)
    out = run("popart", image, grid=True)
    assert out.shape == image.shape
    panels = [out[0, :3, :32, :48], out[0, :3, :32, 48:], out[0, :3, 32:, :48], out[0, :3, 32:, 48:]]
    means = torch.stack([panel.reshape(3, -1).mean(dim=1) for panel in panels])
    for i in range(4):
        assert panels[i].std() > 0.05  # a picture, not a flat fill
        for j in range(i + 1, 4):
            assert (means[i] - means[j]).abs().max() > 0.08, f"panels {i} and {j} look alike"
    # Each panel's background (corners, where the subject is absent) is its palette's backdrop.
    backgrounds = [hex_palette([popart.PALETTES[name][1]], out)[0] for name in popart.PANEL_ORDER]
    corners = [out[0, :3, 0, 0], out[0, :3, 0, 48], out[0, :3, 32, 0], out[0, :3, 32, 48]]
    for corner, background in zip(corners, backgrounds, strict=True):
        assert torch.allclose(corner, background, atol=1e-5)


def test_popart_grid_with_odd_size_fills_every_pixel() -> None:
    image = opaque(pet_like(33, 47))
    out = run("popart", image, grid=True)
    assert out.shape == image.shape
    assert torch.isfinite(out).all()


def test_popart_palette_choice_changes_colours() -> None:
    image = opaque(pet_like())
    assert not torch.allclose(run("popart", image, palette="marilyn"), run("popart", image, palette="citrus"))


# --- retro8bit ---------------------------------------------------------------------------------


def test_retro8bit_colours_all_belong_to_the_palette() -> None:
    image = pet_like(96, 128)
    out = run("retro8bit", image, pixels=32)
    palette = hex_palette(retro8bit.PICO8, out)
    pixels = out[0, :3].reshape(3, -1).T[image[0, 3].reshape(-1) > 0]
    assert torch.cdist(pixels, palette).min(dim=1).values.max() < 1e-6


def test_retro8bit_is_made_of_square_blocks() -> None:
    image = opaque(pet_like(64, 64))
    out = run("retro8bit", image, pixels=16)
    block = 4
    blocks = out[0, :3].reshape(3, 16, block, 16, block)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))


def test_retro8bit_outline_only_on_cutouts() -> None:
    cutout = pet_like(64, 64)
    black = torch.zeros(3)
    with_outline = run("retro8bit", cutout, pixels=16, dither=0.0)
    without = run("retro8bit", cutout, pixels=16, dither=0.0, outline=False)
    is_black = (with_outline[0, :3] == black.view(3, 1, 1)).all(dim=0)
    was_black = (without[0, :3] == black.view(3, 1, 1)).all(dim=0)
    assert is_black.sum() > was_black.sum()
    # An opaque photo has no sprite edge, so the outline setting changes nothing.
    photo = opaque(cutout)
    assert torch.equal(run("retro8bit", photo, pixels=16), run("retro8bit", photo, pixels=16, outline=False))


def test_retro8bit_block_takes_the_majority_colour_not_the_average() -> None:
    """Edge-aware: a block 1/4 red and 3/4 blue becomes blue, never a purple average."""
    image = torch.ones((1, 4, 32, 256))
    image[:, :3] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    image[:, :3, :, 20:] = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    out = run("retro8bit", image, pixels=16, dither=0.0, saturation=1.0, contrast=1.0)  # 16 px blocks
    red = hex_palette(["#ff004d"], out)[0]
    assert torch.equal(out[0, :3, 0, 0], red)  # left block: all red
    blues = hex_palette(["#29adff", "#1d2b53"], out)
    right = out[0, :3, 0, 16]
    assert any(torch.equal(right, blue) for blue in blues), right
