"""Rank 0's metric sink: off the training path, nothing lost when the tracking server is away (a real MLflow
SQLite store and a real closed port; no Ray)."""

from __future__ import annotations

import json
import socket
import time

import pyarrow.fs as pafs
from mlflow import MlflowClient

from cluster.tracking import record_metric_stats, replay_unsent
from trainers.metrics import TRACKING_STATS, UNSENT_PREFIX, AsyncMlflowSink

FS = pafs.LocalFileSystem()


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sink", artifact_location=str(tmp_path / "art"))).info.run_id
    return uri, client, run_id


def _closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_sink_sends_every_record_in_order_with_its_own_step_and_time(tmp_path):
    uri, client, run_id = _store(tmp_path)
    sink = AsyncMlflowSink(uri, run_id, spill=(FS, str(tmp_path)))
    before = int(time.time() * 1000)
    for step in range(1, 301):
        sink.log({"train/loss": 10.0 / step, "lr": 1e-3}, step)
    sink.close()
    hist = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in hist] == list(range(1, 301)) and [m.value for m in hist] == [10.0 / s for s in range(1, 301)]
    assert all(before <= m.timestamp <= int(time.time() * 1000) for m in hist)
    stats = json.loads((tmp_path / TRACKING_STATS).read_text())
    assert (stats["logged"], stats["sent"], stats["sent_late"], stats["unsent"], stats["failed_attempts"]) == (300, 300, 0, 0, 0)
    assert not list(tmp_path.glob(f"{UNSENT_PREFIX}*"))


def test_an_unreachable_server_neither_blocks_logging_nor_loses_records(tmp_path):
    uri, client, run_id = _store(tmp_path)
    sink = AsyncMlflowSink(_closed_port_uri(), run_id, spill=(FS, str(tmp_path)), flush_timeout_s=1.5)
    t0 = time.perf_counter()
    for step in range(1, 51):
        sink.log({"train/loss": float(step)}, step)
    assert time.perf_counter() - t0 < 0.5  # logging is an append: the training loop never waits for MLflow
    sink.close()
    stats = json.loads((tmp_path / TRACKING_STATS).read_text())
    assert stats["logged"] == 50 and stats["sent"] == 0 and stats["unsent"] == 50 and stats["failed_attempts"] >= 1
    [spilled] = tmp_path.glob(f"{UNSENT_PREFIX}{run_id}-*.jsonl")
    assert [json.loads(line)["step"] for line in spilled.read_text().splitlines()] == list(range(1, 51))
    # the driver replays them into the run once the server answers: same steps, values and times
    assert replay_unsent(FS, str(tmp_path), client, run_id) == 50
    hist = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == [(s, float(s)) for s in range(1, 51)]
    assert not spilled.exists() and spilled.with_name(spilled.name + ".replayed").exists()
    assert replay_unsent(FS, str(tmp_path), client, run_id) == 0  # replayed once
    stats = record_metric_stats(FS, str(tmp_path), client, run_id, 50)
    tags = client.get_run(run_id).data.tags
    assert tags["rpt.metrics.unsent"] == "50" and tags["rpt.metrics.replayed"] == "50" and stats["logged"] == 50
