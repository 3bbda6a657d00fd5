"""Continual configs: per-task run configs, replay ratio, schedule continuity across task boundaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster.config import ConfigError
from cluster.continual import load_continual
from cluster.train import data_sources
from data.mixture import Mixture
from data.stream import Shard, pieces_row_ids, rank_pieces
from trainers import schedules

REPO = Path(__file__).resolve().parents[2]
CFG = REPO / "configs/continual-debug.yaml"


def test_task_configs_chain_steps_replay_and_eval_sets():
    cfg = load_continual(CFG)
    t0, t1 = cfg.task_config(0, previous_checkpoint=None), cfg.task_config(1, previous_checkpoint="/ck")
    assert (t0.trainer.max_steps, t1.trainer.max_steps) == (30, 60)
    assert t1.trainer.resume_from == "/ck" and t1.trainer.resume_data_position is False
    assert t0.data.replay is None and t1.data.replay.paths == [cfg.tasks[0].data.path]
    assert set(t1.data.eval_sets) == {"prose", "code", "c"}
    assert t0.schedule_params() == t1.schedule_params()  # one schedule spans the sequence
    assert t1.tracking.alias == "task-1"


@pytest.mark.parametrize(("fraction", "mb", "every", "rows"), [(0.25, 8, 1, 2), (0.05, 20, 1, 1), (0.5, 16, 1, 8),
                                                            (0.05, 4, 5, 1), (0.3, 10, 1, 3)])
def test_replay_is_a_mixture(fraction, mb, every, rows):
    """Replay is the mixture of the task's folder and the earlier tasks' by replay_fraction: ``rows`` replay rows in
    every ``every`` micro-batches (a fraction too small for one row per micro-batch is not rounded away)."""
    cfg = load_continual(CFG, [f"trainer.micro_batch_size={mb}", f"tasks.1.replay_fraction={fraction}"])
    task = cfg.task_config(1, previous_checkpoint="x")
    sources = data_sources(task)
    assert [s.name for s in sources] == ["train", "replay"]
    assert sources[1].paths == (cfg.tasks[0].data.path,) and sources[1].seed == task.data.replay.seed
    counts = Mixture(tuple(s.name for s in sources), tuple(s.weight for s in sources)).micro_counts(0, 10 * every, mb)
    assert (counts.sum(axis=1) == mb).all()
    np.testing.assert_array_equal(counts[:, 1].reshape(10, every).sum(axis=1), rows)
    assert data_sources(cfg.task_config(0, previous_checkpoint=None))[0].weight == 1.0


def test_replay_stream_is_deterministic_per_seed():
    shards = [Shard("a", 50, 0), Shard("b", 30, 50)]
    a = pieces_row_ids(rank_pieces(shards, world_size=1, rank=0, seed=1001, start=0, count=100))
    b = pieces_row_ids(rank_pieces(shards, world_size=1, rank=0, seed=1001, start=0, count=100))
    c = pieces_row_ids(rank_pieces(shards, world_size=1, rank=0, seed=1002, start=0, count=100))
    assert (a == b).all() and not (a == c).all()


def test_schedule_continuity_across_task_boundaries():
    cfg = load_continual(CFG)
    inf = schedules.get("infinite", **cfg.schedule_params())
    for b in (30, 60):  # infinite: flat at η_const across boundaries, no re-warming
        assert inf(b - 1) == inf(b) == inf(b + 1) == pytest.approx(0.5)
    rw = schedules.get("cosine_rewarm", warmup_steps=3, min_ratio=0.1, task_steps=cfg.task_steps)
    for b in (30, 60):  # repeated cosine: decays to η_min at the boundary, then re-warms
        assert rw(b) == pytest.approx(0.1) and rw(b + 3) == pytest.approx(1.0)
        assert abs(rw(b) - rw(b - 1)) < 0.01


def test_bad_continual_configs():
    with pytest.raises(ConfigError, match="not an earlier task"):
        load_continual(CFG, ["tasks.1.replay_tasks=[c]"])
    with pytest.raises(ConfigError, match="needs schedule.name: infinite"):
        load_continual(CFG, ["schedule={name: cosine_rewarm, warmup_steps: 3, min_ratio: 0.1}"])
    with pytest.raises(ConfigError, match="before the constant phase"):
        load_continual(CFG, ["tasks.0.steps=10"])
    with pytest.raises(ConfigError, match="not an index"):
        load_continual(CFG, ["tasks.7.steps=3"])


def test_schedule_params_follow_the_schedules_declared_capabilities():
    cfg = load_continual(CFG)  # infinite: task_steps (task_boundaries) and total_steps are filled in
    assert cfg.schedule_params()["task_steps"] == [30, 30, 30] and cfg.schedule_params()["total_steps"] == 90
    rw = load_continual(CFG, ["anneal_steps=0", "schedule={name: cosine_rewarm, warmup_steps: 3}"])
    assert rw.schedule_params() == {"warmup_steps": 3, "task_steps": [30, 30, 30]}  # no total_steps field
    cos = load_continual(CFG, ["anneal_steps=0", "schedule={name: cosine, warmup_steps: 3}"])
    assert cos.schedule_params() == {"warmup_steps": 3, "total_steps": 90}  # no task boundaries


def test_tune_trials_drop_anneal_branches_for_schedules_without_a_constant_phase():
    from cluster.tune import load_tune

    tune = load_tune(REPO / "configs/tune-debug.yaml")
    assert "anneal_steps=0" in tune.trial_overrides({"schedule": "cosine_rewarm"})
    assert "anneal_steps=0" not in tune.trial_overrides({"schedule": "infinite"})


def test_a_continual_task_on_a_mixture_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"tasks\[1\].data.sources: a continual task trains on one folder"):
        load_continual(CFG, ["tasks.1.data.path=null", "tasks.1.data.prepare=null",
                             "tasks.1.data.sources=[{name: a, path: /d/a, weight: 1}]"])
