"""The data plan: deterministic, disjoint across ranks, resumable at any position."""

from __future__ import annotations

import numpy as np
import pytest

from data.stream import DataPosition, Shard, epoch_rows, pieces_row_ids, rank_pieces

SHARDS = [Shard(f"s{i}", rows, start) for i, (rows, start) in enumerate([(10, 0), (7, 10), (10, 17), (4, 27)])]
N = 31


def ids(rank, start, count, world=2, seed=0):
    return pieces_row_ids(rank_pieces(SHARDS, world_size=world, rank=rank, seed=seed, start=start, count=count))


def test_one_epoch_partitions_rows_across_ranks():
    world = 3
    per = epoch_rows(SHARDS, world)
    assert per == N // world == 10
    got = [ids(r, 0, per, world=world) for r in range(world)]
    allrows = np.concatenate(got)
    assert len(allrows) == len(np.unique(allrows)) == per * world
    assert set(allrows) <= set(range(N))


def test_stream_concatenates_shards_in_seeded_order():
    order = np.random.default_rng([0, 0]).permutation(4)
    stream = np.concatenate([np.arange(SHARDS[i].row_id_start, SHARDS[i].row_id_start + SHARDS[i].rows) for i in order])
    per = N // 2
    np.testing.assert_array_equal(ids(0, 0, per), stream[:per])
    np.testing.assert_array_equal(ids(1, 0, per), stream[per : 2 * per])


def test_resume_is_the_suffix_of_the_full_stream():
    full = ids(1, 0, 50)  # crosses three epochs
    for k in (0, 1, 7, 15, 16, 33):
        np.testing.assert_array_equal(ids(1, k, 50 - k), full[k:])


def test_epochs_differ_and_seed_matters():
    per = N // 2
    e0, e1 = ids(0, 0, per), ids(0, per, per)
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(ids(0, 0, per, seed=1), e0)
    np.testing.assert_array_equal(ids(0, 0, per, seed=0), e0)


def test_too_few_rows_for_world_size():
    with pytest.raises(ValueError, match="trainer.num_workers"):
        rank_pieces([Shard("a", 1, 0)], world_size=2, rank=0, seed=0, start=0, count=1)


def test_position_round_trip():
    p = DataPosition(streams={"train": 37}, world_size=2, seed=3, epoch_rows=15, mixed=37, seen={"train": 74})
    assert p.epoch == 2 and p.rows_consumed == 37
    assert DataPosition.from_dict(p.to_dict()) == p
    m = DataPosition(streams={"web": 30, "code": 10}, world_size=2, seed=3, epoch_rows=15, mixed=40,
                     seen={"web": 60, "code": 20})
    assert DataPosition.from_dict(m.to_dict()) == m and m.rows_consumed == 30 and m.rows("other") == 0
    import json

    sorted_json = json.loads(json.dumps(m.to_dict(), sort_keys=True))  # train_state.json sorts its keys
    assert DataPosition.from_dict(sorted_json).main == "web" and DataPosition.from_dict(sorted_json).epoch == m.epoch


def test_position_written_before_mixtures_loads():
    """A checkpoint's position from before mixtures (train + replay counters) reads as two streams whose mixture
    position is their sum (the replay share was a fixed count per micro-batch, which the mixture reproduces)."""
    old = {"rows_consumed": 24, "world_size": 1, "seed": 3, "epoch_rows": 15, "replay_rows_consumed": 8, "epoch": 1}
    p = DataPosition.from_dict(old)
    assert p.streams == {"train": 24, "replay": 8} and p.mixed == 32 and p.epoch == 1
    assert DataPosition.from_dict({**old, "replay_rows_consumed": 0}).streams == {"train": 24}


