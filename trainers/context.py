"""The loop's view of its runtime: rank, world size, the run's latest checkpoint, the planned streams and
reporting. :class:`RayTrainContext` is Ray Train's; tests build the loop with their own (in-memory
streams, a local checkpoint folder) and run it without Ray.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from trainers.checkpoint import CheckpointDir

log = logging.getLogger(__name__)


class TrainContext(Protocol):
    rank: int
    world: int

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """This run's own latest checkpoint as a local folder (restart or ``--resume``), or None."""

    def batches(self, stream: str, batch_size: int, prefetch: int) -> Iterator[dict[str, Any]]:
        """Batches of ``batch_size`` rows (dicts of tensors, ``row_id`` included; the last may be shorter) of this
        rank's planned ``stream``; :class:`trainers.batches.PlannedBatches` cuts them into micro-batch parts."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Persist a checkpoint folder (collective: every rank calls it) with its metrics."""


class RayTrainContext:
    """Inside a Ray Train worker (``TorchTrainer``): the planned streams are Ray Data shards
    (:class:`data.stream.PlannedDataConfig`), checkpoints go through ``ray.train.report``. The run's
    latest checkpoint is the newest *complete* one in its folder (``checkpoints``, the same function the
    driver planned ``--resume`` with: :func:`trainers.checkpoint.newest_complete`), not Ray's record of the
    last report, so a checkpoint cut off mid-write or damaged later is skipped on every path."""

    def __init__(self, checkpoints: CheckpointDir | None = None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.checkpoints = checkpoints

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        if self.checkpoints is None:
            yield None
            return
        found, skipped = self.checkpoints.newest()
        if self.rank == 0:
            for path, why in skipped:
                log.warning("checkpoint %s skipped: %s", path, why)
        if found is None:
            yield None
            return
        with self.checkpoints.local(found[1]) as d:
            yield d

    def batches(self, stream: str, batch_size: int, prefetch: int) -> Iterator[dict[str, Any]]:
        import ray.train

        shard = ray.train.get_dataset_shard(stream)
        # the plan's row count need not be a multiple of batch_size (a mixture's streams): the last batch is kept
        return iter(shard.iter_torch_batches(batch_size=batch_size, drop_last=False, prefetch_batches=prefetch))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=ckpt)
