"""A decoder-only transformer language model (Llama-style).

token embedding -> n_layers x [x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> LM head

- RMSNorm: Zhang & Sennrich, arXiv 1910.07467.
- Rotary position embeddings on queries and keys: Su et al., arXiv 2104.09864.
- Grouped-query attention (n_kv_heads < n_heads): Ainslie et al., arXiv 2305.13245.
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

:func:`build` makes a model from a preset name or config; :func:`generate` samples from one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig, ResolvedModelConfig, resolve_config


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


def rotary_tables(
    head_dim: int, seq_len: int, *, theta: float = 10000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (seq_len, head_dim), float32.

    Dimension pair (i, i + head_dim/2) at position p is rotated by p * theta^(-2i / head_dim) (Su et al.,
    arXiv 2104.09864, eq. 15). Pairing i with i + head_dim/2 instead of 2i with 2i+1 (the GPT-NeoX / Llama
    layout) is the paper's rotation up to a fixed permutation of the head dimensions.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim  # (D/2,)
    inv_freq = theta**-exponents  # (D/2,)
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

    def __init__(self, head_dim: int, max_seq_len: int, *, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self._build(device=None)

    def _build(self, device: torch.device | None) -> None:
        cos, sin = rotary_tables(self.head_dim, self.max_seq_len, theta=self.theta, device=device)
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
        self.rotary = RotaryTables(cfg.head_dim, cfg.max_seq_len, theta=cfg.rope_theta)
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
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab_size) for ``input_ids`` (B, T), int32 or int64.

        Args:
            attn_mask: boolean (B or 1, 1, T, T), True = may attend; it is the whole mask, so it requires
                ``is_causal=False`` (build causal structure into it, e.g. with :mod:`models.masks`).
            is_causal: query i ignores keys j > i (no mask given); False = bidirectional.
            return_hidden: also return the final (normalised) hidden states (B, T, d_model), i.e. the
                LM head's input, as ``(logits, hidden)``.
        """
        if input_ids.dtype not in (torch.int32, torch.int64) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be int32/int64 of shape (B, T); got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
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
) -> torch.Tensor:
    """Extend ``input_ids`` (B, T) by up to ``max_new_tokens`` sampled tokens; returns (B, T + n).

    Args:
        temperature: softmax temperature; 0 picks the most likely token (greedy, no randomness).
        top_k: sample only among the k most likely tokens.
        generator: RNG for sampling, on the model's device.
        eos_id: a row that produced ``eos_id`` continues with ``eos_id``; generation stops early once
            every row has, so n can be less than ``max_new_tokens``.

    For demos and evaluation samples: there is no KV cache, each step re-runs the context, cropped to
    the last ``max_seq_len`` tokens. The model runs in eval mode (no dropout) and is put back into its
    previous mode afterwards.
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
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)  # (B,)
        for _ in range(max_new_tokens):
            context = ids[:, -model.cfg.max_seq_len :]  # (B, <=max_seq_len)
            logits = model(context)[:, -1, :].float()  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)  # (B, V)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            if eos_id is not None:
                next_id = next_id.masked_fill(finished[:, None], eos_id)
                finished = finished | (next_id[:, 0] == eos_id)
            ids = torch.cat((ids, next_id.to(ids.dtype)), dim=1)  # (B, T + 1)
            if eos_id is not None and bool(finished.all()):
                break
        return ids
    finally:
        model.train(was_training)
