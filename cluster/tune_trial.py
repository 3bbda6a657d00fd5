"""One ``rpt tune`` trial: a whole continual sequence, reported to Ray Tune while it runs.

Every evaluation inside a task and every task's end becomes a ``tune.report`` with the global optimizer
step as progress (``step``, and ``timesteps_total`` so Tune's TensorBoard files plot against it), so
``Tuner`` results, the TensorBoard files and the dashboard show per-trial curves while the study runs,
and a trial scheduler (ASHA) can stop a trial at an evaluation. The trial's MLflow run gets the same
curve (``val/avg_loss`` at every evaluation). A trial that the scheduler stops writes no
``continual_result.json``; the driver marks its MLflow runs KILLED with the tag ``rpt.stopped`` and leaves it
out of the comparison (cluster/tune.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.continual import SequenceObserver


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


class TrialReporter(SequenceObserver):
    """Turns a sequence's evaluations and task ends into Tune reports (one at a time: ``on_eval`` comes
    from the fit's watcher thread, the rest from the trial's thread)."""

    def __init__(self, tasks: list[str], tracking_uri: str, report: Callable[[dict[str, Any]], None]):
        self.tasks, self.uri, self.report = tasks, tracking_uri, report
        self.run_id: str | None = None
        self.stopped_at: int | None = None
        self.reports = 0
        self._lock = threading.Lock()

    def on_start(self, run_id: str) -> None:
        self.run_id = run_id

    def on_eval(self, task: int, step: int, metrics: dict[str, float]) -> None:
        vals = [metrics.get(f"val/{t}/loss") for t in self.tasks]
        if any(v is None for v in vals):
            return  # a training-metrics delivery, or an evaluation without every task's set
        out = {"task": task, **self._val(vals)}
        self._log_mlflow(step, out)
        self._report(step, out)

    def on_task_end(self, task: int, step: int, row: dict[str, float], annealed: dict[str, float] | None) -> None:
        if task == len(self.tasks) - 1:
            return  # the last task's end is the final report, with the sequence's summary
        out: dict[str, Any] = {"task": task, "tasks_done": task + 1, **self._val([row[t] for t in self.tasks])}
        if annealed is not None:
            out.update({f"annealed/{k}": v for k, v in self._val([annealed[t] for t in self.tasks]).items()})
        self._report(step, out)

    def final(self, step: int, result: dict[str, Any]) -> None:
        """The last report: the sequence's summary (``final_avg_loss``, ``mean_forgetting``, ...)."""
        out = {"task": len(self.tasks) - 1, "tasks_done": len(self.tasks), **self._val(result["L"][-1]),
               **result["summary"]}
        if "L_annealed" in result:
            out.update({f"annealed/{k}": v for k, v in self._val(result["L_annealed"][-1]).items()})
            out.update({f"annealed/{k}": v for k, v in result["summary_annealed"].items()})
        self._report(step, out)

    def _val(self, vals: list[float]) -> dict[str, float]:
        return {"val/avg_loss": _mean(vals), **{f"val/{t}/loss": float(v) for t, v in zip(self.tasks, vals, strict=True)}}

    def _report(self, step: int, metrics: dict[str, Any]) -> None:
        with self._lock:
            if self.stopped_at is not None:
                raise SystemExit(0)  # the scheduler stopped this trial: train no further
            try:
                self.report({"step": step, "timesteps_total": step, "mlflow_run_id": self.run_id, **metrics})
                self.reports += 1
            except SystemExit:  # Tune stopped the trial (e.g. ASHA) while this report waited
                self.stopped_at = step
                raise

    def _log_mlflow(self, step: int, metrics: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        try:
            MlflowClient(self.uri).log_batch(self.run_id, metrics=[
                Metric(k, float(v), ts, step) for k, v in metrics.items() if k.startswith("val/")])
        except Exception:  # the live curve is a convenience: the task runs hold every metric
            return


def trial_fn(config: dict[str, Any], *, study: Any, continual: str, cwd: str, storage_path: str,
             tracking_uri: str, parent_run_id: str) -> None:
    """Tune function trainable: one whole continual sequence for the point ``config["space"]``."""
    from ray import tune

    from cluster.continual import load_continual, run_continual

    ctx = tune.get_context()
    trial = ctx.get_trial_name()
    if os.path.isdir(cwd):  # Tune starts trials in their own folder; configs hold paths relative to the repo
        os.chdir(cwd)
    point = config["space"]
    overrides = [*study.trial_overrides(point), f"name={study.name}-{trial}", f"storage_path={storage_path}",
                 f"tracking.tracking_uri={tracking_uri}"]
    cfg = load_continual(continual, overrides)
    reporter = TrialReporter([t.name for t in cfg.tasks], tracking_uri, tune.report)
    label = str(point.get("schedule", cfg.schedule["name"]))
    res = run_continual(cfg, tracking_uri=tracking_uri, parent_run_id=parent_run_id, observer=reporter,
                        run_tags={"rpt.trial": trial, "rpt.schedule_label": label})
    res.update(trial=trial, label=label, point=point, reports=reporter.reports + 1)
    Path(ctx.get_trial_dir(), "continual_result.json").write_text(json.dumps(res, indent=2))
    reporter.final(sum(cfg.task_steps), res)
