"""Continual pre-training over a sequence of tasks (``rpt continual CONFIG``).

Each task is one Ray Train fit that continues the previous task's full state (global step,
optimizer, LR schedule; Ibrahim et al. 2024, arXiv 2403.08763) on the new task's data, optionally
mixed with replay of earlier tasks. After each task the model is evaluated on every task's
validation set, filling ``L[i][j]`` (metrics in cluster/continual_metrics.py), and registered with the
alias ``task-i``. With a schedule that has a constant phase (capability ``anneal_branch``: the infinite
schedule) an anneal branch of each task is trained and evaluated too (``task-i-annealed``); the main
line continues from the pre-anneal checkpoint at η_const.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster import tracking
from cluster.config import ConfigError, apply_overrides, load_raw, validate_config
from cluster.continual_metrics import summary
from trainers import schedules
from trainers.config import DataSpec, OptimizerSpec, TrackingSpec, TrainerSpec

log = logging.getLogger(__name__)


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    data: DataSpec
    steps: int = Field(ge=1, description="optimizer steps of this task")
    replay_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of the rows replayed from earlier tasks "
                                   "(a two-source mixture: within one row of it at every micro-batch)")
    replay_tasks: list[str] | None = Field(None, description="earlier tasks replayed (default: all earlier)")


class ContinualConfig(BaseModel):
    """A sequence of tasks trained one after the other, with one schedule spanning all of them."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    storage_path: str = "results"
    start: str | None = Field(
        None, description="None (scratch), an export/checkpoint folder, a Hugging Face folder, or models:/NAME@ALIAS"
    )
    tasks: list[TaskSpec] = Field(min_length=1)
    schedule: dict[str, Any] = Field(description="name + params; task_steps/total_steps are filled from the tasks")
    anneal_steps: int = Field(0, ge=0, description="anneal branch length after each task (0: none); needs a "
                              "schedule with a constant phase (capability anneal_branch, e.g. infinite)")
    model: dict[str, Any] = Field(default_factory=lambda: {"preset": "debug"})
    vit: dict[str, Any] | None = Field(None, description="image objectives (mae, simclr, ...): the ViT encoder")
    objective: dict[str, Any] = Field(default_factory=lambda: {"name": "causal_lm"})
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _check(self) -> ContinualConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for i, t in enumerate(self.tasks):
            if t.data.sources:
                raise ValueError(f"tasks[{i}].data.sources: a continual task trains on one folder (data.path); "
                                 "mixtures are for single runs, and the earlier tasks are mixed in by replay_fraction")
            for r in t.replay_tasks or []:
                if r not in names[:i]:
                    raise ValueError(f"tasks[{i}].replay_tasks: {r!r} is not an earlier task (earlier: {names[:i]})")
        if self.anneal_steps:
            branching = schedules.with_capability("anneal_branch")
            if self.schedule.get("name") not in branching:
                raise ValueError(f"anneal_steps > 0 needs schedule.name: {' | '.join(branching)} "
                                 "(anneal branches of the constant phase)")
            start, _ = schedules.get(self.schedule["name"], **self.schedule_params()).constant_phase()
            if start > self.tasks[0].steps:
                raise ValueError(
                    f"anneal_steps={self.anneal_steps}: task 0 ends at step {self.tasks[0].steps}, before the constant "
                    f"phase starts (step {start}); anneal branches start in the constant phase: shorten the phases "
                    "before it (warmup, cooldown) or lengthen task 0"
                )
        for i in range(len(self.tasks)):  # every task config must validate, on the driver
            self.task_config(i, previous_checkpoint="/dev/null" if i else None)
        return self

    @property
    def task_steps(self) -> list[int]:
        return [t.steps for t in self.tasks]

    def schedule_params(self) -> dict[str, Any]:
        """The schedule's params, with ``task_steps`` / ``total_steps`` filled from the tasks where it takes them."""
        s = {k: v for k, v in self.schedule.items() if k != "name"}
        name = self.schedule["name"]
        if name in schedules.with_capability("task_boundaries"):
            s.setdefault("task_steps", self.task_steps)
        if schedules.has_param(name, "total_steps"):
            s.setdefault("total_steps", sum(self.task_steps))
        return s

    def task_config(self, i: int, *, previous_checkpoint: str | None, start_folder: str | None = None):
        """The run config of task ``i`` (validated)."""
        task = self.tasks[i]
        data = task.data.model_dump(mode="json")
        data["eval_sets"] = {t.name: t.data.root for t in self.tasks}
        if task.replay_fraction > 0:
            earlier = task.replay_tasks if task.replay_tasks is not None else [t.name for t in self.tasks[:i]]
            paths = [t.data.root for t in self.tasks if t.name in earlier]
            data["replay"] = {"fraction": task.replay_fraction, "paths": paths, "seed": self.seed + 1000 + i}
        trainer = self.trainer.model_dump(mode="json")
        trainer["max_steps"] = sum(self.task_steps[: i + 1])
        if i == 0:
            trainer["init_from"] = start_folder
        else:
            trainer.update(resume_from=previous_checkpoint, resume_data_position=False, init_from=None)
        trk = self.tracking.model_dump(mode="json")
        trk.update(registered_model=self.tracking.registered_model or self.name, alias=f"task-{i}")
        raw = {
            "name": f"{self.name}-t{i}-{task.name}",
            "seed": self.seed + i,  # each task's data order; the model init uses task 0's seed
            "storage_path": self.storage_path,
            "data": data,
            "model": self.model,
            **({"vit": self.vit} if self.vit is not None else {}),
            "objective": self.objective,
            "schedule": {"name": self.schedule["name"], **self.schedule_params()},
            "optimizer": self.optimizer.model_dump(mode="json"),
            "trainer": trainer,
            "tracking": trk,
        }
        return validate_config(raw, source=f"continual task {i} ({task.name})")


