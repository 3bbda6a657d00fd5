"""Parameter counts and training FLOPs per token, from a config (no allocation) or a built model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from models.config import ModelConfig, ResolvedModelConfig, resolve_config

ConfigLike = str | Mapping[str, Any] | ModelConfig | ResolvedModelConfig


def param_breakdown(cfg: ConfigLike) -> dict[str, int]:
    """Parameters of a :class:`models.decoder.DecoderLM` by part, computed from the sizes.

    Keys: ``embedding`` (vocab x d_model), ``attention`` and ``mlp`` (all layers' matmul weights),
    ``norms`` (RMSNorm weights), ``lm_head`` (d_model x vocab, 0 when tied to the embedding).
    """
    cfg = resolve_config(cfg)
    d, q_width, kv_width = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {
        "embedding": cfg.vocab_size * d,
        "attention": cfg.n_layers * (d * q_width + 2 * d * kv_width + q_width * d),
        "mlp": cfg.n_layers * 3 * d * cfg.ffn_hidden,
        "norms": (2 * cfg.n_layers + 1) * d,
        "lm_head": 0 if cfg.tie_embeddings else d * cfg.vocab_size,
    }


def num_params(model_or_cfg: nn.Module | ConfigLike, *, exclude_embedding: bool = False) -> int:
    """Number of distinct parameters (tied matrices once) of a model, or of the model a config describes.

    ``exclude_embedding=True`` leaves out the token embedding table (vocab x d_model) once; an untied LM
    head stays counted. Configs are resolved without runtime values, so a preset counts with its own
    vocabulary.
    """
    if isinstance(model_or_cfg, nn.Module):
        total = sum(p.numel() for p in model_or_cfg.parameters())
        if exclude_embedding:
            embeddings = {
                id(m.weight): m.weight.numel() for m in model_or_cfg.modules() if isinstance(m, nn.Embedding)
            }
            total -= sum(embeddings.values())
        return total
    parts = param_breakdown(model_or_cfg)
    if exclude_embedding:
        parts["embedding"] = 0
    return sum(parts.values())


def flops_per_token(cfg: ConfigLike, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6 N + 12 n_layers d_model seq_len.

    The estimate of Chowdhery et al. (PaLM, arXiv 2204.02311, appendix B), also used by Chinchilla
    (Hoffmann et al., arXiv 2203.15556): each matmul parameter costs 2 FLOPs per token forward and 4
    backward (6 N), and attention scores and the weighted sum of values cost 12 L H Q T with
    H Q = n_heads * head_dim = d_model. N counts the parameters that take part in matmuls: attention
    and MLP weights of every layer plus the LM head (d_model x vocab, whether or not it is tied); the
    embedding lookup and the norms are left out. The causal mask is not discounted (as in PaLM), so MFU
    figures stay comparable across papers.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} is not allowed; allowed: a positive integer")
    cfg = resolve_config(cfg)
    parts = param_breakdown(cfg)
    n_matmul = parts["attention"] + parts["mlp"] + cfg.d_model * cfg.vocab_size
    return float(6 * n_matmul + 12 * cfg.n_layers * cfg.d_model * seq_len)
