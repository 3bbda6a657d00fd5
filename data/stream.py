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

Another world size (a resume on fewer or more workers, e.g. after a node was lost): what is left of the
current epoch, the positions no rank had consumed yet, is concatenated in rank order and cut into
``new_world`` equal contiguous parts, a :class:`Head` (:func:`reshard`); after it, epochs follow the regular
layout for the new world size. So every row of the epoch is still consumed exactly once (the fewer than
``new_world`` rows the cut leaves over wait for the next epoch, as an epoch's tail always does), and the
plan stays a pure function of the shards, the seed and the position, which now carries the head.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Shard:
    path: str  # absolute, or a URI (data.location): workers resolve its filesystem
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


Interval = tuple[int, int]  # positions [lo, hi) of an epoch's concatenated stream


@dataclass(frozen=True)
class Head:
    """The rest of epoch ``epoch`` after a change of world size: the epoch-stream positions each rank takes
    (``ranks[r]``: intervals, in order; ``rows`` per rank). A stream with a head counts its positions from the
    head's start; after ``rows`` positions the regular layout goes on with epoch ``epoch + 1``."""

    epoch: int
    rows: int
    ranks: tuple[tuple[Interval, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "rows": self.rows, "ranks": [[list(iv) for iv in r] for r in self.ranks]}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Head | None:
        if d is None:
            return None
        ranks = tuple(tuple((int(lo), int(hi)) for lo, hi in r) for r in d["ranks"])
        return cls(int(d["epoch"]), int(d["rows"]), ranks)


def epoch_of(rows: int, epoch_rows: int, head: Head | None) -> int:
    """The epoch a rank's stream is in after ``rows`` positions."""
    if head is None:
        return rows // epoch_rows
    return head.epoch if rows < head.rows else head.epoch + 1 + (rows - head.rows) // epoch_rows


@dataclass(frozen=True)
class DataPosition:
    """What a checkpoint stores about the data: enough to continue with the next unseen row.

    ``streams`` holds each planned stream's position (rows per rank, equal on every rank; counted from the
    stream's head when it has one), ``mixed`` the mixture's (:mod:`data.mixture`: rows per rank drawn so far,
    which fixes how the next micro-batches split over the streams), ``seen`` the rows of each stream consumed by
    all ranks since the run started. The first stream is the run's main one (``data.path``, or the first of
    ``data.sources``): ``rows_consumed``, ``seed``, ``epoch_rows`` and ``epoch`` are its."""

    streams: dict[str, int]
    world_size: int
    seed: int
    epoch_rows: int  # rows per rank per epoch of the first stream
    mixed: int = 0
    seen: dict[str, int] = field(default_factory=dict)
    heads: dict[str, Head] = field(default_factory=dict)  # per stream: the epoch resharded to this world size
    main: str = ""  # the first stream's name (default: the first key of ``streams``)

    def __post_init__(self) -> None:
        if not self.main:
            object.__setattr__(self, "main", next(iter(self.streams)))

    @property
    def rows_consumed(self) -> int:
        return self.streams[self.main]

    @property
    def epoch(self) -> int:
        return epoch_of(self.rows_consumed, self.epoch_rows, self.heads.get(self.main))

    def rows(self, stream: str) -> int:
        return self.streams.get(stream, 0)

    def to_dict(self) -> dict[str, Any]:
        return {"streams": dict(self.streams), "rows_consumed": self.rows_consumed, "world_size": self.world_size,
                "seed": self.seed, "epoch_rows": self.epoch_rows, "epoch": self.epoch, "mixed": self.mixed,
                "seen": dict(self.seen), "heads": {k: h.to_dict() for k, h in self.heads.items()}, "main": self.main}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        streams = d.get("streams")
        if streams is None:  # written before mixtures: the train stream and, in continual runs, the replay stream
            streams = {"train": int(d["rows_consumed"])}
            if int(d.get("replay_rows_consumed", 0)):
                streams["replay"] = int(d["replay_rows_consumed"])
        world = int(d["world_size"])
        return cls(
            streams={k: int(v) for k, v in streams.items()},
            world_size=world,
            seed=int(d["seed"]),
            epoch_rows=int(d["epoch_rows"]),
            mixed=int(d.get("mixed", sum(int(v) for v in streams.values()))),
            seen={k: int(v) for k, v in (d.get("seen") or {}).items()},
            heads={k: Head.from_dict(h) for k, h in (d.get("heads") or {}).items()},
            main=d.get("main", ""),
        )

    def resharded(self, totals: dict[str, int], world_size: int) -> DataPosition:
        """This position on ``world_size`` ranks (:func:`reshard` of every stream; ``totals``: rows per epoch of
        each stream). The mixture's position is per rank and goes on unchanged."""
        if world_size == self.world_size:
            return self
        moved = {name: reshard(n, self.world_size, self.rows(name), self.heads.get(name), world_size)
                 for name, n in totals.items()}
        main = next(iter(totals))
        return DataPosition(
            streams={name: r for name, (r, _) in moved.items()}, world_size=world_size, seed=self.seed,
            epoch_rows=totals[main] // world_size, mixed=self.mixed, seen=dict(self.seen),
            heads={name: h for name, (_, h) in moved.items() if h is not None}, main=main,
        )


def _skip(intervals: tuple[Interval, ...], n: int) -> list[Interval]:
    """``intervals`` without their first ``n`` positions."""
    out = []
    for lo, hi in intervals:
        take = min(n, hi - lo)
        n -= take
        if lo + take < hi:
            out.append((lo + take, hi))
    return out


def _cut(intervals: list[Interval], start: int, count: int) -> tuple[Interval, ...]:
    """Positions ``[start, start + count)`` of the concatenation of ``intervals``, as intervals."""
    out, pos = [], 0
    for lo, hi in intervals:
        a, b = max(start, pos), min(start + count, pos + hi - lo)
        if a < b:
            out.append((lo + a - pos, lo + b - pos))
        pos += hi - lo
    return tuple(out)


def layout(total: int, world_size: int, rows: int, head: Head | None) -> tuple[int, int, list[tuple[Interval, ...]]]:
    """Where every rank is after ``rows`` positions: ``(epoch, offset in the epoch's layout, each rank's
    intervals of that epoch)``."""
    if head is not None and rows < head.rows:
        return head.epoch, rows, list(head.ranks)
    per = total // world_size
    p, base = (rows - head.rows, head.epoch + 1) if head is not None else (rows, 0)
    epoch, off = base + p // per, p % per
    return epoch, off, [((r * per, (r + 1) * per),) for r in range(world_size)]


def reshard(total: int, old_world: int, rows: int, head: Head | None, new_world: int) -> tuple[int, Head | None]:
    """A stream's position after ``rows`` positions per rank on ``old_world`` ranks, moved to ``new_world``:
    ``(rows, head)``. The epoch's unconsumed positions, in old-rank order, cut into ``new_world`` equal parts;
    when fewer than ``new_world`` are left, the next epoch starts (``head`` None)."""
    if total // new_world == 0:
        raise ValueError(f"{total} rows cannot feed {new_world} workers; use fewer workers (trainer.num_workers)")
    epoch, off, ranks = layout(total, old_world, rows, head)
    if off == 0 and (head is None or rows >= head.rows):  # at an epoch's start: the regular layout from there
        return epoch * (total // new_world), None
    rest = [iv for r in ranks for iv in _skip(r, off)]
    per = sum(hi - lo for lo, hi in rest) // new_world
    if per == 0:
        return (epoch + 1) * (total // new_world), None
    return 0, Head(epoch, per, tuple(_cut(rest, r * per, per) for r in range(new_world)))


def load_shards(prepared_dir: str | Path, split: str) -> list[Shard]:
    """The shards of ``split`` from ``manifest.json`` (absolute paths, or URIs of an object store).

    Reads the raw JSON, so it serves text ("rpt-packed-v1") and image ("rpt-images-v1") folders alike:
    both list ``splits[split].shards`` as ``{path, rows, row_id_start}``.
    """
    from data.location import resolve

    root = resolve(prepared_dir)  # a URI, file:// or a path (made absolute)
    path = root.join("manifest.json")
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: {str(root)!r} is not a prepared dataset folder; "
            "create one with `rpt data prepare`"
        )
    manifest = json.loads(path.read_text())
    return [
        Shard(path=root.join(s["path"]).uri, rows=int(s["rows"]), row_id_start=int(s["row_id_start"]))
        for s in manifest["splits"][split]["shards"]
    ]


def epoch_rows(shards: list[Shard], world_size: int) -> int:
    """Rows each rank consumes per epoch."""
    return sum(s.rows for s in shards) // world_size


def epoch_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """Seeded shard permutation of one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n_shards)


def rank_pieces(shards: list[Shard], *, world_size: int, rank: int, seed: int, start: int, count: int,
                head: Head | None = None) -> list[Piece]:
    """Rank ``rank``'s stream positions ``[start, start + count)`` as shard pieces, in order (positions counted
    from the ``head``'s start when there is one)."""
    total = sum(s.rows for s in shards)
    if total // world_size == 0:
        raise ValueError(
            f"{total} training rows cannot feed {world_size} workers; "
            "prepare a larger corpus or use fewer workers (trainer.num_workers)"
        )
    pieces: list[Piece] = []
    pos, end = start, start + count
    while pos < end:
        epoch, off, ranks = layout(total, world_size, pos, head)
        mine = _skip(ranks[rank], off)
        left = sum(hi - lo for lo, hi in mine)
        take = min(end - pos, left)
        for lo_s, hi_s in _cut(mine, 0, take):
            pieces.extend(_epoch_pieces(shards, seed, epoch, lo_s, hi_s))
        pos += take
    return pieces


def _epoch_pieces(shards: list[Shard], seed: int, epoch: int, lo_s: int, hi_s: int) -> list[Piece]:
    """Positions ``[lo_s, hi_s)`` of epoch ``epoch``'s concatenated stream as shard pieces."""
    out, cursor = [], 0
    for idx in epoch_order(len(shards), seed, epoch):
        sh = shards[idx]
        a, b = max(lo_s, cursor), min(hi_s, cursor + sh.rows)
        if a < b:
            out.append(Piece(epoch, int(idx), sh.row_id_start + a - cursor, sh.row_id_start + b - cursor))
        cursor += sh.rows
        if cursor >= hi_s:
            break
    return out


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

        from data.location import is_uri, read_parquet

        out = []
        for row in batch.to_pylist():
            try:
                table = read_parquet(row["path"], columns=self.columns)
            except (pa.ArrowException, OSError) as exc:
                if is_uri(row["path"]) and isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                    raise ValueError(  # the store, not the file: network, endpoint, credentials, permissions
                        f"training shard {row['path']!r} cannot be read from its store: {str(exc).splitlines()[0]}; "
                        "check the endpoint (the URI's endpoint_override, AWS_ENDPOINT_URL) and the credentials "
                        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) in every node's environment, then continue with "
                        "`rpt train --resume`"
                    ) from exc
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
    head: Head | None = None  # the epoch resharded to this world size (positions count from its start)

    @property
    def total(self) -> int:
        """Rows of one epoch."""
        return sum(s.rows for s in self.shards)

    def pieces(self, world_size: int, rank: int) -> list[Piece]:
        return rank_pieces(list(self.shards), world_size=world_size, rank=rank, seed=self.seed, start=self.start,
                           count=self.count, head=self.head)

    def to_dict(self) -> dict[str, Any]:
        return {"shards": [asdict(s) for s in self.shards], "seed": self.seed, "start": self.start, "count": self.count,
                "columns": list(self.columns), "head": self.head.to_dict() if self.head else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamPlan:
        return cls(tuple(Shard(**s) for s in d["shards"]), int(d["seed"]), int(d["start"]), int(d["count"]),
                   tuple(d.get("columns", ("tokens", "row_id"))), Head.from_dict(d.get("head")))


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

    from data.location import read_parquet

    tables, have = [], 0
    for path in paths:
        if have >= limit:
            break
        table = read_parquet(path, columns=columns)
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
