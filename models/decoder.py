"""A decoder-only transformer language model (Llama-style).

token embedding -> n_layers x [x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> LM head

- RMSNorm: Zhang & Sennrich, arXiv 1910.07467.
- Rotary position embeddings on queries and keys: Su et al., arXiv 2104.09864.
- Grouped-query attention (n_kv_heads < n_heads): Ainslie et al., arXiv 2305.13245.
- Optional Llama 3 scaling of the rotary frequencies (``cfg.rope_scaling``): arXiv 2407.21783.
- SwiGLU MLP: Shazeer, arXiv 2002.05202.
- Output projections of each residual branch initialised with std / sqrt(2 n_layers), as GPT-2 does
  (Radford et al. 2019, section 2.3), so the residual stream's variance does not grow with depth.

Attention modes of :meth:`DecoderLM.forward`:

- causal (``is_causal=True``, the default): position i attends to positions <= i (the fused fast path);
- bidirectional (``is_causal=False``, no mask): every position attends to every position;
- explicit mask (``attn_mask``, with ``is_causal=False``): a boolean tensor (B or 1, 1, T, T) where
  ``mask[b, 0, i, j]`` is True when query i may attend to key j. For a prefix LM use
  :func:`models.masks.prefix_lm_mask`. Every row must allow at least one key (the diagonal suffices),
  else that position's output is NaN.

:func:`build` makes a model from a preset name or config; :func:`generate` samples from one, reusing the
keys and values of earlier positions (:class:`KVCache`, ``DecoderLM.forward(..., cache=...)``) instead of
re-running the whole prefix for every token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig, ResolvedModelConfig, RopeScaling, resolve_config


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight: no mean subtraction, no bias (arXiv 1910.07467)."""

    def __init__(self, dim: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares over thousands of channels is too coarse in bf16: normalise in float32.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., C)
        return normed.type_as(x) * self.weight


