"""Text corpora for `rpt data prepare`, each read through Ray Data into a one-column (`text`) dataset.

Accepted corpus forms (`PrepareConfig.corpus`):

- a folder of text files: every file whose name ends in one of `TEXT_EXTENSIONS` (searched recursively,
  hidden files and folders skipped, sorted by path) is one document, decoded as UTF-8; read with
  `ray.data.read_binary_files`. A file that is not valid UTF-8 is handled by `on_decode_error`
  (`PrepareConfig.on_decode_error`, see "Undecodable files" below);
- one text file (one document);
- a Parquet file, or a folder holding `*.parquet` files: one document per row of `text_column`
  (`ray.data.read_parquet`);
- a JSON Lines file (`.jsonl`, `.json`, `.ndjson`, optionally `.gz`), or a folder of them: one document
  per line, from the field `text_column` (`ray.data.read_json`);
- a builtin corpus that ships with every CPython installation (nothing is downloaded):

  - `builtin:pydoc`: English prose. The help topics of `pydoc_data.topics.topics` (the text behind
    `help("FORMATTING")` etc., one document per topic, headed by its name), then one document per
    standard-library module of `builtin:stdlib-py` that has docstrings: the module, class and function
    docstrings in source order, each headed by its qualified name, extracted with `ast` (nothing is
    imported). On CPython 3.11.7: 79 topic documents (0.47 M characters) + 407 module documents
    (1.85 M characters) = 486 documents, 2.32 M characters, 0.66 M tokens at vocab 4096.
  - `builtin:stdlib-py`: the standard library's own `.py` files under `sysconfig.get_paths()["stdlib"]`,
    one document per file, excluding the folders `site-packages`, `dist-packages`, `test`, `tests`,
    `idlelib`, `lib2to3`, `turtledemo`, `encodings` (generated codec tables), `pydoc_data` (that is
    `builtin:pydoc`) and `config-*` (build configuration). On CPython 3.11.7: 455 files,
    8.83 M characters, 2.44 M tokens at vocab 4096.
  - `builtin:c-headers`: the C header files (`*.h`, recursively) of the Python include folder
    `sysconfig.get_paths()["include"]`, a farther-away domain for continual pre-training.
    On CPython 3.11.7: 189 files, 0.89 M characters, 0.27 M tokens at vocab 4096.

  Their content depends on the Python version; the manifest records the document and character
  counts, so two preparations can be compared.

Each form may also lie on an object store or another pyarrow filesystem (`s3://bucket/corpus/`, `gs://...`;
endpoint and credentials as in :mod:`data.location`): it is listed and classified the same way through the
filesystem, which the Ray Data readers get (`filesystem=`), so every reader task opens the files itself.

Document order is deterministic (sorted paths, compared part by part, so a folder and its copy in a bucket
give the same order; file row order); `max_documents` keeps the first N.

Undecodable files (text files and the `builtin:stdlib-py` / `builtin:c-headers` files): every file is
decoded once, for a whole batch at a time, by Arrow's UTF-8 validation (no Python decoding when the batch
is valid); only a batch holding an invalid file is decoded file by file, and only an invalid file again, to
count its undecodable bytes. Each document carries `DECODE_COLUMNS` (its path, undecodable
bytes, U+FFFD characters inserted, byte offset of the first undecodable byte), from which the driver
builds one `data.manifest.DecodeErrors` (`decode_report`) and applies the policy:

- `replace` (default): the text keeps U+FFFD in place of each undecodable sequence, as Python's
  `bytes.decode("utf-8", errors="replace")` does; one warning names the files;
- `skip`: such files are left out (`drop_undecodable`); one warning names them;
- `fail`: `CorpusDecodeError` names them, nothing is written.

`max_documents` cuts the file list before reading, so skipped files count against it. On CPython 3.11.7
every file of `builtin:stdlib-py` and `builtin:c-headers` is valid UTF-8 (`builtin:pydoc` is built from
Python strings and has no undecodable bytes).

`on_decode_error` covers text files only: Parquet and JSON Lines corpora are decoded by Arrow (its JSON
reader puts U+FFFD in place of invalid UTF-8 itself, uncounted; Parquet strings are taken as stored).
"""

