"""Weighted mixtures (data.mixture): the quota-method plan, and the rows a rank draws through it (trainers.batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.mixture import GRID, Mixture
from data.stream import Shard, StreamPlan, pieces_row_ids
from trainers.batches import PlannedBatches, _Rows


def _random_mixtures(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        k = int(rng.integers(1, 6))
        weights = tuple(float(w) for w in np.round(rng.uniform(0.01, 1.0, k), 3))
        yield Mixture(tuple(f"s{i}" for i in range(k)), weights)


def test_every_prefix_keeps_quota_and_no_source_loses_rows():
    """After any number of rows, every source holds floor or ceil of its weight's share (within one row), the
    counts add up, and adding rows never takes one from a source (house monotone)."""
    for m in _random_mixtures(200):
        q = m.shares[1]
        n = np.arange(0, 2 * q + 13)
        c = m.cumulative(n)
        ideal = n[:, None] * m.fractions
        assert (c.sum(axis=1) == n).all()
        assert (c >= np.floor(ideal + 1e-9)).all() and (c <= np.ceil(ideal - 1e-9)).all(), m
        assert (np.diff(c, axis=0) >= 0).all()
        np.testing.assert_allclose(m.fractions, np.asarray(m.weights) / sum(m.weights), atol=1e-12)


def test_counts_are_closed_form_at_any_position():
    m = Mixture(("a", "b", "c"), (0.5, 0.3, 0.2))
    assert m.shares == ((5, 3, 2), 10)
    seq = m.micro_counts(0, 50, 7)
    assert (seq.sum(axis=1) == 7).all()
    np.testing.assert_array_equal(m.micro_counts(7 * 13, 37, 7), seq[13:])  # a resumed plan continues the same
    np.testing.assert_array_equal(seq.sum(axis=0), m.cumulative(350))


def test_three_quarters_one_quarter_is_exact_per_micro_batch():
    m = Mixture(("web", "code"), (0.75, 0.25))
    np.testing.assert_array_equal(m.micro_counts(0, 6, 8), np.tile([6, 2], (6, 1)))
    np.testing.assert_array_equal(m.micro_counts(0, 4, 3).sum(axis=0), [9, 3])


def test_a_small_weight_is_not_rounded_away():
    """5 % of 4-row micro-batches: one row in every fifth micro-batch (round(0.05 * 4) would be 0)."""
    counts = Mixture(("new", "replay"), (0.95, 0.05)).micro_counts(0, 20, 4)
    np.testing.assert_array_equal(counts[:, 1], [0, 0, 0, 0, 1] * 4)


def test_weights_are_normalised_and_odd_ones_rounded_to_the_grid():
    assert Mixture(("a", "b"), (3, 1)).shares == Mixture(("a", "b"), (0.75, 0.25)).shares
    third = Mixture(("a", "b", "c"), (1 / 3, 1 / 3, 1 / 3))
    assert third.shares == ((1, 1, 1), 3)
    odd = Mixture(("a", "b"), (0.1234567, 0.8765433))
    assert odd.shares[1] <= GRID and abs(odd.fractions[0] - 0.1234567) < 1 / GRID
    tiny = Mixture(("a", "b", "c"), (1e-5, 1e-5, 1.0))  # raised to one row each on the grid: equal stay equal
    assert tiny.shares[0][0] == tiny.shares[0][1] and sum(tiny.shares[0]) == tiny.shares[1]
    with pytest.raises(ValueError, match="positive"):
        Mixture(("a", "b"), (1.0, 0.0))


def test_round_trip():
    m = Mixture(("web", "code"), (0.75, 0.25))
    assert Mixture.from_dict(m.to_dict()) == m and m.to_dict() == {"web": 0.75, "code": 0.25}


# ---- the rows a rank draws --------------------------------------------------------------------------------------

class _Streams:
    """Rank 0 of 1: each stream's planned rows from memory, in batches of the size asked for (the last short)."""

    def __init__(self, plans: dict[str, StreamPlan]):
        self.ids = {name: pieces_row_ids(p.pieces(1, 0)) for name, p in plans.items()}

    def batches(self, stream, batch_size, prefetch):
        ids = self.ids[stream]
        for i in range(0, len(ids), batch_size):
            part = ids[i : i + batch_size]
            yield {"tokens": torch.from_numpy(part * 10), "row_id": torch.from_numpy(part)}


