"""The curation stages against brute force (no Ray): exact dedup removes exactly the planted copies, MinHash LSH
near dedup removes >= 95 % of pairs with Jaccard >= 0.9 and nothing without a near neighbour, INGENIOUS's lazy
greedy equals a brute-force greedy facility-location selection and beats random subsets, Gopher rules."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data.curation import FilterSpec, NearDedupSpec, exact, filters, near, select


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Random documents over a 3,000-word vocabulary, 80-200 words each (pairwise Jaccard of 5-grams ~0)."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(3000)]
    return [" ".join(rng.choice(vocab, size=int(rng.integers(80, 200)))) for _ in range(n)]


def perturb(text: str, frac: float, rng) -> str:
    words = text.split()
    for i in rng.choice(len(words), size=max(1, int(frac * len(words))), replace=False):
        words[i] = f"x{rng.integers(10**6)}"
    return " ".join(words)


def test_exact_dedup_removes_exactly_the_normalised_copies():
    docs = corpus(50)
    rng = np.random.default_rng(1)
    planted = {}
    for src in rng.choice(50, size=10, replace=False):
        variant = "  " + docs[src].upper().replace(" ", " \n\t ") + " "  # case and whitespace differ
        planted[len(docs)] = int(src)
        docs.append(variant)
    keep = exact.first_occurrences(exact.keys(docs))
    assert set(np.flatnonzero(~keep)) == set(planted)
    assert exact.normalise("Ａ  b\u0301\n C") == exact.normalise("Ａ b\u0301 c")


@pytest.fixture(scope="module")
def planted_near():
    rng = np.random.default_rng(2)
    docs = corpus(300)
    for src in rng.choice(300, size=60, replace=False):  # near copies: 0.3-2 % of the words changed
        docs.append(perturb(docs[src], float(rng.uniform(0.003, 0.02)), rng))
    for src in rng.choice(300, size=20, replace=False):  # relatives: 12 % changed (Jaccard ~0.4 < 0.5)
        docs.append(perturb(docs[src], 0.12, rng))
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


def test_near_dedup_against_brute_force_jaccard(planted_near):
    docs, spec = planted_near, NearDedupSpec(threshold=0.8, ngram=5, num_perm=128)
    sets = [near.shingles(d, 5) for d in docs]
    pairs = {(i, j): near.jaccard(sets[i], sets[j]) for i, j in itertools.combinations(range(len(docs)), 2)}
    best = np.zeros(len(docs))
    for (i, j), v in pairs.items():
        best[i], best[j] = max(best[i], v), max(best[j], v)
    sigs = near.signatures(docs, ngram=5, num_perm=128, seed=spec.seed)
    keep, of = near.near_duplicates(sigs, threshold=spec.threshold, bands=spec.bands, seed=spec.seed)
    close = [(i, j) for (i, j), v in pairs.items() if v >= 0.9]
    assert len(close) >= 25  # the planted near copies are there (5-grams: 1 % of words changed ~ Jaccard 0.9)
    caught = sum(not keep[i] or not keep[j] for i, j in close)
    assert caught >= 0.95 * len(close), (caught, len(close))
    assert not (~keep & (best < 0.5)).any()  # nothing without a near neighbour is removed
    for i in np.flatnonzero(~keep):  # the kept one is earlier in corpus order
        assert of[i] < i and keep[of[i]]
    assert (best[(best >= 0.2) & (best < 0.5)]).size >= 15  # the distant relatives exist and stayed
    # deterministic, and independent of how the signatures were batched
    again = np.concatenate([near.signatures(docs[k : k + 37], ngram=5, num_perm=128, seed=spec.seed)
                            for k in range(0, len(docs), 37)])
    np.testing.assert_array_equal(again, sigs)


def test_near_spec_checks_bands():
    with pytest.raises(ValueError, match="bands=7 does not divide num_perm=128"):
        NearDedupSpec(bands=7)


def brute_greedy(k: np.ndarray, budget: int) -> list[int]:
    chosen, best = [], np.zeros(len(k))
    for _ in range(budget):
        gains = [(np.maximum(best, k[:, j]).sum() - best.sum(), -j) for j in range(len(k)) if j not in chosen]
        g, neg = max(gains)
        chosen.append(-neg)
        best = np.maximum(best, k[:, -neg])
    return chosen


def test_ingenious_equals_brute_force_greedy_and_beats_random_subsets():
    docs = corpus(24, seed=3) + [perturb(d, 0.2, np.random.default_rng(4)) for d in corpus(6, seed=3)]
    x = select.hashed_features(docs, dim=256, ngram=2)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0)
    k = select.kernel(x)
    assert sorted(select.lazy_greedy(k, 8)) == sorted(brute_greedy(k, 8))
    # larger: its facility-location value exceeds that of 20 random subsets of the same size
    big = corpus(200, seed=5)
    xb = select.hashed_features(big, dim=512, ngram=2)
    kb = select.kernel(xb)
    chosen = select.lazy_greedy(kb, 40)
    value = select.facility_location(kb, chosen)
    rng = np.random.default_rng(6)
    randoms = [select.facility_location(kb, rng.choice(200, size=40, replace=False)) for _ in range(20)]
    assert value > max(randoms), (value, max(randoms))
    keep = select.select(xb, fraction=0.25, parts=4, seed=0)
    parts = select.partitions(200, 4, 0)
    assert sorted(np.concatenate(parts)) == list(range(200))
    assert keep.sum() == sum(round(0.25 * len(p)) for p in parts)  # the fraction of each partition
    np.testing.assert_array_equal(keep, select.select(xb, fraction=0.25, parts=4, seed=0))


def test_gopher_rules_name_the_rule_and_value():
    spec = FilterSpec()
    good = " ".join(["the quick brown fox jumps over the lazy dog"] * 8) + "\n" + "another line of prose here."
    assert filters.reason(good, spec) is None
    assert filters.reason("too short", spec).startswith("min_words: 2")
    assert filters.reason(" ".join(["#tag"] * 60), spec).startswith("max_symbol_ratio")
    assert filters.reason("\n".join(["same line of words here ok"] * 20), spec).startswith("max_repeated_line_fraction")
    assert filters.reason(" ".join(["12345 67890"] * 40), spec).startswith("min_alpha_word_fraction")
    assert filters.reason("too short", FilterSpec(min_words=None)) is None
