"""Checkpoint layout and the train state saved with it.

One checkpoint folder (one ``ray.train.report``) holds:

- the engine's full state (no LR scheduler: the LR is a pure function of the step and the configured schedule):
  ``ds/`` (DeepSpeed: one file set per rank, module and optimizer shards) or ``dcp/`` (accelerate:
  ``torch.distributed.checkpoint`` shards and metadata, loadable on any number of ranks);
- ``train_state.json``: step, tokens seen, skipped steps, data position, schedule name + parameters, config,
  MLflow run;
- ``rng-rank<r>.pt``: each rank's random state (Python, NumPy, torch, the loop's generator);
- export files, consolidated weights written by rank 0 for export and the model registry:
  ``model.safetensors`` + ``model_config.json`` + ``tokenizer.json`` (decoder LM) or
  ``encoder.safetensors`` + ``vit_config.json`` + ``image_processor.json`` (+ the whole vision model;
  :mod:`models.vit_io`).

- ``complete-rank<r>.json``: written by each rank last, after all its files: their sizes and BLAKE2b
  hashes. A checkpoint counts only when every rank's marker is there and every file it lists matches
  (:func:`checkpoint_problem`); :func:`newest_complete` is the one answer to "which checkpoint is latest"
  for the driver's ``--resume`` plan and the workers' restore (a restart after a failure, or a resume):
  cut-off or damaged checkpoints are skipped, and reported, and the previous one is used.

Each rank writes into its own temporary folder; Ray merges them in ``storage_path``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import torch

from data.stream import DataPosition

if TYPE_CHECKING:
    from trainers.engines.base import Engine

TRAIN_STATE = "train_state.json"
MARKER = re.compile(r"complete-rank(\d+)\.json")


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs."""

    step: int = 0
    tokens_seen: int = 0
    data_position: DataPosition | None = None  # None: not written by a training step yet
    schedule: dict[str, Any] = field(default_factory=dict)  # name + parameters, as trainers.schedules.describe
    mlflow_run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0  # steps skipped for a non-finite loss (trainer.on_nonfinite=skip) up to ``step``
    declared_grad_accum_steps: int | None = None  # the configured value when the run trains with a rescaled one

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


def save_checkpoint(engine: Engine, directory: str | Path, *, state: TrainState, export) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (all ranks call it).

    ``export(full_state_dict, directory)`` writes the consolidated export files on rank 0 (the decoder
    LM's ``model.safetensors`` + tokenizer, or a vision encoder's files: :mod:`trainers.workloads`).
    """
    engine.save(Path(directory), state.step)
    full = engine.full_state_dict()  # collective
    if full is not None:
        state.save(directory)
        export(full, Path(directory))


def load_checkpoint(engine: Engine, directory: str | Path, *, world: int) -> TrainState:
    """Restore the engine's full state (weights, optimizer; resharded when another number of ranks wrote it) and
    return the train state."""
    from trainers.engines.base import check_state_dir

    directory = Path(directory)
    state = TrainState.load(directory)
    check_state_dir(directory, engine)
    saved_world = state.data_position.world_size if state.data_position is not None else world
    saved_stage = int(state.config.get("trainer", {}).get("zero_stage", engine.t.zero_stage))
    step = engine.load(directory, saved_world=saved_world, saved_stage=saved_stage)
    if step != state.step:
        raise RuntimeError(f"checkpoint {directory}: the {engine.name} state and {TRAIN_STATE} disagree on the step")
    return state


# --- complete or invisible ------------------------------------------------------------------------
def marker_file(rank: int) -> str:
    return f"complete-rank{rank}.json"


def _blake2b(chunks: Iterator[bytes]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _local_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            yield chunk


def write_marker(directory: str | Path, *, rank: int, world_size: int, step: int) -> None:
    """Rank ``rank``'s completion marker: every file it wrote into ``directory`` (its own temporary folder)
    with size and hash. Written last and atomically (a rename), so its presence means the rank finished."""
    d = Path(directory)
    files = {p.relative_to(d).as_posix(): {"size": p.stat().st_size, "blake2b": _blake2b(_local_chunks(p))}
             for p in sorted(d.rglob("*")) if p.is_file() and not MARKER.fullmatch(p.name)}
    tmp = d / f".{marker_file(rank)}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "world_size": world_size, "step": step, "files": files}, indent=1))
    os.replace(tmp, d / marker_file(rank))


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _fs_chunks(fs: pafs.FileSystem, path: str) -> Iterator[bytes]:
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            yield chunk


def _marker(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """A completion marker's content; None when it is not whole JSON with its fields (cut off by a full disk)."""
    try:
        m = json.loads(_read(fs, path))
        return m if isinstance(m, dict) and {"world_size", "files"} <= m.keys() else None
    except (ValueError, OSError):
        return None


