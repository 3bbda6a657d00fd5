"""The transformer blocks of a model: the unit of FSDP2 sharding, activation checkpointing and ``torch.compile``.

``trainer.activation_checkpointing``: each block's activations are recomputed in the backward instead of being
kept (Chen et al., "Training Deep Nets with Sublinear Memory Cost", arXiv 1604.06174), through PyTorch's
composable ``checkpoint`` (forward/backward hooks: parameter names, and so checkpoints and exports, are
unchanged; it composes with FSDP2). ``trainer.compile``: each block's forward is compiled in place
(``nn.Module.compile``: names unchanged), the per-block compilation torchtitan uses (one graph reused by every
block of a kind, short compile times).
"""

from __future__ import annotations

import torch

from models.decoder import Block
from models.vit import ViTBlock

BLOCK_TYPES: tuple[type[torch.nn.Module], ...] = (Block, ViTBlock)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block of the decoder LM, the ViT encoder and decoder, the CLIP text encoder (in module order)."""
    return [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]


def apply_block_options(model: torch.nn.Module, *, activation_checkpointing: bool, compile: bool) -> int:
    """Activation checkpointing, then compilation, on every block (before the engine wraps or shards the model);
    returns the number of blocks."""
    blocks = transformer_blocks(model)
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in blocks:
            checkpoint(block)
    if compile:
        for block in blocks:
            block.compile()
    return len(blocks)
