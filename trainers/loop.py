"""The training loop of one worker: planned stream -> objective -> engine step -> callbacks.

::

    restore (own latest checkpoint, or trainer.resume_from) -> open the planned streams
    for each optimizer step:
        LR = lr_peak * schedule(step); objective.set_step(step)
        for each micro-batch: parts = planned streams' next rows (checked); loss = objective(engine, parts)
            (trainer.on_nonfinite=skip: a NaN/inf loss on any rank -> a zero loss, and the step at LR 0)
            backward; engine step (the optimizer steps at the accumulation boundary)
        callbacks: [*extra, NonFiniteGuard, TrainLogger, Evaluator, Checkpointer]

Everything data-kind specific comes from the workload (:mod:`trainers.workloads`), everything
objective-specific from the objective's hooks (:mod:`objectives.hooks`), the schedule is a pure function
of the step (:mod:`trainers.schedules`), and the runtime (rank, streams, checkpoint reporting) from a
context (:mod:`trainers.context`): Ray Train's in production, an in-memory one in unit tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.mixture import Mixture
from data.stream import StreamPlan
from trainers.batches import PlannedBatches
from trainers.callbacks import Callback, Checkpointer, Evaluator, NonFiniteGuard, StepOutput, TrainLogger, due
from trainers.checkpoint import CheckpointDir, TrainState, load_checkpoint, load_rng
from trainers.config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class FitPlan:
    """What the driver computed for this ``fit()``: the workload kind and its data facts, the data plan,
    the tracking run."""

    kind: str  # trainers.workloads spec: "text" or "images"
    streams: dict[str, dict[str, Any]]  # per planned stream (source): data.stream.StreamPlan as dicts
    start_step: int
    tracking_uri: str
    mlflow_run_id: str | None
    mixture: dict[str, float] = field(default_factory=dict)  # stream -> weight (data.mixture); empty: one stream
    mixed_start: int = 0  # the mixture's position (rows per rank) at this fit's start
    # evaluation sets {name: shard paths}, read directly (data.stream.read_rows): "val" (the run's own),
    # "val:<name>" (data.eval_sets) and the workload's own (the image probes' "probe" bank)
    eval_shards: dict[str, list[str]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # the workload's facts (DataFacts.fields)
    checkpoints: CheckpointDir | None = None  # the run's checkpoint folder (restart / --resume restore)
    declared_grad_accum_steps: int | None = None  # the config's, when the driver rescaled it (kept global batch)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (``TorchTrainer(train_loop_per_worker, ...)``)."""
    from trainers.context import RayTrainContext

    cfg = RunConfig.model_validate(config["run"])  # typed at the boundary
    plan = FitPlan(**config["fit"])
    Trainer(cfg, plan, RayTrainContext(plan.checkpoints), config.get("callbacks", ())).fit()


