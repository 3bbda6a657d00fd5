"""Plots of learning-rate schedules: the absolute LR over optimizer steps, with phases and task boundaries.

matplotlib (and numpy) are imported inside the functions, so importing this module stays cheap. Figures
are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``: no
global backend is switched and no figure is left open in the caller's process.

Usage::

    from cluster import plots
    plots.plot_lr(
        [
            dict(label="re-warm", name="cosine_rewarm", params=dict(task_steps=[1000, 1000], warmup_steps=50,
                 min_ratio=0.1), lr_peak=3e-4, steps=2000),
            dict(label="infinite", name="infinite", params=dict(warmup_steps=50, cooldown_steps=300,
                 anneal_steps=0, task_steps=[1000, 1000]), lr_peak=3e-4, steps=2000),
        ],
        "artifacts/lr.png",
    )
    plots.plot_lr_from_configs(["configs/tiny-lm.yaml", "configs/debug-lm.yaml"], "artifacts/lr.png")
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainers import schedules

if TYPE_CHECKING:
    import numpy as np

CURVE_KEYS = ("label", "name", "params", "lr_peak", "steps")
DPI = 120


def lr_curve(name: str, params: dict[str, Any], lr_peak: float, steps: int) -> np.ndarray:
    """Absolute LR ``lr_peak * f(t)`` for ``t = 0 .. steps-1`` of schedule ``name`` (float64 array)."""
    import numpy as np

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"lr_curve: steps={steps!r} must be an int >= 0")
    f = schedules.get(name, **dict(params))
    return lr_peak * np.fromiter((f(t) for t in range(steps)), dtype=np.float64, count=steps)


def _check_curve(i: int, c: Any) -> None:
    if not isinstance(c, dict):
        raise ValueError(
            f"plot_lr: curve {i} is a {type(c).__name__}, expected a dict with keys {CURVE_KEYS}"
        )
    missing = [k for k in CURVE_KEYS if k not in c]
    if missing:
        raise ValueError(
            f"plot_lr: curve {i} ({c.get('label', '?')!r}) lacks {', '.join(missing)}; "
            f"each curve needs {', '.join(CURVE_KEYS)}"
        )
    steps = c["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"plot_lr: curve {i} ({c['label']!r}): steps={steps!r} must be an int >= 1")
    if not c["lr_peak"] > 0:
        raise ValueError(f"plot_lr: curve {i} ({c['label']!r}): lr_peak={c['lr_peak']!r} must be > 0")


_TASK_PREFIX = re.compile(r"^task\d+:")


def _fmt(x: float) -> str:
    """3e-4 rather than 0.0003; mantissa trailing zeros dropped."""
    mant, exp = f"{x:.3e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return mant if int(exp) == 0 else f"{mant}e{int(exp)}"


# Overlapping curves stay visible: later curves are thinner and dashed, drawn over the earlier ones.
_LINE_STYLES = ("-", (0, (6, 2)), (0, (3, 1.5, 1, 1.5)), (0, (1.5, 1)))
_BOUNDARY_GREY = "0.35"


def plot_lr(curves: list[dict[str, Any]], out: str | Path, *, title: str | None = None) -> Path:
    """Draw the LR of every curve on one axes and save a PNG (dpi 120) at ``out``; returns its path.

    Each curve is ``{"label", "name", "params", "lr_peak", "steps"}`` (schedule name and params as for
    :func:`trainers.schedules.get`). Every curve gets a ribbon of its phases (``schedules.phases``)
    along the top of the axes, in its own colour, with the phase names and faint dotted lines at phase
    starts; task starts (``schedules.task_boundaries``) are dashed vertical lines labelled "task k"
    (grey when all curves share them, otherwise in the curve's colour). Parent folders are created.
    """
    if not curves:
        raise ValueError(
            "plot_lr: no curves to plot; give at least one {label, name, params, lr_peak, steps} dict"
        )
    for i, c in enumerate(curves):
        _check_curve(i, c)

    n = len(curves)
    ys = [lr_curve(c["name"], c["params"], float(c["lr_peak"]), c["steps"]) for c in curves]
    phase_lists = [schedules.phases(c["name"], **dict(c["params"])) for c in curves]
    bound_lists = [schedules.task_boundaries(c["name"], **dict(c["params"])) for c in curves]
    x_end = max(c["steps"] for c in curves)
    y_max = max(float(y.max()) for y in ys)

    fig, ax, ribbon_h = _new_axes(n, x_end, y_max)
    for i, (c, y, ph) in enumerate(zip(curves, ys, phase_lists, strict=True)):
        _draw_curve(ax, i, n, c, y)
        _draw_phase_ribbon(ax, i, c, ph, ribbon_h)
    by_step = _task_boundaries_by_step(curves, bound_lists)
    _draw_task_boundaries(ax, by_step, n, x_end)
    _add_legend_and_labels(ax, n, bool(by_step), title)

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _color(i: int) -> str:
    """Colour of curve ``i`` (and of its ribbon and its own task boundaries)."""
    return f"C{i % 10}"


def _new_axes(n: int, x_end: int, y_max: float) -> tuple[Any, Any, float]:
    """An Agg figure and axes for ``n`` curves; returns ``(fig, ax, ribbon_h)``.

    The phase ribbons are stacked at the top of the axes, ``ribbon_h`` (axes fraction) each; the y range
    leaves room for them above the curves.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8 + 0.25 * n), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ribbon_h = min(0.06, 0.4 / n)
    top_frac = 1.0 - n * ribbon_h - 0.04
    ax.set_xlim(0, max(x_end - 1, 1))
    ax.set_ylim(0, (y_max if y_max > 0 else 1.0) / top_frac)
    return fig, ax, ribbon_h


