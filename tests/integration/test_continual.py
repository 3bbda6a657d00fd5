"""Continual pre-training over 3 tasks and the Ray Tune schedule comparison, on real local Ray + MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.continual import load_continual, run_continual
from tests.support.callbacks import AuditRows
from trainers import schedules

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PEAK = 3e-3


@pytest.fixture(scope="module")
def cl_data(ray_session, tmp_path_factory) -> Path:
    """Three tiny tasks (prose, code, C) sharing task 0's tokenizer."""
    from cluster.continual import prepare_tasks

    root = tmp_path_factory.mktemp("cl-data")
    prepare_tasks(load_continual(REPO / "configs/continual-debug.yaml", data_overrides(root)))
    return root


def data_overrides(root: Path) -> list[str]:
    docs = {"prose": 60, "code": 12, "c": 30}
    out = []
    for i, name in enumerate(("prose", "code", "c")):
        out += [f"tasks.{i}.data.path={root / name}", f"tasks.{i}.data.prepare.max_documents={docs[name]}"]
    return out


def cl_config(root: Path, tmp: Path, *extra: str):
    return load_continual(REPO / "configs/continual-debug.yaml", [
        *data_overrides(root), f"storage_path={tmp / 'results'}", f"tracking.artifact_root={tmp / 'art'}",
        "trainer.log_every=1", "trainer.eval_every=100", *extra,
    ])


def lr_by_step(uri: str, run_ids: list[str]) -> dict[int, float]:
    import mlflow

    c = mlflow.MlflowClient(uri, registry_uri=uri)
    return {m.step: m.value for r in run_ids for m in c.get_metric_history(r, "lr")}


@pytest.fixture(scope="module")
def infinite_run(cl_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cl-inf")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    cfg = cl_config(cl_data, tmp, "tasks.0.steps=8", "tasks.1.steps=8", "tasks.2.steps=8", "anneal_steps=3",
                    "schedule.cooldown_steps=4", "name=cl-inf", "tracking.registered_model=cl-inf")
    return cfg, run_continual(cfg, tracking_uri=uri), uri


def test_infinite_sequence_registers_tasks_and_continues_step_and_lr(infinite_run):
    import mlflow

    from cluster.registry import load_model

    cfg, res, uri = infinite_run
    assert res["tasks"] == ["prose", "code", "c"]
    L = np.array(res["L"])
    assert L.shape == (3, 3) and np.all(np.isfinite(L)) and np.array(res["L_annealed"]).shape == (3, 3)
    # the next task starts at the previous task's global step, with the same (un-rewarmed) LR function
    assert [r["step"] for r in res["runs"]] == [8, 16, 24]
    f = schedules.get("infinite", **cfg.schedule_params())
    lrs = lr_by_step(uri, [r["run_id"] for r in res["runs"]])
    assert sorted(lrs) == list(range(1, 25))
    for step, lr in lrs.items():
        assert lr == pytest.approx(PEAK * f(step), rel=1e-9), step
    assert lrs[16] == pytest.approx(PEAK * 0.5) and lrs[24] == pytest.approx(PEAK * 0.5)  # η_const across tasks
    # task models and annealed branches are registered and load by alias
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    for i, run in enumerate(res["runs"]):
        assert client.get_model_version_by_alias("cl-inf", f"task-{i}").run_id == run["run_id"]
        assert client.get_model_version_by_alias("cl-inf", f"task-{i}-annealed").run_id == run["annealed_run_id"]
        ann_lr = lr_by_step(uri, [run["annealed_run_id"]])
        assert ann_lr[run["step"] + 3] == pytest.approx(PEAK * 0.1)  # annealed to η_min
    model, tok = load_model("models:/cl-inf@task-2", tracking_uri=uri)
    assert tok.get_vocab_size() == 1024 and model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 1024)
    # L and the summary are logged on the sequence run
    seq = client.get_run(res["run_id"])
    assert seq.data.metrics["cl/final_avg_loss"] == pytest.approx(L[-1].mean())
    children = client.search_runs([seq.info.experiment_id], f"tags.mlflow.parentRunId = '{res['run_id']}'")
    assert len(children) == 6  # 3 tasks + 3 anneal branches


