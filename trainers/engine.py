"""The DeepSpeed engine from a typed trainer config (ZeRO 0-3, fp32/bf16/fp16, accumulation, clipping)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from trainers.config import OptimizerSpec, TrainerSpec

log = logging.getLogger(__name__)


def deepspeed_config(t: TrainerSpec) -> dict[str, Any]:
    """The DeepSpeed JSON config for one rank (batch sizes in rows per rank)."""
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not norms/biases/1-D parameters (GPT-2/nanoGPT convention)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, t: TrainerSpec, o: OptimizerSpec):
    """``deepspeed.initialize`` with a client AdamW; returns ``(engine, optimizer)``.

    No LR scheduler is handed to DeepSpeed: the loop sets each step's LR from the schedule, a pure function
    of the global step, so a checkpoint holds no scheduler state that could disagree with the config.
    ``optimizer`` is the client AdamW (its ``param_groups`` are the ones every ZeRO stage steps with).
    Ray Train has already created the process group (gloo on CPU, NCCL on GPU); DeepSpeed reuses it.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if t.use_gpu else "cpu")
    import deepspeed
    import deepspeed.ops

    if not t.use_gpu:
        # The CPU accelerator JIT-compiles an inference-only shared-memory all-reduce op (30-40 s) on the
        # first initialize; training does not use it. tests/unit/test_loop.py
        # (test_engine_build_does_not_compile_the_cpu_shm_op) checks that the key still exists and the build skips it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr_peak, betas=o.betas, eps=o.eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(t))
    return engine, opt
