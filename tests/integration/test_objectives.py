"""Each language objective's debug config trains end to end (real local Ray, DeepSpeed on CPU, MLflow)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import objectives
from cluster.config import ConfigError, load_config
from cluster.train import check_data, run_train

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STEPS = 30
CONFIGS = {name: REPO / f"configs/debug-{name}.yaml" for name in ("mlm", "span_corruption", "ul2", "self_distillation")}


@pytest.fixture(scope="module")
def objective_data(ray_session, tmp_path_factory) -> Path:
    """The debug corpus with every special token the objective configs need, prepared once per module."""
    from data.prepare import PrepareConfig, prepare

    needed: list[str] = []
    for path in CONFIGS.values():
        cfg = load_config(path)
        for tok in objectives.special_tokens_for(cfg.objective.name, **cfg.objective.params):
            if tok not in needed:
                needed.append(tok)
    base = load_config(CONFIGS["mlm"]).data.prepare
    out = tmp_path_factory.mktemp("prepared") / "pydoc-64-objectives"
    prepare(PrepareConfig(**{**base, "special_tokens": needed, "val_fraction": 0.05, "out_dir": out}), progress=False)
    return out


@pytest.fixture(scope="module")
def module_tracking(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlruns.db'}"


def debug_cfg(name: str, data: Path, tmp: Path, *overrides: str):
    return load_config(
        CONFIGS[name],
        [
            f"data.path={data}",
            f"storage_path={tmp / 'results'}",
            f"tracking.artifact_root={tmp / 'artifacts'}",
            "trainer.num_workers=1",
            "trainer.zero_stage=0",
            f"trainer.max_steps={STEPS}",
            f"trainer.eval_every={STEPS}",
            f"trainer.checkpoint_every={STEPS}",
            *overrides,
        ],
    )


def train_and_check(name: str, data: Path, tmp: Path, uri: str, *overrides: str):
    import mlflow

    out = run_train(debug_cfg(name, data, tmp, *overrides), tracking_uri=uri, register=False)
    client = mlflow.MlflowClient(uri)
    train = client.get_metric_history(out.mlflow_run_id, "train/loss")
    assert [m.step for m in train] == list(range(5, STEPS + 1, 5))
    assert all(math.isfinite(m.value) for m in train)
    assert train[-1].value < train[0].value - 0.2, [round(m.value, 3) for m in train]
    val = client.get_metric_history(out.mlflow_run_id, "val/loss")
    assert [m.step for m in val] == [0, STEPS] and val[-1].value < val[0].value
    keys = set(client.get_run(out.mlflow_run_id).data.metrics)
    return out, client, keys


@pytest.fixture(scope="module")
def mlm_run(objective_data, tmp_path_factory, module_tracking):
    """The mlm run: its own test checks it, and its checkpoint is the self-distillation teacher."""
    return train_and_check("mlm", objective_data, tmp_path_factory.mktemp("mlm"), module_tracking)


def test_mlm_trains(mlm_run):
    out, _, keys = mlm_run
    assert {"train/ce", "train/z"} <= keys
    assert Path(out.checkpoint, "model.safetensors").is_file()


def test_span_corruption_trains(objective_data, tmp_path, module_tracking):
    _, _, keys = train_and_check("span_corruption", objective_data, tmp_path, module_tracking)
    assert {"train/ce", "train/z"} <= keys


ENGINES = {"deepspeed": (), "accelerate": ("trainer.engine=accelerate", "trainer.zero_stage=3")}  # FSDP2


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_ul2_trains_and_logs_every_denoiser(objective_data, tmp_path, module_tracking, engine):
    out, client, keys = train_and_check("ul2", objective_data, tmp_path, module_tracking, *ENGINES[engine])
    names = [d.name for d in objectives.get("ul2").active]
    assert {f"train/{n}/{part}" for n in names for part in ("ce_sum", "tokens")} <= keys
    tokens = [client.get_metric_history(out.mlflow_run_id, f"train/{n}/tokens")[-1].value for n in names]
    assert all(t > 0 for t in tokens)  # 30 steps x 8 rows: every denoiser was drawn


def test_self_distillation_trains_toward_the_mlm_teacher(mlm_run, objective_data, tmp_path, module_tracking):
    teacher = mlm_run[0].checkpoint
    out, client, keys = train_and_check(
        "self_distillation", objective_data, tmp_path, module_tracking, f"objective.teacher={teacher}"
    )
    assert {"train/ce", "train/distance"} <= keys
    distance = client.get_metric_history(out.mlflow_run_id, "train/distance")
    assert distance[-1].value < distance[0].value  # the student's hidden states approach the teacher's


def test_missing_special_tokens_fail_on_the_driver(objective_data, tmp_path):
    cfg = debug_cfg("span_corruption", objective_data, tmp_path, "objective.num_sentinels=40")
    with pytest.raises(ConfigError) as e:
        check_data(cfg)
    msg = str(e.value)
    assert "<|sentinel_39|>" in msg and "data.prepare.special_tokens" in msg