def test_cosine_rewarm_from_registered_model_with_replay(infinite_run, cl_data, tmp_path):
    import mlflow

    from cluster.registry import load_model
    from data.stream import load_shards, pieces_row_ids, rank_pieces

    _, _, uri = infinite_run
    audit = tmp_path / "audit"
    cfg = cl_config(
        cl_data, tmp_path, "name=cl-rw", "tracking.registered_model=cl-rw", "anneal_steps=0", "start=models:/cl-inf@task-0",
        "schedule={name: cosine_rewarm, warmup_steps: 2, min_ratio: 0.1}", "tasks.0.steps=6", "tasks.1.steps=6",
        "tasks.2.steps=3", "trainer.eval_every=100",
    )
    res = run_continual(cfg, tracking_uri=uri, callbacks=[AuditRows(audit)])
    f = schedules.get("cosine_rewarm", warmup_steps=2, min_ratio=0.1, task_steps=[6, 6, 3])
    lrs = lr_by_step(uri, [r["run_id"] for r in res["runs"]])
    for step, lr in lrs.items():
        assert lr == pytest.approx(PEAK * f(step), rel=1e-9), step
    assert lrs[6] == pytest.approx(PEAK * 0.1) and lrs[8] == pytest.approx(PEAK)  # re-warmed after the boundary

    # started from the registered model's weights: the step-0 val loss equals the registered model's own
    model, _ = load_model("models:/cl-inf@task-0", tracking_uri=uri)
    import pyarrow.parquet as pq

    rows = torch.cat([
        torch.from_numpy(np.stack(pq.read_table(s.path).column("tokens").to_numpy(zero_copy_only=False)))
        for s in load_shards(cl_data / "prose", "val")
    ])[:64]
    with torch.no_grad():
        logits = model(rows[:, :-1].long())
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1).long())
    hist = mlflow.MlflowClient(uri, registry_uri=uri).get_metric_history(res["runs"][0]["run_id"], "val/loss")
    assert {m.step: m.value for m in hist}[0] == pytest.approx(ref.item(), rel=1e-5)

    # replay: 2 of every 8 rows come from the earlier task, in the planned order
    rep = np.concatenate([np.load(p) for p in sorted(audit.glob("replay-rank0-step*.npy"))])
    new = np.concatenate([np.load(p) for p in sorted(audit.glob("rank0-step*.npy"))])
    assert len(rep) == 6 * 2 + 3 * 2 and len(new) == (6 + 6 + 3) * 8 - len(rep)
    expected = pieces_row_ids(rank_pieces(load_shards(cl_data / "prose", "train"), world_size=1, rank=0,
                                          seed=cfg.seed + 1000 + 1, start=0, count=12))
    np.testing.assert_array_equal(rep[:12], expected)


def trial_results_of(report, label: str) -> list[Path]:
    return [p for p in Path(report["tune_dir"]).rglob("continual_result.json")
            if json.loads(p.read_text())["label"] == label]


