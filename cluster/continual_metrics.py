"""Continual pre-training metrics over the loss matrix ``L[i][j]``.

``L[i][j]`` is the validation loss on task ``j`` after finishing task ``i`` (tasks ``0..n-1``), as in
"Beyond Cosine Decay" (arXiv 2503.02844), the paper whose comparison ``rpt tune`` repeats (README,
"Continual pre-training and the schedule comparison"):

- adaptation on task ``i``: ``L[i][i]`` (how well the model learned the task it just trained on);
  ``mean_adaptation`` averages it over tasks;
- forgetting on task ``j`` after task ``i > j``: ``L[i][j] - min_{j <= k < i} L[k][j]`` (how much
  worse than its best so far); ``mean_forgetting`` averages the final row's forgetting over
  ``j < n-1``;
- final average loss: ``mean_j L[n-1][j]`` (lower is better).
"""

from __future__ import annotations

import numpy as np


def _matrix(L) -> np.ndarray:
    m = np.asarray(L, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"L must be a non-empty square matrix [task after][task evaluated], got shape {m.shape}")
    return m


def adaptation(L) -> np.ndarray:
    """``L[i][i]`` for every task."""
    return np.diag(_matrix(L)).copy()


def forgetting(L) -> np.ndarray:
    """``F[i][j] = L[i][j] - min_{j<=k<i} L[k][j]`` for ``i > j``; NaN elsewhere."""
    m = _matrix(L)
    n = len(m)
    out = np.full((n, n), np.nan)
    for i in range(1, n):
        for j in range(i):
            out[i, j] = m[i, j] - m[j:i, j].min()
    return out


def final_average_loss(L) -> float:
    return float(_matrix(L)[-1].mean())


def summary(L) -> dict[str, float]:
    """The three numbers a comparison reports."""
    m = _matrix(L)
    f = forgetting(m)
    n = len(m)
    return {
        "final_avg_loss": final_average_loss(m),
        "mean_adaptation": float(adaptation(m).mean()),
        "mean_forgetting": float(np.nanmean(f[-1, : n - 1])) if n > 1 else 0.0,
    }
