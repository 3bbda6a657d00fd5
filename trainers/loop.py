"""The Ray Train worker loop: stream -> objective -> DeepSpeed step -> metrics -> checkpoints.

Reads top to bottom like the pseudocode in DESIGN.md. Everything objective- or schedule-specific
lives in ``objectives/`` and ``trainers/schedules.py``; this loop only sees their interfaces.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.stream import DataPosition, Shard, pieces_row_ids, rank_pieces
from trainers.checkpoint import TrainState, load_checkpoint, save_checkpoint
from trainers.config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class FitPlan:
    """What the driver computed for this ``fit()``: data plan, tracking run, resolved sizes."""

    shards: list[dict[str, Any]]
    start_rows: int  # data position (rows per rank) at the start of this fit
    start_step: int
    tokenizer_path: str
    vocab_size: int
    seq_len: int
    tracking_uri: str
    mlflow_run_id: str | None
    marker_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (``TorchTrainer(train_loop_per_worker, ...)``)."""
    cfg = RunConfig.model_validate(config["run"])  # typed at the boundary
    plan = FitPlan(**config["fit"])
    Trainer(cfg, plan).fit()


class Trainer:
    def __init__(self, cfg: RunConfig, plan: FitPlan):
        import ray.train

        import models
        import objectives
        from trainers import schedules
        from trainers.engine import build_engine
        from trainers.metrics import MlflowSink, NullSink, peak_tflops

        self.cfg, self.plan, t = cfg, plan, cfg.trainer
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.shards = [Shard(**s) for s in plan.shards]
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.model_cfg = cfg.model.resolve(vocab_size=plan.vocab_size, max_seq_len=plan.seq_len)
        model = models.build(self.model_cfg)
        if t.init_from:
            self._init_weights(model, t.init_from)
        self.objective = objectives.get(cfg.objective.name, **cfg.objective.params)
        self.schedule_params = cfg.schedule_params()
        lr_fn = schedules.get(cfg.schedule.name, **self.schedule_params)
        self.engine, self.optimizer, self.lr_sched = build_engine(model, t, cfg.optimizer, lr_fn)
        self.device = self.engine.device
        self.sink = MlflowSink(plan.tracking_uri, plan.mlflow_run_id) if self.rank == 0 and plan.mlflow_run_id else NullSink()
        self.flops_per_token = models.flops_per_token(self.model_cfg, plan.seq_len)
        self.peak_flops = peak_tflops(t.peak_tflops, t.use_gpu) * 1e12
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.state = TrainState(step=plan.start_step, schedule=cfg.schedule_description())
        self.rows = plan.start_rows

    # ---- setup -------------------------------------------------------------------------------
    def _init_weights(self, model: torch.nn.Module, path: str) -> None:
        """Weights only (continual pre-training start): a checkpoint folder's consolidated weights."""
        from models.io import load_pretrained

        src, _ = load_pretrained(path)
        model.load_state_dict(src.state_dict())

    def _restore(self) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:  # this run's own latest checkpoint (restart after a failure, or --resume)
            with ckpt.as_directory() as d:
                self.state = load_checkpoint(self.engine, d)
        elif self.cfg.trainer.resume_from:  # a new run continuing another run's full state
            self.state = load_checkpoint(self.engine, self.cfg.trainer.resume_from)
        else:
            return
        self._apply_schedule_change()
        pos = DataPosition.from_dict(self.state.data_position)
        if pos.world_size != self.world:
            raise ValueError(
                f"checkpoint was written by {pos.world_size} workers, this run has {self.world}: the data "
                "position is per rank; resume with the same trainer.num_workers"
            )
        self.rows = pos.rows_consumed
        if self.rows < self.plan.start_rows:
            raise RuntimeError(f"checkpoint data position {self.rows} precedes this fit's start {self.plan.start_rows}")
        if self.rank == 0:
            log.info("resumed at step %d, rows_consumed=%d", self.state.step, self.rows)

    def _apply_schedule_change(self) -> None:
        """Make the configured schedule and peak LR govern from the restored step on.

        LambdaLR's state (restored by DeepSpeed) carries the checkpoint's schedule parameters and
        base LR; continuing under another schedule (a new task, an anneal branch) is an explicit config
        choice, so the config wins and the change is logged with the LR before and after.
        """
        from trainers import schedules

        new = self.cfg.schedule_description()
        peak = self.cfg.optimizer.lr_peak
        old = self.state.schedule
        step = self.state.step
        lr_before = self.lr_sched.get_last_lr()[0]
        if old == new and all(b == peak for b in self.lr_sched.base_lrs):
            return
        fn = schedules.get(new["name"], **new["params"])
        self.lr_sched.lr_lambdas = [fn] * len(self.lr_sched.lr_lambdas)
        self.lr_sched.base_lrs = [peak] * len(self.lr_sched.base_lrs)
        lr_after = peak * fn(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_after
        self.lr_sched._last_lr = [lr_after] * len(self.optimizer.param_groups)
        self.state.schedule = new
        if self.rank == 0:
            log.warning(
                "schedule changed at step %d: %s -> %s; LR %.6g -> %.6g",
                step, json.dumps(old, sort_keys=True), json.dumps(new, sort_keys=True), lr_before, lr_after,
            )

    def _val_rows(self) -> torch.Tensor:
        """This rank's slice of the first ``eval_rows`` validation rows (equal count on every rank)."""
        import ray.train

        want = self.cfg.data.eval_rows
        got = []
        for batch in ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=min(want, 1024), dtypes=torch.long):
            got.append(batch["tokens"])
            if sum(len(x) for x in got) >= want:
                break
        rows = torch.cat(got)[:want]
        n = (len(rows) // self.world) * self.world
        if n == 0:
            raise ValueError(f"validation split has {len(rows)} rows, fewer than {self.world} workers")
        return rows[:n][self.rank :: self.world]

    # ---- loop --------------------------------------------------------------------------------
    def fit(self) -> None:
        import ray.train

        t = self.cfg.trainer
        self._restore()
        B, mb = t.rows_per_step, t.micro_batch_size
        remaining = t.max_steps - self.state.step
        if remaining <= 0:
            log.info("nothing to do: step %d >= max_steps %d", self.state.step, t.max_steps)
            return
        # The plan this fit streams (from the fit's start) and the rows already committed since then.
        expected = pieces_row_ids(
            rank_pieces(
                self.shards,
                world_size=self.world,
                rank=self.rank,
                seed=self.cfg.seed,
                start=self.plan.start_rows,
                count=(t.max_steps - self.plan.start_step) * B,
            )
        )
        cursor = self.rows - self.plan.start_rows
        val = self._val_rows()
        it = iter(
            ray.train.get_dataset_shard("train").iter_torch_batches(
                batch_size=mb, drop_last=True, prefetch_batches=t.data_loader_prefetch
            )
        )
        for _ in range(cursor // mb):  # restarted inside this fit: skip rows already committed
            next(it)

        if self.state.step == 0:  # the baseline every later val/loss is compared with
            self.sink.log({"val/loss": self.evaluate(val)}, 0)
        committed: list[np.ndarray] = []
        loss_sum = torch.zeros((), device=self.device)
        n_micro, wait_s, t_window = 0, 0.0, time.perf_counter()
        while self.state.step < t.max_steps:
            for _ in range(t.grad_accum_steps):
                t0 = time.perf_counter()
                batch = next(it)
                wait_s += time.perf_counter() - t0
                ids = batch["row_id"].numpy()
                if not np.array_equal(ids, expected[cursor : cursor + mb]):
                    raise RuntimeError(
                        f"rank {self.rank}: data stream diverged from the plan at position {self.rows} "
                        f"(got row ids {ids[:4]}..., expected {expected[cursor:cursor + 4]}...)"
                    )
                cursor += mb
                committed.append(ids)
                tokens = batch["tokens"].to(self.device, dtype=torch.long, non_blocking=True)
                prepared = self.objective.prepare({"tokens": tokens}, self.gen)
                loss, _ = self.objective.loss(self.engine, prepared)
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += loss.detach().float()
                n_micro += 1
            self.state.step += 1
            self.rows += B
            step = self.state.step

            if t.fail_at_step and step == t.fail_at_step and self.rank == 1 % self.world:
                self._maybe_inject_failure(step)
            if step % t.log_every == 0 or step == t.max_steps:
                dt = time.perf_counter() - t_window
                self._log_train(loss_sum, n_micro, wait_s, dt, step)
                loss_sum.zero_()
                n_micro, wait_s, t_window = 0, 0.0, time.perf_counter()
            val_loss = None
            if step % t.eval_every == 0 or step == t.max_steps:
                val_loss = self.evaluate(val)
                self.sink.log({"val/loss": val_loss}, step)
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                self._checkpoint(step, val_loss, committed)
                committed = []

    def _log_train(self, loss_sum: torch.Tensor, n_micro: int, wait_s: float, dt: float, step: int) -> None:
        import torch.distributed as dist

        # One host sync per logging step: the mean loss over ranks.
        buf = torch.stack([loss_sum, torch.tensor(float(n_micro), device=self.device)])
        dist.all_reduce(buf)
        loss = (buf[0] / buf[1]).item()
        tokens = n_micro * self.cfg.trainer.micro_batch_size * self.plan.seq_len  # this rank
        tps_rank = tokens / dt
        self.sink.log(
            {
                "train/loss": loss,
                "lr": self.lr_sched.get_last_lr()[0],
                "perf/tokens_per_s": tps_rank * self.world,
                "perf/mfu": tps_rank * self.flops_per_token / self.peak_flops,
                "data/wait_frac": wait_s / dt,
            },
            step,
        )
        self.last_train_loss = loss

    @torch.no_grad()
    def evaluate(self, val: torch.Tensor) -> float:
        """Mean validation loss over every rank's slice (same number of batches on every rank)."""
        import torch.distributed as dist

        self.engine.eval()
        mb = self.cfg.trainer.micro_batch_size
        total = torch.zeros(2, device=self.device)
        for i in range(0, len(val), mb):
            tokens = val[i : i + mb].to(self.device)
            loss, _ = self.objective.loss(self.engine, self.objective.prepare({"tokens": tokens}, None))
            total += torch.stack([loss.float() * len(tokens), torch.tensor(float(len(tokens)), device=self.device)])
        self.engine.train()
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def _checkpoint(self, step: int, val_loss: float | None, committed: list[np.ndarray]) -> None:
        import ray.train
        from ray.train import Checkpoint

        t = self.cfg.trainer
        pos = DataPosition(
            rows_consumed=self.rows,
            world_size=self.world,
            seed=self.cfg.seed,
            epoch_rows=sum(s.rows for s in self.shards) // self.world,
        )
        self.state.tokens_seen = step * t.rows_per_step * self.world * self.plan.seq_len
        self.state.data_position = pos.to_dict()
        self.state.mlflow_run_id = self.plan.mlflow_run_id
        self.state.config = self.cfg.model_dump(mode="json")
        metrics = {"step": step, "tokens_seen": self.state.tokens_seen, "data_epoch": pos.epoch}
        if getattr(self, "last_train_loss", None) is not None:
            metrics["train/loss"] = self.last_train_loss
        if val_loss is not None:
            metrics["val/loss"] = val_loss
        with tempfile.TemporaryDirectory(prefix="rpt-ckpt-") as tmp:
            save_checkpoint(
                self.engine,
                tmp,
                state=self.state,
                zero_stage=t.zero_stage,
                model_cfg=self.model_cfg,
                tokenizer_path=self.plan.tokenizer_path,
            )
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        if t.audit_dir and committed:
            # Written after the report returned, i.e. once the rows are part of a persisted checkpoint.
            Path(t.audit_dir).mkdir(parents=True, exist_ok=True)
            np.save(Path(t.audit_dir, f"rank{self.rank}-step{step:08d}.npy"), np.concatenate(committed))

    def _maybe_inject_failure(self, step: int) -> None:
        marker = self.plan.marker_path
        if marker and not os.path.exists(marker):
            Path(marker).write_text(f"failure injected at step {step}\n")
            raise RuntimeError(f"injected failure at step {step} on rank {self.rank} (trainer.fail_at_step)")