def _plans(start=(0, 0), counts=(75, 25)):
    web = StreamPlan((Shard("web", 60, 0),), seed=1, start=start[0], count=counts[0])
    code = StreamPlan((Shard("code", 17, 0),), seed=2, start=start[1], count=counts[1])
    return {"web": web, "code": code}


def test_rows_reader_cuts_and_joins_batches():
    it = iter([{"row_id": torch.arange(i, i + 3)} for i in range(0, 30, 3)])
    r = _Rows(it)
    got = [r.take(k)["row_id"] for k in (3, 2, 4, 1)]
    r.skip(5)
    got.append(r.take(6)["row_id"])
    np.testing.assert_array_equal(torch.cat(got).numpy(), [*range(10), *range(15, 21)])


def test_batches_draw_the_plan_and_resume_mid_plan():
    """Micro-batches of 4 rows from 0.75/0.25: each holds 3 + 1 rows, each stream's rows are its plan's in order
    (wrapping into the next epoch of the 17-row source), and a restart at micro-batch 9 continues the same rows."""
    mix = Mixture(("web", "code"), (0.75, 0.25))
    plans = _plans()
    b = PlannedBatches(plans, mix, 0, 4, rank=0, world=1)
    b.open(_Streams(plans), 1, 25)
    first = [b.next() for _ in range(25)]
    assert all([len(p["row_id"]) for p in parts] == [3, 1] for parts in first)
    web = np.concatenate([parts[0]["row_id"].numpy() for parts in first])
    code = np.concatenate([parts[1]["row_id"].numpy() for parts in first])
    np.testing.assert_array_equal(web, pieces_row_ids(plans["web"].pieces(1, 0)))
    np.testing.assert_array_equal(code, pieces_row_ids(plans["code"].pieces(1, 0)))
    assert len(set(code[:17].tolist())) == 17  # once each within an epoch
    pos = b.position()
    assert pos.streams == {"web": 75, "code": 25} and pos.mixed == 100 and pos.seen == {"web": 75, "code": 25}

    # a restart inside the fit: the position of micro-batch 9 restored, the iterators advanced past it
    again = PlannedBatches(plans, mix, 0, 4, rank=0, world=1)
    mid = PlannedBatches(plans, mix, 0, 4, rank=0, world=1)
    mid.open(_Streams(plans), 1, 25)
    for _ in range(9):
        mid.next()
    again.restore(mid.position())
    again.open(_Streams(plans), 1, 25)
    rest = [again.next() for _ in range(16)]
    for a, b2 in zip(rest, first[9:], strict=True):
        for pa, pb in zip(a, b2, strict=True):
            assert torch.equal(pa["row_id"], pb["row_id"])


def test_batches_refuse_a_position_off_the_plan():
    mix = Mixture(("web", "code"), (0.75, 0.25))
    plans = _plans()
    b = PlannedBatches(plans, mix, 0, 4, rank=0, world=1)
    b.open(_Streams(plans), 1, 25)
    for _ in range(3):
        b.next()
    pos = b.position()
    from dataclasses import replace

    with pytest.raises(RuntimeError, match="not this fit's plan"):
        PlannedBatches(plans, mix, 0, 4, rank=0, world=1).restore(replace(pos, streams={"web": 8, "code": 4}))
    with pytest.raises(RuntimeError, match="not inside this fit's plan"):
        PlannedBatches(plans, mix, 0, 4, rank=0, world=1).restore(replace(pos, mixed=13))
