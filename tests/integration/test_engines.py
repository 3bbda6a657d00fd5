"""Both engines under real Ray Train (2 CPU workers, gloo), and resuming on another number of workers.

- accelerate DDP trains like DeepSpeed ZeRO-0, and accelerate FSDP2 like DDP, on two ranks: the same
  train/loss at every logged step within 1e-3 (relative); both register a model that `rpt generate` uses;
- a run checkpointed by 2 workers resumes on 1 (DeepSpeed ZeRO-2: universal checkpoint) and one checkpointed by
  1 resumes on 2 (accelerate FSDP2: DCP): the row audit shows every row once, the global batch is kept
  (grad_accum_steps rescaled), the LR at every step is the schedule's, and the final model loads and generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from cluster.config import load_config
from cluster.train import run_train
from data.stream import DataPosition, load_shards, pieces_row_ids, rank_pieces
from tests.support.callbacks import AuditRows
from trainers import schedules

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BASE = ("trainer.max_steps=24", "schedule.total_steps=24", "trainer.checkpoint_every=8", "trainer.eval_every=100",
        "trainer.log_every=1", "trainer.keep_checkpoints=3")


def cfg(data: Path, tmp: Path, name: str, *extra: str):
    return load_config(REPO / "configs/debug-lm.yaml", [
        f"data.path={data}", f"storage_path={tmp / 'results'}", f"tracking.artifact_root={tmp / 'artifacts'}",
        f"name={name}", *BASE, *extra])


def history(uri: str, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key)}


def test_engines_agree_on_two_ranks(ray_session, debug_data, tmp_path, tracking_uri):
    steps = 20  # the acceptance: 20 steps, every one logged
    runs = {}
    for name, extra in {"ds0": ("trainer.engine=deepspeed", "trainer.zero_stage=0"),
                        "ddp": ("trainer.engine=accelerate", "trainer.zero_stage=0"),
                        "fsdp": ("trainer.engine=accelerate", "trainer.zero_stage=3")}.items():
        out = run_train(cfg(debug_data, tmp_path, f"eng-{name}", f"trainer.max_steps={steps}",
                            f"trainer.checkpoint_every={steps}",
                            f"tracking.registered_model=eng-{name}", *extra),
                        tracking_uri=tracking_uri, register=name != "ds0")
        runs[name] = (out, history(tracking_uri, out.mlflow_run_id, "train/loss"),
                      history(tracking_uri, out.mlflow_run_id, "train/grad_norm"))
    for a, b in (("ddp", "ds0"), ("fsdp", "ddp")):
        la, lb = runs[a][1], runs[b][1]
        assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
        worst = max(abs(la[s] - lb[s]) / lb[s] for s in la)
        assert worst < 1e-3, f"{a} vs {b}: relative loss difference {worst:.1e}"
        na, nb = runs[a][2], runs[b][2]
        assert max(abs(na[s] - nb[s]) / nb[s] for s in na) < 1e-3
    assert runs["ds0"][1][1] - runs["ds0"][1][steps] > 0.3  # it learns: the tolerance above can fail
    # the registered models (accelerate: DDP and FSDP2) serve generation unchanged, with the trained weights
    from cluster.registry import load_model
    from models.decoder import generate
    from models.io import load_pretrained

    for name in ("ddp", "fsdp"):
        model, tokenizer = load_model(f"models:/eng-{name}@current", tracking_uri=tracking_uri)
        trained, _ = load_pretrained(runs[name][0].checkpoint)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values(),
                                                      strict=True))
        ids = torch.tensor([tokenizer.encode("def ").ids])
        out = generate(model.eval(), ids, max_new_tokens=6, temperature=0.0)
        assert out.shape == (1, ids.shape[1] + 6) and tokenizer.decode(out[0].tolist())


@pytest.mark.parametrize(("engine", "stage", "before", "after"), [("deepspeed", 2, 2, 1), ("accelerate", 3, 1, 2)])
def test_resume_on_another_number_of_workers(ray_session, debug_data, tmp_path, tracking_uri, engine, stage, before,
                                             after):
    audit1, audit2 = tmp_path / "audit1", tmp_path / "audit2"
    accum = 2 // before  # the global batch: 16 rows per step
    name = f"resize-{engine}"
    common = (f"trainer.engine={engine}", f"trainer.zero_stage={stage}")
    first = run_train(cfg(debug_data, tmp_path, name, "trainer.max_steps=12", f"trainer.num_workers={before}",
                          f"trainer.grad_accum_steps={accum}", *common), tracking_uri=tracking_uri, register=False,
                      callbacks=[AuditRows(audit1)])
    assert first.metrics["step"] == 12
    again = engine == "deepspeed"  # one direction also resumes a second time on the new worker count
    second = run_train(cfg(debug_data, tmp_path, name, f"trainer.num_workers={after}",
                           f"trainer.max_steps={18 if again else 24}", f"trainer.grad_accum_steps={accum}", *common),
                       resume=True, tracking_uri=tracking_uri, register=False, callbacks=[AuditRows(audit2)])
    assert second.mlflow_run_id == first.mlflow_run_id
    audit3, third = tmp_path / "audit3", second
    if again:  # a later --resume with the same config on the same workers keeps the rescaled accumulation
        assert second.metrics["step"] == 18
        third = run_train(cfg(debug_data, tmp_path, name, f"trainer.num_workers={after}",
                              f"trainer.grad_accum_steps={accum}", *common), resume=True, tracking_uri=tracking_uri,
                          register=False, callbacks=[AuditRows(audit3)])
    assert third.metrics["step"] == 24
    final = json.loads(Path(third.checkpoint, "train_state.json").read_text())
    pos = DataPosition.from_dict(final["data_position"])
    assert pos.world_size == after and final["config"]["trainer"]["grad_accum_steps"] == 2 // after
    assert final["declared_grad_accum_steps"] == (accum if accum != 2 // after else None)
    # every row of the covered range exactly once: 24 steps x 16 rows, none twice, all from the planned epoch
    rows1 = [np.concatenate([np.load(f) for f in sorted(audit1.glob(f"rank{r}-step*.npy"))]) for r in range(before)]
    rows2 = [np.concatenate([np.load(f) for a in (audit2, audit3) if a.is_dir()
                             for f in sorted(a.glob(f"rank{r}-step*.npy"))])
             for r in range(after)]
    shards = load_shards(debug_data, "train")
    for r in range(before):  # the first part: the regular plan for `before` ranks
        want = pieces_row_ids(rank_pieces(shards, world_size=before, rank=r, seed=0, start=0, count=12 * 16 // before))
        np.testing.assert_array_equal(rows1[r], want)
    seen = np.concatenate([*rows1, *rows2])
    assert len(seen) == 24 * 16 and len(np.unique(seen)) == len(seen)
    epoch0 = np.concatenate([pieces_row_ids(rank_pieces(shards, world_size=before, rank=r, seed=0, start=0,
                                                        count=sum(s.rows for s in shards) // before))
                             for r in range(before)])
    assert set(seen) <= set(epoch0)
    # step and LR continue: the logged LR at every step is the schedule's
    lr = history(tracking_uri, third.mlflow_run_id, "lr")
    fn = schedules.get("cosine", warmup_steps=2, min_ratio=0.1, total_steps=24)
    assert sorted(lr) == list(range(1, 25))
    for step, value in lr.items():
        assert value == pytest.approx(3e-3 * fn(step), rel=1e-9, abs=1e-12), step
    # the final model loads and generates
    from models.decoder import generate
    from models.io import load_pretrained

    model, _ = load_pretrained(Path(third.checkpoint))
    assert generate(model.eval(), torch.tensor([[5, 6, 7]]), max_new_tokens=4, temperature=0.0).shape == (1, 7)
