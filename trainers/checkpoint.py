"""Checkpoint layout and the train state saved with it.

One checkpoint folder (one ``ray.train.report``) holds:

- ``ds/``: DeepSpeed engine state, one file set per rank (module, optimizer shards; no LR scheduler: the LR is a
  pure function of the step and the configured schedule);
- ``train_state.json``: step, tokens seen, data position, schedule name + parameters, config, MLflow run;
- ``rng-rank<r>.pt``: each rank's random state (Python, NumPy, torch, the loop's generator);
- export files, consolidated weights written by rank 0 for export and the model registry:
  ``model.safetensors`` + ``model_config.json`` + ``tokenizer.json`` (decoder LM) or
  ``encoder.safetensors`` + ``vit_config.json`` + ``image_processor.json`` (+ the whole vision model;
  :mod:`models.vit_io`).

Each rank writes into its own temporary folder; Ray merges them in ``storage_path``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.stream import DataPosition

DS_TAG = "ds"
TRAIN_STATE = "train_state.json"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs."""

    step: int = 0
    tokens_seen: int = 0
    data_position: DataPosition | None = None  # None: not written by a training step yet
    schedule: dict[str, Any] = field(default_factory=dict)  # name + parameters, as trainers.schedules.describe
    mlflow_run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        d = asdict(self)
        d["data_position"] = self.data_position.to_dict() if self.data_position is not None else None
        Path(directory, TRAIN_STATE).write_text(json.dumps(d, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> TrainState:
        path = Path(directory, TRAIN_STATE)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {directory} is not a ray-pretrain checkpoint")
        return cls.from_json(path.read_text())

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        d = json.loads(text)
        pos = d.get("data_position")
        d["data_position"] = DataPosition.from_dict(pos) if pos else None
        return cls(**d)


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def save_rng(directory: str | Path, rank: int, generator: torch.Generator) -> None:
    """This rank's random state: Python's, NumPy's, torch's (CPU, and CUDA when present) and the loop's own
    generator (the objectives' masks and views), so a restarted run draws what an undisturbed one would."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, Path(directory, rng_file(rank)))


def load_rng(directory: str | Path, rank: int, generator: torch.Generator) -> bool:
    """Restore what :func:`save_rng` wrote for ``rank``; False when the checkpoint has none (older ones)."""
    import random

    import numpy as np

    path = Path(directory, rng_file(rank))
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def consolidated_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full weights on rank 0 (None elsewhere). Collective under ZeRO-3: every rank must call it."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if engine.global_rank != 0:
        return None
    return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}


def save_checkpoint(engine, directory: str | Path, *, state: TrainState, zero_stage: int, export) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (all ranks call it).

    ``export(full_state_dict, directory)`` writes the consolidated export files on rank 0 (the decoder
    LM's ``model.safetensors`` + tokenizer, or a vision encoder's files: :mod:`trainers.workloads`).
    """
    engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={"step": state.step})
    full = consolidated_state_dict(engine, zero_stage)
    if engine.global_rank == 0:
        state.save(directory)
        export({k: v.float() for k, v in full.items()}, Path(directory))


def load_checkpoint(engine, directory: str | Path) -> TrainState:
    """Restore engine (module, optimizer, LR scheduler) and return the train state."""
    _, client = engine.load_checkpoint(str(directory), tag=DS_TAG)
    state = TrainState.load(directory)
    if client is None or client.get("step") != state.step:
        raise RuntimeError(f"checkpoint {directory}: DeepSpeed state and {TRAIN_STATE} disagree on the step")
    return state
