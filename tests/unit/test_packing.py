"""Exact-value tests of the pure pieces of `rpt data prepare` (data/pack.py, tokenizer, manifest)."""

from __future__ import annotations

import numpy as np
import pytest

from data import pack
from data.manifest import Manifest, ShardInfo, SplitInfo
from data.tokenizer import EOS_TOKEN, PAD_TOKEN, special_token_ids, train_tokenizer


def _docs(*lists: list[int]) -> list[np.ndarray]:
    return [np.asarray(x, dtype=np.int32) for x in lists]


# ---- EOS + packing -----------------------------------------------------------------------------


def test_concat_appends_eos_after_every_document():
    stream = pack.concat_with_eos(_docs([1, 2, 3], [4], [], [5, 6]), eos_id=0)
    assert stream.dtype == np.int32
    assert stream.tolist() == [1, 2, 3, 0, 4, 0, 0, 5, 6, 0]
    assert pack.concat_with_eos([], eos_id=0).tolist() == []


def test_concat_with_bos_prepends_it_to_every_document():
    stream = pack.concat_with_eos(_docs([1, 2, 3], [4], [], [5, 6]), eos_id=0, bos_id=7)
    assert stream.dtype == np.int32
    assert stream.tolist() == [7, 1, 2, 3, 0, 7, 4, 0, 7, 0, 7, 5, 6, 0]
    assert pack.concat_with_eos(_docs([]), eos_id=0, bos_id=7).tolist() == [7, 0]
    assert pack.concat_with_eos([], eos_id=0, bos_id=7).tolist() == []
    packed = pack.pack_documents(_docs([1, 2], [3]), row_len=4, eos_id=9, bos_id=8)
    assert packed.rows.tolist() == [[8, 1, 2, 9]] and packed.tail.tolist() == [8, 3, 9]
    # bos_id=None is the plain EOS packing
    plain = pack.pack_documents(_docs([1, 2], [3]), row_len=4, eos_id=9, bos_id=None)
    assert plain.rows.tolist() == [[1, 2, 9, 3]] and plain.tail.tolist() == [9]


def test_pack_documents_exact_rows_and_tail():
    packed = pack.pack_documents(_docs([1, 2, 3], [4], [5, 6]), row_len=4, eos_id=9)
    # stream: 1 2 3 9 | 4 9 5 6 | 9
    assert packed.rows.tolist() == [[1, 2, 3, 9], [4, 9, 5, 6]]
    assert packed.tail.tolist() == [9]
    assert packed.tokens == 9


def test_pack_documents_exact_multiple_has_no_tail():
    packed = pack.pack_documents(_docs([1, 2, 3], [4, 5, 6]), row_len=4, eos_id=0)
    assert packed.rows.tolist() == [[1, 2, 3, 0], [4, 5, 6, 0]]
    assert packed.tail.size == 0


def test_pack_documents_shorter_than_a_row():
    packed = pack.pack_documents(_docs([7, 8]), row_len=5, eos_id=0)
    assert packed.rows.shape == (0, 5)
    assert packed.tail.tolist() == [7, 8, 0]


def test_rows_with_tail_pads_and_marks_valid_length():
    packed = pack.pack_documents(_docs([1, 2, 3], [4], [5, 6]), row_len=4, eos_id=0)
    rows, n_valid = pack.rows_with_tail(packed, pad_id=1)
    assert rows.tolist() == [[1, 2, 3, 0], [4, 0, 5, 6], [0, 1, 1, 1]]
    assert n_valid.tolist() == [4, 4, 1]


