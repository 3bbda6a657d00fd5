"""Masked image modelling: MAE and Hard Patches Mining."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

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


def teacher_momentum(step: int, total_steps: int, start: float, end: float, schedule: str = "linear") -> float:
    """EMA momentum after optimizer step ``step`` of ``total_steps``: ``start`` → ``end``, then ``end``.

    ``linear``: m = start + (end − start)·t/T, as HPM's released code raises 0.999 to 0.9999 (per epoch,
    over its first 100 epochs; here over the run). ``cosine``: m = end − (end − start)·(cos(π t/T) + 1)/2,
    BYOL's schedule (Grill et al., arXiv 2006.07733). t/T is clipped to [0, 1].
    """
    frac = min(1.0, max(0.0, step / total_steps))
    if schedule == "linear":
        return start + (end - start) * frac
    if schedule == "cosine":
        return end - (end - start) * (math.cos(math.pi * frac) + 1) / 2
    raise ValueError(f"schedule={schedule!r}; allowed: linear, cosine")


@torch.no_grad()
def ema_update_(teacher: list[torch.Tensor], online: list[torch.Tensor], momentum: float) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_s in place, in the teacher's dtype (online tensors are cast, e.g. from bf16)."""
    if len(teacher) != len(online):
        raise ValueError(f"{len(teacher)} teacher tensors but {len(online)} online ones")
    if not teacher:
        return
    src = [o.detach().to(t.dtype) for t, o in zip(teacher, online, strict=True)]
    torch._foreach_lerp_(teacher, src, 1.0 - momentum)


