"""Ray Tune comparison of LR schedules over a continual task sequence (``rpt tune CONFIG``).

Every trial runs the whole sequence (``cluster.continual.run_continual``): one Ray Train fit per
task, launched from inside a Tune function trainable (how Ray Train V2 combines Train with Tune; the
trainable itself reserves almost no CPU, see :func:`run_tune`). MLflow holds a parent run for the
experiment, a child run per trial and, below it, one per task. At the end a report compares the
schedules: mean ± std over seeds of the final average loss, mean forgetting and mean adaptation, with
plots logged to the parent run (README, "Continual pre-training and the schedule comparison").
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster import tracking
from cluster.config import ConfigError, apply_overrides, format_validation_error, load_raw
from trainers import schedules

log = logging.getLogger(__name__)


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    continual: str = Field(description="the continual config every trial runs (path, relative to the repo or this file)")
    schedules: dict[str, dict[str, Any]] = Field(description="named schedule variants: {label: {name, params...}}")
    grid: dict[str, list[Any]] = Field(description="swept keys: 'schedule' (labels), 'seed', or dotted continual keys")
    max_concurrent_trials: int = Field(2, ge=1)
    storage_path: str = "results/tune"

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        for label in self.grid.get("schedule", []):
            if label not in self.schedules:
                raise ValueError(f"grid.schedule: {label!r} is not defined under schedules (defined: {list(self.schedules)})")
        if any(not v for v in self.grid.values()):
            raise ValueError("every grid entry needs at least one value")
        return self

    def trials(self) -> list[dict[str, Any]]:
        """The cartesian grid as a list of {key: value} (deterministic order)."""
        keys = list(self.grid)
        return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(self.grid[k] for k in keys))]

    def trial_overrides(self, point: dict[str, Any]) -> list[str]:
        out = []
        for key, value in point.items():
            if key == "schedule":
                out.append(f"schedule={json.dumps(self.schedules[value])}")
                if self.schedules[value].get("name") not in schedules.with_capability("anneal_branch"):
                    out.append("anneal_steps=0")  # only schedules with a constant phase have anneal branches
            else:
                out.append(f"{key}={json.dumps(value)}")
        return out


def load_tune(path: str | Path, overrides: list[str] | None = None) -> TuneConfig:
    raw = apply_overrides(load_raw(path), list(overrides or []))
    try:
        cfg = TuneConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
    cont = Path(cfg.continual)
    if not cont.is_file() and Path(path).parent.joinpath(cont.name).is_file():
        cfg.continual = str(Path(path).parent / cont.name)
    from cluster.continual import load_continual

    for point in cfg.trials():  # every trial's continual config validates on the driver
        load_continual(cfg.continual, cfg.trial_overrides(point))
    return cfg


def _trial_fn(config: dict[str, Any]) -> None:
    """Tune function trainable: one whole continual sequence."""
    import os

    from ray import tune

    from cluster.continual import load_continual, run_continual

    ctx = tune.get_context()
    trial = ctx.get_trial_name()
    if os.path.isdir(config["cwd"]):  # Tune starts trials in their own folder; configs hold paths relative to the repo
        os.chdir(config["cwd"])
    overrides = [*config["overrides"], f"name={config['prefix']}-{trial}",
                 f"storage_path={config['storage_path']}", f"tracking.tracking_uri={config['tracking_uri']}"]
    cfg = load_continual(config["continual"], overrides)
    res = run_continual(cfg, tracking_uri=config["tracking_uri"], parent_run_id=config["parent_run_id"],
                        run_tags={"rpt.trial": trial, "rpt.schedule_label": config["label"]})
    metrics = {**res["summary"], **{f"annealed/{k}": v for k, v in res.get("summary_annealed", {}).items()}}
    Path(ctx.get_trial_dir(), "continual_result.json").write_text(json.dumps(res, indent=2))
    tune.report(metrics)


def _plot_lr_curves(cfg: TuneConfig, out: Path) -> Path:
    from cluster.continual import load_continual
    from cluster.plots import plot_lr

    curves, seen = [], set()
    for point in cfg.trials():
        label = str(point.get("schedule", "-"))
        if label in seen:
            continue
        seen.add(label)
        c = load_continual(cfg.continual, cfg.trial_overrides(point))
        curves.append({"label": label, "name": c.schedule["name"], "params": c.schedule_params(),
                       "lr_peak": c.optimizer.lr_peak, "steps": sum(c.task_steps)})
    return plot_lr(curves, out, title=f"{cfg.name}: LR over the task sequence")


def run_tune(cfg: TuneConfig, *, tracking_uri: str | None = None, address: str | None = None) -> dict[str, Any]:
    """Run the grid; returns the per-trial results and the report (also logged to the parent MLflow run)."""
    from mlflow import MlflowClient

    from cluster.continual import load_continual, prepare_tasks
    from cluster.ray_env import init_ray

    base = load_continual(cfg.continual)
    uri = tracking.resolve_tracking_uri(base.tracking.tracking_uri, tracking_uri)
    init_ray(address, cpus_needed=cfg.max_concurrent_trials * base.trainer.num_workers * base.trainer.cpus_per_worker + 1,
             dashboard=False)
    prepare_tasks(base)  # once, before trials start (they share the prepared data)
    exp_id = tracking.ensure_experiment(uri, base.tracking.experiment, base.tracking.artifact_root)
    client = MlflowClient(uri)
    parent = client.create_run(exp_id, run_name=cfg.name, tags={"rpt.tune": cfg.name}).info.run_id
    client.log_text(parent, cfg.model_dump_json(indent=2), "tune_config.json")
    with tracking.run_status(client, parent):
        report = _run_trials(cfg, client, parent, uri=uri)
    report["parent_run_id"] = parent
    report["tune_dir"] = str(Path(cfg.storage_path).resolve() / cfg.name)
    return report


def _run_trials(cfg: TuneConfig, client, parent: str, *, uri: str) -> dict[str, Any]:
    """The trials under the parent run, then the comparison report logged to it."""
    from ray import tune

    from cluster.report import comparison_report

    storage = Path(cfg.storage_path).resolve()
    points = cfg.trials()
    param_space = {
        "point": tune.grid_search([
            {"overrides": cfg.trial_overrides(p), "label": str(p.get("schedule", "-")), "point": p} for p in points
        ]),
    }

    continual_path, cwd = str(Path(cfg.continual).resolve()), str(Path.cwd())

    def fn(config):
        _trial_fn({**config["point"], "continual": continual_path, "prefix": cfg.name, "cwd": cwd,
                   "storage_path": str(storage / "runs"), "tracking_uri": uri, "parent_run_id": parent})

    tuner = tune.Tuner(
        tune.with_resources(fn, {"CPU": 0.01}),  # the trainable only launches fits; 0 is rejected
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials),
        run_config=tune.RunConfig(name=cfg.name, storage_path=str(storage)),
    )
    grid = tuner.fit()
    trials = []
    for r in grid:
        if r.error:
            raise RuntimeError(f"trial {r.path} failed: {r.error}")
        res = json.loads(Path(r.path, "continual_result.json").read_text())
        trials.append({"label": r.config["point"]["label"], "point": r.config["point"]["point"], **res})
    with tempfile.TemporaryDirectory() as tmp:
        report = comparison_report(trials, Path(tmp), uri=uri)
        _plot_lr_curves(cfg, Path(tmp) / "lr_curves.png")
        for f in Path(tmp).iterdir():
            client.log_artifact(parent, str(f))
    return report
