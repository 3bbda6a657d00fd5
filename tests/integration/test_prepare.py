"""`rpt data prepare` end to end on a real local Ray: folder, JSONL and builtin corpora.

Manifest values are checked against counts computed independently from the Parquet files and from a
fresh tokenization of the source documents.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from pydantic import ValidationError
from tokenizers import Tokenizer

from data.manifest import Manifest
from data.prepare import PrepareConfig, prepare
from data.tokenizer import EOS_TOKEN, tokenizer_sha256, train_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SEQ_LEN = 32
ROW_LEN = SEQ_LEN + 1
WORDS = (
    "the model reads tokens from packed rows and learns to predict the next one while the data "
    "pipeline streams shards from storage into workers that share one cluster"
).split()


@pytest.fixture(scope="module")
def ray_local(request):
    """The session's Ray instance when tests/conftest.py provides one, else a module-local one."""
    try:
        request.getfixturevalue("ray_session")
        yield
        return
    except pytest.FixtureLookupError:
        pass
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _document(i: int, rng: np.random.Generator) -> str:
    """~60-200 words; the marker `docNNNN` recurs every 8 words so every document is identifiable
    in the shards even after rows are cut and shuffled."""
    words = rng.choice(WORDS, size=int(rng.integers(60, 200))).tolist()
    for pos in range(0, len(words), 8):
        words.insert(pos, f"doc{i:04d}")
    return " ".join(words) + "\n"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpora")
    rng = np.random.default_rng(0)
    folder = root / "texts"
    (folder / "sub").mkdir(parents=True)
    texts = {}
    for i in range(40):
        text = _document(i, rng)
        if i == 5:
            text += "a literal <|eos|> in the text is not a boundary\n"
        rel = f"sub/file{i:02d}.md" if i % 3 == 0 else f"file{i:02d}.txt"
        (folder / rel).write_text(text, encoding="utf-8")
        texts[i] = text
    (folder / ".hidden.txt").write_text("hidden files are skipped")
    (folder / "image.bin").write_bytes(b"\x00\x01 not a text extension")

    jsonl = root / "docs.jsonl"
    records = [{"id": i, "content": _document(100 + i, rng)} for i in range(30)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    parquet = root / "parquet"
    parquet.mkdir()
    for part in range(2):
        docs = [_document(200 + 10 * part + i, rng) for i in range(10)]
        pq.write_table(pa.table({"text": docs, "n": list(range(10))}), parquet / f"part-{part}.parquet")
    return {
        "parquet": parquet,
        "root": root,
        "folder": folder,
        "texts": texts,
        "jsonl": jsonl,
        "jsonl_texts": {100 + r["id"]: r["content"] for r in records},
    }


def _config(corpus, out_dir, **over) -> PrepareConfig:
    kw = dict(
        corpus=str(corpus),
        out_dir=out_dir,
        seq_len=SEQ_LEN,
        vocab_size=400,
        val_fraction=0.2,
        shard_rows=64,
        seed=3,
        tokenizer=None,
        text_column="text",
        max_documents=None,
        special_tokens=[],
        num_actors=1,
        docs_per_batch=8,
    )
    kw.update(over)
    return PrepareConfig(**kw)


def _read_split(out: Path, manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray, list]:
    """(tokens (N, row_len), row_ids (N,), per-shard row ids) read straight from the Parquet files."""
    tokens, row_ids, per_shard = [], [], []
    for path in sorted((out / split).glob("part-*.parquet")):
        table = pq.read_table(path)
        assert table.schema.field("tokens").type == pa.list_(pa.int32(), ROW_LEN)
        assert table.schema.field("row_id").type == pa.int64()
        flat = table.column("tokens").combine_chunks().flatten().to_numpy()
        tokens.append(flat.reshape(-1, ROW_LEN))
        ids = table.column("row_id").to_numpy()
        row_ids.append(ids)
        per_shard.append((path.relative_to(out).as_posix(), ids))
    if not tokens:
        return np.empty((0, ROW_LEN), np.int32), np.empty(0, np.int64), []
    return np.concatenate(tokens), np.concatenate(row_ids), per_shard


def _markers(tok: Tokenizer, rows: np.ndarray) -> set[str]:
    found = set()
    for row in rows:
        found.update(re.findall(r"doc\d{4}", tok.decode(row.tolist(), skip_special_tokens=False)))
    return found


def _check_prepared(out: Path, summary: dict, texts: dict[int, str]) -> Manifest:
    manifest = Manifest.load(out)
    manifest.verify(out)
    assert manifest.seq_len == SEQ_LEN and manifest.row_len == ROW_LEN
    assert manifest.tokenizer.sha256 == tokenizer_sha256(out / "tokenizer.json")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert manifest.tokenizer.vocab_size == tok.get_vocab_size() <= 400
    assert manifest.tokenizer.eos_id == 0 and manifest.tokenizer.special_tokens[EOS_TOKEN] == 0

    split_rows, split_markers = {}, {}
    for split in ("train", "val"):
        rows, row_ids, per_shard = _read_split(out, manifest, split)
        info = manifest.splits[split]
        assert info.rows == len(rows) == summary[f"{split}_rows"]
        assert info.tokens == rows.size
        assert sorted(row_ids.tolist()) == list(range(len(rows)))  # 0..N-1, each once
        assert [s.path for s in info.shards] == [p for p, _ in per_shard]
        for shard, (_, ids) in zip(info.shards, per_shard, strict=True):
            assert ids.tolist() == list(range(shard.row_id_start, shard.row_id_start + shard.rows))
            assert shard.rows <= 64
        assert rows.min(initial=0) >= 0 and rows.max(initial=0) < manifest.tokenizer.vocab_size
        assert (rows != manifest.tokenizer.pad_id).all()  # full rows only, no padding
        split_rows[split] = rows
        split_markers[split] = _markers(tok, rows)

    # Every document lands in exactly one split, and the counts agree with the manifest.
    assert split_markers["train"].isdisjoint(split_markers["val"])
    assert split_markers["train"] | split_markers["val"] == {f"doc{i:04d}" for i in texts}
    assert len(split_markers["val"]) == manifest.documents.val >= 1
    assert manifest.documents.train + manifest.documents.val == manifest.source.documents == len(texts)
    assert manifest.source.characters == sum(len(t) for t in texts.values())

    # Independent token count: a fresh tokenization of the sources (+1 EOS per document) is what the
    # shards hold plus what was dropped; the EOS count matches the document count.
    tok.encode_special_tokens = True
    expected = sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts.values())
    kept = split_rows["train"].size + split_rows["val"].size
    assert kept + manifest.dropped_tokens == expected == summary["tokens"]
    assert manifest.dropped_tokens < 2 * ROW_LEN  # at most one tail per split
    eos = int((split_rows["train"] == 0).sum() + (split_rows["val"] == 0).sum())
    assert len(texts) - manifest.dropped_tokens <= eos <= len(texts)  # only dropped EOS may be missing
    return manifest