def rotary_inv_freq(
    head_dim: int,
    *,
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The rotary frequencies theta^(-2i / head_dim), i < head_dim/2, float32 (D/2,); with ``scaling``
    rescaled as Llama 3.1 does (arXiv 2407.21783; :class:`models.config.RopeScaling` describes the bands).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim  # (D/2,)
    inv_freq = theta**-exponents  # (D/2,)
    if scaling is None:
        return inv_freq
    # With r = L / wavelength, s = (r - low) / (high - low) clamped to [0, 1] selects the band: s = 1 keeps
    # the frequency (short wavelengths), s = 0 divides it by the factor (long ones), in between it blends.
    wavelength = 2 * math.pi / inv_freq  # (D/2,)
    ratio = scaling.original_max_position_embeddings / wavelength  # (D/2,)
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    blend = ((ratio - low) / (high - low)).clamp(0, 1)  # (D/2,)
    return (1 - blend) * inv_freq / scaling.factor + blend * inv_freq  # (D/2,)


def rotary_tables(
    head_dim: int,
    seq_len: int,
    *,
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (seq_len, head_dim), float32.

    Dimension pair (i, i + head_dim/2) at position p is rotated by p * theta^(-2i / head_dim) (Su et al.,
    arXiv 2104.09864, eq. 15). Pairing i with i + head_dim/2 instead of 2i with 2i+1 (the GPT-NeoX / Llama
    layout) is the paper's rotation up to a fixed permutation of the head dimensions. ``scaling``: see
    :func:`rotary_inv_freq`.
    """
    inv_freq = rotary_inv_freq(head_dim, theta=theta, scaling=scaling, device=device)  # (D/2,)
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)  # (T,)
    angles = torch.outer(positions, inv_freq)  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, D) by its position: cos, sin are (T, D) rows of :func:`rotary_tables`.

    The dot product of a rotated query at position i and a rotated key at position j depends only on
    i - j (and on the unrotated vectors).
    """
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)  # (..., T, D/2) each
    rotated_half = torch.cat((-x2, x1), dim=-1)  # (..., T, D)
    return (x32 * cos + rotated_half * sin).type_as(x)


class RotaryTables(nn.Module):
    """The cos/sin tables for positions [0, max_seq_len) as non-persistent buffers (not in the state_dict)."""

    def __init__(
        self, head_dim: int, max_seq_len: int, *, theta: float, scaling: RopeScaling | None = None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta, self.scaling = head_dim, max_seq_len, theta, scaling
        self._build(device=None)

    def _build(self, device: torch.device | None) -> None:
        cos, sin = rotary_tables(
            self.head_dim, self.max_seq_len, theta=self.theta, scaling=self.scaling, device=device
        )
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryTables:
        # .half() / .bfloat16() / .to(dtype) would round the tables, and the angle error grows with the
        # position; .to_empty() would leave them uninitialised. They are a pure function of the sizes, so
        # rebuild them in float32 on whatever device they landed on.
        super()._apply(fn, recurse)
        self._build(device=self.cos.device)
        return self

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]  # (T, D) each

    def span(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for positions [start, start + length)."""
        return self.cos[start : start + length], self.sin[start : start + length]  # (T, D) each


class KVCache:
    """Rotated keys and values of every layer for the first ``length`` positions of a batch, so that
    decoding one more token costs one position's work instead of re-running the whole prefix.

    Made by :meth:`DecoderLM.new_cache`; ``DecoderLM.forward(ids, cache=cache)`` treats ``ids`` as the
    positions ``[length, length + T)``, appends their keys/values and advances ``length``. Keys and values
    are stored per kv head (B, n_kv_heads, capacity, head_dim), before the grouped-query repetition.
    """

    def __init__(
        self,
        cfg: ResolvedModelConfig,
        batch_size: int,
        capacity: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 1 <= capacity <= cfg.max_seq_len:
            raise ValueError(
                f"KVCache capacity={capacity} is not allowed; "
                f"allowed: 1 <= capacity <= max_seq_len={cfg.max_seq_len}"
            )
        shape = (batch_size, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.batch_size, self.capacity, self.length = batch_size, capacity, 0


class Attention(nn.Module):
    """Multi-head self-attention with rotary embeddings and grouped key/value heads."""

    def __init__(self, cfg: ResolvedModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # Query head h reads kv head h // (H / KV). Expanding here rather than passing enable_gqa keeps
            # every fused SDPA backend eligible, at the cost of materialising the repeated keys/values.
            k = _repeat_kv(k, self.n_heads // self.n_kv_heads)  # (B, H, T, hd)
            v = _repeat_kv(v, self.n_heads // self.n_kv_heads)  # (B, H, T, hd)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.resid_dropout(self.o_proj(y))  # (B, T, C)

    def forward_cached(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int
    ) -> torch.Tensor:
        """Causal attention of the new positions [cache.length, cache.length + T) to every cached and new
        position; stores the new keys/values in ``cache`` (``cache.length`` is advanced by the caller)."""
        B, T, _ = x.shape
        start = cache.length
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache.keys[layer][:, :, start : start + T] = k
        cache.values[layer][:, :, start : start + T] = v
        k = cache.keys[layer][:, :, : start + T]  # (B, KV, S, hd), S = start + T
        v = cache.values[layer][:, :, : start + T]  # (B, KV, S, hd)
        if self.n_kv_heads != self.n_heads:
            k = _repeat_kv(k, self.n_heads // self.n_kv_heads)  # (B, H, S, hd)
            v = _repeat_kv(v, self.n_heads // self.n_kv_heads)  # (B, H, S, hd)
        mask = None
        if T > 1 and start > 0:
            # SDPA's is_causal aligns the triangle top-left; new query i sits at position start + i.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)  # (T, S)
        y = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=T > 1 and start == 0
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.o_proj(y)  # (B, T, C)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    B, KV, T, hd = x.shape
    return x[:, :, None].expand(B, KV, n_rep, T, hd).reshape(B, KV * n_rep, T, hd)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer, arXiv 2002.05202)."""

    def __init__(self, cfg: ResolvedModelConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.w_gate(x)) * self.w_up(x)  # (B, T, F)
        return self.dropout(self.w_down(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ResolvedModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask=attn_mask, is_causal=is_causal)  # (B, T, C)
        return x + self.mlp(self.mlp_norm(x))  # (B, T, C)

    def forward_cached(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int
    ) -> torch.Tensor:
        x = x + self.attn.forward_cached(self.attn_norm(x), cos, sin, cache, layer)  # (B, T, C)
        return x + self.mlp(self.mlp_norm(x))  # (B, T, C)


class DecoderLM(nn.Module):
    """Decoder-only LM over token ids; see the module docstring for the architecture and attention modes."""

    def __init__(self, cfg: ResolvedModelConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ResolvedModelConfig):
            raise TypeError(
                f"DecoderLM needs a ResolvedModelConfig (models.build resolves one), not {type(cfg).__name__}"
            )
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.rotary = RotaryTables(
            cfg.head_dim, cfg.max_seq_len, theta=cfg.rope_theta, scaling=cfg.rope_scaling
        )
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head (when ``tie_embeddings``); call again after
        anything that re-creates parameters (``to_empty``, ``load_state_dict(assign=True)``)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, std / sqrt(2 n_layers) for the residual output projections, unit norms."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.w_down.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        return_hidden: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab_size) for ``input_ids`` (B, T), int32 or int64.

        Args:
            attn_mask: boolean (B or 1, 1, T, T), True = may attend; it is the whole mask, so it requires
                ``is_causal=False`` (build causal structure into it, e.g. with :mod:`models.masks`).
            is_causal: query i ignores keys j > i (no mask given); False = bidirectional.
            return_hidden: also return the final (normalised) hidden states (B, T, d_model), i.e. the
                LM head's input, as ``(logits, hidden)``.
            cache: incremental causal decoding (inference, no dropout): ``input_ids`` continue the
                ``cache.length`` positions already in ``cache`` (from :meth:`new_cache`), attend to them
                causally and are appended to it. Needs the default ``attn_mask=None, is_causal=True``.
        """
        if input_ids.dtype not in (torch.int32, torch.int64) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be int32/int64 of shape (B, T); got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if cache is not None:
            return self._forward_cached(input_ids, cache, attn_mask=attn_mask, is_causal=is_causal,
                                        return_hidden=return_hidden)
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model max_seq_len={self.cfg.max_seq_len}")
        if attn_mask is not None:
            _check_mask(attn_mask, B, T, is_causal)
        cos, sin = self.rotary(T)  # (T, hd) each
        x = self.emb_dropout(self.tok_emb(input_ids))  # (B, T, C)
        causal_path = is_causal and attn_mask is None
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask=attn_mask, is_causal=causal_path)  # (B, T, C)
        hidden = self.norm(x)  # (B, T, C)
        logits = self.lm_head(hidden)  # (B, T, V)
        return (logits, hidden) if return_hidden else logits

    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` rows and up to ``capacity`` (default
        ``max_seq_len``) positions, on the model's device and in its parameters' dtype."""
        weight = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, capacity or self.cfg.max_seq_len, device=weight.device,
                       dtype=weight.dtype)

    def _forward_cached(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        *,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        return_hidden: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, T = input_ids.shape
        if attn_mask is not None or not is_causal:
            raise ValueError(
                "cache= decodes causally: it needs attn_mask=None and is_causal=True; "
                "run the full sequence without a cache for other attention modes"
            )
        if self.training:
            raise ValueError("cache= is for inference: call model.eval() first (dropout is not applied)")
        if B != cache.batch_size or cache.length + T > cache.capacity:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} do not fit the KVCache (batch {cache.batch_size}, "
                f"{cache.length} of {cache.capacity} positions used); allowed: batch {cache.batch_size} and "
                f"T <= {cache.capacity - cache.length}, or start a new cache with model.new_cache()"
            )
        cos, sin = self.rotary.span(cache.length, T)  # (T, hd) each
        x = self.tok_emb(input_ids)  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block.forward_cached(x, cos, sin, cache, layer)  # (B, T, C)
        cache.length += T
        hidden = self.norm(x)  # (B, T, C)
        logits = self.lm_head(hidden)  # (B, T, V)
        return (logits, hidden) if return_hidden else logits


def _check_mask(attn_mask: torch.Tensor, B: int, T: int, is_causal: bool) -> None:
    if is_causal:
        raise ValueError(
            "attn_mask is the whole attention mask; pass is_causal=False with it "
            "(models.masks.causal_mask / prefix_lm_mask build masks that include causality)"
        )
    if (
        attn_mask.dtype != torch.bool
        or attn_mask.dim() != 4
        or attn_mask.shape[1:] != (1, T, T)
        or attn_mask.shape[0] not in (1, B)
    ):
        raise ValueError(
            f"attn_mask must be bool of shape ({B} or 1, 1, {T}, {T}) with True = may attend; "
            f"got {attn_mask.dtype} {tuple(attn_mask.shape)}"
        )


def build(
    spec: str | Mapping[str, Any] | ModelConfig | ResolvedModelConfig,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
) -> DecoderLM:
    """A freshly initialised :class:`DecoderLM` from a preset name, a ``model:`` dict or a config.

    ``vocab_size`` (the tokenizer's) and ``max_seq_len`` (the run's) follow :meth:`ModelConfig.resolve`.
    """
    return DecoderLM(resolve_config(spec, vocab_size=vocab_size, max_seq_len=max_seq_len))


@torch.no_grad()
def generate(
    model: DecoderLM,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend ``input_ids`` (B, T) by up to ``max_new_tokens`` sampled tokens; returns (B, T + n).

    Args:
        temperature: softmax temperature; 0 picks the most likely token (greedy, no randomness).
        top_k: sample only among the k most likely tokens.
        generator: RNG for sampling, on the model's device.
        eos_id: a row that produced ``eos_id`` continues with ``eos_id``; generation stops early once
            every row has, so n can be less than ``max_new_tokens``.
        use_cache: keep the keys/values of the context in a :class:`KVCache` and run only the newest
            token per step; False re-runs the whole context every step (the reference path).

    Each step conditions on the last ``max_seq_len`` tokens. While the sequence fits in ``max_seq_len``
    the cache holds exactly that context; once it is longer, the window slides, every position shifts,
    and the steps fall back to re-running the cropped window, so both paths give the same tokens. The
    model runs in eval mode (no dropout) and is put back into its previous mode afterwards.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is not allowed; allowed: >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is not allowed; allowed: >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} is not allowed; allowed: None or >= 1")
    was_training = model.training
    model.eval()
    try:
        ids = input_ids
        max_len = model.cfg.max_seq_len
        cache = None
        if use_cache and max_new_tokens > 0 and ids.shape[1] < max_len:
            cache = model.new_cache(ids.shape[0], capacity=min(max_len, ids.shape[1] + max_new_tokens))
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)  # (B,)
        for _ in range(max_new_tokens):
            if cache is not None and ids.shape[1] <= cache.capacity:
                logits = model(ids[:, cache.length :], cache=cache)[:, -1, :].float()  # (B, V)
            else:
                logits = model(ids[:, -max_len:])[:, -1, :].float()  # (B, V)
            next_id = _sample(logits, temperature=temperature, top_k=top_k, generator=generator)  # (B, 1)
            if eos_id is not None:
                next_id = next_id.masked_fill(finished[:, None], eos_id)
                finished = finished | (next_id[:, 0] == eos_id)
            ids = torch.cat((ids, next_id.to(ids.dtype)), dim=1)  # (B, T + 1)
            if eos_id is not None and bool(finished.all()):
                break
        return ids
    finally:
        model.train(was_training)


def _sample(
    logits: torch.Tensor, *, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token (B, 1) from the last position's logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
