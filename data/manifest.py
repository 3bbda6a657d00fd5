"""`manifest.json`: the description of a prepared (tokenized, packed, sharded) dataset folder.

Layout written by `rpt data prepare` (`data/prepare.py`):

```
OUT_DIR/
  manifest.json            this model, format "rpt-packed-v1"
  tokenizer.json           the tokenizer the ids come from (sha256 in the manifest)
  tokenizer_config.json    its special-token roles for `transformers` (bos/eos/pad_token, add_bos_token)
  train/part-00000.parquet columns: tokens fixed_size_list<int32>[row_len], row_id int64
  val/part-00000.parquet
```

Every row holds `row_len = seq_len + 1` token ids (inputs plus shifted targets). Row ids are global
within a split: shard i holds ids `[row_id_start, row_id_start + rows)` in ascending order, so a
reader can resume from a row id without opening the shards.

Image datasets (`data/image_prepare.py`) have the same layout without the tokenizer, described by
:class:`ImageManifest` (format "rpt-images-v1"); :func:`load_any_manifest` reads either.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data.location import Location, resolve
from data.tokenizer import EOS_TOKEN, PAD_TOKEN, TokenizerRoles

MANIFEST_NAME = "manifest.json"
FORMAT = "rpt-packed-v1"
SPLITS = ("train", "val")
_RERUN = "re-run `rpt data prepare` for this folder (with overwrite)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ShardBase(_Strict):
    """A shard of a split (text or images): its file and the row ids it holds."""

    path: str = Field(description="Parquet file, relative to the dataset folder (POSIX separators)")
    rows: int = Field(ge=0)
    row_id_start: int = Field(ge=0, description="row id of the shard's first row")

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        p = PurePosixPath(v)
        if p.is_absolute() or ".." in p.parts or not v:
            raise ValueError(f"shard path {v!r} must be relative to the dataset folder, without '..'")
        return v


def _check_contiguous(shards: list[_ShardBase], rows: int) -> None:
    """Row ids run 0, 1, ... across the shards in order, and add up to the split's ``rows``."""
    expected_start = 0
    for shard in shards:
        if shard.row_id_start != expected_start:
            raise ValueError(
                f"shard {shard.path!r} starts at row id {shard.row_id_start}, expected {expected_start} "
                "(row ids must be contiguous across shards)"
            )
        expected_start += shard.rows
    if expected_start != rows:
        raise ValueError(f"shards hold {expected_start} rows but the split says rows={rows}")


class ShardInfo(_ShardBase):
    tokens: int = Field(ge=0, description="rows * row_len")


class SplitInfo(_Strict):
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    shards: list[ShardInfo] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> SplitInfo:
        _check_contiguous(self.shards, self.rows)
        if sum(s.tokens for s in self.shards) != self.tokens:
            raise ValueError(f"shard tokens do not add up to the split's tokens={self.tokens}")
        return self


class SourceInfo(_Strict):
    corpus: str
    documents: int = Field(ge=0)
    characters: int = Field(ge=0)