def test_read_rows_spans_files_keeps_order_and_list_widths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.stream import read_rows

    paths = []
    for i, (lo, hi) in enumerate([(0, 5), (5, 12)]):
        ids = np.arange(lo, hi)
        img = np.repeat(ids[:, None], 6, axis=1).astype(np.uint8)  # row r: six pixels of value r
        table = pa.table({
            "images": pa.FixedSizeListArray.from_arrays(pa.array(img.ravel()), 6),
            "labels": pa.array(ids % 3, pa.int64()),
            "row_id": pa.array(ids, pa.int64()),
        })
        paths.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(table, paths[-1])
    got = read_rows(paths, ["images", "labels"], 8)
    assert got["images"].shape == (8, 6) and got["images"].dtype == np.uint8
    np.testing.assert_array_equal(got["images"][:, 0], np.arange(8))
    np.testing.assert_array_equal(got["labels"], np.arange(8) % 3)
    assert len(read_rows(paths, ["row_id"], 100)["row_id"]) == 12  # fewer rows than asked: all of them
    with pytest.raises(ValueError, match="no rows"):
        read_rows([], ["row_id"], 4)


def consumed(world, rows, head=None, seed=0):
    """Row ids every rank read in its first ``rows`` positions (from the head's start)."""
    return [pieces_row_ids(rank_pieces(SHARDS, world_size=world, rank=r, seed=seed, start=0, count=rows, head=head))
            for r in range(world)]


def epoch_ids(epoch, seed=0):
    order = np.random.default_rng([seed, epoch]).permutation(len(SHARDS))
    return np.concatenate([np.arange(SHARDS[i].row_id_start, SHARDS[i].row_id_start + SHARDS[i].rows) for i in order])


@pytest.mark.parametrize(("old", "new", "k"), [(2, 1, 4), (1, 2, 9), (3, 2, 1), (2, 3, 12), (2, 4, 1), (4, 1, 5)])
def test_reshard_consumes_the_rest_of_the_epoch_exactly_once(old, new, k):
    """``k`` rows per rank on ``old`` ranks, then the rest of the epoch on ``new`` ranks: together every row the
    old layout planned for the epoch once (fewer than ``new`` left over), then the next epoch in the regular
    layout for ``new`` ranks."""
    from data.stream import reshard

    before = np.concatenate(consumed(old, k))
    rows, head = reshard(N, old, k, None, new)
    assert rows == 0 and head is not None and head.epoch == 0
    after = consumed(new, head.rows, head)
    assert len({len(a) for a in after}) == 1  # equal shares
    both = np.concatenate([before, *after])
    assert len(both) == len(np.unique(both))  # nothing twice
    planned = (N // old) * old
    assert planned - new < len(both) <= planned and set(both) <= set(epoch_ids(0))
    # the position after the head is the next epoch in the new world's regular layout
    nxt = [pieces_row_ids(rank_pieces(SHARDS, world_size=new, rank=r, seed=0, start=head.rows, count=N // new,
                                      head=head)) for r in range(new)]
    np.testing.assert_array_equal(np.concatenate(nxt), epoch_ids(1)[: (N // new) * new])


def test_reshard_twice_and_at_an_epoch_end():
    from data.stream import Head, reshard

    r1, h1 = reshard(N, 2, 5, None, 3)
    part = consumed(3, 2, h1)
    r2, h2 = reshard(N, 3, 2, h1, 1)
    rest = consumed(1, h2.rows, h2)
    both = np.concatenate([*consumed(2, 5), *part, *rest])
    assert len(both) == len(np.unique(both)) and len(both) >= (N // 2) * 2 - 2  # each cut leaves < new over
    # an epoch used up: the next one starts in the regular layout (rows = epoch * rows per rank)
    assert reshard(N, 2, N // 2, None, 3) == (N // 3, None)
    assert reshard(N, 2, 0, None, 3) == (0, None)
    d = DataPosition(streams={"train": 1}, world_size=3, seed=0, epoch_rows=N // 3, heads={"train": h1}).to_dict()
    assert DataPosition.from_dict(d).heads["train"] == h1 and isinstance(h1, Head)
    assert DataPosition.from_dict(d).epoch == 0


def test_position_resharded_moves_every_stream():
    p = DataPosition(streams={"train": 20, "replay": 3}, world_size=2, seed=0, epoch_rows=15, mixed=23)
    q = p.resharded({"train": N, "replay": 12}, 1)
    assert q.world_size == 1 and q.epoch_rows == N and q.epoch == 1 and q.mixed == 23
    assert q.rows_consumed == 0 and q.heads["train"].rows == (15 - 5) * 2
    assert q.rows("replay") == 0 and q.heads["replay"].rows == (6 - 3) * 2
    assert p.resharded({"train": N}, 2) is p
