"""`manifest.json`: the description of a prepared (tokenized, packed, sharded) dataset folder.

Layout written by `rpt data prepare` (`data/prepare.py`):

```
OUT_DIR/
  manifest.json            this model, format "rpt-packed-v1"
  tokenizer.json           the tokenizer the ids come from (sha256 in the manifest)
  train/part-00000.parquet columns: tokens fixed_size_list<int32>[row_len], row_id int64
  val/part-00000.parquet
```

Every row holds `row_len = seq_len + 1` token ids (inputs plus shifted targets). Row ids are global
within a split: shard i holds ids `[row_id_start, row_id_start + rows)` in ascending order, so a
reader can resume from a row id without opening the shards.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data.tokenizer import EOS_TOKEN, PAD_TOKEN, tokenizer_sha256

MANIFEST_NAME = "manifest.json"
FORMAT = "rpt-packed-v1"
SPLITS = ("train", "val")
_RERUN = "re-run `rpt data prepare` for this folder (with overwrite)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardInfo(_Strict):
    path: str = Field(description="Parquet file, relative to the dataset folder (POSIX separators)")
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0, description="rows * row_len")
    row_id_start: int = Field(ge=0, description="row id of the shard's first row")

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        p = PurePosixPath(v)
        if p.is_absolute() or ".." in p.parts or not v:
            raise ValueError(f"shard path {v!r} must be relative to the dataset folder, without '..'")
        return v


class SplitInfo(_Strict):
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    shards: list[ShardInfo] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> SplitInfo:
        expected_start = 0
        for shard in self.shards:
            if shard.row_id_start != expected_start:
                raise ValueError(
                    f"shard {shard.path!r} starts at row id {shard.row_id_start}, expected {expected_start} "
                    "(row ids must be contiguous across shards)"
                )
            expected_start += shard.rows
        if expected_start != self.rows:
            raise ValueError(f"shards hold {expected_start} rows but the split says rows={self.rows}")
        if sum(s.tokens for s in self.shards) != self.tokens:
            raise ValueError(f"shard tokens do not add up to the split's tokens={self.tokens}")
        return self


class SourceInfo(_Strict):
    corpus: str
    documents: int = Field(ge=0)
    characters: int = Field(ge=0)


class TokenizerInfo(_Strict):
    path: str = "tokenizer.json"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    vocab_size: int = Field(ge=1)
    eos_id: int = Field(ge=0)
    pad_id: int = Field(ge=0)
    special_tokens: dict[str, int]

    @model_validator(mode="after")
    def _specials(self) -> TokenizerInfo:
        if self.special_tokens.get(EOS_TOKEN) != self.eos_id:
            raise ValueError(f"special_tokens[{EOS_TOKEN!r}] must equal eos_id={self.eos_id}")
        if self.special_tokens.get(PAD_TOKEN) != self.pad_id:
            raise ValueError(f"special_tokens[{PAD_TOKEN!r}] must equal pad_id={self.pad_id}")
        bad = {k: v for k, v in self.special_tokens.items() if not 0 <= v < self.vocab_size}
        if bad:
            raise ValueError(f"special token ids {bad} are outside the vocabulary [0, {self.vocab_size})")
        return self


class DocumentCounts(_Strict):
    train: int = Field(ge=0)
    val: int = Field(ge=0)


class Manifest(_Strict):
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
        """Read `DIR/manifest.json`; errors name the path and how to create it."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
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
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise ValueError(
                f"invalid manifest {str(path)!r} ({exc.error_count()} errors); {_RERUN}:\n{exc}"
            ) from exc

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

    def verify(self, directory: str | Path) -> None:
        """Check the tokenizer hash and that every shard exists with the recorded rows and schema.

        Reads only Parquet footers (cheap). Raises FileNotFoundError for a missing file and ValueError
        for a mismatching or unreadable one, naming the file and suggesting `rpt data prepare`.
        """
        directory = Path(directory)
        tok_path = directory / self.tokenizer.path
        if not tok_path.is_file():
            raise FileNotFoundError(f"tokenizer {str(tok_path)!r} is missing; {_RERUN}")
        if tokenizer_sha256(tok_path) != self.tokenizer.sha256:
            raise ValueError(f"tokenizer {str(tok_path)!r} does not match the manifest's sha256; {_RERUN}")
        expected_type = pa.list_(pa.int32(), self.row_len)
        for split, info in self.splits.items():
            for shard in info.shards:
                path = directory / shard.path
                if not path.is_file():
                    raise FileNotFoundError(f"{split} shard {str(path)!r} is missing; {_RERUN}")
                try:
                    meta = pq.read_metadata(path)
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
                if schema.names != ["tokens", "row_id"] or schema.field("tokens").type != expected_type:
                    raise ValueError(
                        f"{split} shard {str(path)!r} has schema {schema}, expected tokens: "
                        f"{expected_type}, row_id: int64; {_RERUN}"
                    )
