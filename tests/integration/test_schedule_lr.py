"""The LR that training logs to MLflow at every step equals the schedule function (DeepSpeed + LambdaLR seam).

cosine is covered by test_train.py (resume), infinite by test_anneal.py / test_continual.py and
cosine_rewarm by test_continual.py; the others run here, one short 1-worker fit each.
"""

from __future__ import annotations

import mlflow
import pytest

from cluster.train import run_train
from tests.integration.test_train import debug_cfg
from trainers import schedules

pytestmark = pytest.mark.integration

CASES = {
    "constant": {"warmup_steps": 2},
    "linear": {"warmup_steps": 2, "min_ratio": 0.0},
    "wsd": {"warmup_steps": 1, "decay_steps": 3, "decay_shape": "1-sqrt", "min_ratio": 0.05},
}


@pytest.mark.parametrize("name", list(CASES))
def test_logged_lr_equals_schedule(ray_session, debug_data, tmp_path, tracking_uri, name):
    params = CASES[name]
    import json

    sched = json.dumps({"name": name, **params})
    cfg = debug_cfg(debug_data, tmp_path, f"schedule={sched}", "trainer.max_steps=6", "trainer.num_workers=1",
                    "trainer.zero_stage=0", "trainer.log_every=1", "trainer.eval_every=100",
                    "trainer.checkpoint_every=100", f"name=lr-{name}")
    out = run_train(cfg, tracking_uri=tracking_uri, register=False)
    f = schedules.get(name, **cfg.schedule_params())
    lrs = {m.step: m.value for m in mlflow.MlflowClient(tracking_uri).get_metric_history(out.mlflow_run_id, "lr")}
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    for step, lr in lrs.items():
        assert lr == pytest.approx(3e-3 * f(step), rel=1e-12, abs=1e-15), (name, step)