def test_stitch_tails_repacks_batch_tails_and_counts_dropped():
    # Two Ray Data batches packed independently with row_len 4, eos 0, pad 1.
    a = pack.rows_with_tail(pack.pack_documents(_docs([1, 2, 3], [4, 5]), row_len=4, eos_id=0), pad_id=1)
    b = pack.rows_with_tail(pack.pack_documents(_docs([6], [7, 8, 9, 10, 11]), row_len=4, eos_id=0), pad_id=1)
    assert a[0].tolist() == [[1, 2, 3, 0], [4, 5, 0, 1]] and a[1].tolist() == [4, 3]
    assert b[0].tolist() == [[6, 0, 7, 8], [9, 10, 11, 0]] and b[1].tolist() == [4, 4]
    rows, dropped = pack.stitch_tails(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))
    assert rows.tolist() == [[1, 2, 3, 0], [6, 0, 7, 8], [9, 10, 11, 0]]
    assert dropped == 3  # the tail [4, 5, 0] fills no row

    c = pack.rows_with_tail(pack.pack_documents(_docs([12]), row_len=4, eos_id=0), pad_id=1)
    rows, dropped = pack.stitch_tails(np.concatenate([a[0], c[0]]), np.concatenate([a[1], c[1]]))
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 12]]  # tails [4, 5, 0] + [12, 0] -> one row
    assert dropped == 1


def test_stitch_tails_without_partial_rows_drops_nothing():
    rows = np.arange(8, dtype=np.int32).reshape(2, 4)
    out, dropped = pack.stitch_tails(rows, np.array([4, 4]))
    assert out.tolist() == rows.tolist() and dropped == 0
    out, dropped = pack.stitch_tails(np.empty((0, 4), np.int32), np.empty(0, np.int32))
    assert out.shape == (0, 4) and dropped == 0


def test_every_token_is_kept_or_counted_as_dropped():
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 100, size=n, dtype=np.int32) for n in rng.integers(0, 40, size=50)]
    total = sum(len(d) + 1 for d in docs)
    batches = [docs[i : i + 7] for i in range(0, len(docs), 7)]
    outs = [pack.rows_with_tail(pack.pack_documents(b, row_len=16, eos_id=0), pad_id=1) for b in batches]
    rows, dropped = pack.stitch_tails(
        np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
    )
    assert rows.shape[1] == 16
    assert rows.size + dropped == total
    assert 0 <= dropped < 16
    assert (rows == 0).sum() + 1 >= len(docs)  # every EOS kept except those in the dropped tail
    assert (rows == 1).sum() == 0  # no padding survives


# ---- shuffle and shards -------------------------------------------------------------------------


def test_shard_bounds_are_contiguous_row_id_ranges():
    assert pack.shard_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert pack.shard_bounds(4, 2) == [(0, 2), (2, 4)]
    assert pack.shard_bounds(3, 10) == [(0, 3)]
    assert pack.shard_bounds(0, 10) == []
    bounds = pack.shard_bounds(1001, 64)
    ids = np.concatenate([np.arange(a, b) for a, b in bounds])
    assert ids.tolist() == list(range(1001))
    assert all(b - a == 64 for a, b in bounds[:-1]) and bounds[-1][1] - bounds[-1][0] == 1001 % 64


def test_document_uniforms_are_deterministic_and_content_based():
    texts = [f"document number {i}" for i in range(200)]
    u1, s1 = pack.document_uniforms(texts, seed=0)
    u2, s2 = pack.document_uniforms(texts, seed=0)
    assert np.array_equal(u1, u2) and np.array_equal(s1, s2)
    assert ((u1 >= 0) & (u1 < 1)).all() and ((s1 >= 0) & (s1 < 1)).all()
    assert not np.array_equal(u1, pack.document_uniforms(texts, seed=1)[0])
    # Order-independent (a document keeps its value wherever it appears) and duplicates agree.
    rev, _ = pack.document_uniforms(texts[::-1] + [texts[3]], seed=0)
    assert np.array_equal(rev[:-1][::-1], u1) and rev[-1] == u1[3]
    assert pack.document_uniforms(["é"], seed=0)[0][0] == pack.document_uniforms(["é".encode()], seed=0)[0][0]


def test_val_threshold_fraction_and_at_least_one():
    u, _ = pack.document_uniforms([f"doc {i}" for i in range(20_000)], seed=7)
    t = pack.val_threshold(u, 0.05)
    assert t == 0.05
    assert abs((u < t).mean() - 0.05) < 0.01
    assert pack.val_threshold(u, 0.0) == 0.0 and not (u < 0.0).any()
    few = np.array([0.9, 0.4, 0.7])
    t = pack.val_threshold(few, 0.01)  # no document below 0.01: the smallest one is held out
    assert (few < t).tolist() == [False, True, False]
    assert pack.val_threshold(np.empty(0), 0.1) == 0.0


