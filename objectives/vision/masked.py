"""Masked image modelling: MAE and Hard Patches Mining."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from data import augment as A
from models.vit import MAEDecoder, ResolvedViTConfig, ViTEncoder, patchify
from objectives.registry import register
from objectives.vision import functional as VF
from objectives.vision.base import VisionObjective, call, passthrough_labels


def _mae_augment() -> A.AugmentConfig:
    # MAE pre-trains with random resized crops (scale 0.2-1) and flips only (arXiv 2111.06377, A.1)
    return A.AugmentConfig(crop_scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """K = round(L · (1 − mask_ratio)) visible patches; L − K are masked (exactly the ratio when L·ratio is whole)."""
    k = int(round(num_patches * (1.0 - mask_ratio)))
    if not 1 <= k < num_patches:
        raise ValueError(
            f"mask_ratio={mask_ratio} leaves {k} of {num_patches} patches visible; "
            "allowed: at least one visible and one masked patch"
        )
    return k


def masks_from_noise(noise: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking from noise (B, L): the n_keep patches with the lowest noise stay visible.

    Returns ids_keep (B, K) (in ascending-noise order), ids_restore (B, L) (the unshuffling permutation the
    decoder uses) and mask (B, L) float, 1 = masked.
    """
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones_like(noise, dtype=torch.float32)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


@register("mae")
class MAE(VisionObjective):
    """Masked autoencoder (He et al., arXiv 2111.06377).

    ``prepare``: augment (crop + flip), then mask ``mask_ratio`` of the patches uniformly at random per image
    → ``{"images", "ids_keep", "ids_restore", "mask", "labels"}``. ``loss``: encode the visible patches,
    decode all, MSE on the masked patches against per-patch-normalised pixels (``norm_pix_loss``).
    Needs :meth:`bind` (the patch grid). Parts: ``encoder``, ``decoder``.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="fraction of patches masked per image")
        norm_pix_loss: bool = Field(True, description="standardise each target patch by its own mean and std")
        augment: A.AugmentConfig = Field(default_factory=_mae_augment, description="augmentation before masking")

    @classmethod
    def build_modules(cls, params: BaseModel, vit: ResolvedViTConfig) -> dict[str, nn.Module]:
        return {"encoder": ViTEncoder(vit), "decoder": MAEDecoder(vit)}

    def _augment(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
        vit = self._bound()
        x = A.augment(batch["images"], g, self.params.augment)
        if x.shape[-1] != vit.image_size:
            raise ValueError(f"images are {x.shape[-1]} px after augmentation; the ViT expects {vit.image_size}")
        return x

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        g = A.default_generator(generator)
        x = self._augment(batch, g)
        L = self.vit.num_patches
        noise = torch.rand(x.shape[0], L, generator=g, device=g.device).to(x.device)
        ids_keep, ids_restore, mask = masks_from_noise(noise, num_visible(L, self.params.mask_ratio))
        return passthrough_labels(batch, {"images": x, "ids_keep": ids_keep, "ids_restore": ids_restore, "mask": mask})

    def reconstruct(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction (B, L, P), encoder latent (B, prefix + K, D)) for a prepared batch."""
        latent = call(model, "encoder", batch["images"], ids_keep=batch["ids_keep"])
        return call(model, "decoder", latent, batch["ids_restore"]), latent

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        pred, _ = self.reconstruct(model, batch)
        target = patchify(batch["images"], self._bound().patch_size)
        loss = VF.mae_loss(pred, target, batch["mask"], norm_pix=self.params.norm_pix_loss)
        return loss, {"mse_masked": loss.detach()}


