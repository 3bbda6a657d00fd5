"""Batched, seeded image augmentations for two-view (joint-embedding) pre-training, in torch.

Every operation draws one set of random parameters per image from the ``torch.Generator`` it is given
(in a fixed order, so the same generator state gives the same views) and transforms the whole batch at
once, on whatever device the images are on (the random numbers are drawn on the generator's device and
moved). The pipeline is SimCLR's (Chen et al., arXiv 2002.05709, appendix A):

random resized crop + horizontal flip (one ``F.grid_sample`` through a per-image affine grid)
-> colour jitter (brightness, contrast, saturation; with probability ``jitter_p``)
-> random grayscale -> Gaussian blur (with probability ``blur_p``) -> normalise ``(x − mean) / std``.

Deviations from torchvision, for vectorisation: the crop's width and height fractions are clipped to 1
instead of re-drawn (torchvision retries up to 10 times, then falls back to a centre crop); the jitter
order is fixed (brightness, contrast, saturation) and hue jitter is left out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_SEED = 1234
"""Seed of the generator used when none is given (evaluation): the same views every time."""

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale


class AugmentConfig(BaseModel):
    """Augmentation parameters. Defaults: SimCLR's recipe with colour-jitter strength 0.5 (0.4 for brightness,
    contrast and saturation, the usual choice for small images; SimCLR's ImageNet strength 1.0 is 0.8)."""

    model_config = ConfigDict(extra="forbid")

    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="area fraction of the crop, (min, max)")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="aspect ratio w/h of the crop, log-uniform")
    flip_p: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    jitter_p: float = Field(0.8, ge=0, le=1, description="probability of colour jitter")
    brightness: float = Field(0.4, ge=0, lt=1, description="brightness factor in [1 − b, 1 + b]")
    contrast: float = Field(0.4, ge=0, lt=1, description="contrast factor in [1 − c, 1 + c]")
    saturation: float = Field(0.4, ge=0, lt=1, description="saturation factor in [1 − s, 1 + s]")
    grayscale_p: float = Field(0.2, ge=0, le=1, description="probability of converting to grey (RGB only)")
    blur_p: float = Field(0.5, ge=0, le=1, description="probability of a Gaussian blur")
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="blur sigma in pixels, uniform in (min, max)")
    blur_kernel_frac: float = Field(0.1, gt=0, le=1, description="blur kernel side as a fraction of the image side")
    mean: float = Field(0.5, description="normalisation: (x − mean) / std on [0, 1] pixel values")
    std: float = Field(0.5, gt=0, description="normalisation: (x − mean) / std on [0, 1] pixel values")
    out_size: int | None = Field(None, gt=0, description="output side in pixels; None: the input's")

    @model_validator(mode="after")
    def _check_ranges(self) -> AugmentConfig:
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name}=({lo}, {hi}) is not allowed; allowed: 0 < min <= max")
        if self.crop_scale[1] > 1:
            raise ValueError(f"crop_scale max={self.crop_scale[1]} is not allowed; allowed: <= 1")
        return self


NO_AUGMENT = AugmentConfig(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0
)
"""Only conversion and normalisation (for embedding images in probes)."""


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(DEFAULT_SEED)