class TokenizerInfo(_Strict):
    """The tokenizer of a prepared folder and the roles of its special tokens.

    `eos_token` ends every document in the packed rows; `pad_token` pads (None: the tokenizer has none
    and `pad_id` is `eos_id`); `bos_token` / `bos_id` begin a sequence, and `add_bos` says whether the
    packer put `bos_id` before every document. Manifests written before these fields existed describe
    the project's own tokenizer, which the defaults reproduce (`<|eos|>`, `<|pad|>`, no BOS).
    `special_tokens` holds the tokenizer's special tokens (added tokens flagged special) and the role
    tokens; `vocab_size` counts any special tokens `rpt data prepare` added to a released tokenizer.
    """

    path: str = "tokenizer.json"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    vocab_size: int = Field(ge=1)
    eos_id: int = Field(ge=0)
    pad_id: int = Field(ge=0)
    special_tokens: dict[str, int]
    eos_token: str = Field(EOS_TOKEN, min_length=1, description="the token after every document")
    pad_token: str | None = Field(PAD_TOKEN, min_length=1, description="None: no pad token, EOS pads")
    bos_token: str | None = Field(None, min_length=1, description="begin-of-sequence token, if any")
    bos_id: int | None = Field(None, ge=0)
    add_bos: bool = Field(False, description="bos_id was put before every document")

    @model_validator(mode="after")
    def _specials(self) -> TokenizerInfo:
        if self.special_tokens.get(self.eos_token) != self.eos_id:
            raise ValueError(f"special_tokens[{self.eos_token!r}] must equal eos_id={self.eos_id}")
        if self.pad_token is None:
            if self.pad_id != self.eos_id:
                raise ValueError(
                    f"pad_token is null (EOS pads), so pad_id={self.pad_id} must equal eos_id={self.eos_id}"
                )
        elif self.special_tokens.get(self.pad_token) != self.pad_id:
            raise ValueError(f"special_tokens[{self.pad_token!r}] must equal pad_id={self.pad_id}")
        if (self.bos_token is None) != (self.bos_id is None):
            raise ValueError(f"bos_token={self.bos_token!r} and bos_id={self.bos_id!r} must be set together")
        if self.bos_token is not None and self.special_tokens.get(self.bos_token) != self.bos_id:
            raise ValueError(f"special_tokens[{self.bos_token!r}] must equal bos_id={self.bos_id}")
        if self.add_bos and self.bos_id is None:
            raise ValueError("add_bos is true but bos_token / bos_id are unset")
        bad = {k: v for k, v in self.special_tokens.items() if not 0 <= v < self.vocab_size}
        if bad:
            raise ValueError(f"special token ids {bad} are outside the vocabulary [0, {self.vocab_size})")
        return self

    def roles(self) -> TokenizerRoles:
        """The roles as a :class:`data.tokenizer.TokenizerRoles` (`.to_tokenizer_config()` gives the
        `tokenizer_config.json` of the folder, also for folders prepared before it was written)."""
        return TokenizerRoles(
            eos_token=self.eos_token,
            eos_id=self.eos_id,
            pad_token=self.pad_token,
            pad_id=self.pad_id,
            bos_token=self.bos_token,
            bos_id=self.bos_id,
            add_bos_token=self.add_bos,
        )


class DecodeExample(_Strict):
    """One corpus file that is not valid UTF-8."""

    path: str
    bytes: int = Field(ge=1, description="undecodable bytes in the file")
    replacements: int = Field(ge=0, description="U+FFFD characters that replace them (one per invalid sequence)")
    offset: int = Field(ge=0, description="byte offset of the first undecodable byte")


class DecodeErrors(_Strict):
    """The corpus text files that were not valid UTF-8 and what `data.prepare.on_decode_error` did with them:
    `replace` kept them with U+FFFD in place of the undecodable bytes, `skip` left them out (`fail` stops
    the preparation, so a manifest records it only with `files` 0). `examples` are the first few files."""

    policy: Literal["replace", "skip", "fail"]
    files: int = Field(0, ge=0, description="files that were not valid UTF-8")
    bytes: int = Field(0, ge=0, description="their undecodable bytes, all together")
    replacements: int = Field(0, ge=0, description="U+FFFD characters that replace them (policy replace)")
    examples: list[DecodeExample] = Field(default_factory=list, description="the first few files, corpus order")

    @model_validator(mode="after")
    def _consistent(self) -> DecodeErrors:
        if len(self.examples) > self.files:
            raise ValueError(f"{len(self.examples)} example files but files={self.files}")
        if (self.files == 0) != (self.bytes == 0):
            raise ValueError(f"files={self.files} and bytes={self.bytes} must both be 0 or both positive")
        return self


class DocumentCounts(_Strict):
    train: int = Field(ge=0)
    val: int = Field(ge=0)


