"""Real images into uint8 arrays (N, C, size, size) with int64 labels: a folder of PNG/JPEG files, and the
small digits set that ships inside scikit-learn (no download).

Both return :class:`ImageSet`; ``ray.data.from_numpy`` / ``from_items`` or the objectives take the arrays
as they are (``{"images": uint8 (B, C, H, W), "labels": int64 (B,)}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64
    class_names: list[str]  # label -> name

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, test_fraction: float, *, seed: int = 0) -> tuple[ImageSet, ImageSet]:
        """A seeded, stratified (train, test) split: each class keeps ``test_fraction`` of its images for test."""
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction={test_fraction} is not allowed; allowed: 0 < test_fraction < 1")
        rng = np.random.default_rng(seed)
        test = np.zeros(len(self), dtype=bool)
        for c in np.unique(self.labels):
            idx = rng.permutation(np.flatnonzero(self.labels == c))
            test[idx[: int(round(len(idx) * test_fraction))]] = True
        pick = lambda m: ImageSet(self.images[m], self.labels[m], self.class_names)  # noqa: E731
        return pick(~test), pick(test)


def _load_one(path: Path, size: int, channels: int, resize: str):
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        if resize == "center_crop":
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)  # (C, H, W)


def read_image_folder(
    root: str | Path,
    *,
    size: int,
    channels: Literal[1, 3] = 3,
    resize: Literal["center_crop", "stretch"] = "center_crop",
) -> ImageSet:
    """Every PNG/JPEG under ``root/<class name>/`` (recursively), class ids in sorted class-name order.

    Images are converted to RGB (or grey) and resized to ``size``×``size`` (bicubic): ``center_crop`` takes
    the central square first (aspect kept), ``stretch`` resizes the whole image. Files are read in sorted
    path order, so the result is deterministic. Needs Pillow (installed with matplotlib).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    if channels not in (1, 3) or resize not in ("center_crop", "stretch"):
        raise ValueError(f"channels={channels}, resize={resize!r}: allowed channels 1 or 3, resize center_crop|stretch")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        for path in files:
            images.append(_load_one(path, size, channels, resize))
            labels.append(label)
    if not images:
        raise ValueError(
            f"no images found under {root}: expected {root}/<class name>/*.png|jpg|jpeg "
            f"(class folders found: {classes or 'none'})"
        )
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), classes)


def load_digits(*, size: int = 8, channels: Literal[1, 3] = 1) -> ImageSet:
    """scikit-learn's handwritten digits (1,797 images, 8×8, 10 classes; UCI optical digits), shipped
    inside the scikit-learn package: no download.

    Pixel values 0-16 are scaled to 0-255; ``size`` > 8 upsamples bilinearly (e.g. 32 for a ViT with 4-px
    patches), ``channels=3`` repeats the grey channel. Class names are ``DIGIT_NAMES`` (for CLIP captions).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn comes with mlflow
        raise ImportError("load_digits needs scikit-learn (pip install scikit-learn)") from e
    d = _sk_load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    if size != 8:
        import torch
        import torch.nn.functional as F

        t = F.interpolate(torch.from_numpy(x).float(), size=(size, size), mode="bilinear", align_corners=False)
        x = t.round().clamp(0, 255).to(torch.uint8).numpy()
    if channels == 3:
        x = np.repeat(x, 3, axis=1)
    return ImageSet(np.ascontiguousarray(x), d.target.astype(np.int64), list(DIGIT_NAMES))
