"""Exact deduplication on normalised text: NFC, whitespace runs collapsed to one space, stripped, lower case."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip().lower()


def keys(texts: Sequence[str]) -> np.ndarray:
    """A 128-bit BLAKE2b digest of each normalised text, as (n, 2) uint64 (one hash per document)."""
    out = np.empty((len(texts), 2), dtype=np.uint64)
    for i, t in enumerate(texts):
        d = hashlib.blake2b(normalise(t).encode("utf-8"), digest_size=16, person=b"rpt-exact-v1").digest()
        out[i] = np.frombuffer(d, dtype=np.uint64)
    return out


def first_occurrences(k: np.ndarray) -> np.ndarray:
    """Keep mask: True for the first document (in the given order) of every distinct key."""
    keep = np.zeros(len(k), dtype=bool)
    if len(k):
        _, first = np.unique(k, axis=0, return_index=True)
        keep[first] = True
    return keep
