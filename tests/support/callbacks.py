"""Test callbacks for the training loop: fault injection and row audits, outside the production config.

They travel to the Ray workers inside ``train_loop_config`` (pickled by value, so the workers need not
import ``tests``) and join the loop's callbacks (:class:`trainers.callbacks.Callback`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import ray.cloudpickle

from trainers.callbacks import Callback

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _Once(Callback):
    """A fault that rank ``rank`` (modulo the world size) does at ``step``, once: the marker file records it
    (with ``note``), so a restarted worker group goes on. Subclasses say what the fault is (:meth:`fault`)."""

    def __init__(self, step: int, marker: str | Path, rank: int = 1):
        self.step, self.marker, self.rank = step, str(marker), rank

    def on_step_end(self, trainer, step: int, out) -> None:
        if step != self.step or trainer.rank != self.rank % trainer.world or Path(self.marker).exists():
            return
        Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
        Path(self.marker).write_text(f"{self.note()} at step {step}\n")
        self.fault(trainer, step)

    def note(self) -> str:
        return type(self).__name__

    def fault(self, trainer, step: int) -> None:
        raise NotImplementedError


class FailOnce(_Once):
    """Raises at ``step``, once."""

    def note(self) -> str:
        return "failure injected"

    def fault(self, trainer, step: int) -> None:
        raise RuntimeError(f"injected failure at step {step} on rank {trainer.rank} (tests FailOnce)")


class KillOnce(_Once):
    """Kills its own worker process with SIGKILL at ``step``, once: the process dies as from ``kill -9``,
    with no Python cleanup."""

    def note(self) -> str:
        return "SIGKILL"

    def fault(self, trainer, step: int) -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class AuditRows(Callback):
    """Writes the row ids every checkpoint committed, per rank and stream: ``[<stream>-]rank<r>-step<s>.npy``
    (written once the checkpoint is persisted, so a row audited is a row committed)."""

    def __init__(self, directory: str | Path):
        self.directory = str(directory)

    def on_checkpoint(self, trainer, step: int, committed: dict[str, np.ndarray]) -> None:
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        for name, ids in committed.items():
            if len(ids):
                prefix = "" if name == "train" else f"{name}-"
                np.save(Path(self.directory, f"{prefix}rank{trainer.rank}-step{step:08d}.npy"), ids)


class KillServer(Callback):
    """Rank 0 kills the MLflow server's process group with SIGKILL at ``step``, once (the marker file records
    it): the tracking server goes away mid-run, for real."""

    def __init__(self, step: int, pgid: int, marker: str | Path):
        self.step, self.pgid, self.marker = step, pgid, str(marker)

    def on_step_end(self, trainer, step: int, out) -> None:
        import os
        import signal

        if step != self.step or trainer.rank != 0 or Path(self.marker).exists():
            return
        os.killpg(self.pgid, signal.SIGKILL)
        Path(self.marker).write_text(f"MLflow server killed at step {step}\n")


class PauseAt(Callback):
    """Rank 0 writes ``marker`` at ``step`` and waits there (up to ``hold_s``), once: the test removes the
    node under it meanwhile, so the fault lands at a known step."""

    def __init__(self, step: int, marker: str | Path, hold_s: float = 120.0):
        self.step, self.marker, self.hold_s = step, str(marker), hold_s

    def on_step_end(self, trainer, step: int, out) -> None:
        import time

        if step != self.step or trainer.rank != 0 or Path(self.marker).exists():
            return
        Path(self.marker).write_text(f"paused at step {step}\n")
        time.sleep(self.hold_s)