def test_folder_corpus_end_to_end_and_deterministic(ray_local, corpora, tmp_path):
    out = tmp_path / "folder"
    summary = prepare(_config(corpora["folder"], out), progress=False)
    assert summary["documents"] == 40 and summary["out_dir"] == str(out.absolute())
    assert (
        summary["tokens_per_s"] > 0 and summary["shards"] == summary["train_shards"] + summary["val_shards"]
    )
    _check_prepared(out, summary, corpora["texts"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]  # no temp folder left behind

    # Same seed and settings -> identical tokenizer and shards with 1 and 4 actors.
    again = tmp_path / "again"
    prepare(_config(corpora["folder"], again, num_actors=4), progress=False)
    assert tokenizer_sha256(again / "tokenizer.json") == tokenizer_sha256(out / "tokenizer.json")
    for split in ("train", "val"):
        a = sorted((out / split).glob("*.parquet"))
        b = sorted((again / split).glob("*.parquet"))
        assert [p.name for p in a] == [p.name for p in b]
        for pa_, pb in zip(a, b, strict=True):
            assert pq.read_table(pa_).equals(pq.read_table(pb))

    # The shards stream through Ray Data as a 2-D tensor.
    manifest = Manifest.load(out)
    ds = ray.data.read_parquet([str(p) for p in manifest.shard_paths(out, "train")])
    batch = next(iter(ds.iter_torch_batches(batch_size=8)))
    assert tuple(batch["tokens"].shape) == (8, ROW_LEN)

    # A given tokenizer is reused (same hash), and a different seed changes the split.
    reuse = tmp_path / "reuse"
    prepare(_config(corpora["folder"], reuse, seed=4, tokenizer=out / "tokenizer.json"), progress=False)
    assert tokenizer_sha256(reuse / "tokenizer.json") == tokenizer_sha256(out / "tokenizer.json")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    val_a = _markers(tok, _read_split(out, manifest, "val")[0])
    val_b = _markers(tok, _read_split(reuse, Manifest.load(reuse), "val")[0])
    assert val_a != val_b


def test_jsonl_corpus(ray_local, corpora, tmp_path):
    out = tmp_path / "jsonl"
    summary = prepare(
        _config(corpora["jsonl"], out, text_column="content", special_tokens=["<|sep|>"]), progress=False
    )
    manifest = _check_prepared(out, summary, corpora["jsonl_texts"])
    assert manifest.tokenizer.special_tokens == {"<|eos|>": 0, "<|pad|>": 1, "<|sep|>": 2}
    assert manifest.source.corpus == str(corpora["jsonl"])


def test_builtin_pydoc_small(ray_local, tmp_path):
    out = tmp_path / "pydoc"
    summary = prepare(
        _config("builtin:pydoc", out, max_documents=12, vocab_size=512, val_fraction=0.1), progress=False
    )
    manifest = Manifest.load(out)
    manifest.verify(out)
    assert summary["documents"] == manifest.source.documents == 12
    assert manifest.documents.val >= 1 and manifest.splits["train"].rows > 0


def test_bad_inputs_name_the_cause(ray_local, corpora, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no/such/dir.*builtin:pydoc"):
        prepare(_config(tmp_path / "no/such/dir", tmp_path / "o1"), progress=False)
    with pytest.raises(ValueError, match=r"'body'.*columns found: \['id', 'content'\]"):
        prepare(_config(corpora["jsonl"], tmp_path / "o2", text_column="body"), progress=False)
    assert not (tmp_path / "o2").exists()
    assert not any(p.name.startswith(".o2") for p in tmp_path.iterdir())  # temp folder removed

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=r"existing.*overwrite"):
        prepare(_config(corpora["folder"], existing), progress=False)
    assert (existing / "keep.txt").read_text() == "user data"

    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        prepare(
            _config(corpora["folder"], tmp_path / "o4", tokenizer=tmp_path / "missing.json"), progress=False
        )
    given = tmp_path / "given.json"
    train_tokenizer(iter(corpora["texts"].values()), 300, []).save(str(given))
    with pytest.raises(ValueError, match=r"special_tokens \['<\|sep\|>'\] are not special tokens"):
        prepare(
            _config(corpora["folder"], tmp_path / "o4", tokenizer=given, special_tokens=["<|sep|>"]),
            progress=False,
        )
    assert not (tmp_path / "o4").exists()
    with pytest.raises(ValidationError, match="builtin:nope"):
        _config("builtin:nope", tmp_path / "o3")
    with pytest.raises(ValidationError, match="seq_len"):
        _config(corpora["folder"], tmp_path / "o3", seq_len=0)
    with pytest.raises(ValidationError, match="extra_field"):
        _config(corpora["folder"], tmp_path / "o3", extra_field=1)


def test_overwrite_and_corrupt_shard(ray_local, corpora, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    # --overwrite never deletes a folder that prepare did not write (no manifest.json)
    with pytest.raises(FileExistsError, match=r"no manifest.json.*nothing was deleted"):
        prepare(_config(corpora["parquet"], out, overwrite=True, max_documents=15, val_fraction=0.0), progress=False)
    assert (out / "stale.txt").read_text() == "old"
    (out / "stale.txt").unlink()
    prepare(_config(corpora["folder"], out, max_documents=5), progress=False)
    (out / "stale.txt").write_text("old")  # a prepared folder (with a stray file) is replaced whole
    prepare(
        _config(corpora["parquet"], out, overwrite=True, max_documents=15, val_fraction=0.0), progress=False
    )
    assert not (out / "stale.txt").exists()
    manifest = Manifest.load(out)
    assert manifest.documents.val == 0 and manifest.splits["val"].rows == 0
    from cluster.config import ConfigError, load_config
    from cluster.data_check import check_data

    repo = Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError, match=r"no validation rows .*val_fraction > 0"):  # on the driver, not in a worker
        check_data(load_config(repo / "configs/debug-lm.yaml", [f"data.path={out}"]))
    assert manifest.source.documents == 15  # the first 15 rows of the Parquet folder
    assert manifest.source.corpus == str(corpora["parquet"])

    shard = out / manifest.splits["train"].shards[0].path
    shard.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"part-00000\.parquet.*rpt data prepare"):
        manifest.verify(out)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"part-00000\.parquet"):
        manifest.verify(out)


def test_interrupted_prepare_leaves_the_earlier_folder_intact(ray_local, tmp_path):
    """Ctrl-C (SIGINT) in the middle of `rpt data prepare --overwrite`: the earlier prepared folder is untouched
    (same manifest, same shards), the temporary folder is gone, the exit code says so, and no traceback."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "data"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"name: interrupt\nschedule: {{name: constant, warmup_steps: 0}}\ndata:\n  path: {out}\n  prepare:\n"
                   "    corpus: builtin:pydoc\n"
                   "    seq_len: 64\n    vocab_size: 2048\n    num_actors: 1\n")
    prepare(PrepareConfig(corpus="builtin:pydoc", out_dir=out, seq_len=64, vocab_size=512, max_documents=20),
            progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "data", "prepare", str(cfg), "--overwrite"],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".data.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(tmp_path.glob(".data.tmp-*")), "the prepare never started writing"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-2000:]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not list(tmp_path.glob(".data.tmp-*")) and not list(tmp_path.glob(".data.old-*"))
