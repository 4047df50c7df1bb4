"""Foreground colour estimation: quality against pymatting on composites with a known answer, contract."""

from __future__ import annotations

import pytest
import torch

import effects.matting as matting
from effects.matting import estimate_foreground
from tests.support.photos import blur, visible_error


def composite(height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A photo I = αF + (1 − α)B with known F and α: (1, 3, H, W) image, (1, 1, H, W) alpha, (3, H, W) F.

    A textured subject with a soft outline, a veil of partial transparency, and hair-like
    strands crossing a textured background of different colours: where estimation is hard.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0.0, 1.0, height).view(-1, 1).expand(height, width)
    x = torch.linspace(0.0, 1.0, width).view(1, -1).expand(height, width)
    phase = torch.rand(3, 2, generator=g) * 6.28
    foreground = torch.stack(
        [
            base + 0.2 * torch.sin(3 * 6.28 * x + phase[c, 0]) * torch.cos(2 * 6.28 * y + phase[c, 1])
            for c, base in enumerate((0.75, 0.55, 0.35))
        ]
    )
    foreground = (foreground + 0.02 * torch.randn(3, height, width, generator=g)).clamp(0, 1)
    checks = ((x * 16).floor() + (y * 16).floor()) % 2
    background = torch.stack(
        [
            base + 0.25 * torch.sin(5 * 6.28 * x + phase[c, 1]) * torch.cos(4 * 6.28 * y + phase[c, 0]) + 0.15 * checks
            for c, base in enumerate((0.2, 0.45, 0.8))
        ]
    ).clamp(0, 1)
    body = ((((x - 0.5) / 0.3) ** 2 + ((y - 0.55) / 0.35) ** 2) < 1).float()
    alpha = blur(body, 2.0 * height / 256)
    strands = torch.zeros(height, width)
    rows = torch.linspace(0.05, 0.5, 4 * height)
    for _ in range(40):
        x0, amplitude, frequency, opacity = torch.rand(4, generator=g).tolist()
        columns = 0.25 + 0.5 * x0 + 0.05 * amplitude * torch.sin((2 + 4 * frequency) * 6.28 * rows)
        strands[(rows * height).long().clamp(0, height - 1), (columns * width).long().clamp(0, width - 1)] = (
            0.3 + 0.6 * opacity
        )
    alpha = torch.maximum(alpha, (blur(strands, 0.6 * height / 256) * 2).clamp(0, 1))
    veil = ((x > 0.05) & (x < 0.2) & (y > 0.6) & (y < 0.9)).float() * 0.5
    alpha = torch.maximum(alpha, blur(veil, 1.5)).clamp(0, 1)
    image = alpha * foreground + (1 - alpha) * background
    image = (image * 255).round() / 255  # an 8-bit photo
    return image[None], alpha[None, None], foreground


@pytest.mark.parametrize(("height", "width", "seed"), [(256, 256, 0), (300, 200, 1), (384, 512, 2), (768, 1024, 3)])
def test_quality_matches_pymatting(height: int, width: int, seed: int) -> None:
    from pymatting import estimate_foreground_ml

    image, alpha, truth = composite(height, width, seed)
    ours = estimate_foreground(image, alpha)[0]
    reference = estimate_foreground_ml(image[0].permute(1, 2, 0).double().numpy(), alpha[0, 0].double().numpy())
    reference_error = visible_error(torch.from_numpy(reference).permute(2, 0, 1).float(), truth, alpha[0, 0])
    our_error = visible_error(ours, truth, alpha[0, 0])
    keep_the_photo = visible_error(image[0], truth, alpha[0, 0])
    assert our_error <= 1.1 * reference_error, f"ours {our_error:.4f} vs pymatting {reference_error:.4f}"
    assert our_error < 0.5 * keep_the_photo, "the estimate must remove most of the old background's colour"


def test_shape_range_and_solid_regions() -> None:
    image, alpha, _ = composite(120, 160, seed=4)
    alpha[..., :20, :] = 0.0
    alpha[..., 60:70, 60:100] = 1.0
    result = estimate_foreground(image, alpha)
    assert result.shape == image.shape and result.dtype == torch.float32 and result.device == image.device
    assert result.min().item() >= 0.0 and result.max().item() <= 1.0
    # Opaque pixels are the photo itself; so are fully transparent ones (their colour is invisible).
    assert torch.equal(result[..., 60:70, 60:100], image[..., 60:70, 60:100])
    assert torch.equal(result[..., :20, :], image[..., :20, :])
    soft = ((alpha > 0.05) & (alpha < 0.95)).expand_as(image)
    assert (result - image).abs()[soft].mean().item() > 0.02, "soft pixels get the subject's colour back"


