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
    p = DataPosition(rows_consumed=37, world_size=2, seed=3, epoch_rows=15)
    assert p.epoch == 2
    assert DataPosition.from_dict(p.to_dict()) == p


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