def _rand(g: torch.Generator, n: int, device: torch.device, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    u = torch.rand(n, generator=g, device=g.device).to(device)
    return lo + (hi - lo) * u


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float32 in [0, 1]; float input is returned as float32."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W); got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def normalize(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    return (x - cfg.mean) / cfg.std


def resized_crop_flip(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_p: float,
    out_size: int | None = None,
) -> torch.Tensor:
    """Random resized crop and horizontal flip of float images (B, C, H, W) -> (B, C, S, S), bilinear.

    Per image: area fraction a ~ U(scale), aspect r = exp(U(log ratio)); the crop spans fractions
    w = sqrt(a·r·H/W) and h = sqrt(a/r·W/H) of the width and height (clipped to 1) at a uniform position
    inside the image; a flip negates the x axis of the sampling grid.
    """
    B, C, H, W = x.shape
    dev = x.device
    area = _rand(generator, B, dev, *scale)
    log_r = _rand(generator, B, dev, math.log(ratio[0]), math.log(ratio[1]))
    flip = _rand(generator, B, dev) < flip_p
    ux, uy = _rand(generator, B, dev), _rand(generator, B, dev)
    r = log_r.exp()
    w = (area * r * H / W).sqrt().clamp(max=1.0)  # (B,) fraction of the width
    h = (area / r * W / H).sqrt().clamp(max=1.0)
    cx = (2 * ux - 1) * (1 - w)  # centre in [-1, 1] coordinates, crop inside the image
    cy = (2 * uy - 1) * (1 - h)
    sx = torch.where(flip, -w, w)
    zero = torch.zeros_like(w)
    theta = torch.stack((torch.stack((sx, zero, cx), 1), torch.stack((zero, h, cy), 1)), 1)  # (B, 2, 3)
    S = out_size or H
    out_w = out_size or W
    grid = F.affine_grid(theta, [B, C, S, out_w], align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luma; grey images are returned as they are."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x[:, :3] * w).sum(1, keepdim=True)


def color_jitter(
    x: torch.Tensor, generator: torch.Generator, *, p: float, brightness: float, contrast: float, saturation: float
) -> torch.Tensor:
    """Brightness, contrast and saturation jitter on [0, 1] images, applied to each image with probability p."""
    B = x.shape[0]
    dev = x.device
    apply = (_rand(generator, B, dev) < p).view(B, 1, 1, 1)
    b = _rand(generator, B, dev, 1 - brightness, 1 + brightness).view(B, 1, 1, 1)
    c = _rand(generator, B, dev, 1 - contrast, 1 + contrast).view(B, 1, 1, 1)
    s = _rand(generator, B, dev, 1 - saturation, 1 + saturation).view(B, 1, 1, 1)
    y = (x * b).clamp(0, 1)
    m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    y = ((y - m) * c + m).clamp(0, 1)
    if y.shape[1] == 3:
        g = _gray(y)
        y = ((y - g) * s + g).clamp(0, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: torch.Tensor, generator: torch.Generator, *, p: float) -> torch.Tensor:
    """Replace RGB images by their luma (in all 3 channels) with probability p; grey images unchanged."""
    apply = (_rand(generator, x.shape[0], x.device) < p).view(-1, 1, 1, 1)
    if x.shape[1] != 3:
        return x
    return torch.where(apply, _gray(x).expand_as(x), x)


def gaussian_blur(
    x: torch.Tensor, generator: torch.Generator, *, p: float, sigma: tuple[float, float], kernel_frac: float
) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma ~ U(sigma), applied with probability p.

    Kernel side: the odd number nearest ``kernel_frac`` · min(H, W), at least 3; reflect padding. One grouped
    convolution per axis blurs the whole batch (images that are not blurred get a delta kernel).
    """
    B, C, H, W = x.shape
    dev = x.device
    apply = _rand(generator, B, dev) < p
    sig = _rand(generator, B, dev, *sigma)
    k = max(3, int(round(kernel_frac * min(H, W))) // 2 * 2 + 1)
    k = min(k, 2 * (min(H, W) - 1) + 1)  # reflect padding needs pad < side
    t = torch.arange(k, device=dev, dtype=x.dtype) - k // 2  # (k,)
    kern = torch.exp(-(t[None] ** 2) / (2 * sig[:, None] ** 2))  # (B, k)
    kern = kern / kern.sum(1, keepdim=True)
    delta = (t == 0).to(x.dtype)[None].expand(B, k)
    kern = torch.where(apply[:, None], kern, delta)
    kern = kern.repeat_interleave(C, dim=0)  # (B*C, k): one kernel per (image, channel) group
    pad = k // 2
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), kern.view(B * C, 1, k, 1), groups=B * C)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), kern.view(B * C, 1, 1, k), groups=B * C)
    return y.view(B, C, H, W)


def augment(images: torch.Tensor, generator: torch.Generator | None, cfg: AugmentConfig) -> torch.Tensor:
    """One augmented, normalised float32 view (B, C, S, S) of uint8 (or [0, 1] float) images (B, C, H, W)."""
    g = default_generator(generator)
    x = to_float(images)
    x = resized_crop_flip(x, g, scale=cfg.crop_scale, ratio=cfg.crop_ratio, flip_p=cfg.flip_p, out_size=cfg.out_size)
    x = color_jitter(x, g, p=cfg.jitter_p, brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation)
    x = random_grayscale(x, g, p=cfg.grayscale_p)
    x = gaussian_blur(x, g, p=cfg.blur_p, sigma=cfg.blur_sigma, kernel_frac=cfg.blur_kernel_frac)
    return normalize(x, cfg)


def two_views(
    images: torch.Tensor, generator: torch.Generator | None, cfg: AugmentConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views (v1, v2) of the same images, each (B, C, S, S) float32 normalised."""
    cfg = cfg or AugmentConfig()
    g = default_generator(generator)
    return augment(images, g, cfg), augment(images, g, cfg)


def plain(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """No augmentation: uint8 -> float -> normalise with ``cfg``'s mean and std (resized to ``cfg.out_size``)."""
    x = to_float(images)
    if cfg.out_size is not None and x.shape[-2:] != (cfg.out_size, cfg.out_size):
        x = F.interpolate(x, size=(cfg.out_size, cfg.out_size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, cfg)
