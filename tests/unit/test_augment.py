"""Two-view augmentations: determinism, shapes, and the exact effect of each operation in isolation."""

from __future__ import annotations

import pytest
import torch

from data import augment as A


def imgs(b: int = 6, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_two_views_shapes_and_determinism():
    x = imgs()
    v1, v2 = A.two_views(x, gen(0))
    assert v1.shape == v2.shape == (6, 3, 16, 16) and v1.dtype == torch.float32
    w1, w2 = A.two_views(x, gen(0))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert not torch.equal(v1, v2)  # two different views
    u1, _ = A.two_views(x, gen(1))
    assert not torch.equal(u1, v1)
    n1, _ = A.two_views(x, None)
    m1, _ = A.two_views(x, None)
    assert torch.equal(n1, m1)  # no generator: a fixed seed
    assert A.augment(x, gen(0), A.AugmentConfig(out_size=8)).shape == (6, 3, 8, 8)
    assert A.two_views(imgs(c=1), gen(0))[0].shape == (6, 1, 16, 16)


def test_no_augmentation_is_exact_normalisation():
    x = imgs()
    out = A.augment(x, gen(0), A.NO_AUGMENT)
    torch.testing.assert_close(out, (x.float() / 255 - 0.5) / 0.5, rtol=0, atol=1e-5)
    torch.testing.assert_close(A.plain(x, A.NO_AUGMENT), out, rtol=0, atol=1e-5)


def test_flip_and_crop():
    x = A.to_float(imgs())
    flipped = A.resized_crop_flip(x, gen(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(flipped, x.flip(-1), rtol=0, atol=1e-5)
    # a quarter-area crop of a left-dark / right-bright image sees the edge only when it straddles it
    half = torch.zeros(64, 1, 16, 16)
    half[..., 8:] = 1.0
    crop = A.resized_crop_flip(half, gen(0), scale=(0.25, 0.25), ratio=(1.0, 1.0), flip_p=0.0)
    bright = crop.mean((1, 2, 3))  # share of the crop right of the edge: depends on where the crop sits
    assert (crop.amin((1, 2, 3)) >= 0).all() and (crop.amax((1, 2, 3)) <= 1).all()
    assert bright.min() < 0.1 and bright.max() > 0.9 and len(torch.unique(bright.round(decimals=2))) > 10


def test_colour_ops():
    x = A.to_float(imgs())
    gray = A.random_grayscale(x, gen(0), p=1.0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert torch.equal(A.random_grayscale(x, gen(0), p=0.0), x)
    same = A.color_jitter(x, gen(0), p=0.0, brightness=0.4, contrast=0.4, saturation=0.4)
    assert torch.equal(same, x)
    jit = A.color_jitter(x, gen(0), p=1.0, brightness=0.4, contrast=0.4, saturation=0.4)
    assert jit.min() >= 0 and jit.max() <= 1 and not torch.allclose(jit, x)
    # brightness alone scales every pixel of an image by one factor (no clipping at mid-grey values)
    mid = torch.full((4, 3, 4, 4), 0.5)
    b = A.color_jitter(mid, gen(0), p=1.0, brightness=0.4, contrast=0.0, saturation=0.0)
    factors = b[:, 0, 0, 0] / 0.5
    assert torch.allclose(b, 0.5 * factors.view(4, 1, 1, 1).expand_as(b))
    assert ((factors >= 0.6) & (factors <= 1.4)).all()


def test_blur_keeps_constants_and_smooths_noise():
    flat = torch.full((3, 3, 16, 16), 0.3)
    torch.testing.assert_close(A.gaussian_blur(flat, gen(0), p=1.0, sigma=(1.0, 2.0), kernel_frac=0.3), flat)
    noise = torch.rand(3, 3, 16, 16, generator=gen(1))
    blurred = A.gaussian_blur(noise, gen(0), p=1.0, sigma=(1.0, 2.0), kernel_frac=0.3)
    assert blurred.var() < 0.5 * noise.var()
    torch.testing.assert_close(blurred.mean(), noise.mean(), rtol=0.05, atol=0.0)
    assert torch.equal(A.gaussian_blur(noise, gen(0), p=0.0, sigma=(1.0, 2.0), kernel_frac=0.3), noise)


def test_config_validation():
    with pytest.raises(ValueError, match="crop_scale"):
        A.AugmentConfig(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="crop_scale"):
        A.AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError):
        A.AugmentConfig(flip=0.5)  # unknown key
