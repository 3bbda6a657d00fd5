"""The DeepSpeed engine (``trainer.engine: deepspeed``): ZeRO stages 0-3, fp32/bf16/fp16, accumulation, clipping.

Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models" (arXiv 1910.02054):
stage 1 shards the optimizer state, 2 also the gradients, 3 also the parameters.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from trainers.config import OptimizerSpec, TrainerSpec
from trainers.engines.base import Engine, adamw, grad_norm

log = logging.getLogger(__name__)

DS_TAG = "ds"


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


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` with a client AdamW and no LR scheduler.

    No LR scheduler is handed to DeepSpeed: the loop sets each step's LR from the schedule, a pure function of the
    global step, so a checkpoint holds no scheduler state that could disagree with the config. Ray Train has
    already created the process group (gloo on CPU, NCCL on GPU); DeepSpeed reuses it.

    A checkpoint written by another number of ranks: under ZeRO 0 every rank holds the whole optimizer state and
    loads it unchanged; under ZeRO 1-3 the optimizer shards are resharded through the consolidated fp32 state
    (:meth:`_load_resharded`).
    """

    name, state_dir = "deepspeed", DS_TAG

    def __init__(self, model: torch.nn.Module, t: TrainerSpec, o: OptimizerSpec) -> None:
        super().__init__(t, o)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if t.use_gpu else "cpu")
        import deepspeed
        import deepspeed.ops

        if not t.use_gpu:
            # The CPU accelerator JIT-compiles an inference-only shared-memory all-reduce op (30-40 s) on the
            # first initialize; training does not use it. tests/unit/test_loop.py
            # (test_engine_build_does_not_compile_the_cpu_shm_op) checks that the key still exists and the build
            # skips it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.optimizer = adamw(model, o)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.config())
        self.module, self.model, self.device = self.ds.module, self.ds, self.ds.device
        self.rank = self.ds.global_rank

    def config(self) -> dict[str, Any]:
        return deepspeed_config(self.t)

    def backward(self, loss: torch.Tensor | None, *, boundary: bool, want_norm: bool) -> torch.Tensor | None:
        """DeepSpeed scales the loss by 1 / ``grad_accum_steps`` and steps the optimizer itself at the boundary
        (``engine.step()`` after every micro-batch). A left-out micro-batch backpropagates a zero loss
        (:meth:`_backward_zero`), so DeepSpeed's gradient hooks and accumulation bookkeeping run as usual; the loop
        has set the step's LR to 0, so AdamW changes no weight (its state still takes the step)."""
        if loss is None:
            self._backward_zero()
        else:
            self.ds.backward(loss)
        own = None
        if boundary and want_norm and self.t.zero_stage == 0 and self.t.precision == "fp32":
            own = grad_norm(p for p in self.module.parameters() if p.requires_grad)  # ZeRO-0 fp32 keeps none
        self.ds.step()
        if not boundary:
            return None
        if own is not None:
            return own
        kept = self.ds.get_global_grad_norm()  # ZeRO 1-3 and bf16 keep the step's norm (before clipping)
        return None if kept is None else torch.as_tensor(kept, dtype=torch.float32, device=self.device)

    def _backward_zero(self) -> None:
        """Backward of a loss that is exactly 0 and depends on every trainable parameter, with zero (finite)
        gradients even where a weight is NaN/inf (``nan_to_num`` passes no gradient there). Under ZeRO-3 the
        parameters are gathered for it (one all-gather, on left-out micro-batches only)."""
        import deepspeed

        params = [p for p in self.module.parameters() if p.requires_grad]
        gathered = self.t.zero_stage == 3
        with deepspeed.zero.GatheredParameters(params) if gathered else contextlib.nullcontext():
            zero = torch.nan_to_num(torch.stack([p.sum().float() for p in params]).sum()) * 0.0
            self.ds.backward(zero)

    def save(self, directory: Path, step: int) -> None:
        self.ds.save_checkpoint(str(directory), tag=DS_TAG, client_state={"step": step})

    def load(self, directory: Path, *, saved_world: int, saved_stage: int) -> int:
        if saved_stage != self.t.zero_stage:
            raise ValueError(
                f"checkpoint {directory} was written with trainer.zero_stage={saved_stage} and this run has "
                f"zero_stage={self.t.zero_stage}: DeepSpeed's optimizer state differs between stages; resume with "
                f"trainer.zero_stage={saved_stage}, or use trainer.engine=accelerate (its checkpoints move between "
                "stages)"
            )
        if saved_world != self.ds.world_size and self.t.zero_stage > 0:
            return self._load_resharded(directory, saved_world)
        _, client = self.ds.load_checkpoint(str(directory), tag=DS_TAG)
        if client is None:
            raise RuntimeError(f"checkpoint {directory}: DeepSpeed found no state under {DS_TAG}/")
        return int(client["step"])

    def _load_resharded(self, directory: Path, saved_world: int) -> int:
        """ZeRO 1-3 state written by ``saved_world`` ranks onto this world: DeepSpeed's universal checkpoint
        (``deepspeed.checkpoint.ds_to_universal``: every parameter's fp32 weight and Adam moments, whole). The
        first rank of each node converts the node's local copy of the checkpoint into a node-local temporary folder
        (no folder is shared between nodes; host memory and disk are paid once per node), every rank loads its new
        shard from it, and the folder is removed."""
        import hashlib
        import os
        import shutil
        import tempfile

        import torch.distributed as dist

        from trainers.engines.ds_universal import to_universal

        key = hashlib.blake2b(f"{directory}:{saved_world}".encode(), digest_size=8).hexdigest()
        tmp = Path(tempfile.gettempdir(), f"rpt-universal-{key}")  # the same on every rank of a node
        first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
        try:
            if first_on_node:
                shutil.rmtree(tmp, ignore_errors=True)
                to_universal(directory, tmp)
            dist.barrier()
            self.ds._config.load_universal_checkpoint = True
            try:
                _, client = self.ds.load_checkpoint(str(tmp), tag=DS_TAG, load_module_strict=True)
            finally:
                self.ds._config.load_universal_checkpoint = False
            dist.barrier()
        finally:
            if first_on_node:
                shutil.rmtree(tmp, ignore_errors=True)
        if self.rank == 0:
            log.info("resharded DeepSpeed ZeRO-%d state from %d to %d ranks", self.t.zero_stage, saved_world,
                     self.ds.world_size)
        return int(client["step"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.t.zero_stage == 3:
            full = self.ds._zero3_consolidated_16bit_state_dict()
        elif self.rank != 0:
            return None
        else:
            full = self.module.state_dict()
        if self.rank != 0:
            return None
        return {k: v.detach().float().cpu() for k, v in full.items()}
