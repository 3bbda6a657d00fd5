"""Packed rows -> shuffled Parquet shards, written by Ray tasks (`rpt data prepare`, step 4).

The driver holds no rows: per split, the packed full rows stay in Ray's object store (spilled to disk when
they exceed it); only each tokenize batch's tail (< one row) comes to the driver, where the tails are
stitched into further rows. The split's rows, in corpus order (full rows batch by batch, then the stitched
rows), are cut into windows of `shard_rows`; window k is shuffled with `default_rng([seed, split, k])` and
written by one task as the shard at position `perm[k]` of a seeded permutation of the windows (row ids are
contiguous in that position order, as the manifest lists them). Training permutes the shards again every
epoch (`data.stream`). The result is a pure function of the corpus and the settings: the number of actors
changes neither the row order (Ray Data keeps block order) nor the windows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from data import pack
from data.manifest import ShardInfo, SplitInfo

MAX_WRITES_IN_FLIGHT = 8


def tokens_table(rows: np.ndarray, row_id_start: int | None = None) -> pa.Table:
    """Rows (n, row_len) int32 as a `tokens` fixed-size-list column (+ `row_id` from `row_id_start`)."""
    n, row_len = rows.shape
    cols = {"tokens": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(rows, np.int32).reshape(-1)),
                                                        row_len)}
    if row_id_start is not None:
        cols["row_id"] = pa.array(np.arange(row_id_start, row_id_start + n, dtype=np.int64))
    return pa.table(cols)


def rows_of(table: pa.Table) -> np.ndarray:
    col = table.column("tokens").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).astype(np.int32)


def _full_rows(batch: dict[str, np.ndarray], *, code: int, row_len: int) -> pa.Table:
    keep = (batch["split"] == code) & (batch["n_valid"] == row_len)
    return tokens_table(np.asarray(batch["tokens"])[keep].reshape(-1, row_len))


def _tails(batch: dict[str, np.ndarray], *, row_len: int) -> dict[str, np.ndarray]:
    keep = batch["n_valid"] < row_len
    return {"tokens": np.asarray(batch["tokens"])[keep], "n_valid": batch["n_valid"][keep],
            "split": batch["split"][keep]}


@ray.remote
def _write_shard(refs: list, path: str, seed: int, code: int, window: int, row_id_start: int) -> int:
    rows = rows_of(pa.concat_tables(ray.get(refs)))
    rows = rows[np.random.default_rng([int(seed), int(code), int(window)]).permutation(len(rows))]
    pq.write_table(tokens_table(rows, row_id_start), path)
    return len(rows)


@dataclass
class Packed:
    """The packed rows of every split (materialized in the object store) and their tails (on the driver)."""

    rows: ray.data.Dataset
    tails: dict[str, np.ndarray]
    row_len: int

    @classmethod
    def gather_tails(cls, packed: ray.data.Dataset, row_len: int) -> Packed:
        packed = packed.materialize()
        parts: dict[str, list[np.ndarray]] = {"tokens": [], "n_valid": [], "split": []}
        tails = packed.map_batches(_tails, fn_kwargs={"row_len": row_len}, batch_format="numpy", batch_size=None)
        for batch in tails.iter_batches(batch_size=None, batch_format="numpy"):
            for k in parts:
                parts[k].append(np.asarray(batch[k]))
        cat = {k: (np.concatenate(v) if v else np.empty((0, row_len) if k == "tokens" else 0, np.int32))
               for k, v in parts.items()}
        cat["tokens"] = cat["tokens"].reshape(-1, row_len)
        return cls(packed, cat, row_len)


def write_split(packed: Packed, *, code: int, name: str, out_dir: Path, shard_rows: int, seed: int,
                progress=None) -> tuple[SplitInfo, int, int]:
    """Write split ``name``'s shards; returns its info, the tokens of its final tail that fill no row, and the
    tokens it held (full rows plus all tail tokens)."""
    row_len = packed.row_len
    sel = packed.tails["split"] == code
    tail_rows, dropped = pack.stitch_tails(packed.tails["tokens"][sel], packed.tails["n_valid"][sel])
    full = packed.rows.map_batches(_full_rows, fn_kwargs={"code": code, "row_len": row_len},
                                   batch_format="numpy", batch_size=None)
    if len(tail_rows):
        full = full.union(ray.data.from_arrow(tokens_table(tail_rows)))
    full = full.materialize()
    n = full.count()
    tokens = (n - len(tail_rows)) * row_len + int(packed.tails["n_valid"][sel].sum())
    (out_dir / name).mkdir(parents=True, exist_ok=True)
    bounds = pack.shard_bounds(n, shard_rows)
    if not bounds:
        return SplitInfo(rows=0, tokens=0, shards=[]), dropped, tokens
    position = np.random.default_rng([int(seed), int(code), 1]).permutation(len(bounds))  # window -> file
    sizes = np.zeros(len(bounds), dtype=np.int64)
    sizes[position] = [b - a for a, b in bounds]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    windows = full.split_at_indices([a for a, _ in bounds[1:]]) if len(bounds) > 1 else [full]
    pending, t0, written = [], time.perf_counter(), 0
    for k, window in enumerate(windows):
        p = int(position[k])
        path = out_dir / name / f"part-{p:05d}.parquet"
        pending.append(_write_shard.remote(window.to_arrow_refs(), str(path), seed, code, k, int(starts[p])))
        while len(pending) >= MAX_WRITES_IN_FLIGHT or (k == len(windows) - 1 and pending):
            done, pending = ray.wait(pending, num_returns=1)
            written += ray.get(done[0])
            if progress is not None:
                progress(name, written * row_len, time.perf_counter() - t0)
    shards = [ShardInfo(path=f"{name}/part-{p:05d}.parquet", rows=int(sizes[p]), tokens=int(sizes[p]) * row_len,
                        row_id_start=int(starts[p])) for p in range(len(bounds))]
    return SplitInfo(rows=n, tokens=n * row_len, shards=shards), dropped, tokens
