"""Names of the special tokens the objectives use, and their lookup in a tokenizer's special-token map.

The tokenizer gets them at ``rpt data prepare`` time through ``data.prepare.special_tokens`` in the run
config (they follow ``<|eos|>`` = 0 and ``<|pad|>`` = 1, see ``data/tokenizer.py``) and the manifest
records their ids. ``objectives.special_tokens_for(name, **params)`` lists what an objective needs; the
driver refuses to start a run whose tokenizer lacks one.

| token | used by |
|---|---|
| ``<|mask|>`` | ``mlm`` (BERT's [MASK]) |
| ``<|sentinel_0|>`` .. ``<|sentinel_{N-1}|>`` | ``span_corruption``, ``ul2`` R/X (T5's ``<extra_id_i>``) |
| ``<|R|>``, ``<|X|>``, ``<|S|>`` | ``ul2`` mode tokens (the paper's [R], [X], [S] paradigm tokens) |
"""

from __future__ import annotations

EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"
MODE_TOKENS = {"R": "<|R|>", "X": "<|X|>", "S": "<|S|>"}


def sentinel_token(i: int) -> str:
    """The i-th sentinel, ``<|sentinel_i|>`` (T5's ``<extra_id_i>``)."""
    return f"<|sentinel_{i}|>"


def sentinel_tokens(n: int) -> list[str]:
    return [sentinel_token(i) for i in range(n)]


def lookup(special_tokens: dict[str, int], names: list[str], *, objective: str) -> list[int]:
    """Ids of ``names`` in a tokenizer's special-token map; a missing one is an error that says the fix."""
    missing = [t for t in names if t not in special_tokens]
    if missing:
        shown = missing if len(missing) <= 8 else [*missing[:8], f"... ({len(missing)} in all)"]
        raise ValueError(
            f"objective {objective!r} needs special tokens {shown} that the tokenizer lacks (it has "
            f"{sorted(special_tokens)}); prepare the data with data.prepare.special_tokens including "
            f"objectives.special_tokens_for({objective!r}, ...)"
        )
    return [int(special_tokens[t]) for t in names]
