"""Vision pre-training losses as pure tensor functions (no model, no state).

All losses compute in float32 whatever the input dtype. The contrastive losses that need negatives from
the whole global batch (:func:`nt_xent`, :func:`clip_loss`, :func:`amcl_nt_xent`) gather embeddings
across data-parallel ranks when ``torch.distributed`` is initialised with more than one rank (``gather=True``,
the default): each rank's local rows are the anchors and the rows of every rank are the candidates. The
gather is differentiable (:func:`gather_with_grad`: all_gather forward, all_reduce-sum backward), so with
the usual averaging of gradients over ranks (DDP, DeepSpeed) the update equals the one of the
single-process loss on the concatenated global batch. Every rank must hold the same number of rows.
Without a process group (or with one rank) nothing is gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# Cross-rank gather
# ---------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # all_reduce rather than reduce_scatter: gloo has no reduce_scatter, and embeddings are small
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor, *, gather: bool = True) -> tuple[torch.Tensor, int]:
    """``(rows of all ranks concatenated in rank order, offset of this rank's rows)``; identity with one rank."""
    world, rank = _world()
    if not gather or world == 1:
        return x, 0
    return _GatherWithGrad.apply(x), rank * x.shape[0]


def gather_no_grad(x: torch.Tensor, *, gather: bool = True) -> torch.Tensor:
    """all_gather along dim 0 without gradient (labels, ids); identity with one rank."""
    world, _ = _world()
    if not gather or world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------------------------------------------
# Masked image modelling
# ---------------------------------------------------------------------------------------------------


def mae_patch_loss(pred: torch.Tensor, target: torch.Tensor, *, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch mean squared error (N, L) between ``pred`` and ``target`` (N, L, P).

    ``norm_pix``: the target patch is standardised with its own mean and (unbiased) variance first, MAE's
    "normalized pixels" target (He et al., arXiv 2111.06377); each patch's loss depends only on
    that patch's prediction and pixels.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape (N, L, P)")
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    return (pred.float() - target).pow(2).mean(dim=-1)  # (N, L)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix: bool = True) -> torch.Tensor:
    """MAE reconstruction loss: :func:`mae_patch_loss` averaged over the masked patches only.

    pred/target: (N, L, P); mask: (N, L), 1 = masked (predicted), 0 = visible (ignored).
    """
    per_patch = mae_patch_loss(pred, target, norm_pix=norm_pix)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


def hpm_relative_loss(pred_loss: torch.Tensor, target_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HPM's relative (ranking) loss-prediction objective (Wang et al., arXiv 2304.05919).

    For every ordered pair (i, j) of masked patches of the same image whose reconstruction losses differ,
    binary cross-entropy of ``sigmoid(p_i − p_j)`` against ``1[l_i > l_j]``; the mean over those pairs.
    Only the relative order of the predicted losses is learned, so the predictor need not track the
    shrinking scale of the reconstruction loss. ``target_loss`` is detached here: the predictor is trained
    by this loss only and the reconstruction is not trained to be predictable.

    pred_loss, target_loss: (N, L); mask: (N, L), 1 = masked.
    """
    p = pred_loss.float()
    t = target_loss.detach().float()
    m = mask.float()
    diff = p[:, :, None] - p[:, None, :]  # (N, L, L): p_i − p_j
    greater = (t[:, :, None] > t[:, None, :]).float()
    valid = (t[:, :, None] != t[:, None, :]).float() * m[:, :, None] * m[:, None, :]
    bce = F.binary_cross_entropy_with_logits(diff, greater, reduction="none")
    return (bce * valid).sum() / valid.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# Joint-embedding losses
# ---------------------------------------------------------------------------------------------------


def _pair_indices(n: int, m_total: int, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For local anchors [z1; z2] (2n rows) against global candidates [Z1; Z2] (2·m_total rows):
    the column of each anchor itself and of its positive."""
    i = torch.arange(n, device=device)
    self_col = torch.cat((offset + i, m_total + offset + i))
    pos_col = torch.cat((m_total + offset + i, offset + i))
    return self_col, pos_col


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al., arXiv 2002.05709, eq. 1) over two views; row i of z1 and of z2 are a pair.

    With u = normalise(z): for each of the 2N anchors a, ℓ_a = −log( exp(u_a·u_p(a)/τ) / Σ_{k≠a} exp(u_a·u_k/τ) )
    over the 2N − 1 other rows of both views; the loss is the mean over anchors. Gathers across ranks
    (module docstring).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must both be (N, D)")
    u1, u2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    g1, offset = gather_with_grad(u1, gather=gather)
    g2, _ = gather_with_grad(u2, gather=gather)
    n, m = u1.shape[0], g1.shape[0]
    anchors = torch.cat((u1, u2))  # (2n, D)
    candidates = torch.cat((g1, g2))  # (2m, D)
    logits = anchors @ candidates.T / temperature  # (2n, 2m)
    self_col, pos_col = _pair_indices(n, m, offset, z1.device)
    logits = logits.scatter(1, self_col[:, None], float("-inf"))
    return F.cross_entropy(logits, pos_col)


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    caption_ids: torch.Tensor | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """CLIP's symmetric contrastive loss (Radford et al., arXiv 2103.00020, figure 3).

    Embeddings (N, E) are L2-normalised inside; logits = s · cos(image_i, text_j) with ``logit_scale`` s
    (already exponentiated and capped by the caller); loss = ½ (CE over texts for each image + CE over images
    for each text), the target of row i being column i. ``caption_ids`` (N,) int: rows with the same id have
    the same caption, and all of them count as positives (the target is uniform over them), as they are
    when captions are generated from class labels. Gathers across ranks (module docstring).
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)} embeddings must both be (N, E)")
    img, txt = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    g_img, offset = gather_with_grad(img, gather=gather)
    g_txt, _ = gather_with_grad(txt, gather=gather)
    n = img.shape[0]
    scale = logit_scale.float() if torch.is_tensor(logit_scale) else float(logit_scale)
    logits_i2t = scale * img @ g_txt.T  # (n, m)
    logits_t2i = scale * txt @ g_img.T  # (n, m)
    if caption_ids is None:
        target = torch.arange(n, device=img.device) + offset
        return 0.5 * (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target))
    all_ids = gather_no_grad(caption_ids, gather=gather)
    same = (caption_ids[:, None] == all_ids[None, :]).float()  # (n, m)
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target))


def batch_standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(N, D) -> each column minus its batch mean, divided by sqrt(biased batch variance + eps)
    (BatchNorm without affine parameters, as in Barlow Twins)."""
    z = z.float()
    mean = z.mean(0, keepdim=True)
    var = z.var(0, unbiased=False, keepdim=True)
    return (z - mean) / (var + eps).sqrt()


def cross_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C = standardise(a)ᵀ standardise(b) / N: (D, D) empirical cross-correlation over the batch."""
    return batch_standardize(a).T @ batch_standardize(b) / a.shape[0]


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, *, lambd: float = 5e-3, return_parts: bool = False):
    """Barlow Twins (Zbontar et al., arXiv 2103.03230, eq. 1): Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij².

    C is the cross-correlation of the batch-standardised embeddings, so the loss is unchanged when either
    embedding is scaled or shifted per dimension. It uses this rank's batch only (no gather).
    ``return_parts``: also return (on-diagonal term, off-diagonal sum of squares).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must both be (N, D)")
    if z1.shape[0] < 2:
        raise ValueError("Barlow Twins standardises over the batch; it needs at least 2 rows")
    c = cross_correlation(z1, z2)
    diag = torch.diagonal(c)
    on = (1 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    loss = on + lambd * off
    return (loss, on, off) if return_parts else loss


def mixed_barlow_regularizer(
    z1: torch.Tensor, z2: torch.Tensor, z_mix: torch.Tensor, *, alpha: float | torch.Tensor, perm: torch.Tensor
) -> torch.Tensor:
    """Mixed Barlow Twins' mixup regulariser (Bandara et al., arXiv 2312.02151).

    The inputs of ``z_mix`` are x_m = α·x1 + (1 − α)·x2[perm]. If the embedding were linear in the input,
    its cross-correlations with each view would be the same interpolation of the views' own ones:
    C(z_m, z_k) ≈ α·C(z1, z_k) + (1 − α)·C(z2[perm], z_k) for k = 1, 2, where C(a, b) = âᵀ b̂ / N with
    batch-standardised â, b̂. The regulariser is the squared Frobenius distance summed over k = 1, 2;
    the objective weights it (``mix_scale · λ``).
    """
    n = z1.shape[0]
    a1, a2, am = batch_standardize(z1), batch_standardize(z2), batch_standardize(z_mix)
    a2p = a2[perm]
    total = z1.new_zeros((), dtype=torch.float32)
    for ak in (a1, a2):
        c_m = am.T @ ak / n
        c_gt = alpha * (a1.T @ ak / n) + (1 - alpha) * (a2p.T @ ak / n)
        total = total + (c_m - c_gt).pow(2).sum()
    return total


def amcl_omega(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """AMCL's temperature regulariser Ω(τ) = (d′/2)·log τ + 1/τ.

    It is the τ-dependent part of the negative log-likelihood of a unit-vector pair (u, v) under an
    isotropic Gaussian of variance τ in d′ dimensions: ‖u − v‖²/(2τ) + (d′/2) log τ = (1 − u·v)/τ + (d′/2) log τ
    = −u·v/τ + Ω(τ). Its minimum over τ, at τ* = 2(1 − u·v)/d′, keeps τ from running to 0 or ∞.
    """
    tau = tau.float()
    return 0.5 * dim * tau.log() + tau.reciprocal()


def amcl_nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    phi1: torch.Tensor,
    phi2: torch.Tensor,
    *,
    tau_min: float,
    tau_max: float,
    beta: float,
    gather: bool = True,
    return_parts: bool = False,
):
    """Adaptive Multi-head Contrastive Learning on SimCLR (Wang et al., arXiv 2310.05615), the form implemented.

    Inputs: C heads of projected views z1, z2 (C, N, d′) and the temperature network's outputs phi1, phi2
    (C, N, d_φ) on the normalised projections. With u = normalise(z), for head c and anchor a (the 2N local
    rows of both views) against every other row k of the global batch:

        τ_ak = τ_min + (τ_max − τ_min) · sigmoid(−φ_a·φ_k)                           pair- and head-adaptive
        ℓ_ak = u_a·u_k / τ_ak − β·Ω(τ_ak),  Ω(τ) = (d′/2) log τ + 1/τ                (:func:`amcl_omega`)
        L_c  = mean_a [ −ℓ_{a,p(a)} + log Σ_{k≠a} exp(ℓ_ak) ]
        L    = Σ_c L_c

    i.e. the negative log posterior that k = p(a) is the positive when every candidate's similarity has a
    Gaussian likelihood with its own variance τ_ak (β = 1 is that likelihood exactly; smaller β weakens the
    regulariser); the product of the heads' posteriors gives the sum over heads. With a constant τ and β = 0
    it is C times :func:`nt_xent`.

    Why this form: the paper derives the loss as maximum likelihood over head-wise posteriors with pair-wise
    temperatures and a regulariser that stops the temperatures degenerating; Ω and the τ network are those
    of the authors' released code (github.com/LeiWangR/cl, ``amcl/losses.py``). That code approximates the
    log-sum-exp over negatives by the mean of the top-k hardest s/τ and subtracts their log τ + 1/τ; we keep
    the exact softmax normaliser (our batches are small enough) so that the loss stays a proper
    log-likelihood and reduces exactly to NT-Xent. Gathers across ranks (module docstring).

    ``return_parts``: also return (mean positive τ, mean negative τ) as detached tensors.
    """
    if z1.shape != z2.shape or z1.dim() != 3:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must both be (C, N, D)")
    C, n, d = z1.shape
    u = F.normalize(torch.cat((z1, z2), dim=1).float(), dim=-1)  # (C, 2n, d)
    ph = torch.cat((phi1, phi2), dim=1).float()  # (C, 2n, dφ)
    # gather rows of every rank: per view, rank order — the same layout as nt_xent
    u1, u2 = u[:, :n], u[:, n:]
    p1, p2 = ph[:, :n], ph[:, n:]
    g = [gather_with_grad(t.transpose(0, 1).reshape(n, -1), gather=gather) for t in (u1, u2, p1, p2)]
    offset = g[0][1]
    m = g[0][0].shape[0]
    U = torch.cat((g[0][0].view(m, C, -1), g[1][0].view(m, C, -1))).transpose(0, 1)  # (C, 2m, d)
    P = torch.cat((g[2][0].view(m, C, -1), g[3][0].view(m, C, -1))).transpose(0, 1)  # (C, 2m, dφ)
    sim = u @ U.transpose(1, 2)  # (C, 2n, 2m)
    score = ph @ P.transpose(1, 2)
    tau = tau_min + (tau_max - tau_min) * torch.sigmoid(-score)  # (C, 2n, 2m)
    logits = sim / tau - beta * amcl_omega(tau, d)
    self_col, pos_col = _pair_indices(n, m, offset, z1.device)
    logits = logits.scatter(2, self_col.view(1, -1, 1).expand(C, -1, 1), float("-inf"))
    per_head = F.cross_entropy(logits.reshape(C * 2 * n, -1), pos_col.repeat(C), reduction="none").view(C, 2 * n)
    loss = per_head.mean(1).sum()
    if not return_parts:
        return loss
    with torch.no_grad():
        pos_mask = torch.zeros_like(tau, dtype=torch.bool).scatter_(2, pos_col.view(1, -1, 1).expand(C, -1, 1), True)
        neg_mask = ~pos_mask
        neg_mask.scatter_(2, self_col.view(1, -1, 1).expand(C, -1, 1), False)
        return loss, tau[pos_mask].mean(), tau[neg_mask].mean()