from __future__ import annotations

import ast
import functools
import itertools
import posixpath
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from data.location import check_reachable, is_uri, resolve
from data.manifest import DecodeErrors, DecodeExample

TEXT_EXTENSIONS = (
    ".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts",
    ".go", ".rs", ".sh", ".tex", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".html", ".xml", ".csv",
)  # fmt: skip
PARQUET_EXTENSIONS = (".parquet",)
JSONL_EXTENSIONS = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = {
    "pydoc": "Python help topics (pydoc_data) + standard-library docstrings: English prose",
    "stdlib-py": "the standard library's .py source files",
    "c-headers": "CPython's C header files (sysconfig include dir)",
}
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "encodings",
     "pydoc_data", "__pycache__"}
)  # fmt: skip

CORPUS_FORMS = (
    "a folder of text files (" + ", ".join(TEXT_EXTENSIONS[:5]) + ", ...), a text file, "
    "a Parquet file or folder, a JSON Lines file or folder (.jsonl/.json/.ndjson), or one of "
    + ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_CORPORA)
)


DecodePolicy = Literal["replace", "skip", "fail"]
DECODE_POLICIES: tuple[str, ...] = ("replace", "skip", "fail")
DECODE_SCHEMA = pa.schema(
    [("path", pa.string()), ("bad_bytes", pa.int64()), ("replacements", pa.int64()), ("bad_offset", pa.int64())]
)
DECODE_COLUMNS = tuple(DECODE_SCHEMA.names)
DECODE_EXAMPLES = 5  # files named in the warning, the error and the manifest


class CorpusDecodeError(ValueError):
    """Corpus files that are not valid UTF-8 under `on_decode_error: fail`; the message names them and the fix."""


@dataclass(frozen=True)
class CorpusSource:
    """A resolved corpus: how to read it and from where."""

    spec: str
    kind: Literal["text_files", "parquet", "jsonl", "items"]
    paths: tuple[str, ...] = ()  # files (text_files) or one file/folder (parquet, jsonl)
    texts: tuple[str, ...] = ()  # kind == "items": documents built on the driver
    filesystem: Any = field(default=None, compare=False)  # pyarrow filesystem of `paths`; None: local


def _has_suffix_name(name: str, suffixes: Sequence[str]) -> bool:
    name = name.lower()
    return any(name.endswith(s) for s in suffixes)


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return _has_suffix_name(path.name, suffixes)


def _visible_files(root: Path) -> list[Path]:
    files = []
    for p in root.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.is_file():
            files.append(p)
    return sorted(files)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def stdlib_py_files() -> tuple[Path, ...]:
    """The `.py` files of `builtin:stdlib-py` (see the module docstring for what is excluded)."""
    root = _stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        dirs = p.relative_to(root).parts[:-1]
        if any(d in STDLIB_EXCLUDED_DIRS or d.startswith("config-") for d in dirs):
            continue
        out.append(p)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def c_header_files() -> tuple[Path, ...]:
    """The `*.h` files of `builtin:c-headers`."""
    return tuple(sorted(Path(sysconfig.get_paths()["include"]).rglob("*.h")))


