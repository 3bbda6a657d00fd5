"""The schedule comparison report: a table (mean ± std over seeds) and plots, from Tune trial results."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("final_avg_loss", "mean_forgetting", "mean_adaptation")


def aggregate(trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per schedule label: mean and std (population, ddof=0) over trials of each summary metric."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        by[t["label"]].append(t)
    out = {}
    for label, ts in sorted(by.items()):
        row: dict[str, Any] = {"n": len(ts), "seeds": sorted(t["seed"] for t in ts)}
        for key in ("summary", "summary_annealed"):
            if all(key in t for t in ts):
                for m in METRICS:
                    vals = np.array([t[key][m] for t in ts])
                    prefix = "" if key == "summary" else "annealed_"
                    row[f"{prefix}{m}"] = (float(vals.mean()), float(vals.std()))
        row["L_mean"] = np.mean([t["L"] for t in ts], axis=0).tolist()
        out[label] = row
    return out


def format_table(agg: dict[str, dict[str, Any]]) -> str:
    """A Markdown table (also what `rpt tune` prints)."""
    cols = [m for m in METRICS] + [f"annealed_{m}" for m in METRICS if any(f"annealed_{m}" in r for r in agg.values())]
    head = "| schedule | seeds | " + " | ".join(c.replace("_", " ") for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for label, row in agg.items():
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if c in row else "-" for c in cols]
        lines.append(f"| {label} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_trials(trials: list[dict[str, Any]]) -> str:
    """One Markdown row per trial: its point in the search space and its summary metrics (sorted by the
    final average loss), for studies that sample keys rather than only sweep seeds."""
    lines = ["| trial | point | " + " | ".join(m.replace("_", " ") for m in METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    for t in sorted(trials, key=lambda t: t["summary"]["final_avg_loss"]):
        point = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.get("point", {}).items())
        lines.append(f"| {t.get('trial', '-')} | {point or '-'} | " + " | ".join(f"{t['summary'][m]:.3f}" for m in METRICS) + " |")
    return "\n".join(lines)


def _val_curves(uri: str, trial: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """``val/<task>/loss`` over global steps, concatenated over the trial's task runs."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for run in trial["runs"]:
        for task in trial["tasks"]:
            for m in client.get_metric_history(run["run_id"], f"val/{task}/loss"):
                curves[task].append((m.step, m.value))
    return {k: sorted(set(v)) for k, v in curves.items()}


def plot_report(trials: list[dict[str, Any]], agg: dict[str, dict[str, Any]], out: Path, uri: str | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    labels = list(agg)
    tasks = trials[0]["tasks"]
    # L heat maps side by side
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.8), squeeze=False)
    vmin = min(np.min(agg[lab]["L_mean"]) for lab in labels)
    vmax = max(np.max(agg[lab]["L_mean"]) for lab in labels)
    for ax, lab in zip(axes[0], labels, strict=True):
        L = np.array(agg[lab]["L_mean"])
        im = ax.imshow(L, vmin=vmin, vmax=vmax, cmap="viridis")
        for i in range(len(L)):
            for j in range(len(L)):
                ax.text(j, i, f"{L[i, j]:.2f}", ha="center", va="center", color="w", fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
        ax.set_xlabel("evaluated on")
        ax.set_title(f"{lab}: L[i][j] (mean over {agg[lab]['n']} seeds)", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="validation loss")
    paths.append(out / "loss_matrix.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    # validation loss curves over global steps, one panel per task, first seed of each schedule
    if uri:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False, sharey=True)
        bounds = [r["step"] for r in trials[0]["runs"]][:-1]  # global steps where tasks 1.. begin
        for lab in labels:
            first = min((t for t in trials if t["label"] == lab), key=lambda t: t["seed"])
            curves = _val_curves(uri, first)
            for ax, task in zip(axes[0], tasks, strict=True):
                if curves.get(task):
                    s, v = zip(*curves[task], strict=True)
                    ax.plot(s, v, label=f"{lab} (seed {first['seed']})")
        for ax, task in zip(axes[0], tasks, strict=True):
            for b in bounds:
                ax.axvline(b, color="grey", ls="--", lw=0.8)
            ax.set_title(f"val loss on {task}")
            ax.set_xlabel("global step")
        axes[0][0].set_ylabel("loss")
        axes[0][0].legend(fontsize=8)
        paths.append(out / "val_curves.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def comparison_report(trials: list[dict[str, Any]], out: Path, *, uri: str | None = None,
                      schedules: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write report.json, report.md and plots into ``out``; return the aggregate and the table."""
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(trials)
    table = format_table(agg)
    plots = plot_report(trials, agg, out, uri)
    (out / "report.md").write_text(table + "\n\n" + format_trials(trials) + "\n")
    (out / "report.json").write_text(json.dumps({"aggregate": agg, "trials": trials}, indent=2, default=str))
    return {"aggregate": agg, "table": table, "plots": [str(p) for p in plots]}