def load_continual(path: str | Path, overrides: list[str] | None = None) -> ContinualConfig:
    from pydantic import ValidationError

    from cluster.config import format_validation_error

    raw = apply_overrides(load_raw(path), list(overrides or []))
    try:
        return ContinualConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path)).replace("allowed fields here", "allowed")) from None


def prepare_tasks(cfg: ContinualConfig) -> None:
    """Prepare every task's data that is missing; later text tasks reuse task 0's tokenizer (one vocabulary)."""
    from data.location import child_uri
    from data.manifest import is_prepared

    first = cfg.tasks[0].data
    for i, task in enumerate(cfg.tasks):
        if is_prepared(task.data.path):
            continue
        if task.data.prepare is None:
            raise ConfigError(f"tasks[{i}].data.path={task.data.path!r} is not prepared and tasks[{i}].data.prepare is unset")
        spec = task.data.workload()
        params = dict(task.data.prepare)
        if i > 0 and spec.shares_tokenizer:  # one vocabulary across the tasks (image tasks have none)
            params["tokenizer"] = child_uri(first.path, "tokenizer.json")  # a path, or a URI of the store
            params.setdefault("seq_len", (first.prepare or {}).get("seq_len", 128))
        spec.prepare(spec.prepare_config(params, task.data.path), progress=False)


def _resolve_start(cfg: ContinualConfig, tracking_uri: str) -> str | None:
    """A local export folder for ``cfg.start`` (weights only): a registered model is pulled, a Hugging Face
    folder imported, a checkpoint or export folder used as is (:func:`cluster.model_io.resolve_start`)."""
    if cfg.start is None:
        return None
    from cluster.model_io import resolve_start
    from cluster.storage import resolve_storage
    from cluster.train import start_models_cache

    return resolve_start(cfg.start, start_models_cache(resolve_storage(cfg.storage_path)), tracking_uri=tracking_uri)


class SequenceObserver:
    """What a running sequence tells its caller, on the driver (no-ops here; ``rpt tune`` reports each to Ray
    Tune and the trial's MLflow run, see cluster/tune_trial.py). Calls come from a watcher thread
    (``on_eval``) and the sequence's thread (the others)."""

    def on_start(self, run_id: str) -> None:
        """The sequence's MLflow run was created."""

    def on_eval(self, task: int, step: int, metrics: dict[str, float]) -> None:
        """Metrics of a logging step (global ``step``) of task ``task`` as they arrive (``val/<task>/loss`` ...)."""

    def on_task_end(self, task: int, step: int, row: dict[str, float], annealed: dict[str, float] | None) -> None:
        """Task ``task`` ended at global ``step``: ``row`` is ``L[task][j]`` by task name (``annealed``: the anneal
        branch's row)."""


