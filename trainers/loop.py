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

from data.stream import DataPosition, StreamPlan, pieces_row_ids
from trainers.checkpoint import TrainState, load_checkpoint, save_checkpoint
from trainers.config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class FitPlan:
    """What the driver computed for this ``fit()``: data plan, tracking run, resolved sizes."""

    streams: dict[str, dict[str, Any]]  # "train" (+ "replay"): data.stream.StreamPlan as dicts
    start_step: int
    tokenizer_path: str
    vocab_size: int
    seq_len: int
    tracking_uri: str
    mlflow_run_id: str | None
    marker_path: str | None = None
    replay_per_micro: int = 0  # rows of each micro-batch drawn from the replay stream
    special_tokens: dict[str, int] = field(default_factory=dict)
    # evaluation sets {name: shard paths}, read directly (data.stream.read_rows): "val" (the run's own),
    # "val:<name>" (data.eval_sets) and, for image runs, "probe" (the labelled k-NN / NCM bank)
    eval_shards: dict[str, list[str]] = field(default_factory=dict)
    image: dict[str, Any] | None = None  # image data (image_size, channels, n_classes, class_names); None: tokens


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

        from trainers import schedules
        from trainers.engine import build_engine
        from trainers.metrics import MlflowSink, NullSink, peak_tflops
        from trainers.workload import workload_for

        self.cfg, self.plan, t = cfg, plan, cfg.trainer
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.streams = {name: StreamPlan.from_dict(d) for name, d in plan.streams.items()}
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.work = workload_for(cfg, plan)  # tokens -> decoder LM, or images -> ViT objective
        model = self.work.build_model()
        if t.init_from:
            self.work.init_weights(model, t.init_from)
        self.objective = self.work.build_objective()
        self.set_step = getattr(self.objective, "set_step", None)  # step-dependent objectives (HPM's ramp)
        self.schedule_params = cfg.schedule_params()
        lr_fn = schedules.get(cfg.schedule.name, **self.schedule_params)
        self.engine, self.optimizer, self.lr_sched = build_engine(model, t, cfg.optimizer, lr_fn)
        self.device = self.engine.device
        self.sink = MlflowSink(plan.tracking_uri, plan.mlflow_run_id) if self.rank == 0 and plan.mlflow_run_id else NullSink()
        self.flops_per_unit = self.work.flops_per_unit
        self.peak_flops = peak_tflops(t.peak_tflops, t.use_gpu) * 1e12
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.state = TrainState(step=plan.start_step, schedule=cfg.schedule_description())
        self.rows = {name: sp.start for name, sp in self.streams.items()}  # data position per stream
        mb = t.micro_batch_size
        self.micro_rows = {"train": mb - plan.replay_per_micro, **({"replay": plan.replay_per_micro} if "replay" in self.streams else {})}

    # ---- setup -------------------------------------------------------------------------------
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
        if ckpt is None and not self.cfg.trainer.resume_data_position:
            return  # a new task: the step, optimizer and LR go on, the data starts at the new stream's beginning
        pos = DataPosition.from_dict(self.state.data_position)
        if pos.world_size != self.world:
            raise ValueError(
                f"checkpoint was written by {pos.world_size} workers, this run has {self.world}: the data "
                "position is per rank; resume with the same trainer.num_workers"
            )
        restored = {"train": pos.rows_consumed, "replay": pos.replay_rows_consumed}
        for name, sp in self.streams.items():
            self.rows[name] = restored[name]
            if self.rows[name] < sp.start:
                raise RuntimeError(f"checkpoint position {self.rows[name]} of stream {name!r} precedes this fit's start {sp.start}")
        if self.rank == 0:
            log.info("resumed at step %d, data position %s", self.state.step, self.rows)

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

    def _val_rows(self, name: str, want: int) -> dict[str, torch.Tensor]:
        """This rank's slice of the first ``want`` rows of evaluation set ``name`` (equal count on every rank)."""
        from data.stream import read_rows

        cols = [c for c in self.work.columns if c != "row_id"]
        rows = {c: torch.from_numpy(v) for c, v in read_rows(self.plan.eval_shards[name], cols, want).items()}
        n = (len(rows[cols[0]]) // self.world) * self.world
        if n == 0:
            raise ValueError(f"dataset {name!r} has {len(rows[cols[0]])} rows, fewer than {self.world} workers")
        return {c: v[:n][self.rank :: self.world] for c, v in rows.items()}

    # ---- loop --------------------------------------------------------------------------------
    def fit(self) -> None:
        import ray.train

        t = self.cfg.trainer
        self._restore()
        if self.state.step >= t.max_steps:
            log.info("nothing to do: step %d >= max_steps %d", self.state.step, t.max_steps)
            return
        # Per stream: the rows this fit was planned to stream (from the fit's start), a cursor into
        # them (rows already committed since then, after a restart), and the Ray Data iterator.
        expected, cursor, iters = {}, {}, {}
        for name, sp in self.streams.items():
            mb = self.micro_rows[name]
            expected[name] = pieces_row_ids(sp.pieces(self.world, self.rank))
            cursor[name] = self.rows[name] - sp.start
            iters[name] = iter(
                ray.train.get_dataset_shard(name).iter_torch_batches(
                    batch_size=mb, drop_last=True, prefetch_batches=t.data_loader_prefetch
                )
            )
            for _ in range(cursor[name] // mb):  # restarted inside this fit: skip rows already committed
                next(iters[name])
        vals = {name: self._val_rows(name, self.cfg.data.eval_rows) for name in self.plan.eval_shards if name != "probe"}
        self.probe_rows = self._val_rows("probe", self.cfg.data.probe_rows) if "probe" in self.plan.eval_shards else None
        if self.state.step == 0:  # the baseline every later val/loss is compared with
            self.sink.log(self._evaluate_all(vals), 0)

        committed: dict[str, list[np.ndarray]] = {name: [] for name in self.streams}
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        n_micro, wait_s, t_window = 0, 0.0, time.perf_counter()
        while self.state.step < t.max_steps:
            for _ in range(t.grad_accum_steps):
                t0 = time.perf_counter()
                parts = []
                for name, it in iters.items():
                    batch = next(it)
                    ids = batch["row_id"].numpy()
                    mb = self.micro_rows[name]
                    if not np.array_equal(ids, expected[name][cursor[name] : cursor[name] + mb]):
                        raise RuntimeError(
                            f"rank {self.rank}: stream {name!r} diverged from the plan at position {self.rows[name]} "
                            f"(got row ids {ids[:4]}..., expected {expected[name][cursor[name]:cursor[name] + 4]}...)"
                        )
                    cursor[name] += mb
                    self.rows[name] += mb
                    committed[name].append(ids)
                    parts.append(batch)
                wait_s += time.perf_counter() - t0
                if self.set_step is not None:
                    self.set_step(self.state.step)
                prepared = self.objective.prepare(self.work.inputs(parts, self.device), self.gen)
                loss, metrics = self.objective.loss(self.engine, prepared)
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += loss.detach().float()
                for k, v in metrics.items():  # device tensors: no host sync until the logging step
                    metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().float()
                n_micro += 1
            self.state.step += 1
            step = self.state.step

            if t.fail_at_step and step == t.fail_at_step and self.rank == 1 % self.world:
                self._maybe_inject_failure(step)
            if step % t.log_every == 0 or step == t.max_steps:
                dt = time.perf_counter() - t_window
                self._log_train(loss_sum, metric_sums, n_micro, wait_s, dt, step)
                loss_sum.zero_()
                metric_sums = {}
                n_micro, wait_s, t_window = 0, 0.0, time.perf_counter()
            evals = None
            if step % t.eval_every == 0 or step == t.max_steps:
                evals = self._evaluate_all(vals)
                self.sink.log(evals, step)
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                self._checkpoint(step, evals, committed)
                committed = {name: [] for name in self.streams}

    def _evaluate_all(self, vals: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
        """``val/loss`` for the run's own validation set, ``val/<name>/loss`` for the others; image runs add
        ``probe/knn_acc`` and ``probe/ncm_acc`` (and CLIP ``probe/zero_shot_acc``) on the run's own set."""
        out = {}
        for name, rows in vals.items():
            key = "val/loss" if name == "val" else f"val/{name.removeprefix('val:')}/loss"
            out[key] = self.evaluate(rows)
            out.update(self.work.extra_eval(self, name, rows))
        return out

    def _log_train(
        self, loss_sum: torch.Tensor, metric_sums: dict[str, torch.Tensor], n_micro: int, wait_s: float, dt: float,
        step: int,
    ) -> None:
        import torch.distributed as dist

        # One host sync per logging step: the mean loss (and the objective's metrics) over ranks.
        keys = sorted(metric_sums)
        buf = torch.stack([loss_sum, *(metric_sums[k] for k in keys), torch.tensor(float(n_micro), device=self.device)])
        dist.all_reduce(buf)
        means = (buf[:-1] / buf[-1]).tolist()
        loss = means[0]
        units = n_micro * self.cfg.trainer.micro_batch_size * self.work.units_per_row  # tokens or images, this rank
        rate_rank = units / dt
        perf = {
            "train/loss": loss,
            "lr": self.lr_sched.get_last_lr()[0],
            f"perf/{self.work.unit}_per_s": rate_rank * self.world,
            "data/wait_frac": wait_s / dt,
        }
        if self.flops_per_unit:
            perf["perf/mfu"] = rate_rank * self.flops_per_unit / self.peak_flops
        self.sink.log(perf, step)
        if keys:
            extra = {f"train/{k}": v for k, v in zip(keys, means[1:], strict=True)}
            for k in keys:  # per-part losses reported as (sum, count) pairs, e.g. UL2's denoisers
                if k.endswith("/ce_sum") and (cnt := k.removesuffix("/ce_sum") + "/tokens") in keys:
                    extra[f"train/{k.removesuffix('/ce_sum')}/ce"] = extra[f"train/{k}"] / max(extra[f"train/{cnt}"], 1e-9)
            self.sink.log(extra, step)
        self.last_train_loss = loss

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
            loss, _ = self.objective.loss(self.engine, self.objective.prepare(inputs, None))
            total += torch.stack([loss.float() * n, torch.tensor(float(n), device=self.device)])
        self.engine.train()
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def _checkpoint(self, step: int, evals: dict[str, float] | None, committed: dict[str, list[np.ndarray]]) -> None:
        import ray.train
        from ray.train import Checkpoint

        t = self.cfg.trainer
        train = self.streams["train"]
        pos = DataPosition(
            rows_consumed=self.rows["train"],
            world_size=self.world,
            seed=train.seed,
            epoch_rows=sum(s.rows for s in train.shards) // self.world,
            replay_rows_consumed=self.rows.get("replay", 0),
        )
        self.state.tokens_seen = step * t.rows_per_step * self.world * self.work.units_per_row  # images for image runs
        self.state.data_position = pos.to_dict()
        self.state.mlflow_run_id = self.plan.mlflow_run_id
        self.state.config = self.cfg.model_dump(mode="json")
        metrics = {"step": step, f"{self.work.unit}_seen": self.state.tokens_seen, "data_epoch": pos.epoch}
        if getattr(self, "last_train_loss", None) is not None:
            metrics["train/loss"] = self.last_train_loss
        metrics.update(evals or {})
        with tempfile.TemporaryDirectory(prefix="rpt-ckpt-") as tmp:
            save_checkpoint(self.engine, tmp, state=self.state, zero_stage=t.zero_stage, export=self.work.export)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        if t.audit_dir:
            # Written after the report returned, i.e. once the rows are part of a persisted checkpoint.
            Path(t.audit_dir).mkdir(parents=True, exist_ok=True)
            for name, parts in committed.items():
                if parts:
                    prefix = "" if name == "train" else f"{name}-"
                    np.save(Path(t.audit_dir, f"{prefix}rank{self.rank}-step{step:08d}.npy"), np.concatenate(parts))

    def _maybe_inject_failure(self, step: int) -> None:
        marker = self.plan.marker_path
        if marker and not os.path.exists(marker):
            Path(marker).write_text(f"failure injected at step {step}\n")
            raise RuntimeError(f"injected failure at step {step} on rank {self.rank} (trainer.fail_at_step)")