def test_split_is_stable_for_a_seed():
    texts = [f"text {i} " * (i % 5 + 1) for i in range(500)]
    u, _ = pack.document_uniforms(texts, seed=3)
    val = u < pack.val_threshold(u, 0.1)
    u_again, _ = pack.document_uniforms(texts, seed=3)
    assert np.array_equal(val, u_again < pack.val_threshold(u_again, 0.1))
    u_other, _ = pack.document_uniforms(texts, seed=4)
    assert not np.array_equal(val, u_other < pack.val_threshold(u_other, 0.1))


# ---- tokenizer ----------------------------------------------------------------------------------


def test_train_tokenizer_special_ids_and_round_trip():
    texts = ["the quick brown fox jumps over the lazy dog"] * 50 + ["héllo wörld ✓"]
    tok = train_tokenizer(iter(texts), 300, ["<|mask|>"])
    assert special_token_ids(tok) == {EOS_TOKEN: 0, PAD_TOKEN: 1, "<|mask|>": 2}
    assert tok.get_vocab_size() <= 300
    for text in ["the lazy fox", "héllo wörld ✓", "unseen ¥ bytes \x00"]:
        enc = tok.encode(text, add_special_tokens=False)
        assert tok.decode(enc.ids) == text
        assert min(enc.ids) >= 3  # plain text never produces special ids


def test_train_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(iter(["abc"]), 100, [])


# ---- manifest validation ------------------------------------------------------------------------


def _split(rows_per_shard: list[int], row_len: int, starts: list[int] | None = None) -> dict:
    if starts is None:
        starts = [sum(rows_per_shard[:i]) for i in range(len(rows_per_shard))]
    shards = [
        {"path": f"train/part-{i:05d}.parquet", "rows": r, "tokens": r * row_len, "row_id_start": s}
        for i, (r, s) in enumerate(zip(rows_per_shard, starts, strict=True))
    ]
    return {"rows": sum(rows_per_shard), "tokens": sum(rows_per_shard) * row_len, "shards": shards}


def _manifest(**over) -> dict:
    d = {
        "seq_len": 3,
        "row_len": 4,
        "seed": 0,
        "source": {"corpus": "x", "documents": 3, "characters": 10},
        "tokenizer": {
            "sha256": "0" * 64,
            "vocab_size": 300,
            "eos_id": 0,
            "pad_id": 1,
            "special_tokens": {EOS_TOKEN: 0, PAD_TOKEN: 1},
        },
        "splits": {"train": _split([2, 1], 4), "val": _split([], 4)},
        "documents": {"train": 2, "val": 1},
        "dropped_tokens": 0,
    }
    d.update(over)
    return d


def test_manifest_accepts_consistent_values():
    m = Manifest.model_validate(_manifest())
    assert m.format == "rpt-packed-v1"
    assert [s.row_id_start for s in m.splits["train"].shards] == [0, 2]


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"row_len": 5}, "row_len=5 must be seq_len"),
        ({"splits": {"train": _split([2, 1], 4, starts=[0, 3]), "val": _split([], 4)}}, "contiguous"),
        ({"splits": {"train": _split([2], 4)}}, "missing"),
        ({"format": "other"}, "format"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_manifest_rejects_inconsistent_values(over, match):
    with pytest.raises(ValueError, match=match):
        Manifest.model_validate(_manifest(**over))


def test_shard_paths_must_be_relative():
    with pytest.raises(ValueError, match="relative"):
        ShardInfo(path="/abs/part.parquet", rows=1, tokens=4, row_id_start=0)
    with pytest.raises(ValueError, match="rows=3"):
        SplitInfo(rows=3, tokens=12, shards=[ShardInfo(path="a.parquet", rows=2, tokens=8, row_id_start=0)])


def test_manifest_load_names_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="rpt data prepare"):
        Manifest.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="invalid manifest"):
        Manifest.load(tmp_path)
