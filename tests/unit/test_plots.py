"""LR plots (cluster/plots.py): exact curve values, a readable non-blank PNG, config-driven plots, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster import plots
from trainers import schedules

REPO = Path(__file__).resolve().parents[2]
TASKS = [400, 400, 400]
REWARM = dict(task_steps=TASKS, warmup_steps=20, min_ratio=0.1)
INFINITE = dict(warmup_steps=20, cooldown_steps=100, anneal_steps=0, const_ratio=0.5, task_steps=TASKS)
COSINE = dict(warmup_steps=10, total_steps=200, min_ratio=0.1)


def read_png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path)


def two_curves(steps: int = 1200) -> list[dict]:
    return [
        dict(label="re-warm", name="cosine_rewarm", params=REWARM, lr_peak=3e-4, steps=steps),
        dict(label="infinite", name="infinite", params=INFINITE, lr_peak=3e-4, steps=steps),
    ]


@pytest.mark.parametrize(
    ("name", "params", "steps"),
    [("cosine", COSINE, 250), ("infinite", INFINITE, 1200), ("cosine_rewarm", REWARM, 1200)],
)
def test_lr_curve_is_lr_peak_times_f(name, params, steps):
    lr_peak = 3e-4
    y = plots.lr_curve(name, params, lr_peak, steps)
    f = schedules.get(name, **params)
    assert isinstance(y, np.ndarray) and y.shape == (steps,) and y.dtype == np.float64
    for t in (0, 5, 10, 20, 57, 119, 120, 199, steps - 1):
        assert y[t] == pytest.approx(lr_peak * f(t), rel=1e-15, abs=0.0)
    assert y[0] == 0.0 and y.max() == pytest.approx(lr_peak)


def test_lr_curve_hand_values():
    # cosine, W=10, T=200, r=0.1: f(5) = 0.5; f(105) = midpoint of the cosine = (1 + 0.1)/2; f(>=200) = 0.1
    y = plots.lr_curve("cosine", COSINE, 2e-3, 250)
    assert y[5] == pytest.approx(1e-3)
    assert y[10] == pytest.approx(2e-3)
    assert y[105] == pytest.approx(2e-3 * 0.55)
    assert y[220] == pytest.approx(2e-4)
    # infinite, W=20, C=100, c=0.5, no anneal: constant at c * peak from step 120 on, across task boundaries
    z = plots.lr_curve("infinite", INFINITE, 3e-4, 1200)
    assert z[10] == pytest.approx(1.5e-4)
    assert np.allclose(z[120:], 1.5e-4, rtol=1e-12)


def test_lr_curve_edge_cases():
    assert plots.lr_curve("cosine", COSINE, 1e-3, 0).shape == (0,)
    with pytest.raises(ValueError, match="steps=-1"):
        plots.lr_curve("cosine", COSINE, 1e-3, -1)
    with pytest.raises(ValueError, match="unknown schedule 'nope'"):
        plots.lr_curve("nope", {}, 1e-3, 10)


def test_plot_lr_writes_readable_non_blank_png(tmp_path):
    out = tmp_path / "nested" / "dir" / "lr.png"
    got = plots.plot_lr(two_curves(), out, title="re-warm vs infinite")
    assert got == out
    img = read_png(out)
    h, w = img.shape[:2]
    assert h > 0 and w > 0
    assert float(img[..., :3].std()) > 0.0
    # figure size * dpi 120 (constrained layout keeps the canvas size)
    assert w == 11 * plots.DPI


def test_plot_lr_single_curve_and_str_path(tmp_path):
    out = plots.plot_lr(
        [dict(label="cos", name="cosine", params=COSINE, lr_peak=1e-3, steps=200)], str(tmp_path / "one.png")
    )
    assert isinstance(out, Path)
    assert read_png(out)[..., :3].std() > 0


def test_plot_lr_many_curves_and_every_schedule(tmp_path):
    curves = [
        dict(label=name, name=name, params=params, lr_peak=1e-3, steps=1200)
        for name, params in [
            ("constant", dict(warmup_steps=10, total_steps=1200)),
            ("linear", dict(warmup_steps=10, total_steps=1200, min_ratio=0.1)),
            ("cosine", dict(warmup_steps=10, total_steps=1200, min_ratio=0.1)),
            ("wsd", dict(warmup_steps=10, total_steps=1200, decay_frac=0.2)),
            ("cosine_rewarm", REWARM),
            ("infinite", dict(INFINITE, anneal_steps=200, min_ratio=0.1, task_steps=None, total_steps=1200)),
        ]
    ]
    out = plots.plot_lr(curves, tmp_path / "all.png")
    assert read_png(out)[..., :3].std() > 0


def test_plot_lr_rejects_empty_and_malformed(tmp_path):
    with pytest.raises(ValueError, match="no curves to plot"):
        plots.plot_lr([], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"curve 0 \('a'\) lacks lr_peak, steps"):
        plots.plot_lr([dict(label="a", name="cosine", params=COSINE)], tmp_path / "x.png")
    with pytest.raises(ValueError, match="steps=0 must be an int >= 1"):
        plots.plot_lr(
            [dict(label="a", name="cosine", params=COSINE, lr_peak=1e-3, steps=0)], tmp_path / "x.png"
        )
    with pytest.raises(ValueError, match="schedule 'cosine'"):  # the schedules' own validation message
        plots.plot_lr(
            [dict(label="a", name="cosine", params={"warmup_steps": 5}, lr_peak=1e-3, steps=10)],
            tmp_path / "x.png",
        )
    assert not (tmp_path / "x.png").exists()


def test_plot_lr_from_configs(tmp_path):
    paths = [str(REPO / "configs/tiny-lm.yaml"), str(REPO / "configs/debug-lm.yaml")]
    out = plots.plot_lr_from_configs(paths, tmp_path / "cfg" / "lr.png")
    assert read_png(out)[..., :3].std() > 0

    curves = plots.curves_from_configs(paths)
    assert [c["label"] for c in curves] == ["tiny-lm", "debug-lm"]
    tiny = curves[0]
    assert tiny["name"] == "cosine" and tiny["steps"] == 300 and tiny["lr_peak"] == 2e-3
    assert tiny["params"]["total_steps"] == 300  # filled from trainer.max_steps


def test_curves_from_configs_overrides_task_steps_and_label_collisions(tmp_path):
    src = (REPO / "configs/debug-lm.yaml").read_text()
    for stem in ("a", "b"):
        (tmp_path / f"{stem}.yaml").write_text(src)
    paths = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    # same run name in both files -> file stems
    assert [c["label"] for c in plots.curves_from_configs(paths)] == ["a", "b"]
    # same file twice -> stems collide too -> indexed
    assert [c["label"] for c in plots.curves_from_configs([paths[0], paths[0]])] == ["a #0", "a #1"]
    # steps = sum(task_steps) when it exceeds trainer.max_steps (max_steps=20 in debug-lm)
    rewarm = [
        "schedule.name=cosine_rewarm",
        "schedule.task_steps=[30, 30]",
        "schedule.warmup_steps=2",
        "schedule.min_ratio=0.1",
    ]
    (c,) = plots.curves_from_configs([paths[0]], rewarm)
    assert c["name"] == "cosine_rewarm" and c["steps"] == 60
    out = plots.plot_lr_from_configs([str(paths[0])], tmp_path / "rw.png", rewarm)
    assert read_png(out)[..., :3].std() > 0
    with pytest.raises(ValueError, match="no config files"):
        plots.plot_lr_from_configs([], tmp_path / "none.png")


def test_import_is_cheap():
    """Importing the module must not pull in matplotlib (it is imported inside the plotting functions)."""
    code = "import sys, cluster.plots; print('matplotlib' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
