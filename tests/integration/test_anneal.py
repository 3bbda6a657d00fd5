"""Infinite schedule: an anneal branch from a constant-phase checkpoint, main line continues at η_const."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cluster.anneal import anneal_config, run_anneal
from cluster.config import ConfigError
from cluster.train import run_train
from tests.integration.test_train import debug_cfg, expected_rows, read_audit
from tests.support.callbacks import AuditRows
from trainers.checkpoint import TrainState

pytestmark = pytest.mark.integration
INFINITE = "schedule={name: infinite, warmup_steps: 2, cooldown_steps: 4, anneal_steps: 0, const_ratio: 0.5, min_ratio: 0.1}"


def tree_digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def lr_history(uri: str, run_id: str) -> dict[int, float]:
    import mlflow

    return {m.step: m.value for m in mlflow.MlflowClient(uri, registry_uri=uri).get_metric_history(run_id, "lr")}


def test_anneal_branch_and_main_line(ray_session, debug_data, tmp_path, tracking_uri):
    import mlflow

    audit = tmp_path / "audit"
    common = (INFINITE, "name=main-line", "trainer.eval_every=100", "trainer.checkpoint_every=10")
    main = run_train(debug_cfg(debug_data, tmp_path, "trainer.max_steps=10", *common), tracking_uri=tracking_uri,
                     callbacks=[AuditRows(audit)])
    src = Path(main.checkpoint)
    before = tree_digest(src)
    peak = 3e-3
    assert lr_history(tracking_uri, main.mlflow_run_id)[10] == pytest.approx(0.5 * peak)  # constant phase

    branch = run_anneal(str(src), steps=4, tracking_uri=tracking_uri, callbacks=[AuditRows(tmp_path / "audit-b")])
    assert branch.run_name == "main-line-anneal-s10" and branch.metrics["step"] == 14
    lrs = lr_history(tracking_uri, branch.mlflow_run_id)
    assert lrs[14] == pytest.approx(0.1 * peak)  # annealed to η_min
    state = json.loads(Path(branch.checkpoint, "train_state.json").read_text())
    assert state["schedule"]["params"]["anneal_steps"] == 4 and state["schedule"]["params"]["constant_steps"] == 4
    mv = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_by_alias(branch.model_name, "annealed")
    assert mv.run_id == branch.mlflow_run_id
    assert tree_digest(src) == before  # the source checkpoint is untouched
    # the branch continued with the next unseen rows of the plan
    for rank in range(2):
        np.testing.assert_array_equal(
            read_audit(tmp_path / "audit-b", rank),
            expected_rows(debug_data, world=2, rank=rank, seed=0, start=80, count=32),
        )

    # the main line goes on at η_const from its own checkpoint
    cont = run_train(debug_cfg(debug_data, tmp_path, "trainer.max_steps=15", *common), tracking_uri=tracking_uri,
                     resume=True, register=False, callbacks=[AuditRows(audit)])
    assert cont.mlflow_run_id == main.mlflow_run_id and cont.run_name == main.run_name
    assert lr_history(tracking_uri, main.mlflow_run_id)[15] == pytest.approx(0.5 * peak)
    # across the resume (a new fit from the latest checkpoint) the main line read the next unseen rows
    for rank in range(2):
        np.testing.assert_array_equal(
            read_audit(audit, rank), expected_rows(debug_data, world=2, rank=rank, seed=0, start=0, count=15 * 8)
        )


def test_anneal_needs_infinite_constant_phase(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    base = {"step": 10, "tokens_seen": 0, "data_position": {}, "mlflow_run_id": None, "config": {}}
    (ck / "train_state.json").write_text(json.dumps({**base, "schedule": {"name": "cosine", "params": {}}}))
    with pytest.raises(ConfigError, match="'cosine'.*infinite"):
        anneal_config(str(ck), TrainState.load(ck), 5, [], "annealed")
    params = {"warmup_steps": 2, "cooldown_steps": 20, "anneal_steps": 0, "const_ratio": 0.5, "min_ratio": 0.1,
              "total_steps": 100}
    (ck / "train_state.json").write_text(json.dumps({**base, "schedule": {"name": "infinite", "params": params}}))
    with pytest.raises(ConfigError, match="outside the constant phase"):
        anneal_config(str(ck), TrainState.load(ck), 5, [], "annealed")
