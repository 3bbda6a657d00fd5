"""Gopher quality heuristics (Rae et al., "Scaling Language Models: Methods, Analysis & Insights from Training
Gopher", arXiv 2112.11446, appendix A.1.1), as rules with thresholds in :class:`data.curation.FilterSpec`.

Written here rather than taken from ``datatrove``: its Gopher filter runs inside datatrove's own pipeline
objects and brings its tokenizers and I/O stack; these rules are a dozen lines of string statistics per
document, and this way every threshold is a typed, documented field.
"""

from __future__ import annotations

from collections.abc import Sequence

from data.curation.config import FilterSpec

BULLETS = ("•", "‣", "○", "●", "◦", "-", "*", "·")
ELLIPSES = ("...", "…")


def reason(text: str, spec: FilterSpec) -> str | None:
    """The first rule ``text`` fails (its name and value), or None when it passes them all."""
    words = text.split()
    n = len(words)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    checks = (
        ("min_words", n, spec.min_words, n < (spec.min_words or 0)),
        ("max_words", n, spec.max_words, spec.max_words is not None and n > spec.max_words),
    )
    for name, value, limit, bad in checks:
        if limit is not None and bad:
            return f"{name}: {value} (limit {limit})"
    if n == 0:
        return None
    mean_len = sum(len(w) for w in words) / n
    symbols = (text.count("#") + sum(text.count(e) for e in ELLIPSES)) / n
    alpha = sum(any(c.isalpha() for c in w) for w in words) / n
    bullets = sum(ln.startswith(BULLETS) for ln in lines) / max(len(lines), 1)
    ellipsis_end = sum(ln.endswith(ELLIPSES) for ln in lines) / max(len(lines), 1)
    repeated = (len(lines) - len(set(lines))) / max(len(lines), 1)
    rules = (
        ("min_mean_word_length", mean_len, spec.min_mean_word_length, lambda v, x: v < x),
        ("max_mean_word_length", mean_len, spec.max_mean_word_length, lambda v, x: v > x),
        ("max_symbol_ratio", symbols, spec.max_symbol_ratio, lambda v, x: v > x),
        ("max_bullet_line_fraction", bullets, spec.max_bullet_line_fraction, lambda v, x: v > x),
        ("max_ellipsis_line_fraction", ellipsis_end, spec.max_ellipsis_line_fraction, lambda v, x: v > x),
        ("min_alpha_word_fraction", alpha, spec.min_alpha_word_fraction, lambda v, x: v < x),
        ("max_repeated_line_fraction", repeated, spec.max_repeated_line_fraction, lambda v, x: v > x),
    )
    for name, value, limit, fails in rules:
        if limit is not None and fails(value, limit):
            return f"{name}: {value:.3g} (limit {limit})"
    return None


def reasons(texts: Sequence[str], spec: FilterSpec) -> list[str | None]:
    return [reason(t, spec) for t in texts]
