"""Corpus text files that are not valid UTF-8 (`data.prepare.on_decode_error: replace | skip | fail`).

The reading UDF (`data.corpus._decode_utf8`) and the driver's policy run on real files written into
tmp_path; `prepare()` itself runs on `_LocalDataset`, which plays the few Ray Dataset methods prepare uses
eagerly in this process, so no Ray instance is started.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from data.corpus import (
    DECODE_COLUMNS,
    CorpusDecodeError,
    _decode_utf8,
    decode_report,
    decode_utf8,
    drop_undecodable,
    resolve_corpus,
    undecodable_rows,
)
from data.manifest import DecodeErrors, DecodeExample, Manifest
from data.prepare import PrepareConfig, apply_decode_policy, prepare

GOOD = ("The quick brown fox jumps over the lazy dog. Ünïcödé is fine here. " * 8).encode()
LATIN = b"caf\xe9 au lait latinword " * 3  # Latin-1: one undecodable byte per e-acute
# a truncated 3-byte sequence (2 bytes, one U+FFFD), two invalid start bytes (two U+FFFD), and a U+FFFD
# the file really holds (valid UTF-8, not counted)
BROKEN = b"line one\nx\xe2\x82y\xff\xfez brokenword \xef\xbf\xbd end"


@pytest.fixture()
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a_good.txt").write_bytes(GOOD)
    (root / "b_latin.txt").write_bytes(LATIN)
    (root / "c_broken.txt").write_bytes(BROKEN)
    return root


def _read(paths) -> pa.Table:
    """What `ray.data.read_binary_files(paths, include_paths=True)` hands the decode UDF: one row per file."""
    return pa.table(
        {"bytes": pa.array([Path(p).read_bytes() for p in paths], pa.binary()), "path": pa.array(list(paths))}
    )


def _config(corpus: Path, policy: str | None = None, **over) -> PrepareConfig:
    kw = {} if policy is None else {"on_decode_error": policy}
    return PrepareConfig(corpus=str(corpus), out_dir=corpus.parent / "out", **kw, **over)


# ---- one file, one batch --------------------------------------------------------------------------


def test_decode_utf8_counts_bytes_replacements_and_first_offset():
    assert decode_utf8(GOOD) == (GOOD.decode(), 0, 0, -1)
    assert decode_utf8(b"caf\xe9") == ("caf\ufffd", 1, 1, 3)
    text, bad_bytes, replacements, offset = decode_utf8(BROKEN)
    assert text == BROKEN.decode("utf-8", errors="replace")  # the same text as before the policy existed
    assert (bad_bytes, replacements, offset) == (4, 3, 10)
    assert text.count("\ufffd") == 4  # 3 inserted + the one the file holds
    assert decode_utf8(b"") == ("", 0, 0, -1)


def test_decode_batch_valid_files_take_the_arrow_path(corpus):
    paths = resolve_corpus(str(corpus)).paths
    out = _decode_utf8(_read(paths[:1]))
    assert out.column_names == ["text", *DECODE_COLUMNS]
    assert out.column("text").type == pa.large_string()
    assert out.to_pylist() == [
        {"text": GOOD.decode(), "path": paths[0], "bad_bytes": 0, "replacements": 0, "bad_offset": -1}
    ]
    assert undecodable_rows(out).num_rows == 0


def test_decode_batch_counts_each_invalid_file(corpus):
    paths = resolve_corpus(str(corpus)).paths
    assert [Path(p).name for p in paths] == ["a_good.txt", "b_latin.txt", "c_broken.txt"]
    out = _decode_utf8(_read(paths))
    assert out.column("text").to_pylist() == [GOOD.decode(), LATIN.decode("utf-8", "replace"),
                                              BROKEN.decode("utf-8", "replace")]  # fmt: skip
    assert out.column("bad_bytes").to_pylist() == [0, 3, 4]
    assert out.column("replacements").to_pylist() == [0, 3, 3]
    assert out.column("bad_offset").to_pylist() == [-1, 3, 10]
    bad = undecodable_rows(out)
    assert bad.column("path").to_pylist() == list(paths[1:])
    kept = drop_undecodable(out)
    assert kept.column("text").to_pylist() == [GOOD.decode()]


# ---- the policy on the driver --------------------------------------------------------------------


class _LocalDataset:
    """The Ray Dataset methods `prepare()` calls, run eagerly on in-process batches (tables or dicts)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def map_batches(self, fn, *, fn_kwargs=None, fn_constructor_args=(), fn_constructor_kwargs=None,
                    batch_size=None, **_):  # fmt: skip
        if isinstance(fn, type):
            fn = fn(*fn_constructor_args, **(fn_constructor_kwargs or {}))
        table = pa.concat_tables(self.batches) if self.batches else None
        if table is None:
            return _LocalDataset([])
        size = table.num_rows if batch_size is None else batch_size
        parts = [table.slice(i, size) for i in range(0, max(table.num_rows, 1), max(size, 1))]
        return _LocalDataset(fn(p, **(fn_kwargs or {})) for p in parts)

    def materialize(self):
        return self

    def select_columns(self, cols):
        return _LocalDataset(b.select(cols) for b in self.batches)

    def iter_batches(self, *, batch_size=None, batch_format="pyarrow", **_):
        for b in self.batches:
            if batch_format == "numpy" and isinstance(b, pa.Table):
                yield {c: b.column(c).to_numpy(zero_copy_only=False) for c in b.column_names}
            else:
                yield b

    def texts(self) -> list[str]:
        return [t for b in self.batches for t in b.column("text").to_pylist()]


