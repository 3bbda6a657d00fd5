"""Joint-embedding objectives on two augmented views: SimCLR, AMCL, Barlow Twins, Mixed Barlow Twins.

``prepare`` turns ``{"images": uint8 (B, C, H, W), "labels"}`` into two views
``{"view1", "view2": float (B, C, S, S), "labels"}`` with :func:`data.augment.two_views`; ``loss`` encodes
both views in one encoder call (2B images) and projects the pooled embeddings.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from data import augment as A
from models.heads import MultiHeadProjector, PairTemperature, ProjectionHead
from models.vit import ResolvedViTConfig, ViTEncoder
from objectives.registry import register
from objectives.vision import functional as VF
from objectives.vision.base import VisionObjective, call, passthrough_labels


class _TwoViews(VisionObjective):
    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        v1, v2 = A.two_views(batch["images"], generator, self.params.augment)
        return passthrough_labels(batch, {"view1": v1, "view2": v2})

    def _encode(self, model: nn.Module, *views: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings of the views stacked along the batch: (len(views)·B, D)."""
        return call(model, "encoder", torch.cat(views), pool=True)


@register("simclr")
class SimCLR(_TwoViews):
    """SimCLR (Chen et al., arXiv 2002.05709): NT-Xent with temperature τ on projected views.

    Negatives come from the global batch: embeddings are gathered across data-parallel ranks with
    gradients (``gather``; :mod:`objectives.vision.functional`). Parts: ``encoder``, ``projector``
    (2-layer MLP, dropped after pre-training).
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        temperature: float = Field(0.5, gt=0.0, description="τ of NT-Xent (SimCLR uses 0.5 on CIFAR, 0.1 on ImageNet)")
        proj_hidden_dim: int = Field(512, gt=0, description="projector hidden width")
        proj_dim: int = Field(128, gt=0, description="projector output width")
        gather: bool = Field(True, description="negatives from every data-parallel rank (all_gather with gradients)")
        augment: A.AugmentConfig = Field(default_factory=A.AugmentConfig)

    @classmethod
    def build_modules(cls, params: BaseModel, vit: ResolvedViTConfig) -> dict[str, nn.Module]:
        return {
            "encoder": ViTEncoder(vit),
            "projector": ProjectionHead(vit.d_model, params.proj_hidden_dim, params.proj_dim, n_layers=2),
        }

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        z1, z2 = call(model, "projector", self._encode(model, batch["view1"], batch["view2"])).chunk(2)
        loss = VF.nt_xent(z1, z2, temperature=self.params.temperature, gather=self.params.gather)
        pos = F.cosine_similarity(z1.float(), z2.float(), dim=-1).mean()
        return loss, {"pos_cos": pos.detach()}


@register("amcl")
class AMCL(_TwoViews):
    """Adaptive Multi-head Contrastive Learning on SimCLR (Wang et al., arXiv 2310.05615).

    ``n_heads`` projection heads; pair- and head-adaptive temperatures in (``tau_min``, ``tau_max``) from a
    shared network φ on the normalised projections; the loss of
    :func:`objectives.vision.functional.amcl_nt_xent`, whose docstring states both forms exactly:
    ``normalizer="topk"`` (default) is the authors' released loss (the mean s/τ over the ``topk`` = 100
    hardest negatives with their log τ + 1/τ regulariser), ``"softmax"`` the exact log-sum-exp posterior.
    Temperature bounds default to the authors' (1e-5, 2). Negatives come from the global batch (all_gather
    with gradients, ``gather``). Parts: ``encoder``, ``projectors``, ``temperature``.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n_heads: int = Field(3, ge=1, description="C, projection heads (the paper uses 3-5)")
        proj_hidden_dim: int = Field(512, gt=0)
        proj_dim: int = Field(128, gt=0, description="d′, width of each head's output")
        tau_min: float = Field(1e-5, gt=0.0, description="lower bound of the adaptive temperatures (authors' 1e-5)")
        tau_max: float = Field(2.0, gt=0.0, description="upper bound of the adaptive temperatures (authors' 2.0)")
        beta: float = Field(
            0.01, ge=0.0, description="weight β of the temperature regulariser Ω (the authors' loss default)"
        )
        normalizer: Literal["topk", "softmax"] = Field(
            "topk", description="topk: the authors' mean over the hardest negatives; softmax: exact log-sum-exp"
        )
        topk: int = Field(100, ge=1, description="K hardest negatives of the top-k normaliser (authors' 100)")
        temperature_hidden_dim: int | None = Field(None, gt=0, description="hidden width of φ; None: proj_dim")
        gather: bool = Field(True, description="negatives from every data-parallel rank (all_gather with gradients)")
        augment: A.AugmentConfig = Field(default_factory=A.AugmentConfig)

        @model_validator(mode="after")
        def _tau_order(self):
            if self.tau_max <= self.tau_min:
                raise ValueError(f"tau_max={self.tau_max} must exceed tau_min={self.tau_min}")
            return self

    @classmethod
    def build_modules(cls, params: BaseModel, vit: ResolvedViTConfig) -> dict[str, nn.Module]:
        return {
            "encoder": ViTEncoder(vit),
            "projectors": MultiHeadProjector(params.n_heads, vit.d_model, params.proj_hidden_dim, params.proj_dim),
            "temperature": PairTemperature(
                params.proj_dim, hidden_dim=params.temperature_hidden_dim, tau_min=params.tau_min, tau_max=params.tau_max
            ),
        }

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        p = self.params
        z = call(model, "projectors", self._encode(model, batch["view1"], batch["view2"]))  # (C, 2B, d')
        phi = call(model, "temperature", F.normalize(z.float(), dim=-1).to(z.dtype))  # (C, 2B, d')
        z1, z2 = z.chunk(2, dim=1)
        phi1, phi2 = phi.chunk(2, dim=1)
        loss, tau_pos, tau_neg = VF.amcl_nt_xent(
            z1, z2, phi1, phi2, tau_min=p.tau_min, tau_max=p.tau_max, beta=p.beta, normalizer=p.normalizer,
            topk=p.topk, gather=p.gather, return_parts=True,
        )
        return loss, {"tau_pos": tau_pos, "tau_neg": tau_neg}