def _module_docstrings(path: Path, module: str) -> str | None:
    """Module, class and function docstrings of one source file, in source order, as one document."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                child_doc = ast.get_docstring(child)
                if child_doc:
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    parts.append(f"{kind} {module}.{name}\n\n{child_doc}")
                visit(child, f"{name}.")

    visit(tree, "")
    return "\n\n".join(parts) if parts else None


def _iter_pydoc_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name, text in sorted(topics.items()):
        yield f"{name}\n\n{text}"
    root = _stdlib_root()
    for path in stdlib_py_files():
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        doc = _module_docstrings(path, ".".join(parts))
        if doc:
            yield doc


@functools.lru_cache(maxsize=4)
def pydoc_documents(max_documents: int | None = None) -> tuple[str, ...]:
    """The documents of `builtin:pydoc` (the first `max_documents`): help topics, then module docstrings.

    Built lazily: the first 79 documents (the topics) need no source parsing.
    """
    return tuple(itertools.islice(_iter_pydoc_documents(), max_documents))


def resolve_corpus(spec: str, *, max_documents: int | None = None) -> CorpusSource:
    """Classify a corpus spec; raises FileNotFoundError / ValueError naming the spec and accepted forms."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        if name == "pydoc":
            return CorpusSource(spec, "items", texts=pydoc_documents(max_documents))
        if name == "stdlib-py":
            files = stdlib_py_files()[:max_documents]
            return CorpusSource(spec, "text_files", paths=tuple(map(str, files)))
        if name == "c-headers":
            files = c_header_files()[:max_documents]
            return CorpusSource(spec, "text_files", paths=tuple(map(str, files)))
        raise ValueError(
            f"unknown builtin corpus {spec!r}; available: "
            + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)
        )
    if is_uri(spec):
        return _resolve_remote(spec, max_documents)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {spec!r} does not exist (resolved to {str(path.resolve())!r}); expected {CORPUS_FORMS}"
        )
    if path.is_file():
        return _classify_file(spec, str(path))
    return _classify_folder(spec, str(path), [str(p) for p in _visible_files(path)], max_documents)


def _classify_file(spec: str, path: str, filesystem: Any = None) -> CorpusSource:
    """A corpus of one file, by its extension."""
    for kind, suffixes in (("parquet", PARQUET_EXTENSIONS), ("jsonl", JSONL_EXTENSIONS), ("text_files", TEXT_EXTENSIONS)):
        if _has_suffix_name(posixpath.basename(path), suffixes):
            return CorpusSource(spec, kind, paths=(path,), filesystem=filesystem)
    raise ValueError(f"corpus file {spec!r} has an unsupported extension; expected {CORPUS_FORMS}")


def _classify_folder(spec: str, folder: str, files: list[str], max_documents: int | None,
                     filesystem: Any = None) -> CorpusSource:
    """A corpus folder by the files it holds (visible files, sorted): Parquet, else JSON Lines, else text."""
    def named(suffixes: Sequence[str]) -> list[str]:
        return [p for p in files if _has_suffix_name(posixpath.basename(p), suffixes)]

    if named(PARQUET_EXTENSIONS):
        return CorpusSource(spec, "parquet", paths=(folder,), filesystem=filesystem)
    text_files, jsonl_files = named(TEXT_EXTENSIONS), named(JSONL_EXTENSIONS)
    if jsonl_files and not text_files:
        return CorpusSource(spec, "jsonl", paths=tuple(jsonl_files), filesystem=filesystem)
    if not text_files:
        raise ValueError(
            f"corpus folder {spec!r} holds no readable files ({len(files)} files, none ending in "
            f"{', '.join(TEXT_EXTENSIONS + PARQUET_EXTENSIONS + JSONL_EXTENSIONS)}); expected {CORPUS_FORMS}"
        )
    return CorpusSource(spec, "text_files", paths=tuple(text_files[:max_documents]), filesystem=filesystem)


def _resolve_remote(spec: str, max_documents: int | None) -> CorpusSource:
    """A corpus on an object store or another pyarrow filesystem: one file or a folder (prefix), listed there."""
    loc = resolve(spec, what="data.prepare.corpus")
    check_reachable(loc, "data.prepare.corpus")
    info = loc.info()
    if info.type == pafs.FileType.File:
        return _classify_file(spec, loc.path, loc.filesystem)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"corpus {spec!r} does not exist (no object at or below it); expected {CORPUS_FORMS}")
    visible = [(PurePosixPath(loc.relative(i)).parts, i.path) for i in loc.files()]
    files = [p for parts, p in sorted(visible) if not any(part.startswith(".") for part in parts)]
    return _classify_folder(spec, loc.path, files, max_documents, loc.filesystem)