def test_replace_counts_names_and_warns_once(corpus, caplog):
    paths = resolve_corpus(str(corpus)).paths
    docs = _LocalDataset([_decode_utf8(_read(paths))])
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        kept, report, warning = apply_decode_policy(docs, undecodable_rows(docs.batches[0]), _config(corpus))
    assert kept is docs and len(kept.texts()) == 3  # nothing left out
    assert report == DecodeErrors(
        policy="replace", files=2, bytes=7, replacements=6,
        examples=[DecodeExample(path=paths[1], bytes=3, replacements=3, offset=3),
                  DecodeExample(path=paths[2], bytes=4, replacements=3, offset=10)],
    )  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == [warning]
    assert warning == (
        f"corpus {str(corpus)!r}: 2 files not valid UTF-8 (7 undecodable byte(s)) decoded with 6 U+FFFD "
        f"replacement character(s) (data.prepare.on_decode_error: replace): {paths[1]!r}, {paths[2]!r}; set "
        "data.prepare.on_decode_error: skip (leave them out) or fail (stop), or convert the files to UTF-8 "
        "(e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`)"
    )


def test_all_valid_files_warn_nothing(corpus, caplog):
    paths = resolve_corpus(str(corpus)).paths[:1]
    docs = _LocalDataset([_decode_utf8(_read(paths))])
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        _, report, warning = apply_decode_policy(docs, undecodable_rows(docs.batches[0]), _config(corpus, "fail"))
    assert report == DecodeErrors(policy="fail", files=0, bytes=0, replacements=0, examples=[])
    assert warning is None and caplog.records == []


def test_examples_are_capped_and_the_rest_counted(tmp_path):
    for i in range(7):
        (tmp_path / f"f{i}.txt").write_bytes(b"x" * i + b"\xe9")
    paths = resolve_corpus(str(tmp_path)).paths
    report = decode_report(undecodable_rows(_decode_utf8(_read(paths))), "skip")
    assert (report.files, report.bytes, report.replacements) == (7, 7, 7)
    assert [e.path for e in report.examples] == list(paths[:5])
    assert [e.offset for e in report.examples] == [0, 1, 2, 3, 4]
    with pytest.raises(CorpusDecodeError, match=r"'.*f4\.txt' and 2 more; the first undecodable byte of "
                                                r"'.*f0\.txt' is at byte offset 0\."):  # fmt: skip
        apply_decode_policy(None, undecodable_rows(_decode_utf8(_read(paths))), _config(tmp_path, "fail"))


def test_config_default_and_allowed_values(corpus):
    assert _config(corpus).on_decode_error == "replace"
    for policy in ("replace", "skip", "fail"):
        assert _config(corpus, policy).on_decode_error == policy
    with pytest.raises(ValidationError, match="on_decode_error"):
        _config(corpus, "ignore")


# ---- prepare() end to end, on the session's Ray ----------------------------------------------------


@pytest.fixture()
def local_prepare(ray_session):
    """`prepare()` on the test session's Ray instance; returns a function giving the tokens a prepared folder
    holds for given texts (what TokenizeAndPack counts: each text's ids plus one EOS)."""
    import ray

    ray_was_running = ray.is_initialized()

    def tokens_of(config, texts: list[str]) -> int:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(config.out_dir / "tokenizer.json"))
        tok.encode_special_tokens = True
        return sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts)

    yield tokens_of
    assert ray.is_initialized() == ray_was_running  # prepare() started no Ray instance of its own