def _draw_curve(ax: Any, i: int, n: int, c: dict[str, Any], y: np.ndarray) -> None:
    """The LR line of curve ``i`` of ``n``: later curves thinner and dashed, drawn over the earlier ones."""
    ax.plot(
        range(c["steps"]),
        y,
        color=_color(i),
        lw=2.8 - 1.5 * i / (n - 1) if n > 1 else 1.8,
        ls=_LINE_STYLES[i % len(_LINE_STYLES)],
        label=f"{c['label']} ({c['name']}, peak {_fmt(float(c['lr_peak']))})",
        zorder=3 + i,
    )


def _draw_phase_ribbon(
    ax: Any, i: int, c: dict[str, Any], phases: list[schedules.Phase], ribbon_h: float
) -> None:
    """Ribbon ``i`` (from the top) of curve ``c``'s phases: curve label on the right, alternating shades,
    dotted lines at phase starts and the phase names (``taskK:`` prefix dropped) where they fit."""
    steps, color = c["steps"], _color(i)
    y_hi = 1.0 - i * ribbon_h
    y_lo = y_hi - ribbon_h
    y_mid = (y_lo + y_hi) / 2
    ax.text(1.004, y_mid, c["label"], transform=ax.transAxes, ha="left", va="center", fontsize=7, color=color)
    for j, (phase, start, end) in enumerate(phases):
        start, end = max(start, 0), min(end, steps)
        if start >= end:
            continue
        ax.axvspan(start, end, ymin=y_lo, ymax=y_hi, color=color, alpha=0.14 if j % 2 else 0.28, lw=0)
        if start > 0:
            ax.axvline(start, color=color, ls=":", lw=0.8, alpha=0.5, zorder=1)
        name = _TASK_PREFIX.sub("", phase)
        if (end - start) / ax.get_xlim()[1] >= 0.0085 * len(name) + 0.004:
            ax.text(
                (start + end) / 2,
                y_mid,
                name,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="center",
                fontsize=7,
                color="0.15",
                clip_on=True,
            )


