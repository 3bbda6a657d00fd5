"""Torch models and their named size presets.

``models.build("tiny", vocab_size=..., max_seq_len=...)`` returns a :class:`DecoderLM`. The config
classes and preset registry import without torch; the torch-backed names below load on first use, so
the driver can validate configs without paying for ``import torch``. ``import_hf_folder`` /
``export_hf_folder`` convert between Hugging Face Llama folders and the native export folder
(:mod:`models.hf_io`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from models.config import ModelConfig, ResolvedModelConfig, resolve_config
from models.presets import available, register

if TYPE_CHECKING:
    from models.decoder import DecoderLM, KVCache, build, generate
    from models.flops import flops_per_token, num_params
    from models.hf_io import export_hf_folder, import_hf_folder, read_hf_folder
    from models.io import load_pretrained, save_pretrained
    from models.masks import causal_mask, prefix_lm_mask

_LAZY = {
    "DecoderLM": "models.decoder",
    "KVCache": "models.decoder",
    "export_hf_folder": "models.hf_io",
    "import_hf_folder": "models.hf_io",
    "read_hf_folder": "models.hf_io",
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
    "KVCache",
    "ModelConfig",
    "ResolvedModelConfig",
    "available",
    "build",
    "causal_mask",
    "export_hf_folder",
    "flops_per_token",
    "generate",
    "import_hf_folder",
    "load_pretrained",
    "num_params",
    "prefix_lm_mask",
    "read_hf_folder",
    "register",
    "resolve_config",
    "save_pretrained",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
