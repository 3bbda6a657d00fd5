"""Torch models and their named size presets.

``models.build("tiny", vocab_size=..., max_seq_len=...)`` returns a :class:`DecoderLM`. The config
classes and preset registry import without torch; the torch-backed names below load on first use, so
the driver can validate configs without paying for ``import torch``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from models.config import ModelConfig, ResolvedModelConfig, resolve_config
from models.presets import available, register

if TYPE_CHECKING:
    from models.decoder import DecoderLM, build, generate
    from models.flops import flops_per_token, num_params
    from models.io import load_pretrained, save_pretrained
    from models.masks import causal_mask, prefix_lm_mask

_LAZY = {
    "DecoderLM": "models.decoder",
    "build": "models.decoder",
    "flops_per_token": "models.flops",
    "num_params": "models.flops",
    "generate": "models.decoder",
    "load_pretrained": "models.io",
    "save_pretrained": "models.io",
    "causal_mask": "models.masks",
    "prefix_lm_mask": "models.masks",
}

__all__ = [
    "DecoderLM",
    "ModelConfig",
    "ResolvedModelConfig",
    "available",
    "build",
    "causal_mask",
    "flops_per_token",
    "generate",
    "load_pretrained",
    "num_params",
    "prefix_lm_mask",
    "register",
    "resolve_config",
    "save_pretrained",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
