"""Vision pre-training losses as pure tensor functions (no model, no state).

All losses compute in float32 whatever the input dtype. Two kinds of cross-rank communication, both
only when ``torch.distributed`` is initialised with more than one rank (without a process group, or with
one rank, nothing is communicated):

- The contrastive losses that need negatives from the whole global batch (:func:`nt_xent`,
  :func:`clip_loss`, :func:`amcl_nt_xent`) gather embeddings (``gather=True``, the default): each rank's
  local rows are the anchors and the rows of every rank are the candidates. The gather is differentiable
  (:func:`gather_with_grad`: all_gather forward, all_reduce-sum backward). Every rank must hold the same
  number of rows.
- The Barlow Twins losses (:func:`barlow_twins`, :func:`mixed_barlow_regularizer`,
  :func:`cross_correlation`) all-reduce per-rank sums (:func:`all_reduce_with_grad`: all_reduce-sum
  forward and backward): the batch mean and variance of every feature and the cross-correlation matrix
  are those of the global batch, so every rank gets the same loss, the single-process loss on the
  concatenated batch. ``group`` selects another process group than the default one.

In both cases the backward pass gives each rank's rows the gradient of the sum of the ranks' losses, so
with the usual averaging of gradients over ranks (DDP, DeepSpeed) the update equals the one of the
single-process loss on the concatenated global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# Cross-rank gather
# ---------------------------------------------------------------------------------------------------


def _world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(world size, rank) in ``group`` (the default group when None); (1, 0) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
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


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the incoming gradients.

    Every rank gets S = Σ_r x_r. The backward gives rank r the gradient of Σ_r' L_r' (the sum of the ranks'
    losses) w.r.t. x_r: Σ_r' ∂L_r'/∂S, which is the all-reduced sum of the ranks' incoming gradients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Σ over the ranks of ``group`` of ``x`` (same shape on every rank), differentiable; identity with one rank."""
    world, _ = _world(group)
    if world == 1:
        return x
    return _AllReduceSum.apply(x, group)


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
    (BatchNorm without affine parameters, as in Barlow Twins). This rank's rows only; the losses below use
    :func:`global_standardize`."""
    z = z.float()
    mean = z.mean(0, keepdim=True)
    var = z.var(0, unbiased=False, keepdim=True)
    return (z - mean) / (var + eps).sqrt()


def global_standardize(
    *zs: torch.Tensor, eps: float = 1e-5, group: dist.ProcessGroup | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Standardise each (n, D) tensor with the mean and biased variance of every column over the global
    batch (the rows of every rank of ``group``): BatchNorm without affine parameters, synchronised across
    ranks as the Barlow Twins code does with SyncBatchNorm (Zbontar et al., arXiv 2103.03230).

    Two all-reduces of per-rank sums, both differentiable (:func:`all_reduce_with_grad`): Σ z (with the row
    count), then Σ (z − mean)². Returns (this rank's standardised rows of each input, global row count N
    as a float32 tensor). With one rank it is :func:`batch_standardize` of each input.
    """
    zs = tuple(z.float() for z in zs)
    n_local = zs[0].new_full((1,), float(zs[0].shape[0]))
    sums = all_reduce_with_grad(torch.cat([z.sum(0) for z in zs] + [n_local]), group)
    total = sums[-1]
    devs = [z - m / total for z, m in zip(zs, sums[:-1].split([z.shape[1] for z in zs]), strict=True)]
    sq = all_reduce_with_grad(torch.cat([d.pow(2).sum(0) for d in devs]), group)
    var = sq / total
    out = [d / (v + eps).sqrt() for d, v in zip(devs, var.split([d.shape[1] for d in devs]), strict=True)]
    return out, total


