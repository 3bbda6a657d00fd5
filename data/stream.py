"""Deterministic, resumable streaming of packed shards into Ray Train workers.

Ray Data has no mid-epoch resumable iterator, so the order of training rows is fixed by a *plan*
that is a pure function of (shards, world size, seed) and the data position is one integer:
``rows_consumed``, the number of rows each rank has consumed so far (equal on every rank, because
every rank consumes ``micro_batch_size * grad_accum_steps`` rows per optimizer step).

The plan for epoch ``e``:

1. the train shards are permuted with ``np.random.default_rng([seed, e])``;
2. their rows, concatenated in that order (rows inside a shard were already shuffled by
   ``rpt data prepare``), form the epoch's stream of ``N`` rows;
3. rank ``r`` takes the contiguous range ``[r*E, (r+1)*E)`` of the stream, ``E = N // world_size``
   (the ``N mod world_size`` tail rows of an epoch are not used in that epoch).

Rank ``r``'s stream is its epoch-0 range, then its epoch-1 range, ... A run that starts at
``rows_consumed = k`` reads rank ``r``'s stream from position ``k``; the driver builds exactly that
dataset (whole shards dropped, the first shard filtered by row id), so a resumed run neither
repeats nor skips rows. A worker restarted inside the same ``fit()`` gets the fit's original
iterator back and skips the rows it had already committed (it knows them from the checkpoint).
The worker checks every batch's row ids against the plan, so any deviation fails loudly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Shard:
    path: str  # absolute
    rows: int
    row_id_start: int


@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` (global row ids) of one shard, read in stored order."""

    epoch: int
    shard: int
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class DataPosition:
    """What a checkpoint stores about the data: enough to continue with the next unseen row."""

    rows_consumed: int  # per rank
    world_size: int
    seed: int
    epoch_rows: int  # rows per rank per epoch
    replay_rows_consumed: int = 0  # per rank, of the replay stream (continual pre-training)

    @property
    def epoch(self) -> int:
        return self.rows_consumed // self.epoch_rows

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epoch": self.epoch}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls(
            rows_consumed=int(d["rows_consumed"]),
            world_size=int(d["world_size"]),
            seed=int(d["seed"]),
            epoch_rows=int(d["epoch_rows"]),
            replay_rows_consumed=int(d.get("replay_rows_consumed", 0)),
        )


def load_shards(prepared_dir: str | Path, split: str) -> list[Shard]:
    """The shards of ``split`` from ``manifest.json`` (absolute paths).

    Reads the raw JSON, so it serves text ("rpt-packed-v1") and image ("rpt-images-v1") folders alike:
    both list ``splits[split].shards`` as ``{path, rows, row_id_start}``.
    """
    root = Path(prepared_dir).resolve()
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: {str(root)!r} is not a prepared dataset folder; "
            "create one with `rpt data prepare`"
        )
    manifest = json.loads(path.read_text())
    return [
        Shard(path=str(root / s["path"]), rows=int(s["rows"]), row_id_start=int(s["row_id_start"]))
        for s in manifest["splits"][split]["shards"]
    ]


def epoch_rows(shards: list[Shard], world_size: int) -> int:
    """Rows each rank consumes per epoch."""
    return sum(s.rows for s in shards) // world_size


def epoch_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """Seeded shard permutation of one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n_shards)


def rank_pieces(shards: list[Shard], *, world_size: int, rank: int, seed: int, start: int, count: int) -> list[Piece]:
    """Rank ``rank``'s stream positions ``[start, start + count)`` as shard pieces, in order."""
    per_rank = epoch_rows(shards, world_size)
    if per_rank == 0:
        raise ValueError(
            f"{sum(s.rows for s in shards)} training rows cannot feed {world_size} workers; "
            "prepare a larger corpus or use fewer workers (trainer.num_workers)"
        )
    pieces: list[Piece] = []
    pos, end = start, start + count
    while pos < end:
        epoch, off = divmod(pos, per_rank)
        take = min(end - pos, per_rank - off)
        # the rank's range inside this epoch's concatenated stream
        lo_s, hi_s = rank * per_rank + off, rank * per_rank + off + take
        cursor = 0
        for idx in epoch_order(len(shards), seed, epoch):
            sh = shards[idx]
            a, b = max(lo_s, cursor), min(hi_s, cursor + sh.rows)
            if a < b:
                pieces.append(Piece(epoch, int(idx), sh.row_id_start + a - cursor, sh.row_id_start + b - cursor))
            cursor += sh.rows
            if cursor >= hi_s:
                break
        pos += take
    return pieces


def pieces_row_ids(pieces: list[Piece]) -> np.ndarray:
    """The row ids a rank reads, in order (a loop over pieces, not rows)."""
    if not pieces:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(p.lo, p.hi, dtype=np.int64) for p in pieces])


