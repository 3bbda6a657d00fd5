"""Export format of a vision pre-training run: the encoder (what users embed with) and the whole model.

One directory (a checkpoint's export part, and what the MLflow registry holds):

- ``encoder.safetensors``: the :class:`models.vit.ViTEncoder` weights (keys without the ``encoder.`` prefix);
- ``vit_config.json``: its :class:`models.vit.ResolvedViTConfig`;
- ``image_processor.json``: how raw images become encoder input (:class:`ImageProcessor`: size, channels,
  normalisation) plus the data's class names and the objective that trained it;
- ``vision_model.safetensors``: every part of the objective's model (decoder, heads, text tower), so a
  later run with the same objective can continue from all of it (``trainer.init_from``).

:func:`load_encoder` rebuilds the encoder; :class:`ImageEmbedder` wraps it with the processor so that
``embedder(uint8 images (B, C, H, W)) -> (B, D)`` is the whole inference path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from models.files import ENCODER_WEIGHTS, FULL_WEIGHTS, PROCESSOR, VIT_CONFIG
from models.vit import ResolvedViTConfig, ViTEncoder


class ImageProcessor(BaseModel):
    """uint8 (B, C, H, W) -> the float input the encoder was trained on: [0, 1], resized, (x − mean) / std."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(gt=0)
    channels: int = Field(ge=1)
    mean: float = 0.5
    std: float = Field(0.5, gt=0)
    class_names: list[str] = Field(default_factory=list, description="label -> name of the training data")
    objective: str = Field("", description="the pre-training objective that produced the encoder")
    objective_params: dict[str, Any] = Field(default_factory=dict)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"images must be (B, {self.channels}, H, W); got {tuple(images.shape)}")
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std


def is_vision_export(directory: str | os.PathLike) -> bool:
    return Path(directory, VIT_CONFIG).is_file()


def save_vision(
    state: Mapping[str, torch.Tensor], vit_cfg: ResolvedViTConfig, processor: ImageProcessor, directory: str | os.PathLike
) -> Path:
    """Write the full model ``state`` (a :class:`objectives.vision.model.VisionModel` state dict, parts as key
    prefixes) and its encoder part in the export layout above. Returns the directory."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    encoder = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
    with torch.device("meta"):
        expected = set(ViTEncoder(vit_cfg).state_dict())
    if set(encoder) != expected:
        missing, unexpected = sorted(expected - set(encoder)), sorted(set(encoder) - expected)
        raise ValueError(f"encoder.* weights do not match ViTEncoder({vit_cfg!r}): missing {missing[:5]}, unexpected {unexpected[:5]}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(encoder, str(directory / ENCODER_WEIGHTS), metadata={"format": "pt"})
    save_file(tensors, str(directory / FULL_WEIGHTS), metadata={"format": "pt"})
    (directory / VIT_CONFIG).write_text(vit_cfg.model_dump_json(indent=2) + "\n")
    (directory / PROCESSOR).write_text(processor.model_dump_json(indent=2) + "\n")
    return directory


def load_encoder(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[ViTEncoder, ResolvedViTConfig]:
    """The encoder saved by :func:`save_vision` (strict load, training mode as constructed)."""
    directory = Path(directory)
    if not is_vision_export(directory):
        raise FileNotFoundError(f"{directory} holds no {VIT_CONFIG}: not a ray-pretrain vision export")
    cfg = ResolvedViTConfig.model_validate_json((directory / VIT_CONFIG).read_text())
    encoder = ViTEncoder(cfg).to(map_location)
    encoder.load_state_dict(load_file(str(directory / ENCODER_WEIGHTS), device=str(map_location)), strict=True)
    return encoder, cfg


def load_processor(directory: str | os.PathLike) -> ImageProcessor:
    return ImageProcessor.model_validate(json.loads(Path(directory, PROCESSOR).read_text()))


def load_full_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every part's weights (``vision_model.safetensors``), for continuing with the same objective."""
    return load_file(str(Path(directory, FULL_WEIGHTS)))


class ImageEmbedder(nn.Module):
    """``embedder(images) -> (B, D)`` pooled encoder embeddings of uint8 (or float [0, 1]) images, no grad."""

    def __init__(self, encoder: ViTEncoder, processor: ImageProcessor):
        super().__init__()
        self.encoder, self.processor = encoder, processor

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        return self.encoder(self.processor(images.to(device)), pool=True).float()


def load_embedder(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> ImageEmbedder:
    encoder, _ = load_encoder(directory, map_location)
    return ImageEmbedder(encoder, load_processor(directory)).eval()
