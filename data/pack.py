"""Pure-numpy pieces of `rpt data prepare`: document split, EOS packing, shuffling and sharding.

Nothing here imports Ray, so these functions are unit-tested with exact values
(`tests/unit/test_packing.py`) and reused inside Ray Data UDFs (`data/prepare.py`).

Packing layout: every document's token ids are followed by one EOS id (and, for a tokenizer whose
model expects it, e.g. Llama's `<s>`, preceded by one BOS id), the documents are concatenated in order,
and the stream is cut into rows of `row_len = seq_len + 1` tokens (the extra token gives the shifted
next-token targets of the last position). A row may contain the end of one document and the start of
the next; the EOS between them marks the boundary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_UNIT = float(2**53)  # floats in [0, 1) with 53 random bits: exactly representable as float64


def document_uniforms(texts: Sequence[str | bytes], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two deterministic pseudo-uniform numbers in [0, 1) per document, from a keyed hash of its content.

    Returns `(u_split, u_sample)`: `u_split` chooses the validation documents (`val_threshold`),
    `u_sample` the seeded sample the tokenizer is trained on. Hashing the content (not the position)
    makes the split independent of file order and parallelism, and puts exact duplicates in the same
    split, so a duplicated document cannot leak from train into val.
    """
    key = int(seed).to_bytes(8, "little", signed=False)
    u_split = np.empty(len(texts), dtype=np.float64)
    u_sample = np.empty(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):  # one hash per document, not per token
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        digest = hashlib.blake2b(data, digest_size=16, key=key, person=b"rpt-prepare-v1").digest()
        u_split[i] = (int.from_bytes(digest[:8], "little") >> 11) / _UNIT
        u_sample[i] = (int.from_bytes(digest[8:], "little") >> 11) / _UNIT
    return u_split, u_sample


def val_threshold(u_split: np.ndarray, val_fraction: float) -> float:
    """The cut `t` such that a document is held out for validation iff `u_split < t`.

    `t = val_fraction`, except that a positive `val_fraction` always yields at least one validation
    document: when no `u_split` falls below it, `t` moves just above the smallest one. Needs the
    `u_split` of the whole corpus (the caller gathers that small float column on the driver).
    """
    u_split = np.asarray(u_split, dtype=np.float64)
    if val_fraction <= 0.0 or u_split.size == 0:
        return 0.0
    if np.any(u_split < val_fraction):
        return float(val_fraction)
    return float(np.nextafter(u_split.min(), np.inf))


def concat_with_eos(docs: Sequence[np.ndarray], eos_id: int, bos_id: int | None = None) -> np.ndarray:
    """Concatenate token-id arrays with `eos_id` appended after every document (int32).

    With `bos_id`, every document is also preceded by it: `BOS doc EOS BOS doc EOS ...` (one vectorised
    insertion, empty documents included: `BOS EOS`).
    """
    if len(docs) == 0:
        return np.empty(0, dtype=np.int32)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs])
    ends = np.cumsum(lengths)
    if bos_id is None:
        return np.insert(flat, ends, np.int32(eos_id))  # (sum(lengths) + len(docs),)
    # Insertion points start_0, end_0, start_1, end_1, ... are non-decreasing and np.insert places
    # values at equal points in the given order, so EOS_i lands before BOS_{i+1} (and BOS before EOS
    # of an empty document).
    where = np.stack([ends - lengths, ends], axis=1).reshape(-1)  # (2 * docs,)
    values = np.tile(np.array([bos_id, eos_id], dtype=np.int32), len(docs))
    return np.insert(flat, where, values)  # (sum(lengths) + 2 * len(docs),)


def cut_rows(stream: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into full rows `(n, row_len)` and the tail of `< row_len` tokens left over."""
    assert row_len >= 2, row_len
    n_rows = len(stream) // row_len
    rows = stream[: n_rows * row_len].reshape(n_rows, row_len)  # (n, row_len), a view
    return rows, stream[n_rows * row_len :]


@dataclass(frozen=True)
class Packed:
    """Rows of one packing call plus what did not fill a row."""

    rows: np.ndarray  # (n, row_len) int32
    tail: np.ndarray  # (< row_len,) int32

    @property
    def tokens(self) -> int:
        return int(self.rows.size + self.tail.size)


def pack_documents(
    docs: Sequence[np.ndarray], *, row_len: int, eos_id: int, bos_id: int | None = None
) -> Packed:
    """EOS-terminate (and with `bos_id` BOS-prefix), concatenate and cut documents into rows of `row_len`."""
    rows, tail = cut_rows(concat_with_eos(docs, eos_id, bos_id), row_len)
    return Packed(rows=rows, tail=tail)


def rows_with_tail(packed: Packed, *, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows plus the tail as one extra padded row, with the number of real tokens per row.

    Ray Data batches are packed independently; shipping each batch's tail as a padded row (marked by
    `n_valid < row_len`) lets the driver stitch the tails back together (`stitch_tails`) so that only
    one tail per split is dropped, not one per batch.
    """
    n_rows, row_len = packed.rows.shape
    n_valid = np.full(n_rows, row_len, dtype=np.int32)
    if packed.tail.size == 0:
        return packed.rows, n_valid
    last = np.full((1, row_len), pad_id, dtype=np.int32)
    last[0, : packed.tail.size] = packed.tail
    rows = np.concatenate([packed.rows, last])  # (n + 1, row_len)
    return rows, np.append(n_valid, np.int32(packed.tail.size))


def stitch_tails(rows: np.ndarray, n_valid: np.ndarray) -> tuple[np.ndarray, int]:
    """Split `rows_with_tail` output back into full rows and re-pack the partial ones.

    Returns `(full_rows, dropped_tokens)`: full rows in input order followed by the rows cut from the
    concatenated tails (each tail ends with an EOS, so document boundaries stay marked), and the number
    of tokens of the final tail that fills no row (`< row_len`).
    """
    rows = np.asarray(rows, dtype=np.int32)
    n_valid = np.asarray(n_valid)
    row_len = rows.shape[1]
    full = n_valid == row_len
    partial = np.flatnonzero(~full)
    if partial.size == 0:
        return rows, 0
    # Boolean mask over the partial rows' first n_valid positions, flattened in row order.
    take = np.arange(row_len)[None, :] < n_valid[partial][:, None]  # (p, row_len)
    stream = rows[partial][take]
    extra, tail = cut_rows(stream, row_len)
    return np.concatenate([rows[full], extra]), int(tail.size)


def shard_bounds(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """`[start, stop)` row ranges of consecutive shards of `shard_rows` rows (the last may be smaller)."""
    assert shard_rows >= 1, shard_rows
    return [(start, min(start + shard_rows, n_rows)) for start in range(0, n_rows, shard_rows)]
