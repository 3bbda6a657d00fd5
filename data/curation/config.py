"""Typed settings of the curation stages (`data.prepare.dedup`, `.filters`, `.select`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NearDedupSpec(_Strict):
    """MinHash LSH near-duplicate removal. With ``bands`` b of ``rows`` r (b·r = num_perm), a pair of Jaccard
    similarity s shares a bucket with probability 1 − (1 − s^r)^b; candidates are then kept as duplicates only
    when their MinHash-estimated Jaccard reaches ``threshold``."""

    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity of word n-gram sets to count as a duplicate")
    ngram: int = Field(5, ge=1, le=64, description="words per shingle")
    num_perm: int = Field(128, ge=8, le=4096, description="MinHash permutations")
    bands: int | None = Field(None, ge=1, description="LSH bands (num_perm must be a multiple); None: chosen for threshold, favouring recall")
    seed: int = Field(1, ge=0, description="seed of the MinHash permutations")

    @model_validator(mode="after")
    def _bands(self) -> NearDedupSpec:
        if self.bands is not None and self.num_perm % self.bands:
            raise ValueError(
                f"data.prepare.dedup.near.bands={self.bands} does not divide num_perm={self.num_perm}; allowed: a "
                f"divisor of num_perm (e.g. {', '.join(str(d) for d in (8, 16, 32) if self.num_perm % d == 0)})"
            )
        return self


class DedupSpec(_Strict):
    exact: bool = Field(False, description="drop documents whose normalised text was seen before")
    near: NearDedupSpec | None = Field(None, description="MinHash LSH near-duplicate removal")


class FilterSpec(_Strict):
    """Gopher quality heuristics (Rae et al., arXiv 2112.11446, appendix A); None disables a rule."""

    min_words: int | None = Field(50, ge=0, description="fewer words: dropped")
    max_words: int | None = Field(100_000, ge=1, description="more words: dropped")
    min_mean_word_length: float | None = Field(3.0, ge=0.0, description="shorter mean word length: dropped")
    max_mean_word_length: float | None = Field(10.0, gt=0.0, description="longer mean word length: dropped")
    max_symbol_ratio: float | None = Field(0.1, ge=0.0, description="'#' and '...' per word above this: dropped")
    max_bullet_line_fraction: float | None = Field(0.9, ge=0.0, le=1.0, description="lines starting with a bullet")
    max_ellipsis_line_fraction: float | None = Field(0.3, ge=0.0, le=1.0, description="lines ending with an ellipsis")
    min_alpha_word_fraction: float | None = Field(0.8, ge=0.0, le=1.0, description="words with a letter, at least")
    max_repeated_line_fraction: float | None = Field(0.3, ge=0.0, le=1.0, description="lines that repeat an earlier line")


class SelectSpec(_Strict):
    """INGENIOUS subset selection (Renduchintala et al., arXiv 2305.06677)."""

    method: Literal["ingenious"] = "ingenious"
    fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of the documents kept")
    partitions: int = Field(1, ge=1, description="seeded random partitions, each selected on its own (scale)")
    embeddings: str | None = Field(
        None, description="models:/NAME@ALIAS or an export folder: mean-pooled hidden states; None: hashed n-grams"
    )
    features: int = Field(1024, ge=16, le=1 << 16, description="hashed n-gram feature dimensions")
    ngram: int = Field(2, ge=1, le=8, description="word n-grams up to this length, hashed into the features")
    max_tokens: int = Field(256, ge=8, description="embeddings: tokens of each document's start that are embedded")


class CurationSpec(_Strict):
    dedup: DedupSpec | None = None
    filters: FilterSpec | None = None
    select: SelectSpec | None = None

    @property
    def active(self) -> bool:
        d = self.dedup
        return bool((d and (d.exact or d.near)) or self.filters or self.select)
