"""Losses as pure tensor functions (no model, no state)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm(
    logits: torch.Tensor,
    targets: torch.Tensor,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    return_parts: bool = False,
):
    """Next-token cross-entropy with an optional z-loss on the softmax normaliser.

    The z-loss term ``z_loss * mean(log(Z)^2)`` keeps the log-partition function near zero and
    stabilises large-scale training (PaLM, Chowdhery et al. 2022, arXiv 2204.02311, §5).

    logits: (B, T, V); targets: (B, T) with ``ignore_index`` for positions without a target.
    Returns the scalar loss, or ``(loss, ce, zl)`` when ``return_parts``.
    """
    flat = logits.reshape(-1, logits.size(-1)).float()  # (B*T, V)
    tgt = targets.reshape(-1).long()
    ce = F.cross_entropy(flat, tgt, ignore_index=ignore_index)
    if z_loss > 0.0 or return_parts:
        valid = tgt != ignore_index
        log_z = torch.logsumexp(flat, dim=-1)  # (B*T,)
        zl = (log_z.square() * valid).sum() / valid.sum().clamp(min=1)
    else:
        zl = ce.new_zeros(())
    loss = ce + z_loss * zl if z_loss > 0.0 else ce
    if return_parts:
        return loss, ce, zl
    return loss
