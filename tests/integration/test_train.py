"""Real local Ray + DeepSpeed (CPU, gloo) + MLflow (SQLite): the walking skeleton end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import load_config
from cluster.train import run_train
from data.stream import load_shards, pieces_row_ids, rank_pieces
from tests.support.callbacks import AuditRows

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def debug_cfg(data_dir: Path, tmp_path: Path, *overrides: str):
    return load_config(
        REPO / "configs/debug-lm.yaml",
        [
            f"data.path={data_dir}",
            f"storage_path={tmp_path / 'results'}",
            f"tracking.artifact_root={tmp_path / 'artifacts'}",
            *overrides,
        ],
    )


def expected_rows(data_dir: Path, *, world: int, rank: int, seed: int, start: int, count: int) -> np.ndarray:
    shards = load_shards(data_dir, "train")
    return pieces_row_ids(rank_pieces(shards, world_size=world, rank=rank, seed=seed, start=start, count=count))


def read_audit(audit: Path, rank: int) -> np.ndarray:
    files = sorted(audit.glob(f"rank{rank}-step*.npy"))
    return np.concatenate([np.load(f) for f in files]) if files else np.empty(0, np.int64)


def test_two_worker_zero2_run_tracks_checkpoints_and_registers(ray_session, debug_data, tmp_path, tracking_uri):
    import mlflow
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cluster.registry import load_model
    from models import build
    from models.io import load_pretrained

    cfg = debug_cfg(debug_data, tmp_path, "trainer.max_steps=20", "tracking.system_metrics_every_s=1")
    out = run_train(cfg, tracking_uri=tracking_uri, callbacks=[AuditRows(tmp_path / "audit")])

    # the loss went down (MLflow holds the series at the logged steps)
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    train = client.get_metric_history(out.mlflow_run_id, "train/loss")
    val = client.get_metric_history(out.mlflow_run_id, "val/loss")
    assert [m.step for m in train] == [5, 10, 15, 20]
    assert [m.step for m in val] == [0, 10, 20]
    assert train[-1].value < train[0].value - 0.3
    for key in ("lr", "perf/tokens_per_s", "perf/mfu", "data/wait_frac"):
        hist = client.get_metric_history(out.mlflow_run_id, key)
        assert [m.step for m in hist] == [5, 10, 15, 20], key
    assert all(m.value > 0 for m in client.get_metric_history(out.mlflow_run_id, "perf/tokens_per_s"))
    # MLflow's system metrics of rank 0's node, sampled every second while it trained
    cpu = client.get_metric_history(out.mlflow_run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0 <= m.value <= 100 * 64 for m in cpu)
    run = client.get_run(out.mlflow_run_id)
    assert run.data.tags["rpt.metrics.logged"] == run.data.tags["rpt.metrics.sent"] != "0"  # delivered, none late
    arts = {a.path for a in client.list_artifacts(out.mlflow_run_id)}
    assert {"config.yaml", "data"} <= arts
    mv = client.get_model_version_by_alias(out.model_name, "current")
    assert int(mv.version) == out.model_version and mv.run_id == out.mlflow_run_id
    # a second registration moves the alias to the new version; the old one stays
    from cluster.registry import register_checkpoint

    v2 = register_checkpoint(out.checkpoint, run_id=out.mlflow_run_id, name=out.model_name, aliases=["current"],
                             tracking_uri=tracking_uri)
    assert v2 == out.model_version + 1
    assert int(client.get_model_version_by_alias(out.model_name, "current").version) == v2
    assert client.get_model_version(out.model_name, str(out.model_version)).run_id == out.mlflow_run_id
    logged = client.download_artifacts(out.mlflow_run_id, "config.yaml", str(tmp_path))
    assert "max_steps: 20" in Path(logged).read_text()

    # the checkpoint holds every rank's DeepSpeed files and the train state
    ckpt = Path(out.checkpoint)
    ds_files = set(p.name for p in (ckpt / "ds").iterdir())
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= ds_files
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 20
    assert state["data_position"]["rows_consumed"] == 20 * 8
    assert state["data_position"]["world_size"] == 2
    assert state["schedule"]["name"] == "cosine" and state["schedule"]["params"]["total_steps"] == 20
    assert state["tokens_seen"] == 20 * 8 * 2 * 64
    assert state["mlflow_run_id"] == out.mlflow_run_id

    # every rank trained on exactly its planned rows, in order
    for rank in range(2):
        np.testing.assert_array_equal(
            read_audit(tmp_path / "audit", rank),
            expected_rows(debug_data, world=2, rank=rank, seed=0, start=0, count=160),
        )

    # the registered version loads by alias and matches the ZeRO checkpoint's own weights
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    _, resolved = load_pretrained(ckpt)  # only for the resolved model config
    direct = build(resolved)
    direct.load_state_dict(sd)
    model, tok = load_model(f"{out.model_name}@current", tracking_uri=tracking_uri)
    assert tok.get_vocab_size() == 1024
    batch = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(batch), direct.eval()(batch), rtol=0, atol=0)
    assert out.model_version >= 1


def test_nan_start_model_stops_the_run_fails_it_and_registers_nothing(ray_session, debug_data, tmp_path, tracking_uri):
    """Through the CLI: the worker's error reaches the console as one paragraph (no traceback; the full one
    in the run folder's error.log), the MLflow run ends FAILED with the error as a tag, nothing is
    checkpointed or registered."""
    import re
    import subprocess
    import sys

    import mlflow

    import models
    from models.io import save_pretrained

    cfg_m = models.resolve_config("debug", vocab_size=1024, max_seq_len=64)
    bad = models.build(cfg_m)
    with torch.no_grad():
        bad.norm.weight.fill_(float("nan"))
    save_pretrained(bad, cfg_m, tmp_path / "nan-model")
    results = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", str(REPO / "configs/debug-lm.yaml"), f"data.path={debug_data}",
         f"storage_path={results}", f"tracking.artifact_root={tmp_path / 'artifacts'}", "name=nan-run",
         "tracking.registered_model=nan-run", "trainer.max_steps=6", "trainer.checkpoint_every=3",
         f"trainer.init_from={tmp_path / 'nan-model'}", "--tracking-uri", tracking_uri],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    err = " ".join(r.stderr.split())
    assert r.returncode == 1, r.stderr[-3000:]
    assert re.search(r"error: training run 'nan-run' failed on rank \d \(NonFiniteLoss\): .*not finite.* at step 1;", err), err[-2000:]
    assert "trainer.init_from" in err and "Traceback" not in r.stderr
    assert (results / "nan-run" / "error.log").is_file() and str(results / "nan-run" / "error.log") in err
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("ray-pretrain-debug").experiment_id])
    failed = [x for x in runs if x.info.run_name == "nan-run"]
    assert [x.info.status for x in failed] == ["FAILED"] and "not finite" in failed[0].data.tags["rpt.error"]
    assert not client.search_registered_models("name = 'nan-run'")
    assert not list((results / "nan-run").glob("checkpoint_*"))  # the diverged model was never saved
