"""Vision Transformer encoder, MAE decoder and a small text tower for CLIP.

image (B, C, H, W) -> patches (B, L, D) + position embedding -> [keep a subset: MAE] -> [CLS]
-> n_layers x [x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> tokens or pooled (B, D)

- ViT: Dosovitskiy et al., arXiv 2010.11929 (patch embedding, CLS token, learned position embedding).
- 2-D sin-cos position embedding and the masked-autoencoder decoder: He et al., arXiv 2111.06377.
- The blocks are the decoder LM's pre-norm blocks without rotary embeddings: RMSNorm and SwiGLU are
  reused from :mod:`models.decoder`; attention is bidirectional and positions come from the additive
  embedding (rotary embeddings are 1-D; images are 2-D).
- :class:`TextEncoder` (the CLIP text tower, Radford et al. arXiv 2103.00020) reuses
  :class:`models.decoder.Block` as is, with rotary positions and bidirectional attention over the
  non-padding tokens.

Sizes come from a named preset plus overrides (:class:`ViTConfig`, what a run config holds) resolved into
a :class:`ResolvedViTConfig`, as :mod:`models.config` does for the decoder LM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.config import ResolvedModelConfig, default_ffn_hidden
from models.decoder import Block as DecoderBlock
from models.decoder import RMSNorm, RotaryTables, SwiGLU

# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

VIT_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests and smoke runs: 32x32 images, 64 patches of 4x4, ~0.1M parameters
    "debug": dict(image_size=32, patch_size=4, d_model=64, n_layers=2, n_heads=4,
                  decoder_d_model=32, decoder_n_layers=1, decoder_n_heads=2),
    # the CPU demo on 32x32 fractals: ~2.6M parameters in the encoder (ViT-Ti width, half its depth)
    "tiny": dict(image_size=32, patch_size=4, d_model=192, n_layers=6, n_heads=3,
                 decoder_d_model=128, decoder_n_layers=2, decoder_n_heads=4),
    # ViT-S/16 (Touvron et al., arXiv 2012.12877) at 224x224: ~22M parameters
    "small": dict(image_size=224, patch_size=16, d_model=384, n_layers=12, n_heads=6,
                  decoder_d_model=256, decoder_n_layers=4, decoder_n_heads=8),
    # ViT-B/16 at 224x224 (~86M) with MAE's 512-wide, 8-block decoder
    "base": dict(image_size=224, patch_size=16, d_model=768, n_layers=12, n_heads=12,
                 decoder_d_model=512, decoder_n_layers=8, decoder_n_heads=16),
}


def available_vit_presets() -> list[str]:
    """ViT preset names, smallest first."""
    return list(VIT_PRESETS)


_VIT_SIZE_FIELDS = (
    "image_size", "patch_size", "in_channels", "d_model", "n_layers", "n_heads", "ffn_hidden",
    "decoder_d_model", "decoder_n_layers", "decoder_n_heads",
)


class ResolvedViTConfig(BaseModel):
    """Every size of a ViT encoder (and its MAE decoder), after preset and overrides; immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(gt=0, description="height = width of the input images, pixels")
    patch_size: int = Field(gt=0, description="side of a square patch, pixels; divides image_size")
    in_channels: int = Field(3, gt=0, description="image channels (3 RGB, 1 grey)")
    d_model: int = Field(gt=0, description="encoder width")
    n_layers: int = Field(gt=0, description="encoder blocks")
    n_heads: int = Field(gt=0, description="encoder attention heads; divides d_model")
    ffn_hidden: int = Field(gt=0, description="encoder SwiGLU hidden width")
    decoder_d_model: int = Field(gt=0, description="MAE decoder width")
    decoder_n_layers: int = Field(gt=0, description="MAE decoder blocks")
    decoder_n_heads: int = Field(gt=0, description="MAE decoder heads; divides decoder_d_model")
    pos_embed: Literal["sincos", "learned"] = Field("sincos", description="encoder position embedding")
    pool: Literal["cls", "mean"] = Field("cls", description="CLS token or mean of the patch tokens")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on attention and residual branches")

    @model_validator(mode="after")
    def _check(self) -> ResolvedViTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                "allowed: image_size a multiple of patch_size"
            )
        for width, heads, name in ((self.d_model, self.n_heads, ""), (self.decoder_d_model, self.decoder_n_heads, "decoder_")):
            if width % heads:
                raise ValueError(
                    f"{name}d_model={width} is not divisible by {name}n_heads={heads}; "
                    f"allowed: {name}d_model a multiple of {name}n_heads"
                )
        return self

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """L, patches per image."""
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """P, values per patch: patch_size² · in_channels."""
        return self.patch_size**2 * self.in_channels

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the encoder output: 1 (CLS) or 0 (mean pooling)."""
        return 1 if self.pool == "cls" else 0


class ViTConfig(BaseModel):
    """The ``vit:`` section of a run config: a preset name and explicit overrides of its fields.

    Unset sizes (None) come from the preset; ``ffn_hidden`` defaults to 8/3 · d_model rounded up to a
    multiple of 64 (the decoder LM's rule, :func:`models.config.default_ffn_hidden`).
    """

    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field("tiny", description=f"named size, one of {list(VIT_PRESETS)}; None: give every size")
    image_size: int | None = None
    patch_size: int | None = None
    in_channels: int | None = None
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    ffn_hidden: int | None = None
    decoder_d_model: int | None = None
    decoder_n_layers: int | None = None
    decoder_n_heads: int | None = None
    pos_embed: Literal["sincos", "learned"] = "sincos"
    pool: Literal["cls", "mean"] = "cls"
    norm_eps: float = Field(1e-5, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check_preset(self) -> ViTConfig:
        if self.preset is not None and self.preset not in VIT_PRESETS:
            raise ValueError(f"unknown ViT preset {self.preset!r}; available: {', '.join(VIT_PRESETS)}")
        self.resolve()  # a bad combination fails when the config is validated, on the driver
        return self

    def resolve(self) -> ResolvedViTConfig:
        fields = dict(VIT_PRESETS[self.preset]) if self.preset is not None else {}
        fields.setdefault("in_channels", 3)
        for name in _VIT_SIZE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        missing = [n for n in ("image_size", "patch_size", "d_model", "n_layers", "n_heads",
                               "decoder_d_model", "decoder_n_layers", "decoder_n_heads") if n not in fields]
        if missing:
            raise ValueError(f"ViT config without a preset must set {', '.join(missing)}")
        fields.setdefault("ffn_hidden", default_ffn_hidden(fields["d_model"]))
        return ResolvedViTConfig(
            **fields, pos_embed=self.pos_embed, pool=self.pool, norm_eps=self.norm_eps, dropout=self.dropout
        )


def resolve_vit_config(spec: str | Mapping[str, Any] | ViTConfig | ResolvedViTConfig) -> ResolvedViTConfig:
    """A :class:`ResolvedViTConfig` from a preset name, a ``vit:`` dict, a :class:`ViTConfig` or itself."""
    if isinstance(spec, ResolvedViTConfig):
        return spec
    if isinstance(spec, str):
        return ViTConfig(preset=spec).resolve()
    if isinstance(spec, Mapping):
        return ViTConfig.model_validate(dict(spec)).resolve()
    if isinstance(spec, ViTConfig):
        return spec.resolve()
    raise TypeError(f"ViT spec must be a preset name, a dict or a ViTConfig, not {type(spec).__name__}")


# ---------------------------------------------------------------------------------------------------
# Patches and position embeddings
# ---------------------------------------------------------------------------------------------------


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p·p·C): patches in row-major grid order, each flattened as (p, q, c)
    (the MAE layout, so per-patch statistics and :func:`unpatchify` agree with it)."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not divisible into {p}x{p} patches")
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    x = torch.einsum("bchpwq->bhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for square grids: (B, L, p·p·C) -> (B, C, H, W)."""
    B, L, P = patches.shape
    p = patch_size
    h = int(math.isqrt(L))
    if h * h != L or P != p * p * channels:
        raise ValueError(f"patches {tuple(patches.shape)} do not form a square grid of {p}x{p}x{channels} patches")
    x = patches.reshape(B, h, h, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(B, channels, h * p, h * p)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (L, dim), L = grid_size² (MAE, arXiv 2111.06377): half of the
    channels encode the row, half the column, each with the 1-D transformer embedding of Vaswani et al."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(pos.reshape(-1), omega)  # (L, D/4)
        return torch.cat((angles.sin(), angles.cos()), dim=1)  # (L, D/2)

    return torch.cat((one_axis(gy), one_axis(gx)), dim=1).float()  # (L, D)


# ---------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Width:
    """Sizes of one transformer stack; has the attribute names :class:`models.decoder.SwiGLU` reads."""

    d_model: int
    n_heads: int
    ffn_hidden: int
    dropout: float
    norm_eps: float


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, w: _Width) -> None:
        super().__init__()
        self.n_heads, self.head_dim = w.n_heads, w.d_model // w.n_heads
        self.qkv = nn.Linear(w.d_model, 3 * w.d_model, bias=False)
        self.proj = nn.Linear(w.d_model, w.d_model, bias=False)
        self.attn_dropout = w.dropout
        self.resid_dropout = nn.Dropout(w.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=p)  # (B, H, T, hd)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))  # (B, T, C)


class ViTBlock(nn.Module):
    """Pre-norm block: x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x))."""

    def __init__(self, w: _Width) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(w.d_model, eps=w.norm_eps)
        self.attn = SelfAttention(w)
        self.mlp_norm = RMSNorm(w.d_model, eps=w.norm_eps)
        self.mlp = SwiGLU(w)  # duck-typed: reads d_model, ffn_hidden, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))  # (B, T, C)
        return x + self.mlp(self.mlp_norm(x))  # (B, T, C)


def _init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear layers with zero bias, unit norms (the ViT/MAE initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm | nn.LayerNorm):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------
# Encoder and MAE decoder
# ---------------------------------------------------------------------------------------------------


class ViTEncoder(nn.Module):
    """ViT over (B, C, H, W) float images; see the module docstring.

    ``forward(images, ids_keep=None, pool=False)``:

    - ``ids_keep`` (B, K) int64: encode only these patch indices (MAE's visible patches), after adding
      their position embedding;
    - returns the normalised tokens (B, prefix + K, D) with ``prefix`` = 1 CLS token or 0, or with
      ``pool=True`` the pooled embedding (B, D): the CLS token, or the mean of the patch tokens.
    """

    def __init__(self, cfg: ResolvedViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = _Width(cfg.d_model, cfg.n_heads, cfg.ffn_hidden, cfg.dropout, cfg.norm_eps)
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.d_model))
        else:
            self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.d_model, cfg.grid_size)[None], persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model)) if cfg.pool == "cls" else None
        self.blocks = nn.ModuleList(ViTBlock(w) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _init_weights(self)
        # the patch embedding is a linear map of the flattened patch (MAE initialises it as one)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.cfg.d_model, -1))
        nn.init.zeros_(self.patch_embed.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def forward(
        self, images: torch.Tensor, *, ids_keep: torch.Tensor | None = None, pool: bool = False
    ) -> torch.Tensor:
        cfg = self.cfg
        if images.dim() != 4 or images.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images must be (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}); got {tuple(images.shape)}"
            )
        images = images.to(self.patch_embed.weight.dtype)  # e.g. bf16 weights under DeepSpeed
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, L, D)
        x = x + self.pos_embed.to(x.dtype)  # (B, L, D)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1+K, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)  # (B, prefix+K, D)
        return self.pool(x) if pool else x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, prefix+K, D) -> (B, D): the CLS token or the mean over patch tokens."""
        return tokens[:, 0] if self.cls_token is not None else tokens.mean(dim=1)


class MAEDecoder(nn.Module):
    """The masked-autoencoder decoder (He et al., arXiv 2111.06377).

    ``forward(latent, ids_restore)``: project the encoder tokens (B, prefix + K, D_enc) to the decoder
    width, append L − K shared mask tokens, unshuffle to the original patch order with ``ids_restore``
    (B, L), add the fixed 2-D sin-cos position embedding, run the blocks and predict ``out_dim`` values
    per patch: (B, L, out_dim). ``out_dim`` defaults to the patch's pixel count (reconstruction); HPM's
    loss predictor is the same module with ``out_dim=1``.
    """

    def __init__(self, cfg: ResolvedViTConfig, *, out_dim: int | None = None, n_layers: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder_d_model
        w = _Width(d, cfg.decoder_n_heads, default_ffn_hidden(d), cfg.dropout, cfg.norm_eps)
        self.embed = nn.Linear(cfg.d_model, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, cfg.grid_size)[None], persistent=False)
        self.blocks = nn.ModuleList(ViTBlock(w) for _ in range(n_layers or cfg.decoder_n_layers))
        self.norm = RMSNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, out_dim or cfg.patch_dim)
        _init_weights(self)
        with torch.no_grad():
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        n_prefix = self.cfg.num_prefix_tokens
        x = self.embed(latent)  # (B, prefix+K, d)
        prefix, x = x[:, :n_prefix], x[:, n_prefix:]
        B, K, d = x.shape
        L = ids_restore.shape[1]
        x = torch.cat((x, self.mask_token.to(x.dtype).expand(B, L - K, -1)), dim=1)  # (B, L, d) shuffled order
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, d))  # (B, L, d) patch order
        x = torch.cat((prefix, x + self.pos_embed.to(x.dtype)), dim=1)  # (B, prefix+L, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))[:, n_prefix:]  # (B, L, out_dim)


def build_encoder(spec: str | Mapping[str, Any] | ViTConfig | ResolvedViTConfig) -> ViTEncoder:
    """A freshly initialised :class:`ViTEncoder` from a preset name, a ``vit:`` dict or a config."""
    return ViTEncoder(resolve_vit_config(spec))


# ---------------------------------------------------------------------------------------------------
# Text tower (CLIP)
# ---------------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """A small bidirectional transformer over token ids (B, T) -> (B, out_dim).

    Token id ``pad_id`` marks padding: padded keys are masked out of attention and out of the mean pool.
    The blocks are :class:`models.decoder.Block` with rotary positions and ``is_causal=False``.
    Every row needs at least one non-padding token.
    """

    def __init__(
        self, *, vocab_size: int, max_len: int, d_model: int, n_layers: int, n_heads: int, out_dim: int,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = ResolvedModelConfig(
            vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
            ffn_hidden=default_ffn_hidden(d_model), max_seq_len=max_len, tie_embeddings=False,
        )
        self.pad_id = pad_id
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.rotary = RotaryTables(self.cfg.head_dim, max_len, theta=self.cfg.rope_theta)
        self.blocks = nn.ModuleList(DecoderBlock(self.cfg) for _ in range(n_layers))
        self.norm = RMSNorm(d_model, eps=self.cfg.norm_eps)
        self.proj = nn.Linear(d_model, out_dim, bias=False)
        _init_weights(self)
        with torch.no_grad():
            nn.init.normal_(self.tok_emb.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        valid = ids != self.pad_id  # (B, T)
        attn_mask = valid[:, None, None, :].expand(B, 1, T, T)  # (B, 1, T, T): query i may attend key j
        cos, sin = self.rotary(T)
        x = self.tok_emb(ids)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask=attn_mask, is_causal=False)
        x = self.norm(x)
        w = valid.to(x.dtype)[..., None]  # (B, T, 1)
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1)  # (B, C)
        return self.proj(pooled)  # (B, out_dim)
