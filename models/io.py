"""Export format of a decoder LM: ``model.safetensors`` + ``model_config.json`` in one directory.

This is what rank 0 writes into each checkpoint for export and what the MLflow registry holds; the
tokenizer sits next to it but is not this module's business.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.config import ResolvedModelConfig
from models.decoder import DecoderLM
from models.files import LM_CONFIG, LM_WEIGHTS

WEIGHTS_NAME = LM_WEIGHTS
CONFIG_NAME = LM_CONFIG
_EMBEDDING_KEY = "tok_emb.weight"
_HEAD_KEY = "lm_head.weight"


def save_pretrained(
    model: nn.Module | Mapping[str, torch.Tensor],
    cfg: ResolvedModelConfig,
    directory: str | os.PathLike,
) -> Path:
    """Write ``model``'s weights and its fully resolved ``cfg`` into ``directory`` (created if missing).

    ``model`` is a :class:`DecoderLM` (whose ``cfg`` must equal ``cfg``) or its state dict (e.g. one
    consolidated from ZeRO-3 shards). With tied embeddings only ``tok_emb.weight`` is stored
    (safetensors refuses shared tensors). The keys must be exactly those of ``DecoderLM(cfg)``, so a
    wrapper's ``module.`` prefix fails here rather than at load time. Returns the directory.
    """
    if not isinstance(cfg, ResolvedModelConfig):
        raise TypeError(f"cfg must be the model's ResolvedModelConfig (model.cfg), not {type(cfg).__name__}")
    if isinstance(model, DecoderLM) and model.cfg != cfg:
        raise ValueError(f"cfg {cfg!r} is not the model's own config {model.cfg!r}")
    state = dict(model.state_dict() if isinstance(model, nn.Module) else model)
    if cfg.tie_embeddings and _HEAD_KEY in state:
        head = state.pop(_HEAD_KEY)
        if _EMBEDDING_KEY in state and not torch.equal(head, state[_EMBEDDING_KEY]):
            raise ValueError(f"cfg.tie_embeddings=True but {_HEAD_KEY} differs from {_EMBEDDING_KEY}")
    expected = set(_reference_keys(cfg))
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match DecoderLM({cfg!r}): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(cfg.model_dump_json(indent=2) + "\n")
    return directory


def load_pretrained(
    directory: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[DecoderLM, ResolvedModelConfig]:
    """Rebuild the model saved by :func:`save_pretrained` on ``map_location``; returns ``(model, cfg)``.

    Weights load strictly and keep their saved dtypes, without a throwaway random initialisation. The
    model is in training mode, as ``nn.Module`` constructs it; call ``.eval()`` for inference.
    """
    directory = Path(directory)
    cfg = ResolvedModelConfig.model_validate_json((directory / CONFIG_NAME).read_text())
    state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
    if cfg.tie_embeddings and _EMBEDDING_KEY in state:
        state[_HEAD_KEY] = state[_EMBEDDING_KEY]
    with torch.device("meta"):
        model = DecoderLM(cfg)
    model.to_empty(device=map_location)  # also rebuilds the rotary tables on the device
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True gave the head and the embedding separate Parameter objects
    return model, cfg


def _reference_keys(cfg: ResolvedModelConfig) -> list[str]:
    with torch.device("meta"):
        keys = list(DecoderLM(cfg).state_dict())
    return [k for k in keys if not (cfg.tie_embeddings and k == _HEAD_KEY)]
