"""This rank's planned training streams inside one ``fit()``: the mixture's micro-batches, restart skip,
row-id check, data position.

The driver plans every stream (the run's ``data.path``, or each of ``data.sources``, or ``train`` and ``replay``
in continual pre-training) as a pure function of shards, seed and world size (:mod:`data.stream`), and how
each micro-batch splits over them as a pure function of the weights and the mixture position
(:mod:`data.mixture`). This class draws each micro-batch's rows accordingly and checks that they are the plan's
next rows, so a resumed or restarted run neither repeats nor skips a row, and any deviation fails loudly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data.mixture import Mixture
from data.stream import DataPosition, StreamPlan, pieces_row_ids


class _Rows:
    """Rows of one stream taken ``k`` at a time from an iterator of batches (dicts of tensors): a batch of
    exactly ``k`` rows passes through untouched (a single-source run never copies); otherwise rows are cut and
    joined."""

    def __init__(self, it):
        self.it, self.buf, self.have = it, [], 0

    def take(self, k: int) -> dict[str, Any]:
        import torch

        if not self.buf:
            batch = next(self.it)
            n = len(batch["row_id"])
            if n == k:
                return batch
            self.buf, self.have = [batch], n
        while self.have < k:
            batch = next(self.it)
            self.buf.append(batch)
            self.have += len(batch["row_id"])
        joined = self.buf[0] if len(self.buf) == 1 else {c: torch.cat([b[c] for b in self.buf]) for c in self.buf[0]}
        out = {c: v[:k] for c, v in joined.items()}
        rest = self.have - k
        self.buf, self.have = ([{c: v[k:] for c, v in joined.items()}], rest) if rest else ([], 0)
        return out

    def skip(self, k: int) -> None:
        """Drop the next ``k`` rows (a restart's already committed ones) without joining them."""
        while k > 0:
            if not self.buf:
                self.buf = [next(self.it)]
                self.have = len(self.buf[0]["row_id"])
            if self.have > k:
                self.take(k)
                return
            k -= self.have
            self.buf, self.have = [], 0


class PlannedBatches:
    def __init__(self, streams: dict[str, StreamPlan], mixture: Mixture, mixed_start: int, micro_batch: int, *,
                 rank: int, world: int):
        self.streams, self.mixture, self.micro, self.rank, self.world = streams, mixture, micro_batch, rank, world
        self.mixed_start, self.mixed = mixed_start, mixed_start
        self.rows = {name: sp.start for name, sp in streams.items()}  # rows consumed per rank (absolute)
        self.seen = {name: 0 for name in streams}  # this run's rows per stream, all ranks (restored with a position)
        self.committed: dict[str, list[np.ndarray]] = {name: [] for name in streams}
        self.readers: dict[str, _Rows] = {}

    def counts(self, n_micro: int) -> np.ndarray:
        """``(n_micro, K)``: each stream's rows in this fit's first ``n_micro`` micro-batches."""
        return self.mixture.micro_counts(self.mixed_start, n_micro, self.micro)

    def restore(self, pos: DataPosition) -> None:
        """Continue at a checkpoint's position (it must lie inside this fit's plan). A position written by another
        number of ranks is resharded first (:meth:`data.stream.DataPosition.resharded`), as the driver did when it
        planned this fit."""
        pos = pos.resharded({name: sp.total for name, sp in self.streams.items()}, self.world)
        done = pos.mixed - self.mixed_start
        if done < 0 or done % self.micro:
            raise RuntimeError(f"checkpoint mixture position {pos.mixed} is not inside this fit's plan "
                               f"(from {self.mixed_start}, {self.micro} rows per micro-batch)")
        drawn = self.counts(done // self.micro).sum(axis=0)
        for i, (name, sp) in enumerate(self.streams.items()):
            self.rows[name] = pos.rows(name)
            if pos.heads.get(name) != sp.head:
                raise RuntimeError(f"checkpoint position of stream {name!r} is not the one this fit was planned at "
                                   f"(resharded epoch {pos.heads.get(name)} vs {sp.head})")
            if self.rows[name] != sp.start + drawn[i]:
                raise RuntimeError(
                    f"checkpoint position {self.rows[name]} of stream {name!r} is not this fit's plan at mixture row "
                    f"{pos.mixed} ({sp.start} + {drawn[i]})"
                )
        self.mixed = pos.mixed
        self.seen = {name: pos.seen.get(name, 0) for name in self.streams}

    def open(self, ctx, prefetch: int, n_micro: int) -> None:
        """Per stream: the rows this fit was planned to stream (from the fit's start), a cursor into them (rows
        already committed, after a restart inside this fit) and a reader, advanced past them. ``n_micro``: the
        fit's micro-batches (their split over the streams is planned from the start)."""
        self.plan_counts = self.counts(n_micro)
        self.index = (self.mixed - self.mixed_start) // self.micro
        self.expected, self.cursor = {}, {}
        for i, (name, sp) in enumerate(self.streams.items()):
            col = self.plan_counts[:, i]
            self.expected[name] = pieces_row_ids(sp.pieces(self.world, self.rank))
            self.cursor[name] = self.rows[name] - sp.start
            batch = int(np.bincount(col[col > 0]).argmax()) if col.any() else 1  # the usual count: no copies
            self.readers[name] = _Rows(ctx.batches(name, batch, prefetch))
            if self.cursor[name]:
                self.readers[name].skip(self.cursor[name])

    def next(self) -> list[dict[str, Any]]:
        """One micro-batch: each stream's planned rows (a part per stream that gives any), checked against the plan."""
        parts = []
        for i, name in enumerate(self.streams):
            k = int(self.plan_counts[self.index, i])
            if k == 0:
                continue
            batch = self.readers[name].take(k)
            ids = np.asarray(batch["row_id"])
            c = self.cursor[name]
            if not np.array_equal(ids, self.expected[name][c : c + k]):
                raise RuntimeError(
                    f"rank {self.rank}: stream {name!r} diverged from the plan at position {self.rows[name]} "
                    f"(got row ids {ids[:4]}..., expected {self.expected[name][c:c + 4]}...)"
                )
            self.cursor[name] += k
            self.rows[name] += k
            self.seen[name] += k * self.world
            self.committed[name].append(ids)
            parts.append(batch)
        self.index += 1
        self.mixed += self.micro
        return parts

    def position(self) -> DataPosition:
        main = next(iter(self.streams.values()))
        return DataPosition(
            streams=dict(self.rows),
            world_size=self.world,
            seed=main.seed,
            epoch_rows=main.total // self.world,
            mixed=self.mixed,
            seen=dict(self.seen),
            heads={name: sp.head for name, sp in self.streams.items() if sp.head is not None},
            main=next(iter(self.streams)),
        )

    def take_committed(self) -> dict[str, np.ndarray]:
        """Row ids consumed since the last call, per stream (what the next checkpoint commits)."""
        out = {name: np.concatenate(parts) if parts else np.empty(0, np.int64) for name, parts in self.committed.items()}
        self.committed = {name: [] for name in self.streams}
        return out
