"""Losses as pure tensor functions (no model, no state).

Shapes: ``logits`` are (..., C) over C classes (C = vocabulary for token losses), ``targets`` (...) hold
class ids, with ``ignore_index`` marking positions without a target. Every loss is the mean over the
positions that have a target (0 when none has).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree: logits must be "
            "targets.shape + (num_classes,)"
        )
    return logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1).long()  # (N, C), (N,)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (values * valid).sum() / valid.sum().clamp(min=1)


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(log(Z)^2)`` with ``log Z = logsumexp(logits)`` over the last dimension.

    The auxiliary loss of PaLM (Chowdhery et al. 2022, arXiv 2204.02311, section 5, weight 1e-4): it
    keeps the softmax normaliser near 1 (log Z near 0), which stabilises large-scale training; its
    gradient ``2 log Z * softmax(logits)`` on every logit moves log Z toward 0. ``mask`` (logits.shape[:-1],
    bool) restricts the mean to the True positions.
    """
    log_z = torch.logsumexp(logits.float(), dim=-1)  # (...)
    if mask is None:
        return log_z.square().mean()
    return _masked_mean(log_z.square(), mask)


_log_z_squared = z_loss  # cross_entropy's argument shadows the name


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Per-position cross-entropy (targets.shape), 0 where ``targets == ignore_index``."""
    flat, tgt = _flat(logits, targets)
    return F.cross_entropy(flat, tgt, ignore_index=ignore_index, reduction="none").view(targets.shape)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    return_parts: bool = False,
):
    """Token cross-entropy over the positions with a target, plus ``z_loss * mean(log²Z)`` on them.

    The loss every token objective (causal LM, MLM, span corruption, UL2) shares; they differ only in
    which positions carry a target. Returns the scalar loss, or ``(loss, ce, zl)`` when ``return_parts``
    (``zl`` is the unweighted z term, computed whenever it is asked for).
    """
    valid = targets != ignore_index
    # sum / count rather than reduction="mean": a batch without any target gives 0, not NaN, and no host sync
    ce = token_cross_entropy(logits, targets, ignore_index=ignore_index).sum() / valid.sum().clamp(min=1)
    zl = _log_z_squared(logits, valid) if (z_loss > 0.0 or return_parts) else ce.new_zeros(())
    loss = ce + z_loss * zl if z_loss > 0.0 else ce
    if return_parts:
        return loss, ce, zl
    return loss


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

    logits: (B, T, V); targets: (B, T) with ``ignore_index`` for positions without a target (already
    shifted: ``targets[:, t]`` is the token after input position t). Returns the scalar loss, or
    ``(loss, ce, zl)`` when ``return_parts``.
    """
    return cross_entropy(logits, targets, z_loss=z_loss, ignore_index=ignore_index, return_parts=return_parts)


def focal(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, *, ignore_index: int = -100
) -> torch.Tensor:
    """Multi-class focal loss ``-(1 - p_t)^gamma * log p_t``, mean over positions with a target.

    Lin et al., "Focal Loss for Dense Object Detection", arXiv 1708.02002, eq. 4 (without the optional
    alpha class weights): the factor ``(1 - p_t)^gamma`` shrinks the loss of well-classified examples so
    that rare, hard ones dominate the gradient. ``gamma=0`` is cross-entropy exactly.
    """
    if gamma < 0:
        raise ValueError(f"gamma={gamma} is not allowed; allowed: gamma >= 0 (0 is cross-entropy)")
    flat, tgt = _flat(logits, targets)
    valid = tgt != ignore_index
    log_pt = F.log_softmax(flat, dim=-1).gather(1, tgt.clamp(min=0)[:, None])[:, 0]  # (N,)
    if gamma == 0:
        per = -log_pt
    else:
        per = -((1.0 - log_pt.exp()).clamp(min=0.0) ** gamma) * log_pt
    return _masked_mean(per, valid)


def spherical_z(
    logits: torch.Tensor,
    targets: torch.Tensor,
    a: float = 1.0,
    b: float = 1.0,
    *,
    ignore_index: int = -100,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The Z-loss classification loss ``softplus(a (b - z_c)) / a`` of de Brébisson & Vincent.

    "The Z-loss: a shift and scale invariant classification loss belonging to the Spherical Family",
    arXiv 1604.08859: the scores are z-normalised over the classes, ``z = (o - mean(o)) / std(o)`` (the
    population standard deviation), so the loss does not change when every score of an example is
    shifted by a constant or scaled by a positive factor; ``a`` sets the sharpness of the softplus and
    ``b`` the z-score beyond which the target class stops being pushed up. Not to be confused with PaLM's
    auxiliary :func:`z_loss`. ``eps`` bounds the standard deviation away from 0 (constant scores).
    """
    if a <= 0:
        raise ValueError(f"a={a} is not allowed; allowed: a > 0")
    flat, tgt = _flat(logits, targets)
    valid = tgt != ignore_index
    mean = flat.mean(dim=-1, keepdim=True)  # (N, 1)
    std = flat.std(dim=-1, unbiased=False, keepdim=True).clamp(min=eps)  # (N, 1)
    z = (flat - mean) / std  # (N, C)
    z_c = z.gather(1, tgt.clamp(min=0)[:, None])[:, 0]  # (N,)
    per = F.softplus(a * (b - z_c)) / a
    return _masked_mean(per, valid)


POOL_TOKENS = ("mean", "last", "all")


def pool_hidden(hidden: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """The feature vectors of hidden states (B, T, C) that self-distillation compares.

    ``mean``: one vector per sequence, the mean over its T positions, (B, C); ``last``: the last
    position's, (B, C); ``all``: every position's, (B * T, C).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be (B, T, C); got {tuple(hidden.shape)}")
    if how == "mean":
        return hidden.mean(dim=1)
    if how == "last":
        return hidden[:, -1]
    if how == "all":
        return hidden.reshape(-1, hidden.size(-1))
    raise ValueError(f"how={how!r} is not allowed; allowed: {', '.join(POOL_TOKENS)}")


def squared_distance(
    student: torch.Tensor, teacher: torch.Tensor, *, normalize: bool = False
) -> torch.Tensor:
    """``sum_c (student - teacher)^2`` per feature vector (..., C), averaged over the vectors.

    The distillation term of "Self-Distillation for Further Pre-training of Transformers" (Lee et al.,
    arXiv 2210.02871, section 3): the squared L2 distance between the student's and the frozen teacher's
    feature of each example, averaged over the batch, i.e. MSE with reduction sum divided by the batch
    size (not the mean over hidden dimensions, which would shrink the term by C). ``normalize`` compares
    unit vectors (``F.normalize`` over C; the term then lies in [0, 4]), which makes it insensitive to the
    norms of the two models' features. The teacher side is detached; the result is float32.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student features {tuple(student.shape)} and teacher's {tuple(teacher.shape)} differ: "
            "self-distillation needs a teacher of the same width (d_model) on the same inputs"
        )
    s, t = student.float(), teacher.detach().float()
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    return (s - t).square().sum(dim=-1).mean()


# Vision / contrastive losses live in objectives.vision.functional (torch only); re-exported so that
# `from objectives import functional as F; F.nt_xent(...)` covers both families.
from objectives.vision.functional import barlow_twins, clip_loss, mae_loss, nt_xent  # noqa: E402, F401