def run_continual(
    cfg: ContinualConfig, *, tracking_uri: str | None = None, address: str | None = None,
    parent_run_id: str | None = None, run_tags: dict[str, str] | None = None, callbacks: Sequence[Any] = (),
    observer: SequenceObserver | None = None,
) -> dict[str, Any]:
    """Train the task sequence; returns L, the annealed L (anneal_steps > 0), the summary metrics and run ids.
    ``observer`` hears of every evaluation and task end while the sequence runs."""
    from mlflow import MlflowClient

    from cluster.ray_env import init_ray

    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri, tracking_uri)
    init_ray(address, cpus_needed=cfg.trainer.num_workers * cfg.trainer.cpus_per_worker, dashboard=False)
    prepare_tasks(cfg)
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment, cfg.tracking.artifact_root)
    client = MlflowClient(uri)
    tags = {"rpt.continual": cfg.name, "rpt.schedule": cfg.schedule["name"], **(run_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    seq = client.create_run(exp_id, run_name=cfg.name, tags=tags).info.run_id
    client.log_text(seq, json.dumps(cfg.model_dump(mode="json"), indent=2), "continual_config.json")
    client.log_batch(seq, params=[
        _param("schedule", cfg.schedule["name"]), _param("seed", cfg.seed), _param("tasks", [t.name for t in cfg.tasks]),
        _param("lr_peak", cfg.optimizer.lr_peak), _param("replay", [t.replay_fraction for t in cfg.tasks]),
    ])
    observer = observer or SequenceObserver()
    observer.on_start(seq)
    with tracking.run_status(client, seq):
        return _train_sequence(cfg, client, seq, uri=uri, address=address, callbacks=callbacks, observer=observer)


def _train_sequence(cfg: ContinualConfig, client, seq: str, *, uri: str, address: str | None,
                    callbacks: Sequence[Any], observer: SequenceObserver) -> dict[str, Any]:
    """Every task (and its anneal branch) in order under the sequence's MLflow run ``seq``; fills ``L``."""
    from cluster.anneal import run_anneal
    from cluster.train import run_train

    names = [t.name for t in cfg.tasks]
    L: list[list[float]] = []
    L_annealed: list[list[float]] = []
    runs: list[dict[str, Any]] = []
    previous, start_folder = None, _resolve_start(cfg, uri)
    for i, _task in enumerate(cfg.tasks):
        tcfg = cfg.task_config(i, previous_checkpoint=previous, start_folder=start_folder)
        out = run_train(tcfg, tracking_uri=uri, address=address, parent_run_id=seq,
                        tags={"rpt.task": str(i), "rpt.task_name": names[i]}, callbacks=callbacks,
                        on_step=lambda step, m, i=i: observer.on_eval(i, step, m))
        row = [float(out.metrics[f"val/{n}/loss"]) for n in names]
        L.append(row)
        client.log_batch(seq, metrics=[_metric(f"L/{names[i]}/{n}", v, i) for n, v in zip(names, row, strict=True)])
        entry = {"task": names[i], "run_id": out.mlflow_run_id, "checkpoint": out.checkpoint, "version": out.model_version,
                 "step": out.metrics.get("step")}
        if cfg.anneal_steps:
            ann = run_anneal(out.checkpoint, steps=cfg.anneal_steps, alias=f"task-{i}-annealed", tracking_uri=uri,
                             address=address, parent_run_id=seq, storage_path=cfg.storage_path)
            L_annealed.append([float(ann.metrics[f"val/{n}/loss"]) for n in names])
            entry.update(annealed_run_id=ann.mlflow_run_id, annealed_version=ann.model_version)
        runs.append(entry)
        observer.on_task_end(i, sum(cfg.task_steps[: i + 1]), dict(zip(names, row, strict=True)),
                             dict(zip(names, L_annealed[-1], strict=True)) if cfg.anneal_steps else None)
        previous = out.checkpoint
    return _log_result(cfg, client, seq, names, L, L_annealed, runs)


def _log_result(cfg: ContinualConfig, client, seq: str, names: list[str], L: list[list[float]],
                L_annealed: list[list[float]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``L``'s summary metrics (and the annealed ones) and ``continual_result.json`` on the sequence's run."""
    result: dict[str, Any] = {"tasks": names, "L": L, "summary": summary(L), "runs": runs, "run_id": seq,
                              "schedule": cfg.schedule["name"], "seed": cfg.seed}
    if L_annealed:
        result["L_annealed"] = L_annealed
        result["summary_annealed"] = summary(L_annealed)
    metrics = {f"cl/{k}": v for k, v in result["summary"].items()}
    metrics.update({f"cl/annealed/{k}": v for k, v in result.get("summary_annealed", {}).items()})
    client.log_batch(seq, metrics=[_metric(k, v, len(names) - 1) for k, v in metrics.items()])
    client.log_text(seq, json.dumps(result, indent=2), "continual_result.json")
    return result


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value))


def _metric(key: str, value: float, step: int):
    import time

    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)
