"""Vectorised, seeded corruption of token rows: T5 span noise, its sentinel encoding, denoising batches.

Everything random here depends only on the shapes and a CPU ``torch.Generator``, never on token values,
so the structure (which positions are noise, where each token goes) is built on the CPU as *index*
tensors and applied on the tokens' device with a single ``gather``: no host sync, no Python loop over
tokens. The index space is a row's positions ``[0, L)`` followed by a small table of special-token ids
(:class:`TokenTable`): index ``L + j`` stands for ``table[j]``.

T5 (Raffel et al., arXiv 1910.10683, section 3.1.4 and the ``random_spans_noise_mask`` preprocessor):
``num_noise = round(n * noise_density)`` tokens of a window of ``n`` are corrupted, in
``num_spans = round(num_noise / mean_span_length)`` spans whose lengths are a uniformly random
composition of ``num_noise``, placed uniformly at random (:func:`span_noise_mask`). Inputs keep the non-noise tokens and replace each span by one sentinel; targets list each
sentinel followed by the span it replaced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # round half up (Python's round() is round-half-even)


def span_counts(n: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """``(num_noise, num_spans)`` for a window of ``n`` tokens (T5's rounding; at least one of each)."""
    if n < 2:
        raise ValueError(f"a window of {n} token(s) cannot be corrupted; it needs at least 2")
    num_noise = min(max(_round(n * noise_density), 1), n - 1)
    num_spans = max(_round(num_noise / mean_span_length), 1)
    num_spans = min(num_spans, num_noise, n - num_noise)  # every run of either kind is non-empty
    return num_noise, num_spans


@lru_cache(maxsize=256)
def fit_window(row_len: int, noise_density: float, mean_span_length: float, extra: int = 0) -> int:
    """The largest window ``n`` whose encoding fits in ``row_len`` tokens.

    A window of ``n`` tokens with ``k`` spans becomes ``extra`` leading tokens (a mode token) + inputs
    (``n - num_noise + k``) + targets (``num_noise + k``), i.e. ``extra + n + 2k`` tokens; the decoder
    reads all but the last of them, so a row of ``seq_len + 1`` tokens yields at most ``seq_len`` inputs.
    """
    for n in range(row_len - extra, 1, -1):
        _, k = span_counts(n, noise_density, mean_span_length)
        if extra + n + 2 * k <= row_len:
            return n
    raise ValueError(
        f"rows of {row_len} tokens are too short for span corruption (noise_density={noise_density}, "
        f"mean_span_length={mean_span_length}); prepare longer rows (data.prepare.seq_len)"
    )


def random_segmentation(
    batch: int, num_items: int, num_segments: int, generator: torch.Generator
) -> torch.Tensor:
    """(batch, num_segments) run lengths >= 1 summing to ``num_items``, uniform over such compositions.

    The cut points are ``num_segments - 1`` distinct positions of ``1 .. num_items - 1``, drawn as the
    top-k of i.i.d. uniforms (a uniformly random subset).
    """
    if not 1 <= num_segments <= num_items:
        raise ValueError(f"cannot split {num_items} items into {num_segments} non-empty runs")
    if num_segments == 1:
        return torch.full((batch, 1), num_items, dtype=torch.long)
    scores = torch.rand(batch, num_items - 1, generator=generator)  # (b, m-1)
    cuts = scores.topk(num_segments - 1, dim=1).indices.sort(dim=1).values + 1  # (b, k-1) in [1, m-1]
    zero = torch.zeros(batch, 1, dtype=torch.long)
    end = torch.full((batch, 1), num_items, dtype=torch.long)
    return torch.cat([zero, cuts, end], dim=1).diff(dim=1)  # (b, k)


def span_noise_mask(
    batch: int, n: int, noise_density: float, mean_span_length: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random span noise on windows of ``n`` tokens: ``(is_noise, span_id)``, both (batch, n) on CPU.

    ``is_noise`` is True on the corrupted positions (exactly ``num_noise`` per row, in exactly
    ``num_spans`` separate spans, see :func:`span_counts`) and ``span_id`` numbers each position's span
    0, 1, ... from the left (meaningful where ``is_noise``). The span lengths are a uniformly random
    composition of ``num_noise`` (as in T5); the clean runs between them are >= 1 and the clean runs at
    the two ends >= 0, uniformly too. T5's preprocessor instead always starts with a clean run and ends
    with a noise run (its ``random_roll`` option exists to remove that edge bias); here either end may be
    noise or clean, while the counts, hence the sequence lengths, stay fixed. The noise rate is uniform
    along the window except near its two ends, where it falls (to ~40% of the rate at the very first and
    last position at the T5 defaults) because spans must stay separate.
    """
    num_noise, k = span_counts(n, noise_density, mean_span_length)
    noise_len = random_segmentation(batch, num_noise, k, generator)  # (b, k), each >= 1
    clean_len = random_segmentation(batch, n - num_noise + 2, k + 1, generator)  # (b, k+1), each >= 1
    clean_len[:, 0] -= 1  # the runs before the first and after the last span may be empty
    clean_len[:, -1] -= 1
    lengths = torch.cat([torch.stack([clean_len[:, :-1], noise_len], dim=2).reshape(batch, 2 * k),
                         clean_len[:, -1:]], dim=1)  # (b, 2k+1): clean, noise, ..., noise, clean
    starts = lengths.cumsum(dim=1)[:, :-1]  # (b, 2k): first position of runs 1 .. 2k (n when empty at the end)
    marker = torch.zeros(batch, n + 1, dtype=torch.long).scatter_add_(1, starts, torch.ones_like(starts))
    run = marker[:, :n].cumsum(dim=1)  # (b, n): the run each position is in (empty runs are skipped)
    return run % 2 == 1, run // 2


@dataclass(frozen=True)
class TokenTable:
    """Special-token ids appended to the index space after a row's ``L`` positions.

    Layout: ``[pad, sentinel_0 .. sentinel_{N-1}, mode tokens ...]``.
    """

    pad: int
    sentinels: tuple[int, ...] = ()
    modes: tuple[int, ...] = ()

    def ids(self) -> list[int]:
        return [self.pad, *self.sentinels, *self.modes]

    def pad_index(self, row_len: int) -> int:
        return row_len

    def sentinel_base(self, row_len: int) -> int:
        return row_len + 1

    def mode_index(self, row_len: int, i: int) -> int:
        return row_len + 1 + len(self.sentinels) + i


def span_corruption_indices(
    is_noise: torch.Tensor, span_id: torch.Tensor, *, sentinel_base: int, num_sentinels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index rows of the corrupted inputs (B, n - num_noise + k) and of the targets (B, num_noise + k).

    Position indices ``0 .. n-1`` point into the window; span ``s`` is marked by index
    ``sentinel_base + s % num_sentinels`` (sentinels are reused cyclically when a row has more spans
    than sentinels; the order of the spans still identifies them). Every row of ``is_noise`` must have
    the same number of noise tokens and spans (as :func:`span_noise_mask` guarantees).
    """
    B, n = is_noise.shape
    pos = torch.arange(n).expand(B, n)  # (B, n)
    prev = torch.cat([torch.zeros(B, 1, dtype=torch.bool), is_noise[:, :-1]], dim=1)
    span_start = is_noise & ~prev  # (B, n)
    num_noise, k = int(is_noise[0].sum()), int(span_start[0].sum())
    P, Tt = n - num_noise + k, num_noise + k
    sentinel = sentinel_base + span_id % num_sentinels  # (B, n)

    keep = ~is_noise | span_start  # a span keeps one slot, for its sentinel
    dst = torch.where(keep, keep.cumsum(dim=1) - 1, P)  # dropped positions go to a spare column P
    inputs = torch.full((B, P + 1), -1, dtype=torch.long)
    inputs.scatter_(1, dst, torch.where(is_noise, sentinel, pos))

    noise_before = is_noise.cumsum(dim=1) - is_noise.long()  # noise tokens strictly before each position
    targets = torch.full((B, Tt + 1), -1, dtype=torch.long)
    targets.scatter_(1, torch.where(is_noise, noise_before + span_id + 1, Tt), pos)  # span tokens
    targets.scatter_(1, torch.where(span_start, noise_before + span_id, Tt), sentinel)  # one sentinel each
    return inputs[:, :P], targets[:, :Tt]


@dataclass
class DenoisingPlan:
    """Index rows (CPU) of a batch of decoder denoising sequences ``[prefix | targets]``.

    ``index`` (B, S) points into ``[row positions | TokenTable]``; row b is ``length[b]`` long (the rest
    is padding) and its first ``prefix[b]`` positions are the bidirectional prefix; the loss is on the
    positions after it.
    """

    index: torch.Tensor  # (B, S) long
    prefix: torch.Tensor  # (B,) long
    length: torch.Tensor  # (B,) long


def span_plan(
    batch: int,
    row_len: int,
    *,
    noise_density: float,
    mean_span_length: float,
    table: TokenTable,
    generator: torch.Generator,
    mode: int | None = None,
) -> DenoisingPlan:
    """T5 span corruption of the first ``n`` tokens of each row (``n`` from :func:`fit_window`), with the
    mode token ``table.modes[mode]`` in front when ``mode`` is given: ``[mode?] inputs | targets``."""
    extra = 0 if mode is None else 1
    n = fit_window(row_len, noise_density, mean_span_length, extra)
    is_noise, span_id = span_noise_mask(batch, n, noise_density, mean_span_length, generator)
    inputs, targets = span_corruption_indices(
        is_noise, span_id, sentinel_base=table.sentinel_base(row_len), num_sentinels=len(table.sentinels)
    )
    parts = [inputs, targets]
    if mode is not None:
        parts.insert(0, torch.full((batch, 1), table.mode_index(row_len, mode), dtype=torch.long))
    index = torch.cat(parts, dim=1)  # (b, extra + n + 2k)
    prefix = torch.full((batch,), extra + inputs.shape[1], dtype=torch.long)
    length = torch.full((batch,), index.shape[1], dtype=torch.long)
    return DenoisingPlan(index, prefix, length)


def prefix_lm_plan(
    batch: int, row_len: int, *, table: TokenTable, generator: torch.Generator, mode: int | None = None
) -> DenoisingPlan:
    """Prefix LM (UL2's S-denoiser): ``[mode?] row[:n]`` with the split point uniform in ``1 .. n-1``."""
    extra = 0 if mode is None else 1
    n = row_len - extra
    if n < 2:
        raise ValueError(f"rows of {row_len} tokens are too short for a prefix LM")
    split = torch.randint(1, n, (batch,), generator=generator)  # (b,) prefix tokens of the row
    index = torch.arange(n).expand(batch, n)
    if mode is not None:
        index = torch.cat([torch.full((batch, 1), table.mode_index(row_len, mode), dtype=torch.long), index], 1)
    return DenoisingPlan(index, extra + split, torch.full((batch,), extra + n, dtype=torch.long))


def stack_plans(plans: list[tuple[torch.Tensor, DenoisingPlan]], batch: int, width: int, pad_index: int) -> DenoisingPlan:
    """Scatter per-group plans (``rows``, plan) into one (batch, width) plan padded with ``pad_index``."""
    index = torch.full((batch, width), pad_index, dtype=torch.long)
    prefix = torch.zeros(batch, dtype=torch.long)
    length = torch.zeros(batch, dtype=torch.long)
    for rows, plan in plans:
        index[rows, : plan.index.shape[1]] = plan.index
        prefix[rows] = plan.prefix
        length[rows] = plan.length
    return DenoisingPlan(index, prefix, length)


def materialise(tokens: torch.Tensor, table_ids: torch.Tensor, plan: DenoisingPlan, *, ignore_index: int = -100) -> dict:
    """Apply a plan to rows ``tokens`` (B, L) on their device: decoder inputs, targets and the mask.

    Returns ``input_ids`` (B, S-1), ``targets`` (B, S-1) (the next token where it belongs to the target
    part of its row, else ``ignore_index``), ``prefix_len`` (B,) and ``length`` (B,) on the device.
    """
    dev = tokens.device
    B, L = tokens.shape
    source = torch.cat([tokens, table_ids.to(dev).expand(B, -1)], dim=1)  # (B, L + K)
    seq = source.gather(1, plan.index.to(dev))  # (B, S)
    S = seq.shape[1]
    j = torch.arange(S - 1)  # label position j holds token j + 1
    is_target = (j[None] >= plan.prefix[:, None] - 1) & (j[None] < plan.length[:, None] - 1)  # (B, S-1)
    targets = seq[:, 1:].masked_fill(~is_target.to(dev), ignore_index)
    return {
        "input_ids": seq[:, :-1],
        "targets": targets,
        "prefix_len": plan.prefix.to(dev),
        "length": plan.length.to(dev),
    }