@register("barlow_twins")
class BarlowTwins(_TwoViews):
    """Barlow Twins (Zbontar et al., arXiv 2103.03230): Σ(1 − C_ii)² + λ Σ_{i≠j} C_ij².

    C is the cross-correlation of the projections standardised over the global batch: feature means,
    variances and the sum of products are all-reduced over the data-parallel ranks (as the authors' code
    does with SyncBatchNorm and an all_reduce of C), so the loss does not depend on how the batch is split
    over workers (:func:`objectives.vision.functional.barlow_twins`). Parts: ``encoder``, ``projector``
    (3-layer MLP).
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lambd: float = Field(5e-3, ge=0.0, description="λ, weight of the off-diagonal (redundancy) term")
        proj_hidden_dim: int = Field(1024, gt=0)
        proj_dim: int = Field(1024, gt=0)
        augment: A.AugmentConfig = Field(default_factory=A.AugmentConfig)

    @classmethod
    def build_modules(cls, params: BaseModel, vit: ResolvedViTConfig) -> dict[str, nn.Module]:
        return {
            "encoder": ViTEncoder(vit),
            "projector": ProjectionHead(vit.d_model, params.proj_hidden_dim, params.proj_dim, n_layers=3),
        }

    @property
    def lambd(self) -> float:
        """λ, the weight of the off-diagonal term."""
        return self.params.lambd

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        z1, z2 = call(model, "projector", self._encode(model, batch["view1"], batch["view2"])).chunk(2)
        loss, on, off = VF.barlow_twins(z1, z2, lambd=self.lambd, return_parts=True)
        return loss, {"on_diag": on.detach(), "off_diag": off.detach()}


@register("mixed_barlow_twins")
class MixedBarlowTwins(BarlowTwins):
    """Barlow Twins guarded with mixed samples (Bandara et al., arXiv 2312.02151).

    ``prepare`` also draws α ~ U(0, 1) (= Beta(1, 1)) and a permutation per batch and mixes the views:
    x_m = α·view1 + (1 − α)·view2[perm]. ``loss`` = Barlow Twins + ``mix_scale``·λ·
    :func:`objectives.vision.functional.mixed_barlow_regularizer`, both over the global batch.
    Defaults as the authors' runs: ``mix_scale`` 4 and λ = 1/d with d = ``proj_dim`` (their released
    models: d = 1024 with λ = 1/1024 on Tiny ImageNet, 1/128 on CIFAR and STL-10).
    """

    class Params(BarlowTwins.Params):
        lambd: float | None = Field(None, ge=0.0, description="λ of the off-diagonal term; None: 1/proj_dim")
        mix_scale: float = Field(4.0, ge=0.0, description="the regulariser's weight is mix_scale · λ")

    @property
    def lambd(self) -> float:
        """λ: ``lambd``, or 1/``proj_dim`` when unset."""
        p = self.params
        return p.lambd if p.lambd is not None else 1.0 / p.proj_dim

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        g = A.default_generator(generator)
        out = super().prepare(batch, g)
        v1, v2 = out["view1"], out["view2"]
        alpha = torch.rand(1, generator=g, device=g.device).to(v1.device)  # (1,)
        perm = torch.randperm(v1.shape[0], generator=g, device=g.device).to(v1.device)
        out.update(mixed=alpha * v1 + (1 - alpha) * v2[perm], mix_alpha=alpha, mix_perm=perm)
        return out

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        z = call(model, "projector", self._encode(model, batch["view1"], batch["view2"], batch["mixed"]))
        z1, z2, zm = z.chunk(3)
        bt, on, off = VF.barlow_twins(z1, z2, lambd=self.lambd, return_parts=True)
        mix = VF.mixed_barlow_regularizer(z1, z2, zm, alpha=batch["mix_alpha"].float(), perm=batch["mix_perm"])
        loss = bt + self.params.mix_scale * self.lambd * mix
        return loss, {"on_diag": on.detach(), "off_diag": off.detach(), "mix_reg": mix.detach()}