@register("hpm")
class HPM(MAE):
    """Hard Patches Mining (Wang et al., arXiv 2304.05919): MAE plus a loss predictor that chooses the masks.

    Per step (``loss``):

    1. without gradient, encode the whole image and let the loss predictor score every patch (B, L);
    2. mask L − K patches: the ⌊α_t·(L − K)⌉ patches with the highest predicted loss (hard patches), the rest
       at random (the noise drawn in ``prepare``); α_t grows linearly from ``hard_ratio_start`` to
       ``hard_ratio_end`` over ``ramp_steps`` steps — easy (random) to hard masking;
    3. MAE reconstruction loss on the masked patches, plus ``predictor_weight`` × the relative loss
       :func:`objectives.vision.functional.hpm_relative_loss` between the predictor's output for the masked
       patches and their detached per-patch reconstruction losses.

    The predictor (part ``loss_predictor``, a separate MAE decoder branch with one output per patch, on the
    shared encoder latent) gets gradients only from its own loss; that loss also reaches the encoder, as in
    the paper, where predicting difficulty is an extra learning signal. The step t is the number of training
    ``loss`` calls so far, unless :meth:`set_step` is called (the loop should, with the global step, so a
    resumed run continues the ramp). Parts: ``encoder``, ``decoder``, ``loss_predictor``.
    """

    class Params(MAE.Params):
        predictor_weight: float = Field(1.0, ge=0.0, description="weight of the loss-prediction objective")
        predictor_layers: int = Field(1, ge=1, description="blocks of the loss predictor's decoder branch")
        hard_ratio_start: float = Field(0.0, ge=0.0, le=1.0, description="α_0: share of masked patches chosen as hard at step 0")
        hard_ratio_end: float = Field(0.5, ge=0.0, le=1.0, description="α_T: share of masked patches chosen as hard after the ramp")
        ramp_steps: int = Field(1000, ge=1, description="T: steps over which α grows linearly")

        @model_validator(mode="after")
        def _ramp_order(self):
            if self.hard_ratio_end < self.hard_ratio_start:
                raise ValueError(
                    f"hard_ratio_end={self.hard_ratio_end} < hard_ratio_start={self.hard_ratio_start}; "
                    "allowed: end >= start (easy-to-hard)"
                )
            return self

    def __init__(self, params: BaseModel):
        super().__init__(params)
        self.step = 0
        self._step_set = False

    @classmethod
    def build_modules(cls, params: BaseModel, vit: ResolvedViTConfig) -> dict[str, nn.Module]:
        parts = super().build_modules(params, vit)
        parts["loss_predictor"] = MAEDecoder(vit, out_dim=1, n_layers=params.predictor_layers)
        return parts

    def set_step(self, step: int) -> None:
        """Set the step t of the easy-to-hard ramp (and stop counting ``loss`` calls)."""
        self.step, self._step_set = int(step), True

    def hard_ratio(self, step: int) -> float:
        p = self.params
        return p.hard_ratio_start + (p.hard_ratio_end - p.hard_ratio_start) * min(1.0, step / p.ramp_steps)

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        g = A.default_generator(generator)
        x = self._augment(batch, g)
        noise = torch.rand(x.shape[0], self.vit.num_patches, generator=g, device=g.device).to(x.device)
        return passthrough_labels(batch, {"images": x, "noise": noise})

    @torch.no_grad()
    def predicted_losses(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The loss predictor's score for every patch of the unmasked images: (B, L)."""
        B, L = images.shape[0], self._bound().num_patches
        latent = call(model, "encoder", images)
        identity = torch.arange(L, device=images.device).expand(B, L)
        return call(model, "loss_predictor", latent, identity)[..., 0].float()

    def hard_masks(self, scores: torch.Tensor, noise: torch.Tensor, alpha: float):
        """Masks with the ⌊α·n_masked⌉ highest-scoring patches masked, the rest of the masked set at random."""
        L = noise.shape[1]
        n_keep = num_visible(L, self.params.mask_ratio)
        n_hard = int(round(alpha * (L - n_keep)))
        hard = torch.topk(scores, n_hard, dim=1).indices  # (B, n_hard)
        noise = noise.scatter(1, hard, 2.0)  # above every uniform draw: never among the n_keep lowest
        return masks_from_noise(noise, n_keep)

    def loss_terms(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"recon", "rank", "mask", "alpha"}``: the two losses of one step (before weighting), the mask used
        and α_t. Advances the step counter in training mode unless :meth:`set_step` is in use."""
        images = batch["images"]
        alpha = self.hard_ratio(self.step)
        if model.training and not self._step_set:
            self.step += 1
        scores = self.predicted_losses(model, images)
        ids_keep, ids_restore, mask = self.hard_masks(scores, batch["noise"], alpha)
        masked = {"images": images, "ids_keep": ids_keep, "ids_restore": ids_restore}
        pred, latent = self.reconstruct(model, masked)
        per_patch = VF.mae_patch_loss(pred, patchify(images, self.vit.patch_size), norm_pix=self.params.norm_pix_loss)
        recon = (per_patch * mask).sum() / mask.sum()
        pred_loss = call(model, "loss_predictor", latent, ids_restore)[..., 0]  # (B, L)
        rank = VF.hpm_relative_loss(pred_loss, per_patch, mask)
        return {"recon": recon, "rank": rank, "mask": mask, "alpha": torch.tensor(alpha, device=recon.device)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        t = self.loss_terms(model, batch)
        loss = t["recon"] + self.params.predictor_weight * t["rank"]
        return loss, {"mse_masked": t["recon"].detach(), "loss_pred": t["rank"].detach(), "hard_ratio": t["alpha"]}