def test_tune_comparison_two_schedules_two_seeds(cl_data, tmp_path):
    import mlflow

    from cluster.tune import load_tune, run_tune

    cont = tmp_path / "continual.yaml"
    import yaml

    raw = yaml.safe_load((REPO / "configs/continual-debug.yaml").read_text())
    for i, name in enumerate(("prose", "code", "c")):
        raw["tasks"][i]["data"]["path"] = str(cl_data / name)
        raw["tasks"][i]["steps"] = 4
    raw["tasks"] = raw["tasks"][:2]
    raw["anneal_steps"] = 0  # anneal branches are covered above; here 8 fits in 4 rounds keep CI short
    raw["schedule"]["cooldown_steps"] = 1
    raw["trainer"]["eval_every"] = 2  # evaluations at steps 2, 4 (task 0), 6, 8 (task 1): reported to Tune live
    raw["tracking"]["artifact_root"] = str(tmp_path / "art")
    cont.write_text(yaml.safe_dump(raw))
    tune_cfg = tmp_path / "tune.yaml"
    raw_t = yaml.safe_load((REPO / "configs/tune-debug.yaml").read_text())
    raw_t.update(continual=str(cont), storage_path=str(tmp_path / "tune"), name="cmp")
    raw_t["schedules"]["infinite"]["cooldown_steps"] = 1
    raw_t["grid"]["seed"] = [0, 1]
    tune_cfg.write_text(yaml.safe_dump(raw_t))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    report = run_tune(load_tune(tune_cfg), tracking_uri=uri)

    agg = report["aggregate"]
    assert set(agg) == {"cosine_rewarm", "infinite"} and all(a["n"] == 2 and a["seeds"] == [0, 1] for a in agg.values())
    assert "| cosine_rewarm | 2 |" in report["table"] and "| infinite | 2 |" in report["table"]
    for row in agg.values():  # mean ± std over the two seeds of each summary metric
        assert all(len(row[m]) == 2 and np.isfinite(row[m][0]) for m in ("final_avg_loss", "mean_forgetting", "mean_adaptation"))
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    parent = client.get_run(report["parent_run_id"])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.json", "loss_matrix.png", "val_curves.png", "lr_curves.png"} <= arts
    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) == 4
    for t in trials:  # each trial run has its task runs below it
        kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{t.info.run_id}'")
        assert len(kids) == 2
        # the trial run has the curve live (val/avg_loss at every evaluation); its task runs the per-task metrics
        curve = [(m.step, m.value) for m in client.get_metric_history(t.info.run_id, "val/avg_loss")]
        assert [s for s, _ in sorted(curve)] == [2, 4, 6, 8]
        for k in kids:  # the curve is the mean of the task runs' per-task validation losses at each evaluation
            per = [{m.step: m.value for m in client.get_metric_history(k.info.run_id, f"val/{n}/loss")}
                   for n in ("prose", "code")]
            steps = {2, 4} if k.data.tags["rpt.task"] == "0" else {6, 8}
            assert steps <= set(per[0])
            assert all(np.isclose(dict(curve)[s], (per[0][s] + per[1][s]) / 2) for s in steps)
    # Tune got a report at every evaluation (global step as progress) and TensorBoard files show the curves
    from tests.support.tensorboard import read_scalars

    events = sorted(Path(report["tune_dir"]).rglob("events.out.tfevents*"))
    assert len(events) == 4
    for ev in events:
        curve = read_scalars(ev)["ray/tune/val/avg_loss"]
        assert [s for s, _ in curve] == [2, 4, 4, 6, 8, 8]  # evaluations, task 0's end, the final report
        result = json.loads((ev.parent / "continual_result.json").read_text())
        assert np.isclose(curve[-1][1], result["summary"]["final_avg_loss"])
        assert np.isclose(curve[2][1], np.mean(result["L"][0]))
    assert set(report["reports_per_trial"].values()) == {6} and report["stopped"] == []
    # each trial ran the schedule it is labelled with: its task runs logged lr_peak x that schedule at every step
    study = load_tune(tune_cfg)
    for t in trials:
        label = t.data.tags["rpt.schedule_label"]
        c = load_continual(cont, study.trial_overrides({"schedule": label}))
        f = schedules.get(c.schedule["name"], **c.schedule_params())
        kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{t.info.run_id}'")
        lrs = {m.step: m.value for k in kids for m in client.get_metric_history(k.info.run_id, "lr")}
        assert lrs and all(v == pytest.approx(PEAK * f(s), rel=1e-9) for s, v in lrs.items()), label
    # the table's mean ± std are those of the trials' own results (population std over seeds)
    for label, row in agg.items():
        mine = [json.loads(p.read_text()) for p in trial_results_of(report, label)]
        for m in ("final_avg_loss", "mean_forgetting", "mean_adaptation"):
            vals = np.array([r["summary"][m] for r in mine])
            assert row[m] == pytest.approx((vals.mean(), vals.std()), rel=1e-12, abs=1e-12), (label, m)


def test_tune_loguniform_search_with_asha_stops_poor_trials(cl_data, tmp_path):
    """`rpt tune` samples lr_peak log-uniformly (seeded) and ASHA stops trials whose val/avg_loss at a rung is
    worse than the others': they end KILLED in MLflow with the reason and are left out of the comparison."""
    import mlflow
    import yaml

    from cluster.tune import load_tune, run_tune

    raw = yaml.safe_load((REPO / "configs/continual-debug.yaml").read_text())
    raw["tasks"] = raw["tasks"][:1]
    raw["tasks"][0].update(steps=8, data={**raw["tasks"][0]["data"], "path": str(cl_data / "prose")})
    raw["schedule"]["cooldown_steps"] = 1
    raw["trainer"]["eval_every"] = 2
    raw["tracking"]["artifact_root"] = str(tmp_path / "art")
    (tmp_path / "continual.yaml").write_text(yaml.safe_dump(raw))
    study = {"name": "asha", "continual": str(tmp_path / "continual.yaml"), "storage_path": str(tmp_path / "tune"),
             "schedules": {"infinite": raw["schedule"]}, "fixed": {"anneal_steps": 0},
             "search": {"optimizer.lr_peak": {"loguniform": [1e-6, 3e-2]}}, "num_samples": 3, "seed": 0,
             "scheduler": {"name": "asha", "metric": "val/avg_loss", "grace_period": 2, "reduction_factor": 2},
             "max_concurrent_trials": 1}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    report = run_tune(load_tune(tmp_path / "tune.yaml"), tracking_uri=uri)

    lrs = [t["point"]["optimizer.lr_peak"] for t in report["stopped"]]
    results = list(Path(report["tune_dir"]).rglob("continual_result.json"))
    finished = [json.loads(p.read_text()) for p in results]
    lrs += [t["point"]["optimizer.lr_peak"] for t in finished]
    assert len(lrs) == 3 and len(set(lrs)) == 3 and all(1e-6 <= lr <= 3e-2 for lr in lrs)
    assert finished and report["stopped"], (finished, report["stopped"])
    assert report["aggregate"]["infinite"]["n"] == len(finished)
    # the stopped trials' fits hold no CPUs afterwards (their placement groups were removed)
    import time

    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    client = mlflow.MlflowClient(uri)
    for s in report["stopped"]:
        assert s["step"] < 8 and np.isfinite(s["val/avg_loss"])
        run = client.get_run(s["run_id"])
        assert run.info.status == "KILLED" and "stopped early by the Tune scheduler" in run.data.tags["rpt.stopped"]
        # it was worse at its last rung than a finished trial at the same step
        best = min(min(m.value for m in client.get_metric_history(f["run_id"], "val/avg_loss") if m.step == s["step"])
                   for f in finished)
        assert s["val/avg_loss"] > best


