"""Weighted mixtures of data sources: which source every row of every micro-batch comes from.

A run that trains on several prepared folders (``data.sources: [{name, path, weight}, ...]``, or one folder plus
the replay of earlier tasks in continual pre-training) draws each micro-batch's rows from the sources by weight.
The draw is a *plan*, a pure function of the weights and one integer, the number of mixture rows a rank has
consumed, so a resumed or restarted run continues it exactly and every rank draws the same counts (each from its
own part of every source, :mod:`data.stream`).

The rows are apportioned one at a time by Balinski and Young's quota method ("The quota method of apportionment",
Amer. Math. Monthly 82(7), 1975): row ``n`` goes to the source with the smallest ``(c_s + 1) / w_s`` (Jefferson's
priority: the source whose next row is most overdue) among those still under their upper quota
(``c_s < w_s (n + 1)``). The method is house monotone (adding a row never takes one away from a source) and keeps
quota: after any ``n`` rows every source has ``floor(w_s n)`` or ``ceil(w_s n)`` rows, so the realised count of
each source is within one row of its weight at every micro-batch and step, however small the weight (a 5 %
replay with 4-row micro-batches is one row in every fifth micro-batch, not rounded away).

With rational weights ``a_s / Q`` the sequence is periodic with period ``Q`` (after ``Q`` rows every source
holds exactly ``a_s``), so one period is computed once and counts at any position are closed-form
(:meth:`Mixture.cumulative`). Weights are taken as the decimals they are written as (0.75 is 3/4); weights whose
common denominator exceeds :data:`MAX_PERIOD` are rounded to multiples of ``1 / GRID`` first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import numpy as np

MAX_PERIOD = 100_000  # rows of one period computed exactly
GRID = 10_000  # resolution of weights that would need a longer period


def _shares(weights: tuple[float, ...]) -> tuple[tuple[int, ...], int]:
    """Normalised weights as integers ``a_s`` over a common denominator ``Q`` (``sum(a) == Q``)."""
    fracs = [Fraction(str(w)) for w in weights]
    total = sum(fracs)
    norm = [f / total for f in fracs]
    q = math.lcm(*(f.denominator for f in norm))
    if q <= MAX_PERIOD:
        return tuple(int(f * q) for f in norm), q
    exact = [float(f) * GRID for f in norm]  # largest remainder onto the grid, every source at least 1
    a = [max(1, math.floor(x)) for x in exact]
    while sum(a) < GRID:  # the largest remainders get the rows left
        a[max(range(len(a)), key=lambda i: (exact[i] - a[i], -i))] += 1
    while sum(a) > GRID:  # sources raised to 1 row: taken from the most over-served of the others
        a[max((i for i in range(len(a)) if a[i] > 1), key=lambda i: (a[i] - exact[i], -i))] -= 1
    g = math.gcd(*a)
    return tuple(x // g for x in a), sum(a) // g


@dataclass(frozen=True)
class Source:
    """One planned stream of a run: prepared folders read as one stream (their train shards concatenated), its
    weight in the mixture and the seed of its shard order."""

    name: str
    paths: tuple[str, ...]
    weight: float
    seed: int


@dataclass(frozen=True)
class Mixture:
    """Sources ``names`` with positive ``weights`` (any scale; normalised)."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.weights) or not self.names:
            raise ValueError(f"a mixture needs one weight per source: names={self.names}, weights={self.weights}")
        if any(not w > 0 or math.isinf(w) for w in self.weights):
            raise ValueError(f"mixture weights must be positive and finite, got {list(self.weights)} for {list(self.names)}")

    @cached_property
    def shares(self) -> tuple[tuple[int, ...], int]:
        return _shares(self.weights)

    @property
    def fractions(self) -> np.ndarray:
        """The realised weights ``a_s / Q`` (sum 1)."""
        a, q = self.shares
        return np.asarray(a, dtype=np.float64) / q

    @cached_property
    def _prefix(self) -> np.ndarray:
        """``(Q + 1, K)``: rows of each source among the first ``n`` rows of a period, ``n = 0..Q``."""
        a, q = self.shares
        k = len(a)
        counts = [0] * k
        order = np.empty(q, dtype=np.int64)
        for n in range(q):
            best = -1
            for s in range(k):
                if counts[s] * q >= a[s] * (n + 1):  # at its upper quota
                    continue
                if best < 0 or (counts[s] + 1) * a[best] < (counts[best] + 1) * a[s]:
                    best = s
            order[n] = best
            counts[best] += 1
        prefix = np.zeros((q + 1, k), dtype=np.int64)
        prefix[1:] = np.cumsum(np.eye(k, dtype=np.int64)[order], axis=0)
        return prefix

    def cumulative(self, n: int | np.ndarray) -> np.ndarray:
        """Rows of each source among the first ``n`` mixture rows: shape ``(K,)``, or ``(len(n), K)``."""
        a, q = self.shares
        n = np.asarray(n, dtype=np.int64)
        return (n // q)[..., None] * np.asarray(a, dtype=np.int64) + self._prefix[n % q]

    def micro_counts(self, start: int, n_micro: int, micro_batch: int) -> np.ndarray:
        """``(n_micro, K)``: rows of each source in each of ``n_micro`` micro-batches of ``micro_batch`` rows,
        the first starting at mixture row ``start``."""
        bounds = self.cumulative(start + micro_batch * np.arange(n_micro + 1, dtype=np.int64))
        return np.diff(bounds, axis=0)

    def to_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights, strict=True))

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> Mixture:
        return cls(tuple(d), tuple(float(w) for w in d.values()))
