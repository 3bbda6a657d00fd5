"""Ray Jobs submission: what `rpt submit` builds (fast, no Ray), and the real path against a local
multi-process cluster: `rpt cluster up` -> `rpt submit --follow` of the debug config -> the job
succeeds, MLflow holds its run and model version -> `rpt cluster down` leaves no process behind.

The cluster runs in its own process sessions, temp dir and ports, next to the session's Ray instance
of the other tests, which it does not touch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import jobs

REPO = Path(__file__).resolve().parents[2]
# `python -m cluster.cli_ops ...` is `rpt ...` with submit/jobs/cluster registered (cluster/cli_ops.py).
RPT = [sys.executable, "-m", "cluster.cli_ops"]


# --- the submission, built locally ---------------------------------------------------------------
def test_submission_ships_the_repo_and_passes_env_by_name(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("MY_FLAG", "1")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    sub = jobs.build_submission(str(REPO / "configs/debug-lm.yaml"), ["trainer.max_steps=5"], env=["MY_FLAG"],
                                entrypoint_num_cpus=0.5)
    assert sub.entrypoint == ("python -m cluster.cli train configs/debug-lm.yaml trainer.max_steps=5 --address auto")
    env = sub.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert env["MY_FLAG"] == "1" and "PATH" not in env
    assert sub.runtime_env["working_dir"] == str(REPO)
    assert {".venv/", "data/prepared/", "results/", "mlartifacts/", "*.db", ".git/"} <= set(sub.runtime_env["excludes"])
    assert "s3cr3t" not in repr(sub), "values stay out of logs"
    assert sub.entrypoint_num_cpus == 0.5 and sub.submission_id.startswith("rpt-train-debug-lm-")
    # a container image instead of pip requirements; a job command other than train is passed through
    img = jobs.build_submission("configs/tune-debug.yaml", command="tune", image="ray-pretrain:0.1.0-gpu")
    assert img.runtime_env["image_uri"] == "ray-pretrain:0.1.0-gpu" and "pip" not in img.runtime_env
    assert img.entrypoint.startswith("python -m cluster.cli tune configs/tune-debug.yaml")
    pip = jobs.build_submission("configs/debug-lm.yaml", pip=["rich==13.9.4"])
    assert pip.runtime_env["pip"] == ["rich==13.9.4"]


@pytest.mark.parametrize("kwargs, message", [
    ({"env": ["MY_TOKEN=abc"]}, "name only"),
    ({"env": ["NOT_SET_ANYWHERE_42"]}, "not set"),
    ({"env": ["DS_ACCELERATOR"]}, "set by the job's driver"),
    ({"command": "serve"}, "allowed"),
    ({"image": "x:1", "pip": ["y"]}, "exclude each other"),
])
def test_submission_errors_name_the_fix(kwargs, message):
    with pytest.raises(jobs.JobError, match=message):
        jobs.build_submission("configs/debug-lm.yaml", **kwargs)


def test_config_outside_the_working_dir_is_refused(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("name: x\n")
    with pytest.raises(jobs.JobError, match="outside the shipped working dir"):
        jobs.build_submission(str(cfg))


def test_auth_token_goes_only_where_it_belongs(monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("abc\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")  # no ~/.ray/auth_token
    assert jobs.auth_headers("http://127.0.0.1:8265") == {}
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert jobs.auth_headers("http://head.example:8265") == {"Authorization": "Bearer abc"}
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text("local")
    assert jobs.auth_headers("http://localhost:8265") == {"Authorization": "Bearer local"}
    assert jobs.auth_headers("http://head.example:8265") == {}, "the local token is not sent elsewhere unasked"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.auth_headers("http://localhost:8265") == {}


def test_train_configs_with_paths_a_job_cannot_see_are_refused(monkeypatch):
    from cluster.cli_ops import check_train_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    problems = check_train_config(str(REPO / "configs/debug-lm.yaml"), [])
    assert [p.split("=")[0].split(" '")[0] for p in problems] == ["data.path", "storage_path", "tracking URI",
                                                                  "tracking.artifact_root"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert check_train_config(str(REPO / "configs/debug-lm.yaml"), [
        "data.path=/mnt/shared/d", "storage_path=s3://b/runs", "tracking.artifact_root=s3://b/mlflow"]) == []


def test_exit_codes():
    assert [jobs.exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED", "PENDING")] == [0, 1, 3, 4]


# --- the real path: a local multi-process cluster --------------------------------------------------
def rpt(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _processes_mentioning(text: str) -> list[int]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in part for part in (p.info["cmdline"] or [])) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.integration
def test_submit_to_a_local_cluster_and_tear_it_down(debug_data, tmp_path):
    import mlflow
    import psutil

    from cluster.local_cluster import LocalCluster

    state = tmp_path / "cluster"
    procs: list[int] = []
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    up = rpt("cluster", "up", "--state-dir", str(state), "--num-cpus-head", "1", "--num-cpus-worker", "4", env=env)
    cluster = LocalCluster.load(state)
    try:
        assert up.returncode == 0 and cluster is not None, up.stdout + up.stderr
        status = json.loads(rpt("cluster", "status", "--state-dir", str(state), env=env).stdout)
        assert status["running"] and status["ray_nodes_alive"] == 2 and status["jobs_api"]
        address = cluster.dashboard_url
        tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
        job_env = {**env, "MLFLOW_TRACKING_URI": tracking_uri}
        common = [f"data.path={debug_data}", f"storage_path={tmp_path / 'results'}",
                  f"tracking.artifact_root={tmp_path / 'artifacts'}"]

        # a job that fails inside the cluster: the exit code says so (the config parses here; the
        # driver on the head finds no model at trainer.init_from)
        bad = rpt("submit", "configs/debug-lm.yaml", *common, "trainer.init_from=/nonexistent/model",
                  "--address", address, "--follow", "--submission-id", "rpt-test-fails", env=job_env)
        assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
        assert "FAILED" in bad.stdout + bad.stderr and "init_from" in bad.stdout

        ok = rpt("submit", "configs/debug-lm.yaml", *common, "trainer.max_steps=10", "trainer.eval_every=10",
                 "trainer.checkpoint_every=10", "--address", address, "--follow", "--submission-id", "rpt-test-ok",
                 env=job_env, timeout=600)
        assert ok.returncode == 0, ok.stdout[-5000:] + ok.stderr[-3000:]
        assert "SUCCEEDED" in ok.stdout and "done" in ok.stdout

        listed = {j["submission_id"]: j for j in json.loads(rpt("jobs", "list", "--address", address, "--json", env=env).stdout)}
        assert listed["rpt-test-ok"]["status"] == "SUCCEEDED" and listed["rpt-test-fails"]["status"] == "FAILED"
        assert listed["rpt-test-ok"]["metadata"]["rpt.command"] == "train"
        logs = rpt("jobs", "logs", "rpt-test-ok", "--address", address, env=env)
        assert "MLflow run id" in logs.stdout

        # the job's run and registered model are in the MLflow store the submitter pointed it at
        client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
        exp = client.get_experiment_by_name("ray-pretrain-debug")
        runs = client.search_runs([exp.experiment_id])
        done = [r for r in runs if r.info.status == "FINISHED"]
        assert len(done) == 1 and done[0].data.metrics["train/loss"] > 0
        mv = client.get_model_version_by_alias("debug-lm", "current")
        assert mv.run_id == done[0].info.run_id
        assert any((tmp_path / "results" / "debug-lm").glob("checkpoint_*/train_state.json"))
        procs = cluster.processes()
        assert len(procs) >= 6  # two `ray start`, GCS, raylets, dashboard, agents, workers
    finally:
        down = rpt("cluster", "down", "--state-dir", str(state), env=env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert cluster is not None
    assert not [p for p in procs if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    for temp_dir in (cluster.temp_dir, cluster.worker_temp_dir):
        assert not _processes_mentioning(temp_dir), "a process of the cluster survived `rpt cluster down`"
        assert not Path(temp_dir).exists()
    assert not (state / "cluster.json").exists()
    assert json.loads(rpt("cluster", "status", "--state-dir", str(state), env=env).stdout)["running"] is False
