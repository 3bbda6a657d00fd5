"""Shared plumbing of the vision objectives: the model contract, seeding, probe embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from data import augment as A
from models.vit import ResolvedViTConfig, ViTConfig, ViTEncoder, resolve_vit_config
from objectives.hooks import ObjectiveHooks


def call(model: nn.Module, part: str, *args: Any, **kwargs: Any) -> Any:
    """Run sub-module ``part`` of a :class:`objectives.vision.model.VisionModel` through the model's own
    ``forward`` (so a DeepSpeed engine or DDP wrapper around it sees a forward call)."""
    return model(part, *args, **kwargs)


class VisionObjective(ObjectiveHooks):
    """Base class of the vision objectives.

    Subclasses set ``Params`` (with an ``augment: AugmentConfig`` field) and implement
    :meth:`build_modules`, :meth:`prepare` and :meth:`loss`. ``prepare`` takes
    ``{"images": uint8 (B, C, H, W), "labels": int64 (B,)}`` on any device and returns float tensors on the
    same device; ``loss(model, prepared)`` returns ``(loss, metrics)`` with the same metric keys every call.
    """

    name: str
    Params: type[BaseModel]

    def __init__(self, params: BaseModel):
        self.params = params
        self.vit: ResolvedViTConfig | None = None

    # ---- the model ---------------------------------------------------------------------------------
    @classmethod
    def build_modules(cls, params: BaseModel, vit: ResolvedViTConfig) -> dict[str, nn.Module]:
        """The named sub-modules this objective trains; ``encoder`` is always a :class:`ViTEncoder`."""
        return {"encoder": ViTEncoder(vit)}

    def bind(self, vit_cfg: str | Mapping[str, Any] | ViTConfig | ResolvedViTConfig) -> VisionObjective:
        """Record the ViT's sizes (patch grid), which masking objectives need in ``prepare``; returns self."""
        self.vit = resolve_vit_config(vit_cfg)
        return self

    def _bound(self) -> ResolvedViTConfig:
        if self.vit is None:
            raise RuntimeError(
                f"objective {self.name!r}: call objective.bind(vit_cfg) before prepare/loss "
                "(the patch grid comes from the ViT config)"
            )
        return self.vit

    # ---- the two steps -----------------------------------------------------------------------------
    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # ---- evaluation --------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the float input the encoder sees, without augmentation."""
        return A.plain(images, self.params.augment)

    @torch.no_grad()
    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Pooled encoder embeddings (B, D), float32, of uint8 images (B, C, H, W), in eval mode.

        The representation probes (k-NN, nearest class mean) use; projection heads are not applied.
        """
        was_training = model.training
        model.eval()
        try:
            return call(model, "encoder", self.normalize(images), pool=True).float()
        finally:
            model.train(was_training)


def registered_vision_objectives() -> tuple[str, ...]:
    """Names of the registered objectives whose class is a :class:`VisionObjective` (sorted, as
    ``objectives.available()``)."""
    from objectives import registry

    return tuple(n for n in registry.available() if issubclass(registry.objective_class(n), VisionObjective))


def passthrough_labels(batch: dict[str, torch.Tensor], out: dict[str, Any]) -> dict[str, Any]:
    if "labels" in batch:
        out["labels"] = batch["labels"]
    return out