def _prepare(corpus: Path, policy: str | None):
    config = _config(corpus, policy, seq_len=8, vocab_size=300, val_fraction=0.0, num_actors=1)
    return config, prepare(config, progress=False)


def test_prepare_replace_records_the_files_in_the_manifest(corpus, local_prepare):
    config, summary = _prepare(corpus, None)
    paths = resolve_corpus(str(corpus)).paths
    assert summary["documents"] == 3 and summary["undecodable_files"] == 2
    texts = [GOOD.decode(), LATIN.decode("utf-8", "replace"), BROKEN.decode("utf-8", "replace")]
    assert summary["tokens"] == local_prepare(config, texts)  # all three tokenised, with U+FFFD
    manifest = Manifest.load(config.out_dir)
    assert manifest.decode_errors == DecodeErrors(
        policy="replace", files=2, bytes=7, replacements=6,
        examples=[DecodeExample(path=paths[1], bytes=3, replacements=3, offset=3),
                  DecodeExample(path=paths[2], bytes=4, replacements=3, offset=10)],
    )  # fmt: skip
    raw = json.loads((config.out_dir / "manifest.json").read_text())
    assert raw["decode_errors"] == {
        "policy": "replace", "files": 2, "bytes": 7, "replacements": 6,
        "examples": [{"path": paths[1], "bytes": 3, "replacements": 3, "offset": 3},
                     {"path": paths[2], "bytes": 4, "replacements": 3, "offset": 10}],
    }  # fmt: skip
    # a manifest written before the field existed still loads (decode_errors: None)
    del raw["decode_errors"]
    assert Manifest.model_validate(raw).decode_errors is None


def test_prepare_skip_leaves_the_files_out(corpus, local_prepare, caplog):
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        config, summary = _prepare(corpus, "skip")
    paths = resolve_corpus(str(corpus)).paths
    assert summary["tokens"] == local_prepare(config, [GOOD.decode()])  # the only text tokenised
    assert summary["documents"] == 1 and summary["characters"] == len(GOOD.decode())
    assert summary["undecodable_files"] == 2
    record = Manifest.load(config.out_dir).decode_errors
    assert (record.policy, record.files, record.bytes, record.replacements) == ("skip", 2, 7, 6)
    assert [e.path for e in record.examples] == list(paths[1:])
    (warning,) = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
    assert warning.startswith(
        f"corpus {str(corpus)!r}: 2 files not valid UTF-8 (7 undecodable byte(s)) left out "
        f"(data.prepare.on_decode_error: skip): {paths[1]!r}, {paths[2]!r}; set data.prepare.on_decode_error: "
        "replace to keep them, or fail to stop, or convert the files to UTF-8"
    )


def test_prepare_fail_names_files_offset_and_fix_and_writes_nothing(corpus, local_prepare):
    paths = resolve_corpus(str(corpus)).paths
    with pytest.raises(CorpusDecodeError) as info:
        _prepare(corpus, "fail")
    assert isinstance(info.value, ValueError)  # the CLI reports it as bad input (exit 2)
    assert str(info.value) == (
        f"corpus {str(corpus)!r}: 2 files not valid UTF-8 (7 undecodable byte(s)): {paths[1]!r}, {paths[2]!r}; "
        f"the first undecodable byte of {paths[1]!r} is at byte offset 3. Nothing was written "
        "(data.prepare.on_decode_error: fail); set data.prepare.on_decode_error: replace (U+FFFD in their "
        "place) or skip (leave the files out), or convert the files to UTF-8 "
        "(e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`)"
    )
    assert sorted(p.name for p in corpus.parent.iterdir()) == ["corpus"]  # no out_dir, no temp folder: nothing
    # was tokenised or written


def test_prepare_valid_corpus_records_zero(corpus, local_prepare):
    (corpus / "b_latin.txt").unlink()
    (corpus / "c_broken.txt").unlink()
    config, summary = _prepare(corpus, "fail")
    assert summary["undecodable_files"] == 0
    assert Manifest.load(config.out_dir).decode_errors == DecodeErrors(policy="fail")
    assert np.isfinite(summary["tokens_per_s"])
