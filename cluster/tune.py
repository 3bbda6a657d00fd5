"""Ray Tune comparison of LR schedules over a continual task sequence (``rpt tune CONFIG``).

Every trial runs the whole sequence (``cluster.continual.run_continual``): one Ray Train fit per
task, launched from inside a Tune function trainable (how Ray Train V2 combines Train with Tune; the
trainable itself reserves almost no CPU, see :func:`run_tune`). MLflow holds a parent run for the
experiment, a child run per trial and, below it, one per task. At the end a report compares the
schedules: mean ± std over seeds of the final average loss, mean forgetting and mean adaptation, with
plots logged to the parent run (README, "Continual pre-training and the schedule comparison").
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster import tracking
from cluster.config import ConfigError, apply_overrides, format_validation_error, load_raw
from cluster.tune_space import (
    Dimension,
    SchedulerSpec,
    SearchAlgSpec,
    SpaceError,
    build_scheduler,
    build_search_alg,
    check_search_alg,
    parse_space,
    probe_points,
    tune_domains,
)
from trainers import schedules

log = logging.getLogger(__name__)


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    continual: str = Field(description="the continual config every trial runs (path, relative to the repo or this file)")
    schedules: dict[str, dict[str, Any]] = Field(description="named schedule variants: {label: {name, params...}}")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="the short form of search: {key: [values]} "
                                       "for keys swept over every value ('schedule' labels, 'seed', dotted keys)")
    search: dict[str, Any] = Field(default_factory=dict, description="{key: search space} (cluster/tune_space.py): "
                                   "grid, choice, uniform, loguniform, randint")
    fixed: dict[str, Any] = Field(default_factory=dict, description="dotted continual keys set in every trial "
                                  "(e.g. a larger model for a GPU variant of the study)")
    num_samples: int = Field(1, ge=1, description="repeats of the grid; sampled keys are drawn anew in each")
    scheduler: SchedulerSpec | None = Field(None, description="stop poor trials early at evaluations (asha)")
    search_alg: SearchAlgSpec | None = Field(None, description="propose the sampled keys (optuna)")
    seed: int = Field(0, description="seed of Tune's sampling (the same study samples the same points)")
    max_concurrent_trials: int = Field(2, ge=1)
    storage_path: str = "results/tune"

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        try:
            dims = self.dimensions()
            check_search_alg(self.search_alg, dims)
        except SpaceError as e:
            raise ValueError(str(e)) from None
        for d in dims:
            if d.key == "schedule":
                if d.kind not in ("grid", "choice"):
                    raise ValueError(f"schedule: labels are swept with a list, grid or choice, not {d.kind}")
                for label in d.values:
                    if label not in self.schedules:
                        raise ValueError(f"schedule: {label!r} is not defined under schedules (defined: {list(self.schedules)})")
        return self

    def dimensions(self) -> list[Dimension]:
        return parse_space(self.grid, self.search)

    def trials(self) -> list[dict[str, Any]]:
        """Points that take every value a trial can be given (every listed value, both ends of ranges)."""
        return probe_points(self.dimensions())

    def trial_overrides(self, point: dict[str, Any]) -> list[str]:
        out = [f"{key}={json.dumps(value)}" for key, value in self.fixed.items()]
        for key, value in point.items():
            if key == "schedule":
                out.append(f"schedule={json.dumps(self.schedules[value])}")
                if self.schedules[value].get("name") not in schedules.with_capability("anneal_branch"):
                    out.append("anneal_steps=0")  # only schedules with a constant phase have anneal branches
            else:
                out.append(f"{key}={json.dumps(value)}")
        return out

    def check_metrics(self, tasks: list[str]) -> None:
        """Scheduler and search metrics are ones every trial reports (cluster/tune_trial.py)."""
        reported = ["val/avg_loss", *(f"val/{t}/loss" for t in tasks)]
        if self.scheduler is not None and self.scheduler.metric not in reported:
            raise ConfigError(f"scheduler.metric={self.scheduler.metric!r} is not reported at every evaluation; "
                              f"allowed: {', '.join(reported)}")
        final = [*reported, "final_avg_loss", "mean_forgetting", "mean_adaptation"]
        if self.search_alg is not None and self.search_alg.metric not in final:
            raise ConfigError(f"search_alg.metric={self.search_alg.metric!r} is not reported; allowed: {', '.join(final)}")


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

    for point in cfg.trials():  # every value a trial can take validates on the driver
        base = load_continual(cfg.continual, cfg.trial_overrides(point))
    cfg.check_metrics([t.name for t in base.tasks])
    return cfg


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
    # The dashboard serves the State API, through which Ray Train's placement-group cleaner sees that a trial the
    # scheduler stopped (its actor killed) took its fit's controller with it, and frees that fit's CPUs.
    init_ray(address, cpus_needed=cfg.max_concurrent_trials * base.trainer.num_workers * base.trainer.cpus_per_worker + 1,
             dashboard=True)
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

    from cluster.continual import load_continual
    from cluster.report import comparison_report, format_trials

    storage = Path(cfg.storage_path).resolve()
    continual_path, cwd = str(Path(cfg.continual).resolve()), str(Path.cwd())
    total_steps = sum(load_continual(cfg.continual, cfg.trial_overrides({})).task_steps)

    def fn(config):
        from cluster.tune_trial import trial_fn

        trial_fn(config, study=cfg, continual=continual_path, cwd=cwd, storage_path=str(storage / "runs"),
                 tracking_uri=uri, parent_run_id=parent)

    tuner = tune.Tuner(
        tune.with_resources(fn, {"CPU": 0.01}),  # the trainable only launches fits; 0 is rejected
        param_space={"space": tune_domains(cfg.dimensions())},
        tune_config=tune.TuneConfig(
            num_samples=cfg.num_samples, scheduler=build_scheduler(cfg.scheduler, total_steps),
            search_alg=build_search_alg(cfg.search_alg, cfg.seed, cfg.max_concurrent_trials),
            max_concurrent_trials=cfg.max_concurrent_trials if cfg.search_alg else None,
        ),
        run_config=tune.RunConfig(name=cfg.name, storage_path=str(storage)),
    )
    with _placement_groups_freed():
        trials, stopped = _collect(tuner.fit())
    _mark_stopped(client, parent, stopped)
    if not trials:
        raise ConfigError(f"tune {cfg.name}: every trial was stopped early by the scheduler ({len(stopped)}); "
                          "nothing to compare: raise scheduler.grace_period or max_t")
    with tempfile.TemporaryDirectory() as tmp:
        report = comparison_report(trials, Path(tmp), uri=uri)
        _plot_lr_curves(cfg, Path(tmp) / "lr_curves.png")
        for f in Path(tmp).iterdir():
            client.log_artifact(parent, str(f))
    report["stopped"] = stopped
    report["trials_table"] = format_trials(trials)
    report["reports_per_trial"] = {t["trial"]: t["reports"] for t in trials}
    return report


@contextlib.contextmanager
def _placement_groups_freed():
    """Placement groups the study's fits created and left behind (a trial stopped by the scheduler dies with its
    fit's controller) are removed when the study ends, so nothing after it waits for their CPUs."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    before = set(placement_group_table())
    try:
        yield
    finally:
        for pg_id, info in placement_group_table().items():
            if pg_id not in before and info["state"] in ("CREATED", "PENDING", "RESCHEDULING"):
                log.info("removing placement group %s left by a stopped trial", pg_id)
                remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))