def _task_boundaries_by_step(
    curves: list[dict[str, Any]], bound_lists: list[list[int]]
) -> dict[int, tuple[int, list[int]]]:
    """Task starts within each curve's steps: ``{step: (task index, [indices of the curves having it])}``."""
    by_step: dict[int, tuple[int, list[int]]] = {}
    for i, (c, bounds) in enumerate(zip(curves, bound_lists, strict=True)):
        for k, b in enumerate(bounds):
            if b < c["steps"]:
                by_step.setdefault(b, (k, []))[1].append(i)
    return by_step


def _draw_task_boundaries(ax: Any, by_step: dict[int, tuple[int, list[int]]], n: int, x_end: int) -> None:
    """One dashed line per task start, labelled "task k": grey when every curve has it (or there is one
    curve), otherwise in the colour of the first curve that has it."""
    for b, (k, owners) in sorted(by_step.items()):
        shared = len(owners) == n and n > 1
        color = _BOUNDARY_GREY if shared or n == 1 else _color(owners[0])
        ax.axvline(b, color=color, ls="--", lw=1.1, alpha=0.85, zorder=2)
        ax.text(
            b,
            0.02,
            f" task {k}",
            transform=ax.get_xaxis_transform(),
            rotation=90,
            ha="left" if b < x_end - 1 else "right",
            va="bottom",
            fontsize=8,
            color=color,
        )


def _add_legend_and_labels(ax: Any, n: int, has_boundaries: bool, title: str | None) -> None:
    """Legend below the axes (with a "task boundary" entry if any), axis labels, grid and title."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    if has_boundaries:
        handles.append(Line2D([], [], color=_BOUNDARY_GREY, ls="--", lw=1.1))
        labels.append("task boundary")
    ax.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.13),
        ncol=min(n + has_boundaries, 3),
        fontsize=9,
        frameon=False,
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(True, alpha=0.25, lw=0.6)
    ax.set_title(title if title is not None else "learning-rate schedule" + ("s" if n > 1 else ""))


def _labels(paths: Sequence[Path], names: Sequence[str]) -> list[str]:
    """Config names; file stems where names collide; stems with an index where those collide too."""
    out = []
    for p, name in zip(paths, names, strict=True):
        out.append(name if list(names).count(name) == 1 else p.stem)
    if len(set(out)) < len(out):
        out = [f"{lab} #{i}" if out.count(lab) > 1 else lab for i, lab in enumerate(out)]
    return out


def curves_from_configs(config_paths: Sequence[str | Path], overrides: list[str] | None = None) -> list[dict]:
    """One :func:`plot_lr` curve per run config (``overrides`` apply to every config).

    label = config name (file stem where names collide), params = ``cfg.schedule_params()``,
    lr_peak = ``optimizer.lr_peak``, steps = ``trainer.max_steps``, or ``sum(task_steps)`` when larger.
    """
    from cluster.config import load_config

    if not config_paths:
        raise ValueError("plot_lr_from_configs: no config files given (e.g. configs/tiny-lm.yaml)")
    paths = [Path(p) for p in config_paths]
    cfgs = [load_config(p, list(overrides or [])) for p in paths]
    curves = []
    for label, cfg in zip(_labels(paths, [c.name for c in cfgs]), cfgs, strict=True):
        params = cfg.schedule_params()
        steps = max(cfg.trainer.max_steps, sum(params.get("task_steps") or []))
        curves.append(
            dict(
                label=label, name=cfg.schedule.name, params=params, lr_peak=cfg.optimizer.lr_peak, steps=steps
            )
        )
    return curves


def plot_lr_from_configs(
    config_paths: list[str], out: str | Path, overrides: list[str] | None = None, *, title: str | None = None
) -> Path:
    """Plot the LR schedule of each run config (see :func:`curves_from_configs`) into one PNG at ``out``."""
    return plot_lr(curves_from_configs(config_paths, overrides), out, title=title)