class Trainer:
    def __init__(self, cfg: RunConfig, plan: FitPlan, ctx, callbacks: Sequence[Callback] = ()):
        from trainers import engines, schedules, workloads
        from trainers.metrics import AsyncMlflowSink, NullSink, peak_tflops, system_monitor

        self.cfg, self.plan, self.ctx, t = cfg, plan, ctx, cfg.trainer
        self.rank, self.world = ctx.rank, ctx.world
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.work = workloads.get(plan.kind).worker(cfg, plan)
        model = self.work.build_model()
        if t.init_from:
            self.work.init_weights(model, t.init_from)
        self.objective = self.work.build_objective()
        self.lr_fn = schedules.get(cfg.schedule.name, **cfg.schedule_params())
        self.engine = engines.build(model, t, cfg.optimizer)
        self.device = self.engine.device
        spill = (plan.checkpoints.fs, plan.checkpoints.run_dir) if plan.checkpoints is not None else None
        self.sink = (AsyncMlflowSink(plan.tracking_uri, plan.mlflow_run_id, spill=spill,
                                     flush_timeout_s=cfg.tracking.flush_timeout_s)
                     if self.rank == 0 and plan.mlflow_run_id else NullSink())
        self.monitor = (system_monitor(plan.tracking_uri, plan.mlflow_run_id, cfg.tracking.system_metrics_every_s)
                        if self.rank == 0 and plan.mlflow_run_id else None)
        self.peak_flops = peak_tflops(t.peak_tflops, t.use_gpu) * 1e12
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.state = TrainState(step=plan.start_step, schedule=cfg.schedule_description())
        streams = {name: StreamPlan.from_dict(d) for name, d in plan.streams.items()}
        mixture = Mixture.from_dict(plan.mixture or {name: 1.0 for name in streams})
        self.batches = PlannedBatches(streams, mixture, plan.mixed_start, t.micro_batch_size, rank=self.rank,
                                      world=self.world)
        # the validation set the workload's extra evaluation (image probes) runs on: the run's own, or with
        # data.sources the first source's
        self.main_val = "val" if "val" in plan.eval_shards or not cfg.data.sources else f"val:{cfg.data.sources[0].name}"
        self.callbacks = [*callbacks, NonFiniteGuard(), TrainLogger(), Evaluator(), Checkpointer()]
        self.last_train_loss: float | None = None
        self.skipped_steps = 0  # steps skipped for a non-finite loss (on_nonfinite=skip), saved in checkpoints
        self.step_evals: dict[str, float] | None = None
        self.loop_start = time.perf_counter()

    def lr(self, step: int) -> float:
        """The LR of the optimizer step taken at global step ``step``: a pure function of the step."""
        return self.cfg.optimizer.lr_peak * self.lr_fn(step)

    # ---- setup -------------------------------------------------------------------------------
    def _restore(self) -> None:
        """This run's own latest checkpoint (restart after a failure, or ``--resume``), else
        ``trainer.resume_from`` (a new run continuing another run's full state: a new task, an anneal branch)."""
        t = self.cfg.trainer
        with self.ctx.latest_checkpoint() as own, self._resume_source(own) as src:
            if src is None:
                return
            self.state = load_checkpoint(self.engine, src, world=self.world)
            if own is None:
                self.state.skipped_steps = 0  # a new run (resume_from) counts its own skipped steps
            self.skipped_steps = self.state.skipped_steps
            pos = self.state.data_position
            continues = own is not None or t.resume_data_position  # not a new task (which seeds its own)
            if continues and (pos is None or pos.world_size == self.world):
                load_rng(src, self.rank, self.gen)  # the same random draws as an undisturbed run
        self._note_schedule_change()
        if own is None and not t.resume_data_position:
            return  # a new task: step, optimizer and LR go on, the data starts at the new stream's beginning
        self.batches.restore(self.state.data_position)
        if self.rank == 0:
            log.info("resumed at step %d, data position %s", self.state.step, self.batches.rows)

    @contextlib.contextmanager
    def _resume_source(self, own: Path | None) -> Iterator[Path | str | None]:
        """What to restore: the run's own checkpoint, else ``trainer.resume_from`` (a URI such as ``s3://...`` is
        read through the run's storage filesystem into a temporary folder, as the run's own checkpoints are)."""
        src = self.cfg.trainer.resume_from
        if own is not None or src is None or "://" not in src:
            yield own if own is not None else src
            return
        with self.plan.checkpoints.local(src.split("://", 1)[1]) as local:
            yield local

    def _note_schedule_change(self) -> None:
        """The configured schedule and peak LR govern from the restored step on (the step and the config are
        the truth; no scheduler state is restored). Continuing under another schedule is an explicit config
        choice (a new task, an anneal branch), logged with the LR before and after."""
        from trainers import schedules

        old, new, step = self.state.schedule, self.cfg.schedule_description(), self.state.step
        old_peak = self.state.config.get("optimizer", {}).get("lr_peak", self.cfg.optimizer.lr_peak)
        if (old, old_peak) != (new, self.cfg.optimizer.lr_peak) and self.rank == 0:
            before = old_peak * schedules.get(old["name"], **old["params"])(step) if old else float("nan")
            log.warning("schedule changed at step %d: %s -> %s; LR %.6g -> %.6g", step,
                        json.dumps(old, sort_keys=True), json.dumps(new, sort_keys=True), before, self.lr(step))
        self.state.schedule = new

    def eval_rows(self, name: str, want: int) -> dict[str, torch.Tensor]:
        """This rank's slice of the first ``want`` rows of evaluation set ``name`` (equal count on every rank)."""
        from data.stream import read_rows
        from trainers import workloads

        cols = [c for c in workloads.get(self.plan.kind).columns if c != "row_id"]
        rows = {c: torch.from_numpy(v) for c, v in read_rows(self.plan.eval_shards[name], cols, want).items()}
        n = (len(rows[cols[0]]) // self.world) * self.world
        if n == 0:
            raise ValueError(f"dataset {name!r} has {len(rows[cols[0]])} rows, fewer than {self.world} workers")
        return {c: v[:n][self.rank :: self.world] for c, v in rows.items()}

    # ---- loop --------------------------------------------------------------------------------
    def fit(self) -> None:
        try:
            self._fit()
        except BaseException:
            self.sink.close(timeout_s=5.0)  # what it could not send is kept for the driver; the error goes on
            raise
        finally:
            if self.monitor is not None:
                self.monitor.finish()
        self.sink.close()

    def _fit(self) -> None:
        t = self.cfg.trainer
        self._restore()
        if self.state.step >= t.max_steps:
            log.info("nothing to do: step %d >= max_steps %d", self.state.step, t.max_steps)
            return
        self.batches.open(self.ctx, t.data_loader_prefetch, (t.max_steps - self.plan.start_step) * t.grad_accum_steps)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        self.loop_start = time.perf_counter()
        while self.state.step < t.max_steps:
            out = self.train_step()
            self.state.step += 1
            self.step_evals = None
            for cb in self.callbacks:
                cb.on_step_end(self, self.state.step, out)

    def train_step(self) -> StepOutput:
        """One optimizer step over ``grad_accum_steps`` micro-batches; sums stay on the device.

        ``trainer.on_nonfinite: skip``: each micro-batch's loss is checked on every rank before its backward
        (:meth:`_nonfinite_on_any_rank`: one all-reduce and one host sync per micro-batch, the price of
        ``skip``; ``stop`` and ``ignore`` add none). A non-finite loss on any rank leaves that micro-batch out
        of the backward (:meth:`trainers.engines.base.Engine.backward` with ``None``) and skips the whole step:
        it runs at LR 0 and changes no weight. The step's rows are consumed like any other's (never repeated);
        :class:`trainers.callbacks.NonFiniteGuard` counts the step and enforces ``trainer.max_skipped_steps``,
        :class:`trainers.callbacks.TrainLogger` leaves its loss out.

        The gradient norm (before clipping) is asked for at logging steps and before checkpoints; engines that
        compute it anyway return it at every step.
        """
        t = self.cfg.trainer
        step, skip = self.state.step, t.on_nonfinite == "skip"
        self.engine.set_lr(self.lr(step))
        self.objective.set_step(step)
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        wait_s, skipped, norm = 0.0, False, None
        want_norm = due(step + 1, t.log_every, t.max_steps) or due(step + 1, t.checkpoint_every, t.max_steps)
        for i in range(t.grad_accum_steps):
            boundary = i == t.grad_accum_steps - 1
            t0 = time.perf_counter()
            parts = self.batches.next()
            wait_s += time.perf_counter() - t0
            with self.engine.micro_batch(boundary):
                prepared = self.objective.prepare(self.work.inputs(parts, self.device), self.gen)
                loss, metrics = self.objective.loss(self.engine.model, prepared)
                left_out = skip and self._nonfinite_on_any_rank(loss)
                if left_out:
                    skipped = True
                    self.engine.set_lr(0.0)  # before the boundary's optimizer step: no weight changes
                norm = self.engine.backward(None if left_out else loss, boundary=boundary, want_norm=want_norm)
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        return StepOutput(loss_sum, sums, t.grad_accum_steps, wait_s, skipped, norm)

    def _nonfinite_on_any_rank(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is NaN/inf on any rank: a flag all-reduced (MAX) over the process group and read
        on the host, so every rank takes the same branch."""
        import torch.distributed as dist

        flag = (~torch.isfinite(loss.detach())).any().float()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @torch.no_grad()
    def evaluate(self, val: dict[str, torch.Tensor]) -> float:
        """Mean validation loss over every rank's slice (same number of batches on every rank).

        ``prepare(..., None)``: objectives draw masks / views from a fixed seed, so every eval sees the same ones.
        """
        import torch.distributed as dist

        self.engine.eval()
        mb = self.cfg.trainer.micro_batch_size
        total = torch.zeros(2, device=self.device)
        n_rows = len(next(iter(val.values())))
        for i in range(0, n_rows, mb):
            inputs = self.work.inputs([{k: v[i : i + mb] for k, v in val.items()}], self.device)
            n = len(next(iter(inputs.values())))
            loss, _ = self.objective.loss(self.engine.model, self.objective.prepare(inputs, None))
            total += torch.stack([loss.float() * n, torch.tensor(float(n), device=self.device)])
        self.engine.train()
        dist.all_reduce(total)
        return (total[0] / total[1]).item()