def test_continual_mae_over_two_fractal_domains(ray_session, tmp_path):
    """The image path through `rpt continual`: two fractal domains, MAE, infinite schedule with anneal branches,
    replay of task 0's images in task 1; each task's encoder is registered and loads as an embedder."""
    from cluster.registry import load_model

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_continual(REPO / "configs/continual-mae-debug.yaml", [
        f"tasks.0.data.path={tmp_path / 'a'}", f"tasks.1.data.path={tmp_path / 'b'}",
        "tasks.0.data.prepare.train_rows=512", "tasks.1.data.prepare.train_rows=512",
        "tasks.0.data.prepare.val_rows=64", "tasks.1.data.prepare.val_rows=64",
        "tasks.0.data.eval_rows=64", "tasks.1.data.eval_rows=64", "tasks.0.data.probe_rows=128",
        "tasks.1.data.probe_rows=128", "tasks.0.steps=10", "tasks.1.steps=10", "schedule.cooldown_steps=4",
        "anneal_steps=2", f"storage_path={tmp_path / 'results'}", f"tracking.artifact_root={tmp_path / 'art'}",
    ])
    res = run_continual(cfg, tracking_uri=uri)
    L, La = np.array(res["L"]), np.array(res["L_annealed"])
    assert L.shape == La.shape == (2, 2) and np.isfinite(L).all() and np.isfinite(La).all()
    assert [r["step"] for r in res["runs"]] == [10, 20]  # the global step continues across tasks
    assert L[1, 1] < L[0, 1]  # training on domain b lowers the reconstruction loss on b
    import mlflow

    client = mlflow.MlflowClient(uri)
    knn = client.get_metric_history(res["runs"][1]["run_id"], "probe/knn_acc")
    assert [m.step for m in knn] == [20] and 0.0 <= knn[0].value <= 1.0
    embedder, processor = load_model("models:/cl-mae-debug@task-1-annealed", tracking_uri=uri)
    assert processor.objective == "mae"
    assert embedder(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 64)


def test_a_failed_task_ends_the_sequence_run_failed(cl_data, tmp_path):
    """A task that fails (a start model full of NaN) ends the continual parent run FAILED with the error, not
    RUNNING; nothing of the sequence is registered."""
    import json

    import mlflow
    import torch

    import models
    from cluster.train import TrainingError
    from models.io import save_pretrained

    vocab = json.loads((cl_data / "prose" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    cfg_m = models.resolve_config("debug", vocab_size=vocab, max_seq_len=64)
    bad = models.build(cfg_m)
    with torch.no_grad():
        bad.norm.weight.fill_(float("nan"))
    save_pretrained(bad, cfg_m, tmp_path / "nan-start")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = cl_config(cl_data, tmp_path, "name=cl-fail", "tracking.registered_model=cl-fail", "anneal_steps=0",
                    f"start={tmp_path / 'nan-start'}", "tasks.0.steps=4", "tasks.1.steps=4", "tasks.2.steps=4",
                    "schedule.cooldown_steps=1", "schedule.warmup_steps=1")
    with pytest.raises(TrainingError, match="not finite"):
        run_continual(cfg, tracking_uri=uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "cl-fail"]
    assert [r.info.status for r in parent] == ["FAILED"] and "not finite" in parent[0].data.tags["rpt.error"]
    assert not client.search_registered_models("name = 'cl-fail'")
