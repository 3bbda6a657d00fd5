"""The planned stream through real Ray Data: exact row order across partial and whole shards and epochs."""

from __future__ import annotations

import numpy as np
import pytest

from data.stream import build_rank_dataset, load_shards, pieces_row_ids, rank_pieces

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("start", "count", "batch"), [(0, 500, 64), (37, 900, 100), (611, 700, 256)])
def test_rank_dataset_yields_the_plan(ray_session, debug_data, start, count, batch):
    shards = load_shards(debug_data, "train")
    for rank in range(2):
        pieces = rank_pieces(shards, world_size=2, rank=rank, seed=0, start=start, count=count)
        assert any(p.rows != shards[p.shard].rows for p in pieces)  # partial shards are involved
        ds = build_rank_dataset(shards, pieces)
        ds.context.execution_options.preserve_order = True
        got = [b["row_id"].numpy() for b in ds.iter_torch_batches(batch_size=batch)]  # batches span segments
        np.testing.assert_array_equal(np.concatenate(got), pieces_row_ids(pieces))