class _ManifestFiles:
    """File methods shared by :class:`Manifest` and :class:`ImageManifest` (pydantic models with ``splits``)."""

    def save(self, directory: str | Path) -> Path:
        """Write `DIR/manifest.json` atomically (temp file + rename)."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    def shard_paths(self, directory: str | Path, split: Literal["train", "val"]) -> list[Path]:
        """Absolute paths of a split's shards, in row-id order."""
        return [Path(directory) / s.path for s in self.splits[split].shards]

    def _shard_footers(self, directory: str | Path):
        """Every shard's (split, shard info, location, footer metadata, arrow schema), after checking that it exists,
        is readable Parquet and holds the recorded rows (errors name the file and the fix)."""
        root = resolve(directory)
        for split, info in self.splits.items():
            for shard in info.shards:
                path = root.join(shard.path)
                if not path.is_file():
                    raise FileNotFoundError(f"{split} shard {str(path)!r} is missing; {_RERUN}")
                try:
                    meta = pq.read_metadata(path.path, filesystem=path.filesystem)
                    schema = meta.schema.to_arrow_schema()
                except (pa.ArrowException, OSError) as exc:
                    raise ValueError(
                        f"{split} shard {str(path)!r} is not a readable Parquet file ({exc}); {_RERUN}"
                    ) from exc
                if meta.num_rows != shard.rows:
                    raise ValueError(
                        f"{split} shard {str(path)!r} holds {meta.num_rows} rows, the manifest "
                        f"says {shard.rows}; {_RERUN}"
                    )
                yield split, shard, path, meta, schema

    def verify_rows(self, directory: str | Path) -> None:
        """Read every row group of every shard (``data.verify_shards: full``): damage inside a shard whose
        footer is intact (bytes overwritten, a bad disk block) is found here, naming the file and the rows."""
        for split, shard, path, meta, _ in self._shard_footers(directory):
            pf, first = pq.ParquetFile(path.path, filesystem=path.filesystem), shard.row_id_start
            for i in range(meta.num_row_groups):
                n = meta.row_group(i).num_rows
                try:
                    pf.read_row_group(i)
                except (pa.ArrowException, OSError) as exc:
                    raise ValueError(
                        f"{split} shard {str(path)!r} is damaged in row group {i} (row ids {first}..{first + n - 1}): "
                        f"{exc}; {_RERUN}"
                    ) from exc
                first += n


class CurationStage(_Strict):
    """One curation stage of `rpt data prepare` (data.curation), in the order run."""

    stage: str
    documents_in: int = Field(ge=0)
    documents_out: int = Field(ge=0)