def test_uniform_alpha_everywhere() -> None:
    image, _, _ = composite(64, 80, seed=5)
    assert torch.equal(estimate_foreground(image, torch.ones(1, 1, 64, 80)), image)
    assert torch.equal(estimate_foreground(image, torch.zeros(1, 1, 64, 80)), image)
    half = estimate_foreground(image, torch.full((1, 1, 64, 80), 0.5))
    assert torch.isfinite(half).all() and half.shape == image.shape


def test_batch_is_per_image() -> None:
    first, first_alpha, _ = composite(96, 128, seed=6)
    second, second_alpha, _ = composite(96, 128, seed=7)
    together = estimate_foreground(torch.cat([first, second]), torch.cat([first_alpha, second_alpha]))
    assert torch.equal(together[1:], estimate_foreground(second, second_alpha))


def test_sparse_and_dense_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Edge cells gathered one by one give what dense full-resolution passes give."""
    image, alpha, _ = composite(200, 300, seed=8)
    sparse = estimate_foreground(image, alpha)
    monkeypatch.setattr(matting, "DENSE_LIMIT", -1.0)
    dense = estimate_foreground(image, alpha)
    assert (alpha * (sparse - dense).abs()).max().item() < 1.0 / 255.0


def test_writes_into_out_and_in_place() -> None:
    image, alpha, _ = composite(72, 90, seed=9)
    expected = estimate_foreground(image, alpha)
    out = torch.empty_like(image)
    assert estimate_foreground(image, alpha, out=out) is out
    assert torch.equal(out, expected)
    photo = image.clone()
    estimate_foreground(photo, alpha, out=photo)
    assert torch.equal(photo, expected)


def test_tiny_and_odd_sizes() -> None:
    generator = torch.Generator().manual_seed(10)
    for height, width in [(1, 1), (2, 3), (1, 100), (7, 5), (2049, 3)]:
        image = torch.rand(1, 3, height, width, generator=generator)
        alpha = torch.rand(1, 1, height, width, generator=generator)
        result = estimate_foreground(image, alpha)
        assert result.shape == image.shape
        assert torch.isfinite(result).all() and result.min().item() >= 0.0 and result.max().item() <= 1.0


def test_alpha_outside_the_unit_range_is_clamped() -> None:
    image, alpha, _ = composite(64, 64, seed=11)
    stretched = alpha * 1.5 - 0.25
    assert torch.equal(estimate_foreground(image, stretched), estimate_foreground(image, stretched.clamp(0, 1)))


def test_rejects_mismatched_inputs() -> None:
    image = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        estimate_foreground(torch.rand(1, 4, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="alpha must be"):
        estimate_foreground(image, torch.rand(1, 1, 8, 9))
    with pytest.raises(ValueError, match="out must be"):
        estimate_foreground(image, torch.rand(1, 1, 8, 8), out=torch.empty(1, 3, 8, 8, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_result_on_the_gpu() -> None:
    image, alpha, _ = composite(256, 320, seed=12)
    on_cpu = estimate_foreground(image, alpha)
    on_gpu = estimate_foreground(image.cuda(), alpha.cuda())
    assert on_gpu.device.type == "cuda"
    assert (alpha * (on_gpu.cpu() - on_cpu).abs()).max().item() < 1.0 / 255.0


def test_writes_into_a_strided_out() -> None:
    """`out` may be the colour planes of an RGBA tensor, or a channels-last tensor."""
    image, alpha, _ = composite(40, 56, seed=13)
    expected = estimate_foreground(image, alpha)
    rgba = torch.zeros(1, 4, 40, 56)
    estimate_foreground(image, alpha, out=rgba[:, :3])
    assert torch.equal(rgba[:, :3], expected) and torch.equal(rgba[:, 3], torch.zeros(1, 40, 56))
    channels_last = torch.empty_like(image, memory_format=torch.channels_last)
    estimate_foreground(image, alpha, out=channels_last)
    assert torch.equal(channels_last, expected)
