"""Boolean attention masks for :meth:`models.decoder.DecoderLM.forward` (True = may attend).

Shapes are (B or 1, 1, T, T): ``mask[b, 0, i, j]`` says whether query position i of example b may attend
to key position j.
"""

from __future__ import annotations

import torch


def causal_mask(seq_len: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, T, T): position i attends to positions j <= i."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, T, T)


def prefix_lm_mask(
    prefix_len: int | torch.Tensor, seq_len: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Prefix-LM mask (Raffel et al., arXiv 1910.10683, section 3.2.1): bidirectional over the prefix,
    causal after it.

    Position i may attend to j when ``j <= i`` or ``j < prefix_len``: the prefix sees all of itself,
    every later position sees the whole prefix and the positions before it, and no position sees a later
    non-prefix position. ``prefix_len`` is an int (one prefix for the batch, returns (1, 1, T, T)) or a
    (B,) integer tensor (one per example, returns (B, 1, T, T)). ``prefix_len=0`` is the causal mask.
    """
    if isinstance(prefix_len, int):
        if not 0 <= prefix_len <= seq_len:
            raise ValueError(
                f"prefix_len={prefix_len} is not allowed; allowed: 0 <= prefix_len <= seq_len={seq_len}"
            )
        prefix = torch.tensor([prefix_len], device=device)  # (1,)
    else:
        if prefix_len.dim() != 1:
            raise ValueError(
                f"prefix_len must be an int or a (B,) tensor; got shape {tuple(prefix_len.shape)}"
            )
        prefix = prefix_len.to(device=device) if device is not None else prefix_len  # (B,)
    positions = torch.arange(seq_len, device=prefix.device)  # (T,)
    causal = positions[None, :] <= positions[:, None]  # (T, T): j <= i
    in_prefix = positions[None, None, :] < prefix[:, None, None]  # (B, 1, T): j < prefix_len
    return (causal[None] | in_prefix)[:, None]  # (B, 1, T, T)
