"""This rank's planned training streams inside one ``fit()``: iterators, restart skip, row-id check,
data position.

The driver plans every stream (``train``, and ``replay`` in continual pre-training) as a pure function of
shards, seed and world size (:mod:`data.stream`); this class checks that every micro-batch is the plan's
next rows, so a resumed or restarted run neither repeats nor skips a row, and any deviation fails loudly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data.stream import DataPosition, StreamPlan, pieces_row_ids


class PlannedBatches:
    def __init__(self, streams: dict[str, StreamPlan], micro_rows: dict[str, int], *, rank: int, world: int):
        self.streams, self.micro_rows, self.rank, self.world = streams, micro_rows, rank, world
        self.rows = {name: sp.start for name, sp in streams.items()}  # rows consumed per rank (absolute)
        self.committed: dict[str, list[np.ndarray]] = {name: [] for name in streams}
        self.iters: dict[str, Any] = {}

    def restore(self, pos: DataPosition) -> None:
        """Continue at a checkpoint's position (it must lie inside this fit's plan). A position written by another
        number of ranks is resharded first (:meth:`data.stream.DataPosition.resharded`), as the driver did when it
        planned this fit."""
        pos = pos.resharded({name: sp.total for name, sp in self.streams.items()}, self.world)
        for name, sp in self.streams.items():
            self.rows[name] = pos.rows(name)
            if pos.heads.get(name) != sp.head:
                raise RuntimeError(f"checkpoint position of stream {name!r} is not the one this fit was planned at "
                                   f"(resharded epoch {pos.heads.get(name)} vs {sp.head})")
            if self.rows[name] < sp.start:
                raise RuntimeError(
                    f"checkpoint position {self.rows[name]} of stream {name!r} precedes this fit's start {sp.start}"
                )

    def open(self, ctx, prefetch: int) -> None:
        """Per stream: the rows this fit was planned to stream (from the fit's start), a cursor into them
        (rows already committed, after a restart inside this fit) and the iterator, advanced past them."""
        self.expected, self.cursor = {}, {}
        for name, sp in self.streams.items():
            mb = self.micro_rows[name]
            self.expected[name] = pieces_row_ids(sp.pieces(self.world, self.rank))
            self.cursor[name] = self.rows[name] - sp.start
            self.iters[name] = ctx.batches(name, mb, prefetch)
            for _ in range(self.cursor[name] // mb):
                next(self.iters[name])

    def next(self) -> list[dict[str, Any]]:
        """One micro-batch part per stream, each checked against the plan."""
        parts = []
        for name, it in self.iters.items():
            batch = next(it)
            ids = np.asarray(batch["row_id"])
            mb, c = self.micro_rows[name], self.cursor[name]
            if not np.array_equal(ids, self.expected[name][c : c + mb]):
                raise RuntimeError(
                    f"rank {self.rank}: stream {name!r} diverged from the plan at position {self.rows[name]} "
                    f"(got row ids {ids[:4]}..., expected {self.expected[name][c:c + 4]}...)"
                )
            self.cursor[name] += mb
            self.rows[name] += mb
            self.committed[name].append(ids)
            parts.append(batch)
        return parts

    def position(self) -> DataPosition:
        train = self.streams["train"]
        return DataPosition(
            rows_consumed=self.rows["train"],
            world_size=self.world,
            seed=train.seed,
            epoch_rows=train.total // self.world,
            replay_rows_consumed=self.rows.get("replay", 0),
            heads={name: sp.head for name, sp in self.streams.items() if sp.head is not None},
        )

    def take_committed(self) -> dict[str, np.ndarray]:
        """Row ids consumed since the last call, per stream (what the next checkpoint commits)."""
        out = {name: np.concatenate(parts) if parts else np.empty(0, np.int64) for name, parts in self.committed.items()}
        self.committed = {name: [] for name in self.streams}
        return out