def checkpoint_problem(fs: pafs.FileSystem, path: str, *, deep: bool) -> str | None:
    """Why the checkpoint folder ``path`` is not complete (None: it is): a missing marker (cut off while being
    written), a rank that did not finish, a file missing or of another size than its writer recorded, or
    (``deep``: hashes checked too) a file whose content changed after it was written."""
    path = path.rstrip("/")
    infos = {i.path[len(path) + 1:]: i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True,
                                                                                   allow_not_found=True))
             if i.type == pafs.FileType.File}
    markers = {int(m.group(1)): rel for rel in infos if (m := MARKER.fullmatch(rel))}
    if not markers:
        return "no completion marker (complete-rank<r>.json): it was cut off while being written"
    read = {r: _marker(fs, f"{path}/{rel}") for r, rel in markers.items()}
    broken = sorted(markers[r] for r, m in read.items() if m is None)
    if broken:
        return f"{', '.join(broken)} cut off or damaged (a completion marker must be whole)"
    world = read[min(read)]["world_size"]
    missing = [r for r in range(world) if r not in markers]
    if missing:
        return f"rank(s) {missing} of {world} did not finish writing it (no complete-rank<r>.json)"
    for r in range(world):
        for rel, meta in read[r]["files"].items():
            info = infos.get(rel)
            if info is None:
                return f"{rel} (written by rank {r}) is missing"
            if info.size != meta["size"]:
                return f"{rel} has {info.size:,} bytes but rank {r} wrote {meta['size']:,} (truncated or damaged)"
            if deep and _blake2b(_fs_chunks(fs, f"{path}/{rel}")) != meta["blake2b"]:
                return f"{rel} differs from what rank {r} wrote (its hash changed: damaged after it was written)"
    return None


def _state_or_none(fs: pafs.FileSystem, path: str) -> TrainState | None:
    try:
        return TrainState.from_json(_read(fs, f"{path.rstrip('/')}/{TRAIN_STATE}").decode())
    except (OSError, FileNotFoundError, ValueError, TypeError, KeyError):
        return None


def checkpoint_folders(fs: pafs.FileSystem, run_dir: str) -> list[str]:
    """Every ``checkpoint_*`` folder of a run (complete or not; none when the run folder does not exist)."""
    return [i.path for i in fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]


def newest_complete(fs: pafs.FileSystem, run_dir: str, *, deep: bool, exclude: tuple[str, ...] = ()
                    ) -> tuple[tuple[TrainState, str] | None, list[tuple[str, str]]]:
    """The run's newest complete checkpoint (its train state and path; None if there is none) and the newer
    ones skipped on the way, each with why (:func:`checkpoint_problem`; ``exclude``: paths already found
    damaged, e.g. by the driver's deeper check)."""
    folders = checkpoint_folders(fs, run_dir)
    states = {p: _state_or_none(fs, p) for p in folders}
    order = sorted(folders, key=lambda p: (states[p].step if states[p] else -1, p), reverse=True)
    skipped = []
    for p in order:
        problem = "found damaged by the driver" if p in exclude else checkpoint_problem(fs, p, deep=deep)
        if problem is None and states[p] is None:
            problem = f"{TRAIN_STATE} is unreadable"
        if problem is None:
            return (states[p], p), skipped
        skipped.append((p, problem))
    return None, skipped


@dataclass(frozen=True)
class CheckpointDir:
    """Where a run's checkpoints live (a folder on any pyarrow filesystem: local, S3), as the workers see it."""

    fs: pafs.FileSystem
    run_dir: str
    exclude: tuple[str, ...] = ()  # checkpoints the driver found damaged

    def newest(self) -> tuple[tuple[TrainState, str] | None, list[tuple[str, str]]]:
        return newest_complete(self.fs, self.run_dir, deep=False, exclude=self.exclude)

    @contextlib.contextmanager
    def local(self, path: str) -> Iterator[Path]:
        """The checkpoint ``path`` as a local folder (downloaded into a temporary folder when remote)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            yield Path(path)
            return
        with tempfile.TemporaryDirectory(prefix="rpt-restore-") as tmp:
            pafs.copy_files(path, tmp, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            yield Path(tmp)
