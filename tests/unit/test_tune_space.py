"""Search spaces of `rpt tune` written in YAML, and the trial reporter's reports (pure: no Ray, no MLflow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cluster.config import ConfigError
from cluster.tune_space import Dimension, SpaceError, grid_points, parse_dimension, parse_space, probe_points

REPO = Path(__file__).resolve().parents[2]


def test_every_form_parses_to_its_kind_and_bounds():
    assert parse_dimension("seed", [0, 1, 2]) == Dimension(key="seed", kind="grid", values=(0, 1, 2))
    assert parse_dimension("s", {"choice": ["a", "b"]}).kind == "choice"
    d = parse_dimension("optimizer.lr_peak", {"loguniform": [1e-4, 1e-2]})
    assert (d.kind, d.values, d.candidates()) == ("loguniform", (1e-4, 1e-2), [1e-4, 1e-2])
    assert parse_dimension("k", {"randint": [1, 10]}).candidates() == [1, 9]  # high is exclusive
    assert parse_dimension("k", {"uniform": [0.0, 0.5]}).candidates() == [0.0, 0.5]


@pytest.mark.parametrize("spec, needle", [
    ({"gaussian": [0, 1]}, "is not a search space"),
    ({"loguniform": [0.0, 1.0]}, "must be > 0 (log scale)"),
    ({"uniform": [1.0, 1.0]}, "low=1.0 must be < high=1.0"),
    ({"randint": [0.5, 3]}, "bounds must be integers"),
    ({"choice": []}, "non-empty list"),
    ({"uniform": [1]}, "[low, high] numbers"),
    ({"grid": [1], "choice": [2]}, "is not a search space"),
])
def test_bad_spaces_name_the_key_and_the_fix(spec, needle):
    with pytest.raises(SpaceError) as e:
        parse_dimension("optimizer.lr_peak", spec)
    assert "search.optimizer.lr_peak" in str(e.value) and needle in str(e.value)


def test_probe_points_cover_every_candidate_once_without_the_product():
    dims = parse_space({"schedule": ["a", "b", "c"], "seed": [0, 1, 2]}, {"x": {"uniform": [0.0, 1.0]}})
    points = probe_points(dims)
    assert len(points) == 1 + 2 + 2 + 1  # base + other values of each dimension (not 3*3*2 = 18)
    for d in dims:
        assert sorted({p[d.key] for p in points}, key=str) == sorted(d.candidates(), key=str)
    assert grid_points(dims) == 9


def test_a_key_in_grid_and_search_is_refused():
    with pytest.raises(SpaceError, match="both grid and search"):
        parse_space({"seed": [0]}, {"seed": {"choice": [1]}})


def test_tune_domains_sample_within_bounds_and_log_uniformly():
    from ray.tune.search.sample import Float, Integer

    from cluster.tune_space import tune_domains

    dom = tune_domains(parse_space({"seed": [0, 1]}, {"lr": {"loguniform": [1e-4, 1e-2]}, "k": {"randint": [1, 4]}}))
    assert dom["seed"] == {"grid_search": [0, 1]}
    assert isinstance(dom["lr"], Float) and isinstance(dom["k"], Integer)
    lr = np.array(dom["lr"].sample(size=4000, random_state=np.random.default_rng(0)))
    assert lr.min() >= 1e-4 and lr.max() <= 1e-2
    # log-uniform: log10(lr) uniform on [-4, -2], so its mean is -3 and half the draws are below 1e-3
    assert abs(np.log10(lr).mean() + 3) < 0.03 and abs((lr < 1e-3).mean() - 0.5) < 0.03
    k = dom["k"].sample(size=2000, random_state=np.random.default_rng(0))
    assert set(k) == {1, 2, 3}


def _study(tmp_path, **extra):
    import yaml

    from cluster.tune import load_tune

    raw = yaml.safe_load((REPO / "configs/tune-shift.yaml").read_text())
    raw["continual"] = str(REPO / "configs/continual-shift.yaml")
    raw.update(extra)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_tune(path)


def test_tune_config_takes_search_spaces_scheduler_and_fixed_keys(tmp_path):
    cfg = _study(tmp_path, search={"optimizer.lr_peak": {"loguniform": [1e-4, 1e-2]}}, num_samples=2,
                 scheduler={"name": "asha", "metric": "val/prose/loss", "grace_period": 50},
                 fixed={"trainer.eval_every": 25})
    assert [d.key for d in cfg.dimensions()] == ["schedule", "seed", "optimizer.lr_peak"]
    over = cfg.trial_overrides({"schedule": "wsd", "optimizer.lr_peak": 1e-3})
    assert over[0] == "trainer.eval_every=25" and "anneal_steps=0" in over and "optimizer.lr_peak=0.001" in over


@pytest.mark.parametrize("extra, needle", [
    ({"scheduler": {"name": "asha", "metric": "final_avg_loss"}}, "is not reported at every evaluation"),
    ({"search": {"optimizer.lr_peak": {"loguniform": [10.0, 20.0]}}}, "lr_peak"),
    ({"grid": {"schedule": ["cosine", "wsd"]}}, "'cosine' is not defined under schedules"),
    ({"search": {"schedule": {"uniform": [0, 1]}}, "grid": {"seed": [0]}}, "not uniform"),
    ({"search_alg": {"name": "optuna"}}, "grid dimensions"),
])
def test_bad_studies_are_refused_on_the_driver(tmp_path, extra, needle):
    with pytest.raises(ConfigError) as e:
        _study(tmp_path, **extra)
    assert needle in str(e.value)


def test_trial_reporter_reports_every_evaluation_task_end_and_summary():
    from cluster.tune_trial import TrialReporter

    got = []
    rep = TrialReporter(["a", "b"], "sqlite:///unused.db", got.append)
    rep.on_eval(0, 5, {"train/loss": 3.0})  # training metrics only: no report
    rep.on_eval(0, 10, {"val/a/loss": 2.0, "val/b/loss": 4.0})
    rep.on_task_end(0, 10, {"a": 2.0, "b": 4.0}, {"a": 1.5, "b": 3.5})
    rep.on_eval(1, 20, {"val/a/loss": 2.5, "val/b/loss": 3.0})
    rep.on_task_end(1, 20, {"a": 2.5, "b": 3.0}, None)  # the last task's end is the final report
    rep.final(20, {"L": [[2.0, 4.0], [2.5, 3.0]], "summary": {"final_avg_loss": 2.75, "mean_forgetting": 0.5}})
    assert [r["step"] for r in got] == [10, 10, 20, 20] and rep.reports == 4
    assert all(r["timesteps_total"] == r["step"] for r in got)
    assert got[0]["val/avg_loss"] == 3.0 and got[0]["task"] == 0
    assert got[1]["annealed/val/avg_loss"] == 2.5 and got[1]["tasks_done"] == 1
    assert got[3]["final_avg_loss"] == 2.75 and math.isclose(got[3]["val/avg_loss"], 2.75)


def test_a_stopped_trial_reports_nothing_more_and_ends_its_sequence():
    from cluster.tune_trial import TrialReporter

    def stop(_):
        raise SystemExit(0)

    rep = TrialReporter(["a", "b"], "sqlite:///unused.db", stop)
    with pytest.raises(SystemExit):
        rep.on_eval(0, 10, {"val/a/loss": 2.0, "val/b/loss": 3.0})
    assert rep.stopped_at == 10 and rep.reports == 0
    with pytest.raises(SystemExit):  # the next report (e.g. a task end on the main thread) ends the sequence
        rep.on_task_end(0, 20, {"a": 1.0, "b": 2.0}, None)


def test_optuna_search_proposes_points_inside_the_space():
    pytest.importorskip("optuna")
    from cluster.tune_space import SearchAlgSpec, build_search_alg, tune_domains

    dims = parse_space({}, {"schedule": {"choice": ["cosine_rewarm", "wsd"]},
                            "optimizer.lr_peak": {"loguniform": [1e-4, 1e-2]}, "trainer.micro_batch_size": {"randint": [4, 9]}})
    alg = build_search_alg(SearchAlgSpec(name="optuna", seed=3), seed=0, max_concurrent=2)
    assert alg.set_search_properties("val/avg_loss", "min", {"space": tune_domains(dims)})
    points = [alg.suggest(f"t{i}")["space"] for i in range(6)]
    for p in points:
        assert p["schedule"] in ("cosine_rewarm", "wsd") and 1e-4 <= p["optimizer.lr_peak"] <= 1e-2
        assert 4 <= p["trainer.micro_batch_size"] <= 8
    assert len({p["optimizer.lr_peak"] for p in points}) == 6  # drawn, not repeated
    for i, p in enumerate(points):  # told the results, TPE goes on proposing valid points
        alg.on_trial_complete(f"t{i}", {"val/avg_loss": p["optimizer.lr_peak"]})
    assert 1e-4 <= alg.suggest("t6")["space"]["optimizer.lr_peak"] <= 1e-2
