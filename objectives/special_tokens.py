"""Names of the special tokens the objectives use, and their lookup in a tokenizer's special-token map.

The tokenizer gets them at ``rpt data prepare`` time through ``data.prepare.special_tokens`` in the run
config (a trained tokenizer puts them after ``<|eos|>`` = 0 and ``<|pad|>`` = 1, a released model's
tokenizer gets them appended after its vocabulary; see ``data/tokenizer.py``) and the manifest records
their ids. ``objectives.special_tokens_for(name, **params)`` lists what an objective needs; the driver
refuses to start a run whose tokenizer lacks one.

EOS and PAD are not looked up here: whatever a tokenizer calls them (``<|eos|>``, ``</s>``,
``<|endoftext|>``), the objectives get their ids from the manifest (``setup(eos_id=..., pad_id=...)``).

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


def _shown(tokens: list[str], n: int = 8) -> list[str]:
    return tokens if len(tokens) <= n else [*tokens[:n], f"... ({len(tokens)} in all)"]


def lookup(special_tokens: dict[str, int], names: list[str], *, objective: str) -> list[int]:
    """Ids of ``names`` in a tokenizer's special-token map; a missing one is an error that says the fix."""
    missing = [t for t in names if t not in special_tokens]
    if missing:
        needed = list(dict.fromkeys(names))
        if len(needed) <= 12:
            fix = f"data.prepare.special_tokens: {needed}"
        else:
            fix = f"data.prepare.special_tokens listing objectives.special_tokens_for({objective!r}, ...)"
        have = _shown(sorted(special_tokens, key=special_tokens.__getitem__))
        raise ValueError(
            f"objective {objective!r} needs special tokens {_shown(missing)} that the tokenizer lacks (it "
            f"has {have}); prepare the data again with {fix} (plus any other special tokens you use; a "
            "trained tokenizer puts them after <|eos|> and <|pad|>, a released model's tokenizer gets them "
            "after its vocabulary, so its vocab_size grows)"
        )
    return [int(special_tokens[t]) for t in names]