def _collect(grid) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Finished trials (their continual_result.json) and the ones the scheduler stopped early."""
    trials, stopped = [], []
    for r in grid:
        if r.error:
            raise RuntimeError(f"trial {r.path} failed: {r.error}")
        path = Path(r.path, "continual_result.json")
        if path.is_file():
            trials.append({"trial": Path(r.path).name, **json.loads(path.read_text())})
        else:
            last = r.metrics or {}
            stopped.append({"trial": f"trial {last.get('trial_id', Path(r.path).name)}", "run_id": last.get("mlflow_run_id"),
                            "point": r.config["space"], "step": last.get("step"),
                            "val/avg_loss": last.get("val/avg_loss")})
    return trials, stopped


def _mark_stopped(client, parent: str, stopped: list[dict[str, Any]]) -> None:
    """The MLflow runs of trials the scheduler stopped (the trial's sequence run and its unfinished task runs,
    which the stopped trial could not end, or ended FAILED as its actor went down) end KILLED with the tag
    ``rpt.stopped``."""
    exp = client.get_run(parent).info.experiment_id
    for s in stopped:
        if not s["run_id"]:
            continue  # stopped before its first report
        why = f"stopped early by the Tune scheduler after step {s['step']} (val/avg_loss {s['val/avg_loss']})"
        kids = client.search_runs([exp], f"tags.mlflow.parentRunId = '{s['run_id']}'")
        for run in [client.get_run(s["run_id"]), *kids]:
            if run.info.status != "FINISHED":
                client.set_tag(run.info.run_id, "rpt.stopped", why)
                client.set_terminated(run.info.run_id, status="KILLED")