class Manifest(_ManifestFiles, _Strict):
    """The manifest of a prepared dataset folder; `Manifest.load(dir)` reads and validates it."""

    format: Literal["rpt-packed-v1"] = FORMAT
    seq_len: int = Field(ge=1, description="model context length; rows hold seq_len + 1 tokens")
    row_len: int = Field(ge=2, description="tokens per stored row = seq_len + 1")
    seed: int = Field(ge=0)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    source: SourceInfo
    tokenizer: TokenizerInfo
    splits: dict[Literal["train", "val"], SplitInfo]
    documents: DocumentCounts
    dropped_tokens: int = Field(ge=0, description="tokens of the final tail of each split that fill no row")
    decode_errors: DecodeErrors | None = Field(
        None, description="text files that were not valid UTF-8; None: a corpus not read as files, or an older manifest"
    )
    curation: list[CurationStage] | None = Field(
        None, description="curation stages in order (removed ids: curation_removed.parquet); None: none configured"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.row_len != self.seq_len + 1:
            raise ValueError(f"row_len={self.row_len} must be seq_len + 1 = {self.seq_len + 1}")
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise ValueError(f"splits {missing} are missing (need {list(SPLITS)})")
        for name, split in self.splits.items():
            if split.tokens != split.rows * self.row_len:
                raise ValueError(
                    f"split {name!r}: tokens={split.tokens} != rows * row_len = {split.rows} * {self.row_len}"
                )
        return self

    # ---- files ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read `DIR/manifest.json` (a local folder or a URI, :mod:`data.location`); errors name the path and how
        to create it."""
        path = _manifest_path(directory)
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as exc:
            raise ValueError(
                f"invalid manifest {str(path)!r} ({exc.error_count()} errors); {_RERUN}:\n{exc}"
            ) from exc

    def verify(self, directory: str | Path) -> None:
        """Check the tokenizer hash and that every shard exists with the recorded rows and schema.

        Reads only Parquet footers (cheap). Raises FileNotFoundError for a missing file and ValueError
        for a mismatching or unreadable one, naming the file and suggesting `rpt data prepare`.
        """
        tok_path = resolve(directory).join(self.tokenizer.path)
        if not tok_path.is_file():
            raise FileNotFoundError(f"tokenizer {str(tok_path)!r} is missing; {_RERUN}")
        if tok_path.sha256() != self.tokenizer.sha256:
            raise ValueError(f"tokenizer {str(tok_path)!r} does not match the manifest's sha256; {_RERUN}")
        expected_type = pa.list_(pa.int32(), self.row_len)
        for split, _, path, _, schema in self._shard_footers(directory):
            if schema.names != ["tokens", "row_id"] or schema.field("tokens").type != expected_type:
                raise ValueError(
                    f"{split} shard {str(path)!r} has schema {schema}, expected tokens: "
                    f"{expected_type}, row_id: int64; {_RERUN}"
                )


# ---- image datasets -------------------------------------------------------------------------------

IMAGE_FORMAT = "rpt-images-v1"
FORMATS = (FORMAT, IMAGE_FORMAT)
IMAGE_COLUMNS = ("images", "labels", "row_id")


class ImageShardInfo(_ShardBase):
    """A shard of an image split (no token count)."""


class ImageSplitInfo(_Strict):
    rows: int = Field(ge=0)
    shards: list[ImageShardInfo] = Field(default_factory=list)

    @model_validator(mode="after")
    def _contiguous(self) -> ImageSplitInfo:
        _check_contiguous(self.shards, self.rows)
        return self


class ImageManifest(_ManifestFiles, _Strict):
    """The manifest of a prepared image folder (`data/image_prepare.py`); `ImageManifest.load(dir)`.

    Layout: ``train/part-NNNNN.parquet`` and ``val/part-NNNNN.parquet`` with columns ``images``
    fixed_size_list<uint8>[channels * image_size * image_size] (each image flattened in (C, H, W) order),
    ``labels`` int64, ``row_id`` int64 (global within the split, as for text), and with ``instances`` > 1
    also ``multi_labels`` fixed_size_list<uint8>[n_classes] (multi-hot).
    """

    format: Literal["rpt-images-v1"] = IMAGE_FORMAT
    image_size: int = Field(ge=1, description="images are image_size x image_size pixels")
    channels: int = Field(description="1 (grey) or 3 (RGB)")
    n_classes: int = Field(ge=1)
    class_names: list[str] = Field(description="label -> name, n_classes entries")
    seed: int = Field(ge=0)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    source: dict[str, Any] = Field(description='how the images were made, e.g. {"kind": "fractals", ...}')
    splits: dict[Literal["train", "val"], ImageSplitInfo]
    instances: int = Field(1, ge=1, description="fractal systems per image; > 1 adds a multi_labels column")

    @model_validator(mode="after")
    def _consistent(self) -> ImageManifest:
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels} is not allowed; allowed: 1 or 3")
        if len(self.class_names) != self.n_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries, n_classes={self.n_classes} (need one per class)"
            )
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise ValueError(f"splits {missing} are missing (need {list(SPLITS)})")
        return self

    @property
    def pixels(self) -> int:
        """Values per stored image: channels * image_size * image_size."""
        return self.channels * self.image_size * self.image_size

    def columns(self) -> list[str]:
        """The shards' column names, in stored order."""
        return [*IMAGE_COLUMNS, *(["multi_labels"] if self.instances > 1 else [])]

    def arrow_schema(self) -> pa.Schema:
        """The schema every shard has."""
        fields = [
            pa.field("images", pa.list_(pa.uint8(), self.pixels)),
            pa.field("labels", pa.int64()),
            pa.field("row_id", pa.int64()),
        ]
        if self.instances > 1:
            fields.append(pa.field("multi_labels", pa.list_(pa.uint8(), self.n_classes)))
        return pa.schema(fields)

    # ---- files ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> ImageManifest:
        """Read `DIR/manifest.json`; errors name the path and how to create it."""
        path = _manifest_path(directory)
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as exc:
            raise ValueError(
                f"invalid image manifest {str(path)!r} ({exc.error_count()} errors); {_RERUN}:\n{exc}"
            ) from exc

    def verify(self, directory: str | Path) -> None:
        """Check that every shard exists with the recorded rows, schema and row-id range.

        Reads only Parquet footers (cheap; the row-id range comes from the column statistics when the
        writer stored them). Raises FileNotFoundError for a missing file and ValueError for a
        mismatching or unreadable one, naming the file and suggesting `rpt data prepare`.
        """
        expected = self.arrow_schema()
        for split, shard, path, meta, schema in self._shard_footers(directory):
            if schema.names != expected.names or schema.types != expected.types:
                raise ValueError(
                    f"{split} shard {str(path)!r} has columns {_describe(schema)}, expected "
                    f"{_describe(expected)}; {_RERUN}"
                )
            bounds = _column_bounds(meta, "row_id")
            want_bounds = (shard.row_id_start, shard.row_id_start + shard.rows - 1)
            if bounds is not None and shard.rows and bounds != want_bounds:
                raise ValueError(
                    f"{split} shard {str(path)!r} holds row ids {bounds[0]}..{bounds[1]}, the manifest "
                    f"says {want_bounds[0]}..{want_bounds[1]}; {_RERUN}"
                )


def _describe(schema: pa.Schema) -> str:
    """`name: type` pairs, fixed-size lists as `fixed_size_list<uint8>[N]` (no child field name)."""

    def kind(t: pa.DataType) -> str:
        return f"fixed_size_list<{t.value_type}>[{t.list_size}]" if pa.types.is_fixed_size_list(t) else str(t)

    return ", ".join(f"{f.name}: {kind(f.type)}" for f in schema)


def _column_bounds(meta: pq.FileMetaData, column: str) -> tuple[int, int] | None:
    """(min, max) of an integer column from the row-group statistics; None when any are missing."""
    idx = meta.schema.names.index(column)
    lo, hi = None, None
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(idx).statistics
        if stats is None or not stats.has_min_max:
            return None
        lo = stats.min if lo is None else min(lo, stats.min)
        hi = stats.max if hi is None else max(hi, stats.max)
    return None if lo is None else (int(lo), int(hi))


def _manifest_path(directory: str | Path) -> Location:
    """`DIR/manifest.json`, or FileNotFoundError naming the path and `rpt data prepare`."""
    directory = resolve(directory)
    path = directory.join(MANIFEST_NAME)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"prepared dataset folder {str(directory)!r} does not exist; create it with "
            f"`rpt data prepare` (out_dir={str(directory)!r})"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: {str(directory)!r} is not a prepared dataset folder; "
            "create one with `rpt data prepare`"
        )
    return path


def is_prepared(directory: str | Path) -> bool:
    """Whether ``directory`` (a local folder or a URI) holds a ``manifest.json``, text or images: a folder without
    one is not prepared data (prepare writes the manifest last)."""
    return resolve(directory).join(MANIFEST_NAME).is_file()


def load_any_manifest(directory: str | Path) -> Manifest | ImageManifest:
    """The manifest of a prepared folder, text (`Manifest`) or images (`ImageManifest`), by its "format"."""
    path = _manifest_path(directory)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"manifest {str(path)!r} is not valid JSON ({exc}); {_RERUN}") from exc
    # A manifest without "format" predates the field; Manifest's default format applies.
    fmt = raw.get("format", FORMAT) if isinstance(raw, dict) else None
    if fmt == FORMAT:
        return Manifest.load(directory)
    if fmt == IMAGE_FORMAT:
        return ImageManifest.load(directory)
    raise ValueError(
        f"manifest {str(path)!r} has format {fmt!r}; allowed formats: {', '.join(map(repr, FORMATS))}; {_RERUN}"
    )
