"""The loop's cadences as callbacks: training metrics, evaluation, checkpoints.

:class:`trainers.loop.Trainer` runs ``[*extra, NonFiniteGuard, TrainLogger, Evaluator, Checkpointer]`` at the end of every
optimizer step; extra callbacks (tests: fault injection, row audits) come first and see the same hooks.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from trainers.loop import Trainer

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """One optimizer step's sums over its micro-batches (device tensors: no host sync)."""

    loss_sum: torch.Tensor
    metric_sums: dict[str, torch.Tensor]
    n_micro: int
    wait_s: float
    skipped: bool = False  # trainer.on_nonfinite=skip: a non-finite loss on some rank; no weight changed
    grad_norm: torch.Tensor | None = None  # global gradient norm before clipping (asked for at logging steps)


class Callback:
    """Hooks of the training loop; every one is a no-op unless overridden."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After the restore, before the first step of this fit."""

    def on_step_end(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        """After optimizer step ``step`` (the global step, counted from 1)."""

    def on_checkpoint(self, trainer: Trainer, step: int, committed: dict[str, np.ndarray]) -> None:
        """After the checkpoint of ``step`` was persisted; ``committed`` are the row ids (per stream) it
        committed since the previous checkpoint."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteGuard(Callback):
    """What a non-finite (NaN/inf) training loss does, by ``trainer.on_nonfinite``. Runs before the other
    built-in callbacks.

    - ``stop`` (default): a non-finite loss or global gradient norm stops the run before anything of the bad
      step is checkpointed or registered. The
      first bad step is kept on the device (no per-step host sync); it is read at every logging step (or
      every ``trainer.nonfinite_check_every`` steps) and always before a checkpoint step, so a checkpoint
      never holds a diverged model.
    - ``skip``: :meth:`trainers.loop.Trainer.train_step` checks every rank's loss before each micro-batch's
      backward (one all-reduce and host sync per micro-batch) and runs a step with a bad one at LR 0: no
      weight changes, the step's rows are consumed. Here each skipped step is counted
      (``Trainer.skipped_steps``, saved in checkpoints, logged as ``train/skipped_steps``) with a warning that
      names it, and the run stops once more than ``trainer.max_skipped_steps`` steps were skipped.
    - ``ignore``: nothing is checked.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=trainer.device)

    def on_step_end(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        policy = trainer.cfg.trainer.on_nonfinite
        if policy == "stop":
            self._stop(trainer, step, out)
        elif policy == "skip" and out.skipped:
            self._count_skipped(trainer, step)

    def _stop(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        t = trainer.cfg.trainer
        bad = ~torch.isfinite(out.loss_sum) | self._grad_norm_bad(trainer, out)
        checkpoint = due(step, t.checkpoint_every, t.max_steps)
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)
        every = t.nonfinite_check_every or t.log_every  # no host sync beyond the logging step's by default
        if due(step, every, t.max_steps) or checkpoint:
            first = int(self.first_bad)
            if first >= 0:
                raise NonFiniteLoss(
                    f"rank {trainer.rank}: the training loss or gradient norm is not finite (NaN or inf) at step "
                    f"{first}; the run "
                    f"stops (trainer.on_nonfinite=stop) and keeps its last complete checkpoint. Check the start "
                    f"model (trainer.init_from) for NaN weights, or lower optimizer.lr_peak "
                    f"({trainer.cfg.optimizer.lr_peak}) / enable trainer.grad_clip"
                )

    @staticmethod
    def _grad_norm_bad(trainer: Trainer, out: StepOutput) -> torch.Tensor:
        """Whether the step's global gradient norm is NaN/inf, as a device flag (no host sync). Every engine gives
        it at logging and checkpoint steps (:meth:`trainers.engines.base.Engine.backward`), so a checkpoint never
        holds weights stepped with a non-finite gradient; fp16 runs are left to the loss scaler, which skips
        overflowing steps itself."""
        if out.grad_norm is None or trainer.cfg.trainer.precision == "fp16":
            return torch.zeros((), dtype=torch.bool, device=trainer.device)
        return ~torch.isfinite(out.grad_norm)

    def _count_skipped(self, trainer: Trainer, step: int) -> None:
        t = trainer.cfg.trainer
        trainer.skipped_steps += 1
        if trainer.rank == 0:
            log.warning("step %d skipped: the training loss is not finite (NaN or inf) on some rank; no weight "
                        "changed (trainer.on_nonfinite=skip, %d of at most %d skipped steps)",
                        step, trainer.skipped_steps, t.max_skipped_steps)
        if trainer.skipped_steps > t.max_skipped_steps:
            raise NonFiniteLoss(
                f"rank {trainer.rank}: {trainer.skipped_steps} training steps were skipped for a non-finite loss "
                f"(NaN or inf), more than trainer.max_skipped_steps={t.max_skipped_steps}; the last at step "
                f"{step}. The run stops (trainer.on_nonfinite=skip) and keeps its last complete checkpoint. Lower "
                f"optimizer.lr_peak ({trainer.cfg.optimizer.lr_peak}) / enable trainer.grad_clip, "
                f"check the start model (trainer.init_from) for NaN weights, or raise "
                f"trainer.max_skipped_steps"
            )


def due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


class TrainLogger(Callback):
    """Every ``trainer.log_every`` steps: mean loss and objective metrics over ranks (one host sync),
    LR, throughput, MFU and the share of time spent waiting for data.

    ``trainer.on_nonfinite: skip``: the means are over the window's steps that were not skipped (a window of
    skipped steps only logs no ``train/loss``, rather than NaN), and ``train/skipped_steps`` is the run's
    count of skipped steps so far."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self._reset(None)

    def _reset(self, t0: float | None) -> None:
        self.loss, self.sums, self.n_micro, self.n_kept, self.wait_s, self.t0 = None, {}, 0, 0, 0.0, t0

    def on_step_end(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        if self.t0 is None:
            self.t0 = trainer.loop_start
        if not out.skipped:  # every rank skips the same steps: the same keys and counts on every rank
            self.loss = out.loss_sum if self.loss is None else self.loss + out.loss_sum
            for k, v in out.metric_sums.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.n_kept += out.n_micro
        self.n_micro += out.n_micro
        self.wait_s += out.wait_s
        t = trainer.cfg.trainer
        if due(step, t.log_every, t.max_steps):
            trainer.last_train_loss = self._log(trainer, step, time.perf_counter() - self.t0, out.grad_norm)
            self._reset(time.perf_counter())

    def _log(self, trainer: Trainer, step: int, dt: float, norm: torch.Tensor | None) -> float | None:
        """Logs the window's metrics; returns its mean training loss (None: every step was skipped).

        ``train/grad_norm`` is the logging step's global gradient norm before clipping; ``perf/mem_peak_gb`` the
        largest peak memory of any rank (:func:`trainers.engines.base.peak_memory_gb`)."""
        import torch.distributed as dist

        from trainers.engines.base import peak_memory_gb

        keys = sorted(self.sums)
        n = torch.tensor(float(self.n_kept), device=trainer.device)
        loss = self.loss if self.loss is not None else torch.zeros((), device=trainer.device)
        buf = torch.stack([loss, *(self.sums[k] for k in keys), n])
        dist.all_reduce(buf)
        peak = torch.tensor(peak_memory_gb(trainer.device), device=trainer.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        means = (buf[:-1] / buf[-1]).tolist()
        work = trainer.work
        units = self.n_micro * trainer.cfg.trainer.micro_batch_size * work.units_per_row  # this rank
        rate_rank = units / dt
        perf = {"train/loss": means[0]} if self.n_kept else {}
        perf.update({"lr": trainer.lr(step), f"perf/{work.unit}_per_s": rate_rank * trainer.world,
                     "data/wait_frac": self.wait_s / dt, "perf/mem_peak_gb": peak.item()})
        if norm is not None:
            perf["train/grad_norm"] = norm.item()
        if trainer.cfg.trainer.on_nonfinite == "skip":
            perf["train/skipped_steps"] = trainer.skipped_steps
        if len(trainer.batches.streams) > 1:  # a mixture: rows of each source so far (all ranks)
            perf.update({f"data/{name}/rows_seen": n for name, n in trainer.batches.seen.items()})
        if work.flops_per_unit:
            perf["perf/mfu"] = rate_rank * work.flops_per_unit / trainer.peak_flops
        trainer.sink.log(perf, step)
        if keys and self.n_kept:
            folded = trainer.objective.reduce_metrics(dict(zip(keys, means[1:], strict=True)))
            trainer.sink.log({f"train/{k}": v for k, v in folded.items()}, step)
        return means[0] if self.n_kept else None


class Evaluator(Callback):
    """``val/loss`` (the run's validation set) and ``val/<name>/loss`` (``data.eval_sets``, and every source of
    ``data.sources``) at step 0 (the untrained baseline) and every ``trainer.eval_every`` steps, plus the
    workload's extra evaluation (image probes). A mixture of ``data.sources`` has no validation set of its own:
    its ``val/loss`` is the weighted mean of the sources' (the loss on the mixture the run trains on)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        data = trainer.cfg.data
        self.vals = {n: trainer.eval_rows(n, data.eval_rows) for n in trainer.plan.eval_shards if n != "probe"}
        self.bank = trainer.eval_rows("probe", data.probe_rows) if "probe" in trainer.plan.eval_shards else None
        if trainer.state.step == 0:
            trainer.sink.log(self.evaluate_all(trainer), 0)

    def on_step_end(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        t = trainer.cfg.trainer
        if due(step, t.eval_every, t.max_steps):
            trainer.step_evals = self.evaluate_all(trainer)
            trainer.sink.log(trainer.step_evals, step)

    def evaluate_all(self, trainer: Trainer) -> dict[str, float]:
        out = {}
        for name, rows in self.vals.items():
            key = "val/loss" if name == "val" else f"val/{name.removeprefix('val:')}/loss"
            out[key] = trainer.evaluate(rows)
            out.update(trainer.work.extra_eval(trainer, name, rows, self.bank))
        mix = trainer.plan.mixture
        if "val" not in self.vals and mix and all(f"val/{n}/loss" in out for n in mix):
            out["val/loss"] = sum(w * out[f"val/{n}/loss"] for n, w in mix.items()) / sum(mix.values())
        return out


class Checkpointer(Callback):
    """Every ``trainer.checkpoint_every`` steps (and at the last): the engine state, ``train_state.json``
    and the consolidated export, persisted through the context; then every callback's ``on_checkpoint``."""

    def on_step_end(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        t = trainer.cfg.trainer
        if due(step, t.checkpoint_every, t.max_steps):
            self.save(trainer, step)

    def save(self, trainer: Trainer, step: int) -> None:
        from trainers.checkpoint import save_checkpoint, save_rng, write_marker

        t, st = trainer.cfg.trainer, trainer.state
        pos = trainer.batches.position()
        st.tokens_seen = step * t.rows_per_step * trainer.world * trainer.work.units_per_row  # images for images
        st.data_position = pos
        st.skipped_steps = trainer.skipped_steps
        st.mlflow_run_id = trainer.plan.mlflow_run_id
        st.declared_grad_accum_steps = trainer.plan.declared_grad_accum_steps
        st.config = trainer.cfg.model_dump(mode="json")
        metrics = {"step": step, f"{trainer.work.unit}_seen": st.tokens_seen, "data_epoch": pos.epoch}
        if trainer.last_train_loss is not None:
            metrics["train/loss"] = trainer.last_train_loss
        metrics.update(trainer.step_evals or {})
        with tempfile.TemporaryDirectory(prefix="rpt-ckpt-") as tmp:
            save_checkpoint(trainer.engine, tmp, state=st, export=trainer.work.export)
            save_rng(tmp, trainer.rank, trainer.gen)
            write_marker(tmp, rank=trainer.rank, world_size=trainer.world, step=step)  # last: this rank is done
            trainer.ctx.report(metrics, Path(tmp))
        committed = trainer.batches.take_committed()
        for cb in trainer.callbacks:
            cb.on_checkpoint(trainer, step, committed)