def decode_utf8(data: bytes) -> tuple[str, int, int, int]:
    """`(text, bad_bytes, replacements, bad_offset)` of one file's bytes.

    `text` is `data.decode("utf-8", errors="replace")`; `bad_bytes` counts the undecodable bytes,
    `replacements` the U+FFFD characters put in their place (one per maximal invalid sequence, so it can
    be smaller than `bad_bytes`; U+FFFD characters the file itself holds are not counted), `bad_offset` is
    the byte offset of the first undecodable byte (-1 for valid UTF-8). Valid UTF-8 is decoded once.
    """
    try:
        return data.decode("utf-8"), 0, 0, -1
    except UnicodeDecodeError as exc:
        first = exc.start
    text = data.decode("utf-8", errors="replace")
    escaped = data.decode("utf-8", errors="surrogateescape")  # one lone surrogate per undecodable byte
    bad_bytes = len(data) - len(escaped.encode("utf-8", errors="ignore"))  # "ignore" drops the surrogates
    return text, bad_bytes, text.count("\ufffd") - escaped.count("\ufffd"), first


def _decode_utf8(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: `bytes` (+ `path`) -> `text` + `DECODE_COLUMNS` (see the module docstring)."""
    blobs = batch.column("bytes")
    n = len(blobs)
    try:  # Arrow validates UTF-8 in C; the common all-valid batch needs no Python strings
        text = blobs.cast(pa.large_string())
        counts = np.zeros((3, n), dtype=np.int64)
        counts[2] = -1
    except pa.ArrowInvalid:
        decoded = [decode_utf8(b) for b in blobs.to_pylist()]
        text = pa.array([d[0] for d in decoded], type=pa.large_string())
        counts = np.array([d[1:] for d in decoded], dtype=np.int64).reshape(n, 3).T
    paths = batch.column("path") if "path" in batch.column_names else pa.nulls(n, pa.string())
    columns = {"text": text, "path": paths}
    columns.update(zip(DECODE_COLUMNS[1:], counts, strict=True))
    return pa.table(columns)


def undecodable_rows(batch: pa.Table) -> pa.Table:
    """The `DECODE_COLUMNS` of the documents that were not valid UTF-8 (a small table for the driver)."""
    return batch.filter(pc.greater(batch.column("bad_bytes"), 0)).select(list(DECODE_COLUMNS))


def drop_undecodable(batch: pa.Table) -> pa.Table:
    """`on_decode_error: skip`: leave out the documents that were not valid UTF-8."""
    return batch.filter(pc.equal(batch.column("bad_bytes"), 0))


def decode_report(rows: pa.Table, policy: DecodePolicy, *, examples: int = DECODE_EXAMPLES) -> DecodeErrors:
    """The manifest record of `undecodable_rows` (all of a corpus', in corpus order) under `policy`."""
    bad = rows.column("bad_bytes").to_numpy() if rows.num_rows else np.zeros(0, np.int64)
    repl = rows.column("replacements").to_numpy() if rows.num_rows else np.zeros(0, np.int64)
    head = rows.slice(0, examples).to_pylist()
    return DecodeErrors(
        policy=policy,
        files=rows.num_rows,
        bytes=int(bad.sum()),
        replacements=int(repl.sum()),
        examples=[
            DecodeExample(path=r["path"] or "?", bytes=r["bad_bytes"], replacements=r["replacements"],
                          offset=r["bad_offset"])
            for r in head
        ],
    )  # fmt: skip


_CONVERT = "or convert the files to UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`)"


def _named_files(report: DecodeErrors) -> str:
    names = ", ".join(repr(e.path) for e in report.examples)
    more = report.files - len(report.examples)
    return names + (f" and {more} more" if more > 0 else "")


def decode_warning(report: DecodeErrors, corpus: str) -> str | None:
    """The one warning of a `replace` or `skip` preparation with undecodable files (None when there are none)."""
    if not report.files:
        return None
    s = "s" if report.files != 1 else ""
    if report.policy == "skip":
        what = f"left out (data.prepare.on_decode_error: skip): {_named_files(report)}"
        fix = f"set data.prepare.on_decode_error: replace to keep them, or fail to stop, {_CONVERT}"
    else:
        what = (
            f"decoded with {report.replacements:,} U+FFFD replacement character(s) "
            f"(data.prepare.on_decode_error: replace): {_named_files(report)}"
        )
        fix = f"set data.prepare.on_decode_error: skip (leave them out) or fail (stop), {_CONVERT}"
    return (
        f"corpus {corpus!r}: {report.files:,} file{s} not valid UTF-8 ({report.bytes:,} undecodable "
        f"byte(s)) {what}; {fix}"
    )


def decode_error(report: DecodeErrors, corpus: str) -> CorpusDecodeError:
    """The error of `on_decode_error: fail` when `report` names undecodable files."""
    s = "s" if report.files != 1 else ""
    first = report.examples[0]
    return CorpusDecodeError(
        f"corpus {corpus!r}: {report.files:,} file{s} not valid UTF-8 ({report.bytes:,} undecodable "
        f"byte(s)): {_named_files(report)}; the first undecodable byte of {first.path!r} is at byte offset "
        f"{first.offset:,}. Nothing was written (data.prepare.on_decode_error: fail); set "
        f"data.prepare.on_decode_error: replace (U+FFFD in their place) or skip (leave the files out), {_CONVERT}"
    )


def _as_text(batch: pa.Table, column: str) -> pa.Table:
    # Null documents become empty ones (they still count as a document and get an EOS when packed).
    col = pc.fill_null(batch.column(column).cast(pa.large_string()), "")
    return pa.table({"text": col})


def read_corpus(
    source: str | CorpusSource, *, text_column: str = "text", max_documents: int | None = None
) -> ray.data.Dataset:
    """A Ray Dataset with one column `text` (one row per document) for a corpus spec; text files (the
    `text_files` kind) also get the `DECODE_COLUMNS` (`undecodable_rows`, `drop_undecodable` read them).

    Raises ValueError when a Parquet/JSONL corpus lacks `text_column` (naming the columns found) or
    when that column does not hold strings.
    """
    if isinstance(source, str):
        source = resolve_corpus(source, max_documents=max_documents)
    if source.kind == "items":
        texts = list(source.texts[:max_documents])
        if not texts:
            return ray.data.from_items([{"text": ""}]).limit(0)
        n_blocks = int(np.clip(len(texts) // 64, min(len(texts), 2), 16))  # >= 2 blocks feed 2 actors
        return ray.data.from_items([{"text": t} for t in texts], override_num_blocks=n_blocks)
    if source.kind == "text_files":
        paths = list(source.paths[:max_documents])
        n_blocks = int(np.clip(len(paths) // 8, min(len(paths), 2), 64))  # >= 2 blocks feed 2 actors
        ds = ray.data.read_binary_files(paths, include_paths=True, override_num_blocks=n_blocks,
                                        filesystem=source.filesystem)
        return ds.map_batches(_decode_utf8, batch_format="pyarrow", batch_size=None)
    if source.kind == "parquet":
        ds = ray.data.read_parquet(list(source.paths), filesystem=source.filesystem)
    else:
        ds = ray.data.read_json(list(source.paths), file_extensions=None, filesystem=source.filesystem)
    schema = ds.schema()
    names = list(schema.names)
    if text_column not in names:
        raise ValueError(
            f"corpus {source.spec!r} has no text column {text_column!r}; columns found: {names}. "
            "Set `text_column` to the column that holds the documents."
        )
    col_type = schema.types[names.index(text_column)]
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type) or col_type is str):
        raise ValueError(
            f"corpus {source.spec!r}: column {text_column!r} has type {col_type}, expected strings"
        )
    ds = ds.select_columns([text_column])
    if max_documents is not None:
        ds = ds.limit(max_documents)
    return ds.map_batches(
        _as_text, fn_kwargs={"column": text_column}, batch_format="pyarrow", batch_size=None
    )
