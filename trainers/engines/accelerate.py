"""The accelerate engine (``trainer.engine: accelerate``): DDP, or PyTorch FSDP2 with the same ``zero_stage`` meaning.

``trainer.zero_stage`` keeps one meaning across engines: 0 replicates everything (DDP: every rank holds the
weights, gradients and optimizer state; gradients are all-reduced), 2 shards gradients and optimizer state
(FSDP2 with ``reshard_after_forward=False``: parameters stay gathered from the forward to the backward, like
ZeRO-2), 3 shards the parameters too (FSDP2 full shard, gathered per block for its forward and backward, like
ZeRO-3). Stage 1 has no FSDP2 counterpart and is an error (``trainers.config``). FSDP2 (``fully_shard``, per
transformer block and at the root, as torchtitan and OLMo-core apply it) shards each parameter on dim 0 as a
DTensor (Zhao et al., "PyTorch FSDP", arXiv 2304.11277).

``accelerate.Accelerator`` runs inside the Ray Train worker on Ray's process group (gloo on CPU, NCCL on GPU):
it picks the device, wraps the model in DDP (stage 0) with mixed-precision autocast and the optimizer with
the fp16 gradient scaler. accelerate 1.15 enables its own FSDP plugin only on accelerator devices, so FSDP2
is applied here, the same way on CPU and GPU, and the tests on CPU exercise the path a GPU run takes.

Checkpoints hold the full state as ``torch.distributed.checkpoint`` (DCP) files under ``dcp/`` (each rank its
shards, rank 0 the metadata), which load onto any number of ranks: a run resumed on another
``trainer.num_workers`` gets its weights and Adam moments resharded.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from trainers.config import OptimizerSpec, TrainerSpec
from trainers.engines.base import Engine, adamw, full_tensor, grad_norm
from trainers.engines.blocks import transformer_blocks

log = logging.getLogger(__name__)

DCP_DIR = "dcp"
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class AccelerateEngine(Engine):
    name, state_dir = "accelerate", DCP_DIR

    def __init__(self, model: torch.nn.Module, t: TrainerSpec, o: OptimizerSpec) -> None:
        super().__init__(t, o)
        import torch.distributed as dist
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per fit (tests build several)
        self.acc = Accelerator(cpu=not t.use_gpu, mixed_precision=MIXED_PRECISION[t.precision])
        self.device = self.acc.device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.sharded = t.zero_stage >= 2
        self.module = model.to(self.device)
        if self.sharded:
            self._fully_shard(model)
            self.model = model
            self.optimizer = adamw(model, o)
        else:
            self.model, self.optimizer = self.acc.prepare(model, adamw(model, o))
        self.skipped = False

    def _fully_shard(self, model: torch.nn.Module) -> None:
        """FSDP2 per transformer block, then the root (embeddings, final norm, head): one all-gather per block."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.t.precision == "bf16" else MixedPrecisionPolicy())
        reshard = self.t.zero_stage == 3
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)

    def micro_batch(self, boundary: bool) -> contextlib.AbstractContextManager[None]:
        """DDP: no gradient all-reduce before the boundary (``no_sync``). FSDP2 reduce-scatters every micro-batch's
        gradients into the sharded ``.grad`` (torchtitan's default): skipping that sync would keep whole unsharded
        gradients on every rank between micro-batches, giving up stage 2/3's gradient sharding."""
        if self.sharded:
            return contextlib.nullcontext()
        if boundary or self.world == 1 or not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor | None, *, boundary: bool, want_norm: bool) -> torch.Tensor | None:
        """The loss is scaled by 1 / ``grad_accum_steps`` (the mean over the step's micro-batches, as DeepSpeed
        does). A left-out micro-batch (``None``) is not backpropagated and its step does not step the optimizer:
        the gradients are dropped and AdamW's state does not change (DeepSpeed instead steps at LR 0, which
        advances Adam's step count and decays its moments; neither changes a weight)."""
        if loss is None:
            self.skipped = True
        else:
            accum = self.t.grad_accum_steps
            self.acc.backward(loss / accum if accum > 1 else loss)
        if not boundary:
            return None
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = None
        if self.skipped:
            self.skipped = False
        elif self.t.grad_clip > 0:
            norm = full_tensor(self.acc.clip_grad_norm_(params, self.t.grad_clip))
            self.optimizer.step()
        else:
            norm = grad_norm(params) if want_norm else None
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, directory: Path, step: int) -> None:
        """DCP writes this rank's shards (a replicated tensor once, by one of the ranks) and rank 0 the metadata,
        each into its own folder; Ray merges the ranks' folders into the checkpoint."""
        import torch.distributed.checkpoint as dcp

        state = self._state()
        state["step"] = torch.tensor(step)
        dcp.save(state, checkpoint_id=str(Path(directory, DCP_DIR)))

    def load(self, directory: Path, *, saved_world: int, saved_stage: int) -> int:
        """DCP reshards onto any world size and between DDP and FSDP2 (the state dicts name whole tensors)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        state["step"] = torch.tensor(-1)
        dcp.load(state, checkpoint_id=str(Path(directory, DCP_DIR)))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        if saved_world != self.world and self.rank == 0:
            log.info("resharded the accelerate (%s) state from %d to %d ranks",
                     "FSDP2" if self.sharded else "DDP", saved_world, self.world)
        return int(state["step"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                           cpu_offload=self.sharded))
        if self.rank != 0:
            return None
        return {k: v.detach().float().cpu() for k, v in full.items()}
