"""INGENIOUS (Renduchintala et al., "INGENIOUS: Using Informative Data Subsets for Efficient Pre-Training of
Language Models", arXiv 2305.06677): keep the subset S that maximises the facility-location function

    f(S) = sum_i max_{j in S} sim(i, j),   sim(i, j) = max(0, cos(x_i, x_j)),

a monotone submodular "representativeness" of S for the whole corpus, by lazy greedy (Minoux 1978; within
1 - 1/e of the optimum, Nemhauser et al. 1978), separately in seeded random partitions (the paper's way to scale:
the kernel of a partition of m documents is m x m). The greedy runs in ``submodlib`` (the library the INGENIOUS
authors build on; its C++ lazy greedy over our precomputed kernel).

Features: hashed word n-grams (counts of unigrams .. ``ngram``-grams in ``features`` buckets, L2-normalised), or
a registered model's mean-pooled last hidden states (the paper uses a pre-trained LM's embeddings).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from collections.abc import Sequence

import numpy as np

from data.curation.exact import normalise

_WORD = re.compile(r"\w+", re.UNICODE)


def hashed_features(texts: Sequence[str], *, dim: int, ngram: int) -> np.ndarray:
    """(n, dim) float32, L2-normalised counts of hashed word 1..ngram-grams (a zero text: a zero row)."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, text in enumerate(texts):
        words = _WORD.findall(normalise(text))
        grams = [" ".join(words[k : k + n]) for n in range(1, ngram + 1) for k in range(len(words) - n + 1)]
        if not grams:
            continue
        idx = [int.from_bytes(hashlib.blake2b(g.encode("utf-8"), digest_size=8).digest(), "little") % dim
               for g in grams]
        np.add.at(out[i], np.asarray(idx), 1.0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def kernel(x: np.ndarray) -> np.ndarray:
    """Facility-location similarities: max(0, cosine) of L2-normalised rows."""
    return np.maximum(x @ x.T, 0.0).astype(np.float32)


def facility_location(k: np.ndarray, s: Sequence[int]) -> float:
    """f(S) for the kernel ``k`` (n, n)."""
    return float(k[:, list(s)].max(axis=1).sum()) if len(s) else 0.0


def lazy_greedy(k: np.ndarray, budget: int) -> list[int]:
    """The greedy facility-location selection of ``budget`` items of kernel ``k`` (submodlib's lazy greedy), in
    the order chosen."""
    from submodlib import FacilityLocationFunction

    n = len(k)
    budget = min(budget, n)
    if budget == 0:
        return []
    if budget == n:
        return list(range(n))
    f = FacilityLocationFunction(n=n, mode="dense", sijs=k, separate_rep=False)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bar
        chosen = f.maximize(budget=budget, optimizer="LazyGreedy", stopIfZeroGain=False,
                            stopIfNegativeGain=False, verbose=False)
    return [int(i) for i, _ in chosen]


def partitions(n: int, parts: int, seed: int) -> list[np.ndarray]:
    """A seeded random split of ``range(n)`` into ``parts`` near-equal parts (each sorted)."""
    perm = np.random.default_rng([seed, 2305_06677]).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, min(parts, max(n, 1)))]


def select(x: np.ndarray, *, fraction: float, parts: int, seed: int) -> np.ndarray:
    """Keep mask: in each partition the ``round(fraction * size)`` (at least 1) greedy facility-location picks."""
    keep = np.zeros(len(x), dtype=bool)
    for idx in partitions(len(x), parts, seed):
        if len(idx) == 0:
            continue
        budget = max(1, int(round(fraction * len(idx))))
        keep[idx[lazy_greedy(kernel(x[idx]), budget)]] = True
    return keep
