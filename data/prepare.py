"""`rpt data prepare`: corpus -> tokenizer -> packed, tokenized Parquet shards + manifest.

Pipeline (Ray Data unless noted):

1. read the corpus into a `text` column (`data/corpus.py`) and annotate every document with its
   character count and two keyed-hash uniforms (`data/pack.py:document_uniforms`); materialized once;
   driver: gather the text files that are not valid UTF-8 and apply `on_decode_error` (warn and keep
   them with U+FFFD, warn and leave them out, or stop before anything is written); the manifest's
   `decode_errors` records what was found and done;
2. driver: choose the validation documents (`u_split < val_threshold`, at least one when
   `val_fraction > 0`), then train a byte-level BPE tokenizer on a seeded sample of the *training*
   documents (`u_sample < tokenizer_train_chars / train_characters`), or load the given one (a
   `tokenizer.json` or a Hugging Face tokenizer folder, e.g. a released model's) and resolve which of
   its tokens are EOS, PAD and BOS (`data/tokenizer.py:resolve_roles`);
3. `map_batches` with a callable class on `num_actors` actors: `encode_batch`, EOS after each document
   (and BOS before it when `add_bos_token`), concatenate and cut into rows of `seq_len + 1` tokens
   (numpy reshape), train and val separately;
   each batch's leftover tail comes back as one padded row marked by its valid length;
4. Ray tasks (`data/shards.py`): the rows stay in the object store; the driver stitches the per-batch tails
   into further rows (only the last tail of each split, fewer than `row_len` tokens, is dropped and
   reported); each window of `shard_rows` consecutive rows is shuffled (seeded) and written as one shard by a
   task, the shards in a seeded permutation of the windows.

Scale: the driver holds no rows, only the tails (< one row per tokenize batch) and per-document split
statistics (16 bytes a document); the rows live in Ray's object store, which spills to disk. Tokenizer
training reads at most `tokenizer_train_chars` characters of training documents.

Determinism: the same corpus, seed and settings (seq_len, vocab_size, val_fraction, docs_per_batch, ...)
give a byte-identical tokenizer and identical shards whatever `num_actors` is: Ray Data runs with
`preserve_order`, the split hashes document contents, and the shuffle is seeded per window and shard.

Next to `tokenizer.json` goes `tokenizer_config.json` (`TokenizerRoles.to_tokenizer_config()`: the
bos/eos/pad tokens and add_bos_token), for every tokenizer, so exports can be loaded by `transformers`.

Everything is written to a temporary sibling folder and renamed to `out_dir` at the end, so a failure
leaves no half-written dataset behind. `corpus` and `out_dir` may be URIs of an object store
(`s3://bucket/prefix`, :mod:`data.location`): an `out_dir` there is built in a local temporary folder and
uploaded with `manifest.json` last (:mod:`data.upload`, which describes the guarantee and `overwrite`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.data import DataContext
from tokenizers import Tokenizer

from data import pack
from data.corpus import (
    BUILTIN_CORPORA,
    BUILTIN_PREFIX,
    DECODE_SCHEMA,
    CorpusSource,
    DecodePolicy,
    decode_error,
    decode_report,
    decode_warning,
    drop_undecodable,
    read_corpus,
    resolve_corpus,
    undecodable_rows,
)
from data.curation import DedupSpec, FilterSpec, SelectSpec
from data.location import Location, check_reachable, is_uri, resolve
from data.manifest import (
    DecodeErrors,
    DocumentCounts,
    Manifest,
    SourceInfo,
    SplitInfo,
    TokenizerInfo,
)
from data.shards import Packed, write_split
from data.tokenizer import (
    BASE_SPECIAL_TOKENS,
    EOS_TOKEN,
    PAD_TOKEN,
    TokenizerRoles,
    add_special_tokens,
    all_special_tokens,
    is_project_tokenizer,
    load_tokenizer,
    min_vocab_size,
    resolve_roles,
    special_token_ids,
    special_tokens_with_roles,
    tokenizer_file,
    tokenizer_sha256,
    train_tokenizer,
    vocab_size_of,
    write_tokenizer_config,
)

logger = logging.getLogger(__name__)

TOKENIZER_NAME = "tokenizer.json"
SPLIT_CODES = {"train": 0, "val": 1}


class PrepareConfig(BaseModel):
    """Settings of one `rpt data prepare` run. Unknown keys and out-of-range values are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: str = Field(
        description="folder/file of text, Parquet or JSONL, or builtin:pydoc|stdlib-py|c-headers"
    )
    out_dir: Path | str = Field(
        description="output folder, or an object-store URI such as s3://bucket/prefix (must not exist or be empty "
        "unless overwrite)"
    )
    seq_len: int = Field(128, ge=2, le=1 << 20, description="model context; rows hold seq_len + 1 tokens")
    vocab_size: int = Field(4096, le=(1 << 31) - 1, description="BPE vocab incl. 256 bytes + special tokens")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents held out for val")
    shard_rows: int = Field(2048, ge=1, description="rows per Parquet shard (the last may be smaller)")
    seed: int = Field(0, ge=0, le=(1 << 64) - 1, description="seeds the split, tokenizer sample, shuffle")
    tokenizer: Path | str | None = Field(
        None, description="tokenizer.json or Hugging Face tokenizer folder (a path or an object-store URI) to use "
        "instead of training one"
    )
    bos_token: str | None = Field(
        None, min_length=1, description="BOS token; default: the tokenizer folder's tokenizer_config.json"
    )
    eos_token: str | None = Field(
        None, min_length=1, description="token after every document; default: tokenizer_config.json, <|eos|>"
    )
    pad_token: str | None = Field(
        None, min_length=1, description="pad token; default: tokenizer_config.json, <|pad|>, else EOS pads"
    )
    add_bos_token: bool | None = Field(
        None, description="put BOS before every document; default: tokenizer_config.json, the post-processor"
    )
    text_column: str = Field("text", min_length=1, description="document column of Parquet/JSONL corpora")
    max_documents: int | None = Field(None, ge=1, description="keep only the first N documents")
    special_tokens: list[str] = Field(
        default_factory=list,
        description="extra special tokens: after eos/pad when trained, after a given tokenizer's vocabulary",
    )
    overwrite: bool = Field(False, description="replace an existing non-empty out_dir")
    tokenizer_train_chars: int = Field(
        50_000_000, ge=1, description="characters of training documents sampled to train the tokenizer"
    )
    docs_per_batch: int = Field(
        256, ge=1, description="documents per tokenize/pack batch; with the seed it fixes the packed rows"
    )
    num_actors: int = Field(2, ge=1, description="tokenizer actors (map_batches concurrency)")
    dedup: DedupSpec | None = Field(None, description="curation: exact and/or MinHash near-duplicate removal")
    filters: FilterSpec | None = Field(None, description="curation: Gopher quality rules (each threshold; null: off)")
    select: SelectSpec | None = Field(None, description="curation: INGENIOUS representative subset selection")
    on_decode_error: DecodePolicy = Field(
        "replace",
        description="text files that are not valid UTF-8: replace (U+FFFD, warn), skip (leave out, warn), "
        "fail (stop, write nothing)",
    )

    @field_validator("corpus")
    @classmethod
    def _corpus(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("corpus must be a path or builtin:NAME, got an empty string")
        if v.startswith(BUILTIN_PREFIX) and v[len(BUILTIN_PREFIX) :] not in BUILTIN_CORPORA:
            allowed = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)
            raise ValueError(f"unknown builtin corpus {v!r}; allowed: {allowed}")
        return v

    @field_validator("out_dir", "tokenizer")
    @classmethod
    def _location(cls, v: Path | str | None) -> Path | str | None:
        if v is None or (isinstance(v, str) and is_uri(v)):
            return v  # URIs stay strings (a Path folds s3:// to s3:/)
        return Path(v)

    @field_validator("special_tokens")
    @classmethod
    def _special_tokens(cls, v: list[str]) -> list[str]:
        if any(not t or t.isspace() for t in v):
            raise ValueError(f"special_tokens must be non-empty strings, got {v!r}")
        dupes = sorted({t for t in v if v.count(t) > 1})
        if dupes:
            raise ValueError(f"special_tokens {dupes} are duplicated; list each token once")
        return v

    @model_validator(mode="after")
    def _vocab(self) -> PrepareConfig:
        if self.tokenizer is not None:
            return self
        dupes = sorted(set(self.special_tokens) & set(BASE_SPECIAL_TOKENS))
        if dupes:
            raise ValueError(
                f"special_tokens {dupes} are duplicated ({EOS_TOKEN} and {PAD_TOKEN} are always added)"
            )
        need = min_vocab_size(self.special_tokens)
        if self.vocab_size < need:
            raise ValueError(
                f"vocab_size={self.vocab_size} is too small: a byte-level BPE needs >= {need} "
                f"(256 byte symbols + {need - 256} special tokens)"
            )
        specials = all_special_tokens(self.special_tokens)
        for role in ("bos", "eos", "pad"):
            token = getattr(self, f"{role}_token")
            if token is not None and token not in specials:
                raise ValueError(
                    f"data.prepare.{role}_token={token!r} is not a special token of the tokenizer rpt trains "
                    f"({', '.join(specials)}); add it to data.prepare.special_tokens, or set "
                    "data.prepare.tokenizer to a tokenizer that has it"
                )
        if self.add_bos_token and self.bos_token is None:
            raise ValueError(
                "data.prepare.add_bos_token=True needs data.prepare.bos_token (the tokenizer rpt trains has no "
                "BOS of its own): add e.g. '<|bos|>' to data.prepare.special_tokens and set bos_token to it"
            )
        return self

    def curation(self):
        """The curation stages' settings (:class:`data.curation.CurationSpec`)."""
        from data.curation import CurationSpec

        return CurationSpec(dedup=self.dedup, filters=self.filters, select=self.select)

    def role_settings(self) -> dict[str, Any]:
        """The explicit role fields, as keyword arguments of `data.tokenizer.resolve_roles`."""
        return {k: getattr(self, k) for k in ("bos_token", "eos_token", "pad_token", "add_bos_token")}


