"""GPU path: bf16 + NCCL + DeepSpeed ZeRO-2 through the real `rpt train` driver. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_zero2_on_gpu(ray_session, debug_data, tmp_path, tracking_uri):
    import mlflow

    from cluster.train import run_train
    from tests.integration.test_train import debug_cfg

    n = torch.cuda.device_count()
    cfg = debug_cfg(debug_data, tmp_path, "trainer.use_gpu=true", "trainer.precision=bf16", f"trainer.num_workers={n}",
                    "trainer.max_steps=20", "trainer.log_every=5")
    out = run_train(cfg, tracking_uri=tracking_uri, register=False)
    hist = mlflow.MlflowClient(tracking_uri).get_metric_history(out.mlflow_run_id, "train/loss")
    assert hist[-1].value < hist[0].value
    mfu = mlflow.MlflowClient(tracking_uri).get_metric_history(out.mlflow_run_id, "perf/mfu")
    assert all(0 < m.value < 1 for m in mfu)