def build_rank_dataset(shards: list[Shard], pieces: list[Piece], columns: list[str] | None = None):
    """A Ray Dataset that yields exactly ``pieces`` in order.

    One block per piece (``from_items``), each read by a task of :class:`_ReadPieces` (the shard's Parquet file,
    sliced to the piece's row range by offset from the shard's first row id), so shards from different
    prepared folders (replay mixtures), whose row ids overlap, never mix. One map operator: a union of
    ``read_parquet`` datasets (one per run of shards, plus a row-id filter for partial shards) took 11-17 s
    to yield its first batch with two ranks on this 2-core machine; this plan takes 0.1-3 s.
    """
    import ray.data

    columns = columns or ["tokens", "row_id"]
    items = [
        {"path": shards[p.shard].path, "lo": p.lo, "hi": p.hi, "first_row_id": shards[p.shard].row_id_start}
        for p in pieces
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(_ReadPieces(columns), batch_size=1, batch_format="pyarrow")


class _ReadPieces:
    """Pieces ``{path, lo, hi, first_row_id}`` -> their rows (pyarrow, ``fixed_size_list`` columns kept)."""

    def __init__(self, columns: list[str]):
        self.columns = columns

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = []
        for row in batch.to_pylist():
            try:
                table = pq.read_table(row["path"], columns=self.columns)
            except (pa.ArrowException, OSError) as exc:
                raise ValueError(
                    f"training shard {row['path']!r} (row ids {row['lo']}..{row['hi'] - 1}) cannot be read: {exc}; "
                    "the file is damaged: prepare the data again (rpt data prepare --overwrite) or restore it, and "
                    "check whole shards before a run with data.verify_shards: full"
                ) from exc
            out.append(table.slice(row["lo"] - row["first_row_id"], row["hi"] - row["lo"]))
        return pa.concat_tables(out)


@dataclass(frozen=True)
class StreamPlan:
    """One planned stream: its shards, seed, the per-rank range ``[start, start + count)`` and the columns read."""

    shards: tuple[Shard, ...]
    seed: int
    start: int
    count: int
    columns: tuple[str, ...] = ("tokens", "row_id")  # image data: ("images", "labels", "row_id")

    def pieces(self, world_size: int, rank: int) -> list[Piece]:
        return rank_pieces(list(self.shards), world_size=world_size, rank=rank, seed=self.seed, start=self.start,
                           count=self.count)

    def to_dict(self) -> dict[str, Any]:
        return {"shards": [asdict(s) for s in self.shards], "seed": self.seed, "start": self.start, "count": self.count,
                "columns": list(self.columns)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamPlan:
        return cls(tuple(Shard(**s) for s in d["shards"]), int(d["seed"]), int(d["start"]), int(d["count"]),
                   tuple(d.get("columns", ("tokens", "row_id"))))


def _planned_data_config_base():
    import ray.train

    return ray.train.DataConfig


class PlannedDataConfig(_planned_data_config_base()):
    """A Ray Train ``DataConfig`` that hands rank ``r`` its planned rows of every planned stream.

    ``get_dataset_shard("train").iter_torch_batches(...)`` in the worker then yields the plan's rows
    in order (likewise ``"replay"`` in continual pre-training). Other datasets (validation sets) are
    given whole to every rank. Order preservation is switched on: the plan is only worth something if
    Ray Data keeps it.
    """

    def __init__(self, streams: dict[str, StreamPlan], *, world_size: int):
        super().__init__(datasets_to_split=list(streams))
        self.streams, self.world_size = streams, world_size

    def _options(self, name: str):
        opts = self._resolve_execution_options(name)
        opts.preserve_order = True
        return opts

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if world_size != self.world_size:
            raise ValueError(f"plan made for {self.world_size} workers, Ray started {world_size}")
        out: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if name in self.streams:
                plan = self.streams[name]
                for r in range(world_size):
                    rds = build_rank_dataset(list(plan.shards), plan.pieces(world_size, r), list(plan.columns))
                    rds.context.execution_options = self._options(name)
                    out[r][name] = rds.iterator()
            else:
                ds = ds.copy(ds)
                ds.context.execution_options = self._options(name)
                for r in range(world_size):
                    out[r][name] = ds.iterator()
        return out


def read_rows(paths: list[str], columns: list[str], limit: int) -> dict[str, np.ndarray]:
    """The first ``limit`` rows of Parquet files ``paths`` (in order), read directly with pyarrow, per column.

    For the small fixed evaluation sets (validation rows, the probe bank) that every rank reads whole at the
    start of a fit: one Ray Data execution per set and rank costs seconds of start-up on a small machine,
    this costs milliseconds. ``fixed_size_list`` columns become 2-D arrays (rows, width). Training data
    never comes through here; it streams through Ray Data (:class:`PlannedDataConfig`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, have = [], 0
    for path in paths:
        if have >= limit:
            break
        table = pq.read_table(path, columns=columns)
        tables.append(table.slice(0, limit - have))
        have += tables[-1].num_rows
    if not tables:
        raise ValueError(f"no rows to read: paths={paths!r}")
    table = pa.concat_tables(tables).combine_chunks()
    out = {}
    for name in columns:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out