def cross_correlation(
    a: torch.Tensor, b: torch.Tensor, *, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """C = âᵀ b̂ / N: (D, D) empirical cross-correlation over the global batch (N rows of every rank),
    â, b̂ standardised by :func:`global_standardize`; the sum of products is all-reduced."""
    (sa, sb), total = global_standardize(a, b, group=group)
    return all_reduce_with_grad(sa.T @ sb, group) / total


def _check_pair(z1: torch.Tensor, z2: torch.Tensor, group) -> None:
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must both be (N, D)")
    world, _ = _world(group)
    if z1.shape[0] * world < 2:
        raise ValueError("Barlow Twins standardises over the batch; it needs at least 2 rows")


def barlow_twins(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    lambd: float = 5e-3,
    return_parts: bool = False,
    group: dist.ProcessGroup | None = None,
):
    """Barlow Twins (Zbontar et al., arXiv 2103.03230, eq. 1): Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij².

    C is :func:`cross_correlation` of the two views' embeddings over the global batch (every rank of
    ``group``, module docstring), so the loss is that of the single-process run on the concatenated
    batch whatever the split over ranks, and unchanged when either embedding is scaled or shifted per
    dimension. ``return_parts``: also return (on-diagonal term, off-diagonal sum of squares).
    """
    _check_pair(z1, z2, group)
    c = cross_correlation(z1, z2, group=group)
    diag = torch.diagonal(c)
    on = (1 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    loss = on + lambd * off
    return (loss, on, off) if return_parts else loss


def mixed_barlow_regularizer(
    z1: torch.Tensor,
    z2: torch.Tensor,
    z_mix: torch.Tensor,
    *,
    alpha: float | torch.Tensor,
    perm: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Mixed Barlow Twins' mixup regulariser (Bandara et al., arXiv 2312.02151).

    The inputs of ``z_mix`` are x_m = α·x1 + (1 − α)·x2[perm] (``perm`` permutes this rank's rows). If the
    embedding were linear in the input, its cross-correlations with each view would be the same
    interpolation of the views' own ones: C(z_m, z_k) ≈ α·C(z1, z_k) + (1 − α)·C(z2[perm], z_k) for
    k = 1, 2, where C(a, b) = âᵀ b̂ / N with â, b̂ standardised over the global batch
    (:func:`global_standardize`). The regulariser is the squared Frobenius distance summed over k = 1, 2
    (as in the authors' code); the objective weights it (``mix_scale · λ``). Both sides are sums over
    rows, so the difference (âm − α·â1 − (1 − α)·â2[perm])ᵀ âk is all-reduced over ranks (each rank's
    rows with that rank's α).
    """
    _check_pair(z1, z2, group)
    (a1, a2, am), total = global_standardize(z1, z2, z_mix, group=group)
    resid = am - alpha * a1 - (1 - alpha) * a2[perm]  # (n, D)
    diff = all_reduce_with_grad(torch.stack((resid.T @ a1, resid.T @ a2)), group) / total  # (2, D, D)
    return diff.pow(2).sum()


def amcl_omega(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """AMCL's temperature regulariser Ω(τ) = (d′/2)·log τ + 1/τ.

    It is the τ-dependent part of the negative log-likelihood of a unit-vector pair (u, v) under an
    isotropic Gaussian of variance τ in d′ dimensions: ‖u − v‖²/(2τ) + (d′/2) log τ = (1 − u·v)/τ + (d′/2) log τ
    = −u·v/τ + Ω(τ). Its minimum over τ, at τ* = 2(1 − u·v)/d′, keeps τ from running to 0 or ∞.
    """
    tau = tau.float()
    return 0.5 * dim * tau.log() + tau.reciprocal()


AMCL_NORMALIZERS = ("topk", "softmax")


def amcl_nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    phi1: torch.Tensor,
    phi2: torch.Tensor,
    *,
    tau_min: float,
    tau_max: float,
    beta: float,
    normalizer: str = "topk",
    topk: int = 100,
    gather: bool = True,
    return_parts: bool = False,
):
    """Adaptive Multi-head Contrastive Learning on SimCLR (Wang et al., arXiv 2310.05615): what is computed.

    Inputs: C heads of projected views z1, z2 (C, N, d′) and the temperature network's outputs phi1, phi2
    (C, N, d_φ) on the normalised projections. With u = normalise(z) and s_ak = u_a·u_k, for head c and
    anchor a (the 2N local rows of both views), its positive p(a) (the other view of the same image) and
    the negatives k ∉ {a, p(a)} (the 2M − 2 other rows of the global batch of M images, module docstring):

        τ_ak = τ_min + (τ_max − τ_min) · sigmoid(−φ_a·φ_k)          pair- and head-adaptive, shared φ
        Ω(τ) = (d′/2) log τ + 1/τ                                   (:func:`amcl_omega`)

    ``normalizer="topk"`` (default): the loss of the authors' released code for SimCLR, with
    K = min(``topk``, 2M − 2) and T(a) the K negatives of largest s_ak (the hardest; chosen by s, not s/τ):

        ℓ_a = −s_{a,p(a)}/τ_{a,p(a)} + β·Ω(τ_{a,p(a)}) + (1/K)·Σ_{k∈T(a)} s_ak/τ_ak − β·Σ_{k∈T(a)} (log τ_ak + 1/τ_ak)

    The mean over the hardest negatives replaces a log-sum-exp normaliser, and their regulariser is summed,
    without the d′/2 factor and with the opposite sign to the positive's. It is not a normalised
    log-likelihood and is not bounded below in τ: a negative with s_ak < K·β lowers the loss without limit
    as τ_ak → 0, so ``tau_min`` bounds it.

    ``normalizer="softmax"``: the exact posterior form. With ℓ_ak = s_ak/τ_ak − β·Ω(τ_ak),

        ℓ_a = −ℓ_{a,p(a)} + log Σ_{k≠a} exp(ℓ_ak)          (the positive is among the candidates)

    the negative log posterior that k = p(a) is the positive when the similarity to each candidate k has
    an isotropic Gaussian likelihood of variance τ_ak (β = 1 is that likelihood up to a constant; β < 1
    weakens the Ω term). With a constant τ and β = 0 it is :func:`nt_xent` per head.

    Both: L = Σ_c mean_a ℓ_a (mean over the 2N local anchors of both views, sum over heads; the authors'
    code averages the two view directions, the same mean). Gathers across ranks (module docstring); the
    authors' code takes negatives from one GPU's batch. ``return_parts``: also return (mean τ over the
    positive pairs, mean τ over all negative pairs) as detached tensors.
    """
    if normalizer not in AMCL_NORMALIZERS:
        raise ValueError(f"normalizer={normalizer!r}; allowed: {', '.join(AMCL_NORMALIZERS)}")
    if topk < 1:
        raise ValueError(f"topk={topk}; allowed: >= 1")
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
    self_col, pos_col = _pair_indices(n, m, offset, z1.device)
    self_idx = self_col.view(1, -1, 1).expand(C, -1, 1)
    pos_idx = pos_col.view(1, -1, 1).expand(C, -1, 1)
    if normalizer == "softmax":
        logits = (sim / tau - beta * amcl_omega(tau, d)).scatter(2, self_idx, float("-inf"))
        per_anchor = F.cross_entropy(logits.reshape(C * 2 * n, -1), pos_col.repeat(C), reduction="none")
        per_anchor = per_anchor.view(C, 2 * n)
    else:
        k = min(topk, 2 * m - 2)
        if k < 1:
            raise ValueError("AMCL's top-k normaliser needs at least one negative: 2 images in the global batch")
        excluded = sim.detach().scatter(2, self_idx, float("-inf")).scatter(2, pos_idx, float("-inf"))
        top = excluded.topk(k, dim=2).indices  # (C, 2n, K): the hardest negatives by similarity
        s_top, tau_top = sim.gather(2, top), tau.gather(2, top)
        s_pos, tau_pos = sim.gather(2, pos_idx)[..., 0], tau.gather(2, pos_idx)[..., 0]  # (C, 2n)
        per_anchor = (
            -s_pos / tau_pos
            + beta * amcl_omega(tau_pos, d)
            + (s_top / tau_top).mean(2)
            - beta * (tau_top.log() + tau_top.reciprocal()).sum(2)
        )
    loss = per_anchor.mean(1).sum()
    if not return_parts:
        return loss
    with torch.no_grad():
        pos_mask = torch.zeros_like(tau, dtype=torch.bool).scatter_(2, pos_idx, True)
        neg_mask = ~pos_mask
        neg_mask.scatter_(2, self_idx, False)
        return loss, tau[pos_mask].mean(), tau[neg_mask].mean()
