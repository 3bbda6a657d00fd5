"""Engines by name (``trainer.engine``): the one switch between DeepSpeed and accelerate (DDP / FSDP2).

:class:`trainers.engines.base.Engine` is the interface the loop uses; :func:`build` applies the block options
(activation checkpointing, compile: :mod:`trainers.engines.blocks`) and builds the named engine.
"""

from __future__ import annotations

import torch

from trainers.config import OptimizerSpec, TrainerSpec
from trainers.engines.base import Engine

ENGINES = ("deepspeed", "accelerate")


def build(model: torch.nn.Module, t: TrainerSpec, o: OptimizerSpec) -> Engine:
    from trainers.engines.blocks import apply_block_options

    apply_block_options(model, activation_checkpointing=t.activation_checkpointing, compile=t.compile)
    if t.engine == "deepspeed":
        from trainers.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, t, o)
    if t.engine == "accelerate":
        from trainers.engines.accelerate import AccelerateEngine

        return AccelerateEngine(model, t, o)
    raise ValueError(f"trainer.engine={t.engine!r} is not an engine; allowed: {', '.join(ENGINES)}")