class HPMTeacher(nn.Module):
    """HPM's frozen EMA teacher: copies of the encoder and the loss predictor that score every patch.

    Never trained (``requires_grad=False``, always in eval mode); :class:`HPM` moves it towards the online
    parts after every optimizer step. ``synced`` (a persistent buffer, so checkpoints keep it) is 0 until
    the teacher has been set equal to the online parts, which happens on the first ``loss`` call: then a
    teacher restored from a checkpoint is kept, and one whose online parts were loaded from elsewhere
    (encoder-only initialisation) starts from them.
    """

    def __init__(self, encoder: nn.Module, loss_predictor: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        self.loss_predictor = copy.deepcopy(loss_predictor)
        self.requires_grad_(False)
        self.register_buffer("synced", torch.zeros((), dtype=torch.long))
        self.train(False)

    def train(self, mode: bool = True) -> HPMTeacher:
        return super().train(False)  # no dropout in the teacher, whatever the model's mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted reconstruction loss of every patch of the unmasked images: (B, L) float32."""
        latent = self.encoder(images)
        B, L = images.shape[0], self.encoder.cfg.num_patches
        identity = torch.arange(L, device=images.device).expand(B, L)
        return self.loss_predictor(latent, identity)[..., 0].float()


def _unwrap(model: nn.Module) -> nn.Module:
    """The :class:`VisionModel` inside a DeepSpeed engine or DDP wrapper (``.module``), or the model itself."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


@register("hpm")
class HPM(MAE):
    """Hard Patches Mining (Wang et al., arXiv 2304.05919): MAE plus a loss predictor that chooses the masks.

    Per step (``loss``):

    1. the EMA teacher (part ``teacher``: :class:`HPMTeacher`, copies of the encoder and loss predictor)
       encodes the whole image without gradient and scores every patch (B, L);
    2. mask L − K patches: the ⌊α_t·(L − K)⌉ patches with the highest predicted loss (hard patches), the rest
       at random (the noise drawn in ``prepare``); α_t = α_0 + (α_T − α_0)·t/T grows linearly from
       ``hard_ratio_start`` to ``hard_ratio_end`` over ``ramp_steps`` (default: the whole run,
       ``total_steps``), the paper's easy-to-hard schedule;
    3. MAE reconstruction loss on the masked patches, plus ``predictor_weight`` × the relative loss
       :func:`objectives.vision.functional.hpm_relative_loss` between the online predictor's output for the
       masked patches and their detached per-patch reconstruction losses.

    The online predictor (part ``loss_predictor``, a separate MAE decoder branch with one output per patch,
    as deep as the decoder by default as in the authors' code, on the shared encoder latent) gets gradients only
    from its own loss; that loss also reaches the encoder, as in the paper, where predicting difficulty is
    an extra learning signal.

    The teacher follows the online encoder and predictor by an exponential moving average after every
    optimizer step, θ_t ← m·θ_t + (1 − m)·θ_s, with m from ``momentum_start`` (0.999) to ``momentum_end``
    (0.9999) over the run (:func:`teacher_momentum`), as the authors' code does with a model EMA; so the
    masks come from a slowly moving model, not from the one being trained. The update runs in
    :meth:`set_step`, which the training loop calls before every step (objectives/hooks.py): it applies the
    update for the optimizer step just taken to the model the last training ``loss`` call received (a
    DeepSpeed engine is unwrapped through ``.module``), on the device, without host syncs. The teacher is
    kept in float32 (under bf16 an update of (1 − m)·Δθ would round away), is a part of the model and so
    is checkpointed with it; after a bf16 resume it restarts from its checkpointed (bf16-rounded) values.
    ZeRO stage 3 (partitioned parameters) is not supported.

    The step t is the one :meth:`set_step` received; without it (no training loop), the number of training
    ``loss`` calls so far, and the teacher is only updated by :meth:`update_teacher`.
    Parts: ``encoder``, ``decoder``, ``loss_predictor``, ``teacher``.
    """

    class Params(MAE.Params):
        predictor_weight: float = Field(1.0, ge=0.0, description="weight of the loss-prediction objective")
        predictor_layers: int | None = Field(
            None, ge=1, description="blocks of the loss predictor's decoder branch; None: as many as the decoder"
        )
        hard_ratio_start: float = Field(0.0, ge=0.0, le=1.0, description="α_0: share of masked patches chosen as hard at step 0")
        hard_ratio_end: float = Field(0.5, ge=0.0, le=1.0, description="α_T: share of masked patches chosen as hard after the ramp")
        total_steps: int | None = Field(
            None, ge=1, description="T, the run's optimizer steps (trainer.max_steps): length of the α and momentum ramps"
        )
        ramp_steps: int | None = Field(None, ge=1, description="steps over which α grows linearly; None: total_steps")
        momentum_start: float = Field(0.999, ge=0.0, lt=1.0, description="teacher EMA momentum at step 0")
        momentum_end: float = Field(0.9999, ge=0.0, lt=1.0, description="teacher EMA momentum at the end of the run")
        momentum_schedule: Literal["linear", "cosine"] = Field("linear", description="how the momentum rises")

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
        self._online: nn.Module | None = None  # the model of the last training loss call
        self._stepped = False  # a training loss call since the last teacher update
        self._teacher_ready: nn.Module | None = None  # the VisionModel whose teacher is synced and float32

    @classmethod
    def build_modules(cls, params: BaseModel, vit: ResolvedViTConfig) -> dict[str, nn.Module]:
        parts = super().build_modules(params, vit)
        parts["loss_predictor"] = MAEDecoder(vit, out_dim=1, n_layers=params.predictor_layers)
        parts["teacher"] = HPMTeacher(parts["encoder"], parts["loss_predictor"])
        return parts

    def check_data(self, data: dict[str, Any]) -> None:
        if self.params.total_steps is None and self.params.ramp_steps is None:
            raise ValueError(
                "objective.total_steps is not set: hpm ramps its hard-patch share and its teacher's momentum "
                "over the run; set objective.total_steps to trainer.max_steps"
            )

    # ---- schedules ---------------------------------------------------------------------------------
    def _horizon(self, what: str) -> int:
        """Length of the α ramp (``ramp_steps``, else ``total_steps``) or of the momentum ramp
        (``total_steps``, else ``ramp_steps``)."""
        p = self.params
        first, second = (p.ramp_steps, p.total_steps) if what == "ramp" else (p.total_steps, p.ramp_steps)
        steps = first if first is not None else second
        if steps is None:
            raise ValueError(f"hpm: objective.total_steps (the run's length) is needed for the {what} schedule")
        return steps

    def hard_ratio(self, step: int) -> float:
        """α_t = α_0 + (α_T − α_0)·min(1, t/T)."""
        p = self.params
        return p.hard_ratio_start + (p.hard_ratio_end - p.hard_ratio_start) * min(1.0, step / self._horizon("ramp"))

    def momentum(self, step: int) -> float:
        """The teacher's EMA momentum for the update after optimizer step ``step``."""
        p = self.params
        return teacher_momentum(step, self._horizon("momentum"), p.momentum_start, p.momentum_end, p.momentum_schedule)

    # ---- the EMA teacher ---------------------------------------------------------------------------
    @staticmethod
    def _pairs(net: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """(teacher params, online params, teacher buffers, online buffers), matched by name."""
        out: tuple[list, list, list, list] = ([], [], [], [])
        for part in ("encoder", "loss_predictor"):
            online, teacher = getattr(net, part), getattr(net.teacher, part)
            for i, named in enumerate((nn.Module.named_parameters, nn.Module.named_buffers)):
                src, dst = dict(named(online)), dict(named(teacher))
                if src.keys() != dst.keys():
                    raise ValueError(f"hpm teacher's {part} does not match the online {part}")
                out[2 * i].extend(dst.values())
                out[2 * i + 1].extend(src[k] for k in dst)
        return out

    def _teacher(self, model: nn.Module) -> HPMTeacher:
        """The model's teacher, in float32 and synced with the online parts on first use (one host sync)."""
        net = _unwrap(model)
        if self._teacher_ready is net:
            return net.teacher
        if any(hasattr(p, "ds_id") for p in net.parameters()):  # the driver checks first (check_trainer)
            raise ValueError("hpm's EMA teacher needs whole parameters on every rank: use trainer.zero_stage <= 2")
        teacher = net.teacher
        teacher.float()  # DeepSpeed casts the whole module under bf16/fp16
        if not bool(teacher.synced):
            t_par, s_par, t_buf, s_buf = self._pairs(net)
            with torch.no_grad():
                for t, s in zip(t_par + t_buf, s_par + s_buf, strict=True):
                    t.copy_(s)
                teacher.synced.fill_(1)
        self._teacher_ready = net
        return teacher

    def check_trainer(self, engine: str, zero_stage: int) -> None:
        """The teacher is called outside the model's forward pass, so it needs whole parameters on every rank
        between steps: DeepSpeed up to ZeRO-2, accelerate's DDP (FSDP2 keeps parameters sharded between steps)."""
        if (engine == "deepspeed" and zero_stage == 3) or (engine == "accelerate" and zero_stage >= 2):
            raise ValueError(
                f"objective hpm with trainer.engine={engine} and trainer.zero_stage={zero_stage}: its EMA teacher "
                "needs whole parameters on every rank; allowed: engine deepspeed with zero_stage 0-2, or engine "
                "accelerate with zero_stage 0 (DDP)"
            )

    def update_teacher(self, model: nn.Module, step: int) -> None:
        """One EMA update of ``model``'s teacher towards its online encoder and loss predictor, with the
        momentum of optimizer step ``step``."""
        net = _unwrap(model)
        self._teacher(net)
        t_par, s_par, t_buf, s_buf = self._pairs(net)
        ema_update_(t_par, s_par, self.momentum(step))
        with torch.no_grad():
            for t, s in zip(t_buf, s_buf, strict=True):
                t.copy_(s)

    def set_step(self, step: int) -> None:
        """Before training step ``step``: update the teacher for the optimizer step just taken (if a training
        ``loss`` call happened since the last update), then set t of the ramps (and stop counting ``loss``
        calls)."""
        if self._online is not None and self._stepped:
            self.update_teacher(self._online, self.step)
        self._stepped = False
        self.step, self._step_set = int(step), True

    # ---- masking and the loss ----------------------------------------------------------------------
    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        g = A.default_generator(generator)
        x = self._augment(batch, g)
        noise = torch.rand(x.shape[0], self.vit.num_patches, generator=g, device=g.device).to(x.device)
        return passthrough_labels(batch, {"images": x, "noise": noise})

    @torch.no_grad()
    def predicted_losses(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The EMA teacher's predicted loss for every patch of the unmasked images: (B, L)."""
        return self._teacher(model)(images)

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
        and α_t. In training mode, records the model for the next teacher update and advances the step
        counter unless :meth:`set_step` is in use."""
        images = batch["images"]
        alpha = self.hard_ratio(self.step)
        if model.training:
            self._online, self._stepped = model, True
            if not self._step_set:
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