# ---- Ray Data UDFs ------------------------------------------------------------------------------


def _annotate(batch: pa.Table, *, seed: int) -> pa.Table:
    """Add per-document `chars`, `u_split`, `u_sample` (see `pack.document_uniforms`)."""
    texts = batch.column("text").to_pylist()
    u_split, u_sample = pack.document_uniforms(texts, seed)
    chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    return (
        batch.append_column("chars", pa.array(chars))
        .append_column("u_split", pa.array(u_split))
        .append_column("u_sample", pa.array(u_sample))
    )


class TokenizeAndPack:
    """Ray Data callable class: documents -> packed rows, per split. Loads the tokenizer once per actor.

    The tokenizer file lies next to the shards, so on a multi-node cluster `out_dir` must be on storage
    every node sees (which training needs anyway to read the shards).
    """

    def __init__(
        self,
        tokenizer_path: str,
        *,
        row_len: int,
        eos_id: int,
        pad_id: int,
        threshold: float,
        bos_id: int | None = None,
    ):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(tokenizer_path)
        # A released tokenizer.json may enable truncation or padding (e.g. to the model's context);
        # documents are packed whole, so both are turned off (no-ops for the project's own tokenizer).
        self.tok.no_truncation()
        self.tok.no_padding()
        # A literal "<|eos|>" (or "</s>", ...) inside a document is text, not a document boundary: only
        # the packer writes special ids (by default `tokenizers` would map the string to its id).
        self.tok.encode_special_tokens = True
        # encode_batch_fast skips the character offsets we do not use (same ids as encode_batch).
        self.encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        self.row_len, self.eos_id, self.pad_id, self.threshold = row_len, eos_id, pad_id, threshold
        self.bos_id = bos_id  # put before every document when set (add_bos_token)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        is_val = batch.column("u_split").to_numpy() < self.threshold
        encodings = self.encode(batch.column("text").to_pylist(), add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        tokens, n_valid, split = [np.empty((0, self.row_len), np.int32)], [np.empty(0, np.int32)], []
        for name, mask in (("train", ~is_val), ("val", is_val)):
            docs = [ids[i] for i in np.flatnonzero(mask)]
            if not docs:
                continue
            packed = pack.pack_documents(docs, row_len=self.row_len, eos_id=self.eos_id, bos_id=self.bos_id)
            rows, valid = pack.rows_with_tail(packed, pad_id=self.pad_id)
            tokens.append(rows)
            n_valid.append(valid)
            split.append(np.full(len(rows), SPLIT_CODES[name], dtype=np.int8))
        return {
            "tokens": np.concatenate(tokens),  # (rows, row_len) int32
            "n_valid": np.concatenate(n_valid),  # (rows,) real tokens per row; < row_len marks a tail
            "split": np.concatenate(split) if split else np.empty(0, np.int8),
        }


# ---- driver helpers -----------------------------------------------------------------------------


@contextlib.contextmanager
def _data_context(progress: bool) -> Iterator[None]:
    """Deterministic block order (packing and sharding depend on it) and progress bars, restored after."""
    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    try:
        yield
    finally:
        (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start) = saved


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """A local ``out_dir``: the same rules as on an object store (:func:`data.upload.check_out_dir`)."""
    from data.upload import check_out_dir

    check_out_dir(resolve(out_dir, what="out_dir"), overwrite)


def _gather_numpy(ds: ray.data.Dataset, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns of a dataset concatenated on the driver, in block order (one execution of `ds`)."""
    ds = ds.select_columns(columns)
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for c in columns:
            parts[c].append(np.asarray(batch[c]))
    return {c: np.concatenate(v) if v else np.empty(0) for c, v in parts.items()}


def _sampled(batch: pa.Table, *, threshold: float, sample_fraction: float) -> pa.Table:
    keep = (batch.column("u_split").to_numpy() >= threshold) & (batch.column("u_sample").to_numpy() < sample_fraction)
    return batch.select(["text"]).filter(pa.array(keep))


def _tokenizer_texts(docs: ray.data.Dataset, threshold: float, sample_fraction: float) -> Iterator[list[str]]:
    """Training documents with `u_sample < sample_fraction`, chosen in Ray Data tasks and streamed to the driver
    in batches (about `tokenizer_train_chars` characters in all)."""
    sample = docs.map_batches(_sampled, fn_kwargs={"threshold": threshold, "sample_fraction": sample_fraction},
                              batch_format="pyarrow", batch_size=None)
    for batch in sample.iter_batches(batch_size=512, batch_format="pyarrow"):
        if batch.num_rows:
            yield batch.column("text").to_pylist()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


_SUMMARY_ROWS = ("corpus", "documents", "characters", "vocab_size", "train_rows", "val_rows", "tokens",
                 "dropped_tokens", "shards", "seconds", "tokens_per_s")  # fmt: skip


def _print_summary(summary: dict[str, Any], warning: str | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"rpt data prepare -> {summary['out_dir']}", show_header=False)
    for key in _SUMMARY_ROWS:
        table.add_row(key, _fmt(summary[key]))
    if summary["undecodable_files"]:
        table.add_row("undecodable_files", _fmt(summary["undecodable_files"]))
    for st in summary.get("curation", []):
        table.add_row(f"curation {st['stage']}", f"{st['documents_in']:,} -> {st['documents_out']:,} documents")
    console = Console()
    console.print(table)
    if warning:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


# ---- pipeline steps -----------------------------------------------------------------------------


def _gather_undecodable(docs: ray.data.Dataset) -> pa.Table:
    """The `DECODE_COLUMNS` of every document that was not valid UTF-8, in corpus order (small)."""
    bad = docs.map_batches(undecodable_rows, batch_format="pyarrow", batch_size=None)
    tables = [t for t in bad.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows]
    return pa.concat_tables(tables, promote_options="permissive") if tables else DECODE_SCHEMA.empty_table()


def apply_decode_policy(
    docs: Any, rows: pa.Table, config: PrepareConfig
) -> tuple[Any, DecodeErrors, str | None]:
    """`on_decode_error` on the undecodable `rows` of a text-file corpus: returns the documents to use
    (without those files under `skip`), the manifest record and the warning (logged here; None when every
    file was valid UTF-8). Under `fail` raises `data.corpus.CorpusDecodeError` (a ValueError)."""
    report = decode_report(rows, config.on_decode_error)
    if not report.files:
        return docs, report, None
    if report.policy == "fail":
        raise decode_error(report, config.corpus)
    warning = decode_warning(report, config.corpus)
    logger.warning("%s", warning)
    if report.policy == "skip":
        docs = docs.map_batches(drop_undecodable, batch_format="pyarrow", batch_size=None)
    return docs, report, warning


def _read_documents(
    source: CorpusSource, config: PrepareConfig
) -> tuple[ray.data.Dataset, DecodeErrors | None, str | None]:
    """Step 1: the annotated documents (materialized), the decode record (text files only) and its warning."""
    docs = (
        read_corpus(source, text_column=config.text_column, max_documents=config.max_documents)
        .map_batches(_annotate, fn_kwargs={"seed": config.seed}, batch_format="pyarrow", batch_size=None)
        .materialize()
    )
    if source.kind != "text_files":
        return docs, None, None
    return apply_decode_policy(docs, _gather_undecodable(docs), config)


def _curate(docs: ray.data.Dataset, config: PrepareConfig, tmp: Path) -> tuple[ray.data.Dataset, list | None]:
    """The curation stages (:mod:`data.curation`) on the documents, when any is configured: the documents kept,
    the manifest's stage records, and `curation_removed.parquet` (doc_id, stage, reason) written into ``tmp``."""
    from data.curation.pipeline import REMOVED_FILE, curate, with_ids
    from data.manifest import CurationStage

    spec = config.curation()
    if not spec.active:
        return docs, None
    embed = spec.select.embeddings if spec.select is not None else None
    if embed is not None and "://" in embed:
        raise ValueError(
            f"data.prepare.select.embeddings={embed!r} is a registry URI: `rpt data prepare` resolves it to a local "
            "folder; here give an export folder (model.safetensors + model_config.json + tokenizer.json)"
        )
    cur = curate(with_ids(docs), spec, seed=config.seed, embed_folder=embed)
    pq.write_table(cur.removed_table(), tmp / REMOVED_FILE)
    for st in cur.stages:
        logger.info("curation %s: %d -> %d documents", st["stage"], st["documents_in"], st["documents_out"])
    return cur.docs, [CurationStage(**st) for st in cur.stages]


@dataclass(frozen=True)
class _DocStats:
    documents: int
    val_documents: int
    characters: int
    train_characters: int
    threshold: float  # a document is in val iff u_split < threshold

    @property
    def train_documents(self) -> int:
        return self.documents - self.val_documents


def _split_documents(docs: ray.data.Dataset, config: PrepareConfig) -> _DocStats:
    stats = _gather_numpy(docs, ["chars", "u_split"])
    n_docs = len(stats["chars"])
    if n_docs == 0:
        raise ValueError(f"corpus {config.corpus!r} holds no documents")
    threshold = pack.val_threshold(stats["u_split"], config.val_fraction)
    is_val = stats["u_split"] < threshold
    result = _DocStats(
        documents=n_docs,
        val_documents=int(is_val.sum()),
        characters=int(stats["chars"].sum()),
        train_characters=int(stats["chars"][~is_val].sum()),
        threshold=threshold,
    )
    if result.train_documents == 0:
        raise ValueError(
            f"corpus {config.corpus!r} has {n_docs} document(s), none left for training after holding "
            f"out val_fraction={config.val_fraction}; add documents or lower val_fraction"
        )
    return result


@dataclass(frozen=True)
class TokenizerChoice:
    """The tokenizer a preparation uses, its special-token roles, and where it came from."""

    tok: Tokenizer
    roles: TokenizerRoles
    source: Path | None = None  # the given tokenizer.json; None when trained
    added: tuple[str, ...] = ()  # special tokens added to a given tokenizer (after its vocabulary)

    def write(self, directory: Path) -> Path:
        """Write `DIR/tokenizer.json` (a byte copy of an unchanged given file) and `tokenizer_config.json`."""
        tok_path = directory / TOKENIZER_NAME
        if self.source is not None and not self.added:
            shutil.copyfile(self.source, tok_path)
        else:
            self.tok.save(str(tok_path))
        write_tokenizer_config(self.roles, directory)
        return tok_path

    def info(self, tok_path: Path) -> TokenizerInfo:
        """The manifest's description of the written tokenizer."""
        roles = self.roles
        return TokenizerInfo(
            path=tok_path.name,
            sha256=tokenizer_sha256(tok_path),
            vocab_size=vocab_size_of(self.tok),
            eos_id=roles.eos_id,
            pad_id=roles.pad_id,
            special_tokens=special_tokens_with_roles(self.tok, roles),
            eos_token=roles.eos_token,
            pad_token=roles.pad_token,
            bos_token=roles.bos_token,
            bos_id=roles.bos_id,
            add_bos=roles.add_bos_token,
        )


def load_given_tokenizer(config: PrepareConfig) -> TokenizerChoice:
    """Load `config.tokenizer`, add `config.special_tokens` it lacks, and resolve its roles (no Ray).

    A released model's tokenizer gets the missing special tokens appended after its vocabulary (with a
    warning: the model's embedding needs rows for them). One of the project's own tokenizers (`<|eos|>`
    = 0, `<|pad|>` = 1) is never extended: a missing special token is an error, as its vocabulary was
    trained with its special tokens first.
    """
    assert config.tokenizer is not None
    source = tokenizer_file(config.tokenizer)
    tok = load_tokenizer(source)
    added: list[str] = []
    if is_project_tokenizer(tok):
        missing = [t for t in config.special_tokens if t not in special_token_ids(tok)]
        if missing:
            raise ValueError(
                f"data.prepare.special_tokens {missing} are not special tokens of tokenizer {str(source)!r} "
                "(one of rpt's own, which is not extended); remove them, or leave data.prepare.tokenizer "
                "unset to train a tokenizer that has them"
            )
    else:
        before = vocab_size_of(tok)
        added = add_special_tokens(tok, config.special_tokens)
        if added:
            ids = [tok.token_to_id(t) for t in added]
            logger.warning(
                "added special tokens %s (ids %s) to tokenizer %s after its vocabulary: vocab_size grows "
                "from %d to %d; a model pre-trained with the original tokenizer needs an embedding with "
                "room for them (at least %d rows)",
                added, ids, source, before, vocab_size_of(tok), vocab_size_of(tok),
            )  # fmt: skip
    roles = resolve_roles(tok, config.tokenizer, **config.role_settings())
    return TokenizerChoice(tok=tok, roles=roles, source=source, added=tuple(added))


def _build_tokenizer(
    docs: ray.data.Dataset,
    stats: _DocStats,
    config: PrepareConfig,
    given: TokenizerChoice | None,
    *,
    progress: bool,
) -> TokenizerChoice:
    """The given tokenizer, or one trained on a seeded sample of the training documents."""
    if given is not None:
        if "vocab_size" in config.model_fields_set and vocab_size_of(given.tok) != config.vocab_size:
            logger.warning(
                "using the given tokenizer's vocab_size %d instead of vocab_size=%d",
                vocab_size_of(given.tok),
                config.vocab_size,
            )
        return given
    sample_fraction = min(1.0, config.tokenizer_train_chars / max(stats.train_characters, 1))
    texts = _tokenizer_texts(docs, stats.threshold, sample_fraction)
    tok = train_tokenizer(texts, config.vocab_size, config.special_tokens, show_progress=progress)
    if tok.get_vocab_size() < config.vocab_size:
        logger.warning(
            "the tokenizer ran out of merges: vocab_size %d < requested %d (small corpus)",
            tok.get_vocab_size(),
            config.vocab_size,
        )
    return TokenizerChoice(tok=tok, roles=resolve_roles(tok, None, **config.role_settings()))


def _tokenize_and_pack(
    docs: ray.data.Dataset, tok_path: Path, roles: TokenizerRoles, threshold: float, config: PrepareConfig
) -> Packed:
    """Run `TokenizeAndPack` on an actor pool; the rows stay in the object store, the tails come to the driver."""
    num_actors = config.num_actors
    cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
    if 0 < cluster_cpus < num_actors:  # each actor takes one CPU; more would wait forever
        logger.warning(
            "num_actors=%d exceeds the cluster's %d CPUs; using %d", num_actors, cluster_cpus, cluster_cpus
        )
        num_actors = cluster_cpus
    packed = docs.map_batches(
        TokenizeAndPack,
        fn_constructor_args=(str(tok_path),),
        fn_constructor_kwargs={
            "row_len": config.seq_len + 1,
            "eos_id": roles.eos_id,
            "pad_id": roles.pad_id,
            "bos_id": roles.prepend_id,
            "threshold": threshold,
        },
        batch_size=config.docs_per_batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
    )
    return Packed.gather_tails(packed, config.seq_len + 1)


def _write_splits(packed: Packed, config: PrepareConfig, tmp: Path, progress: bool
                  ) -> tuple[dict[str, SplitInfo], int, int]:
    """Each split's shards, written by Ray tasks (:mod:`data.shards`); returns the split infos, the dropped
    tokens and all tokens."""
    splits, dropped, tokens = {}, 0, 0
    with _write_progress(progress) as report:
        for name, code in SPLIT_CODES.items():
            splits[name], d, t = write_split(packed, code=code, name=name, out_dir=tmp,
                                             shard_rows=config.shard_rows, seed=config.seed, progress=report)
            dropped, tokens = dropped + d, tokens + t
    if splits["train"].rows == 0:
        train_tokens = tokens - int(packed.tails["n_valid"][packed.tails["split"] == SPLIT_CODES["val"]].sum())
        raise ValueError(
            f"the training documents hold {train_tokens} tokens, fewer than one row of seq_len + 1 = "
            f"{config.seq_len + 1}; use a larger corpus or a smaller seq_len"
        )
    return splits, dropped, tokens


@contextlib.contextmanager
def _write_progress(progress: bool) -> Iterator[Any]:
    """A console line per split while its shards are written: tokens written and tokens/s."""
    if not progress:
        yield None
        return
    from rich.progress import Progress, TextColumn

    with Progress(TextColumn("{task.description}"), transient=False) as bar:
        tasks: dict[str, Any] = {}

        def report(name: str, tokens: int, seconds: float) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name)
            rate = tokens / seconds if seconds > 0 else 0.0
            bar.update(tasks[name], description=f"writing {name} shards: {tokens:,} tokens, {rate:,.0f} tokens/s")

        yield report


# ---- entry point --------------------------------------------------------------------------------


def prepare(config: PrepareConfig, *, progress: bool = True) -> dict[str, Any]:
    """Prepare `config.corpus` into `config.out_dir` (see :func:`_prepare`); a tokenizer given as an object-store
    URI is downloaded into a temporary folder first, with the Hugging Face files next to it."""
    if config.tokenizer is None or not is_uri(config.tokenizer):
        return _prepare(config, progress=progress)
    with tempfile.TemporaryDirectory(prefix="rpt-tokenizer-") as tmp:
        local = _download_tokenizer(str(config.tokenizer), Path(tmp))
        return _prepare(config.model_copy(update={"tokenizer": local}), progress=progress)


def _download_tokenizer(uri: str, dest: Path) -> Path:
    """A `tokenizer.json` (or a tokenizer folder) on a store, with the `tokenizer_config.json` and
    `special_tokens_map.json` of its folder where present, copied into `dest`; returns the local equivalent."""
    from data.location import copy_to_local
    from data.tokenizer import SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

    what = "data.prepare.tokenizer"
    loc = resolve(uri, what=what)
    check_reachable(loc, what)
    folder, name = (loc, TOKENIZER_FILE) if loc.is_dir() else (loc.parent, loc.name)
    if not folder.join(name).is_file():
        raise FileNotFoundError(f"{what}={uri!r} does not exist (no {name} there)")
    for file in (name, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
        if file == name or folder.join(file).is_file():
            copy_to_local(folder.join(file).uri, dest / file)
    return dest if loc.is_dir() else dest / name


def _prepare(config: PrepareConfig, *, progress: bool = True) -> dict[str, Any]:
    """Prepare `config.corpus` into `config.out_dir`; returns a summary dict (and prints it if `progress`).

    Uses the current Ray instance (Ray Data starts a local one if none is running). `progress` turns
    Ray Data's progress bars, the tokenizer trainer's bar and the summary table on or off. Summary keys:
    out_dir, corpus, documents, train_documents, val_documents, characters, vocab_size, train_rows,
    val_rows, tokens (all tokens incl. one EOS, and with add_bos_token one BOS, per document),
    packed_tokens, dropped_tokens, shards, train_shards, val_shards, seconds, tokens_per_s,
    undecodable_files (text files that were not valid UTF-8, kept or left out by `on_decode_error`).
    """
    t0 = time.perf_counter()
    target = _remote_target(config.out_dir, config.overwrite)
    out_dir = Path(config.out_dir).expanduser().absolute() if target is None else None
    if out_dir is not None:
        _check_out_dir(out_dir, config.overwrite)
    source = resolve_corpus(config.corpus, max_documents=config.max_documents)  # path errors before Ray work
    # fail fast on a bad tokenizer file or special-token role, before any Ray work
    given = load_given_tokenizer(config) if config.tokenizer is not None else None

    tmp = _temp_folder(out_dir)
    try:
        with _data_context(progress):
            docs, decode, decode_warn = _read_documents(source, config)
            docs, curated = _curate(docs, config, tmp)
            stats = _split_documents(docs, config)
            choice = _build_tokenizer(docs, stats, config, given, progress=progress)
            tok_path = choice.write(tmp)
            roles = choice.roles
            logger.info(
                "special tokens: eos %r = %d, pad %s, bos %s%s",
                roles.eos_token, roles.eos_id,
                "= eos" if roles.pads_with_eos else f"{roles.pad_token!r} = {roles.pad_id}",
                f"{roles.bos_token!r} = {roles.bos_id}" if roles.bos_token is not None else "none",
                " (put before every document)" if roles.add_bos_token else "",
            )  # fmt: skip
            packed = _tokenize_and_pack(docs, tok_path, roles, stats.threshold, config)
            del docs  # release the materialized documents from the object store
            splits, dropped, tokens_total = _write_splits(packed, config, tmp, progress)
            del packed
        if stats.val_documents and splits["val"].rows == 0:
            logger.warning(
                "the %d validation document(s) fill no row of %d tokens: the val split is empty",
                stats.val_documents,
                config.seq_len + 1,
            )
        tokenizer_info = choice.info(tok_path)
        vocab_size = tokenizer_info.vocab_size
        manifest = Manifest(
            seq_len=config.seq_len,
            row_len=config.seq_len + 1,
            seed=config.seed,
            source=SourceInfo(corpus=config.corpus, documents=stats.documents, characters=stats.characters),
            tokenizer=tokenizer_info,
            splits=splits,
            documents=DocumentCounts(train=stats.train_documents, val=stats.val_documents),
            dropped_tokens=dropped,
            decode_errors=decode,
            curation=curated,
        )
        manifest.save(tmp)
        manifest.verify(tmp)
        _publish(tmp, out_dir, target, config.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "out_dir": str(out_dir) if target is None else target.shown,
        "corpus": config.corpus,
        "documents": stats.documents,
        "train_documents": stats.train_documents,
        "val_documents": stats.val_documents,
        "characters": stats.characters,
        "vocab_size": vocab_size,
        "train_rows": splits["train"].rows,
        "val_rows": splits["val"].rows,
        "tokens": tokens_total,
        "packed_tokens": splits["train"].tokens + splits["val"].tokens,
        "dropped_tokens": dropped,
        "train_shards": len(splits["train"].shards),
        "val_shards": len(splits["val"].shards),
        "shards": len(splits["train"].shards) + len(splits["val"].shards),
        "seconds": seconds,
        "tokens_per_s": tokens_total / seconds if seconds > 0 else 0.0,
        "undecodable_files": decode.files if decode is not None else 0,
        "curation": [c.model_dump() for c in curated] if curated else [],
    }
    if progress:
        _print_summary(summary, decode_warn)
    return summary


def _remote_target(out_dir: Path | str, overwrite: bool) -> Location | None:
    """``out_dir`` on an object store, checked (store reachable, bucket there, prefix free or a prepared folder
    under ``overwrite``); None for a local ``out_dir``."""
    from data.upload import check_out_dir

    if not is_uri(out_dir):
        return None
    what = "out_dir (data.path)"
    target = resolve(out_dir, what=what)
    check_reachable(target, what)
    check_out_dir(target, overwrite)
    return target


def _temp_folder(out_dir: Path | None) -> Path:
    """Where the preparation is built: a sibling of a local ``out_dir`` (renamed at the end), else a local
    temporary folder (uploaded at the end)."""
    if out_dir is None:
        return Path(tempfile.mkdtemp(prefix="rpt-prepare-"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out_dir: Path | None, target: Location | None, overwrite: bool) -> None:
    """The finished ``tmp`` becomes ``out_dir`` (a rename), or is uploaded to ``target`` and removed."""
    from data.upload import upload_prepared

    if target is None:
        assert out_dir is not None
        _replace_dir(tmp, out_dir)
        return
    try:
        upload_prepared(tmp, target, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp folder to `out_dir`, replacing an existing one only after success."""
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        else:
            out_dir.rmdir()
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
