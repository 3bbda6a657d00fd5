"""A real `mlflow server` stopped while a run trains (2 workers, ZeRO-2, CPU): training neither stalls nor
fails, and every metric arrives (late) or is kept and replayed; registration waits for the server or is
left to `rpt models register`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.train import run_train
from tests.support.callbacks import KillServer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STEPS = 30


class MlflowServer:
    """`mlflow server` on a fixed port and SQLite store, in its own process group (killed with SIGKILL)."""

    def __init__(self, tmp: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.tmp, self.proc = f"http://127.0.0.1:{self.port}", tmp, None

    def start(self) -> MlflowServer:
        log = open(self.tmp / "mlflow-server.log", "ab")  # noqa: SIM115 (the server's lifetime)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.tmp / 'server.db'}",
             "--default-artifact-root", str(self.tmp / "server-artifacts"), "--workers", "1"],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start: {(self.tmp / 'mlflow-server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path).start()
    yield srv
    srv.stop()


def cfg(data: Path, tmp: Path, name: str, *extra: str):
    return load_config(REPO / "configs/debug-lm.yaml", [
        f"data.path={data}", f"storage_path={tmp / 'results'}", f"tracking.artifact_root={tmp / 'artifacts'}",
        f"name={name}", f"tracking.registered_model={name}", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
        "trainer.eval_every=100", f"trainer.checkpoint_every={STEPS}", *extra])


def restart_after(server: MlflowServer, ready, delay_s: float) -> threading.Thread:
    """Start the server again ``delay_s`` after ``ready()`` turns true (in a thread)."""
    def run():
        while not ready():
            time.sleep(0.2)
        time.sleep(delay_s)
        server.start()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def history(uri: str, run_id: str, key: str = "train/loss"):
    import mlflow

    return sorted(mlflow.MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)


def test_server_outage_mid_run_neither_stalls_nor_loses_metrics(ray_session, debug_data, tmp_path, server):
    marker, outage_s = tmp_path / "killed", 15.0
    th = restart_after(server, marker.exists, outage_s)
    t0 = time.monotonic()
    out = run_train(cfg(debug_data, tmp_path, "outage"), tracking_uri=server.url,
                    callbacks=[KillServer(step=5, pgid=server.proc.pid, marker=marker)])
    th.join(5)
    import mlflow

    client = mlflow.MlflowClient(server.url, registry_uri=server.url)
    run = client.get_run(out.mlflow_run_id)
    hist = history(server.url, out.mlflow_run_id)
    assert [m.step for m in hist] == list(range(1, STEPS + 1))  # every step's loss arrived, late
    # the loop never waited for the server: no gap between consecutive logging times near the outage's length
    gaps = [(b.timestamp - a.timestamp) / 1000 for a, b in zip(hist, hist[1:], strict=False)]
    assert max(gaps) < outage_s / 3, gaps
    tags = run.data.tags
    assert int(tags["rpt.metrics.sent_late"]) > 0 and int(tags["rpt.metrics.failed_attempts"]) >= 1
    assert tags["rpt.metrics.unsent"] == "0" and float(tags["rpt.metrics.max_delay_s"]) > 5
    assert run.info.status == "FINISHED" and out.model_version and out.register_later is None
    assert client.get_model_version_by_alias("outage", "current").version == str(out.model_version)
    print(f"outage {outage_s:.0f} s: fit {time.monotonic() - t0:.1f} s, longest gap between steps {max(gaps):.2f} s, "
          f"sent late {tags['rpt.metrics.sent_late']}, longest delay {tags['rpt.metrics.max_delay_s']} s")


def test_server_away_past_the_run_keeps_metrics_and_registers_later(ray_session, debug_data, tmp_path, server):
    """Away longer than rank 0's flush window and the driver's wait: the run ends, the metrics are kept in the
    run folder, and `rpt models register` (once the server is back) replays them, registers and ends the run."""
    marker = tmp_path / "killed"
    out = run_train(cfg(debug_data, tmp_path, "away", "tracking.flush_timeout_s=2", "tracking.end_wait_s=3"),
                    tracking_uri=server.url, callbacks=[KillServer(step=5, pgid=server.proc.pid, marker=marker)])
    assert marker.is_file() and out.model_version is None and out.metrics["step"] == STEPS
    assert out.register_later == (f"rpt models register {out.checkpoint} --name away --tracking-uri {server.url} "
                                  "--alias current")
    run_dir = tmp_path / "results" / "away"
    [kept] = run_dir.glob(f"unsent-metrics-{out.mlflow_run_id}-*.jsonl")
    assert len(kept.read_text().splitlines()) >= STEPS - 5
    server.start()
    r = subprocess.run([sys.executable, "-m", "cluster.cli", *out.register_later.split()[1:]],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "registered models:/away/1 (@current)" in r.stdout and "metric records replayed" in r.stdout
    import mlflow

    client = mlflow.MlflowClient(server.url, registry_uri=server.url)
    assert [m.step for m in history(server.url, out.mlflow_run_id)] == list(range(1, STEPS + 1))
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags["rpt.metrics.replayed"]) >= STEPS - 5
    assert client.get_model_version_by_alias("away", "current").version == "1"
    assert not kept.exists() and kept.with_name(kept.name + ".replayed").exists()
