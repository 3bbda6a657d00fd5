"""Named model sizes, chosen by ``model.preset`` in a run config.

A preset is a partial set of :class:`models.config.ModelConfig` fields; explicit fields in the config
override it, and the tokenizer's vocabulary / the run's sequence length replace the preset's
``vocab_size`` / ``max_seq_len`` at resolve time (see :meth:`ModelConfig.resolve`). Fields a preset
leaves out take the config defaults (``n_kv_heads = n_heads``, ``ffn_hidden`` from ``d_model``).

Parameter counts below are with the preset's own vocabulary (``models.num_params(name)``).
"""

from __future__ import annotations

from typing import Any

_PRESETS: dict[str, dict[str, Any]] = {}


def register(name: str, **fields: Any) -> None:
    """Register a preset under ``name``; registering a name twice is an error.

    Field names and values are validated when a config that uses the preset is validated.
    """
    if not name:
        raise ValueError("a model preset needs a non-empty name")
    if name in _PRESETS:
        raise ValueError(
            f"model preset {name!r} is already registered; pick another name (registered: {', '.join(available())})"
        )
    _PRESETS[name] = dict(fields)


def get(name: str) -> dict[str, Any]:
    """A copy of the fields of preset ``name``; an unknown name is a ``ValueError`` listing the presets."""
    try:
        return dict(_PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(available())}") from None


def available() -> list[str]:
    """Registered preset names, in registration order (smallest first for the built-in ones)."""
    return list(_PRESETS)


# For unit tests and smoke runs: ~0.12M parameters.
register("debug", vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=128)
# The CPU demo: ~4.3M parameters (1.0M of them the tied 4096 x 256 embedding).
register("tiny", vocab_size=4096, d_model=256, n_layers=4, n_heads=4, max_seq_len=512)
# GPT-2-small shape (Radford et al. 2019) with SwiGLU and a 32k vocabulary: ~110M parameters with tied
# embeddings (GPT-2's 124M comes from its 50257-token vocabulary).
register("small", vocab_size=32000, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024)
# TinyLlama-1.1B's sizes (Zhang et al., arXiv 2401.02385) with 16 heads of 128 instead of 32 of 64
# (same parameter count): ~1.1B parameters, untied embeddings, grouped-query attention with 4 kv heads.
register(
    "1b",
    vocab_size=32000,
    d_model=2048,
    n_layers=22,
    n_heads=16,
    n_kv_heads=4,
    ffn_hidden=5632,
    max_seq_len=2048,
    tie_embeddings=False,
)
