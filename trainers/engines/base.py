"""What the training loop asks of an engine, and the parts both engines share.

The loop (:mod:`trainers.loop`) talks to an :class:`Engine` only: the forward pass (calling it), one
micro-batch's backward with the optimizer step at the accumulation boundary (:meth:`Engine.backward`),
the gradient norm before clipping, the LR (the optimizer's ``param_groups``), train / eval mode, the full
state to and from a checkpoint folder and the consolidated weights for export. Two implementations,
chosen by ``trainer.engine`` (:mod:`trainers.engines`): DeepSpeed (ZeRO 0-3) and accelerate (DDP, or
PyTorch FSDP2 for ``zero_stage`` 2 / 3).
"""

from __future__ import annotations

import contextlib
import resource
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainers.config import OptimizerSpec, TrainerSpec


class Engine(ABC):
    """A model, its optimizer and its parallelism, as the loop sees them.

    Attributes: ``device``; ``module``, the model as built (its parameters may be sharded in place);
    ``model``, the module the objectives call for every forward pass (the DeepSpeed engine, DDP, or the
    FSDP2-sharded model itself: a wrapper must see each forward); ``optimizer``, whose ``param_groups`` carry the
    LR the loop sets before every step.
    """

    name: str  # trainer.engine
    state_dir: str  # the engine's sub-folder of a checkpoint

    def __init__(self, t: TrainerSpec, o: OptimizerSpec) -> None:
        self.t, self.o = t, o
        self.device: torch.device
        self.module: torch.nn.Module
        self.model: torch.nn.Module
        self.optimizer: torch.optim.Optimizer

    def micro_batch(self, boundary: bool) -> contextlib.AbstractContextManager[None]:
        """Around one micro-batch's forward and backward: gradients are synchronised only at the accumulation
        boundary (``boundary``: the step's last micro-batch)."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor | None, *, boundary: bool, want_norm: bool) -> torch.Tensor | None:
        """Backpropagate one micro-batch's ``loss`` (scaled by 1 / ``grad_accum_steps``); ``None``: a micro-batch
        left out (a non-finite loss on some rank, ``trainer.on_nonfinite: skip``) whose step changes no weight.
        At ``boundary``: clip, step the optimizer, zero the gradients, and return the global gradient norm before
        clipping as a device tensor when ``want_norm`` (or when the engine computed it anyway), else None."""

    @abstractmethod
    def save(self, directory: Path, step: int) -> None:
        """This rank's part of the full state (weights, optimizer) into ``directory / state_dir``."""

    @abstractmethod
    def load(self, directory: Path, *, saved_world: int, saved_stage: int) -> int:
        """Restore the full state from a checkpoint folder written by ``saved_world`` ranks with ``zero_stage``
        ``saved_stage``; returns the step the state was saved at."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights (float32, CPU) on rank 0, None elsewhere. Collective: every rank calls it."""

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def check_state_dir(directory: Path, engine: Engine) -> None:
    """A clear error when a checkpoint was written by the other engine."""
    if (directory / engine.state_dir).is_dir():
        return
    others = sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name in ("ds", "dcp"))
    if not others:
        raise ValueError(
            f"checkpoint {directory} holds no engine state (no ds/ or dcp/ folder): it is incomplete or damaged; "
            "resume from an earlier checkpoint, or start a new run from its weights with trainer.init_from"
        )
    raise ValueError(
        f"checkpoint {directory} holds no {engine.state_dir}/ (the state trainer.engine={engine.name} writes; it "
        f"has {others}): it was written by the other engine. Resume it with the engine that "
        "wrote it (trainer.engine), or start a new run from its weights with trainer.init_from"
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not norms/biases/1-D parameters (GPT-2/nanoGPT convention)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, o: OptimizerSpec) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, arXiv 1711.05101) over :func:`param_groups`, at the peak LR (the loop sets each
    step's LR)."""
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr_peak, betas=o.betas, eps=o.eps)


def grad_norm(params: Iterator[torch.nn.Parameter] | list[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` (a device tensor; sharded DTensor gradients are reduced)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    return full_tensor(norm)


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or the whole tensor of a DTensor (a collective for sharded ones)."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or ``x``."""
    from torch.distributed.tensor import DTensor

    return x.to_local() if isinstance(x, DTensor) else x


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA's max allocated on a GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
