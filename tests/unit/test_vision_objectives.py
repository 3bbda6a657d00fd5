"""Vision objectives: hand-computed losses, their optima, masking, HPM's gradient routing, the model
contract, loss decrease on a tiny ViT, and the cross-rank gather on 2 gloo processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import objectives
import objectives.vision as V
from models.vit import ViTConfig
from objectives.vision import functional as VF
from objectives.vision.masked import masks_from_noise, num_visible

# a ViT small enough for 20 Adam steps per objective in well under a second each
TINY_VIT = ViTConfig(
    preset=None, image_size=16, patch_size=4, d_model=32, n_layers=1, n_heads=2,
    decoder_d_model=16, decoder_n_layers=1, decoder_n_heads=2,
).resolve()
SMALL_HEADS = {
    "simclr": dict(proj_hidden_dim=32, proj_dim=16),
    "amcl": dict(proj_hidden_dim=32, proj_dim=16, n_heads=2),
    "barlow_twins": dict(proj_hidden_dim=32, proj_dim=16),
    "mixed_barlow_twins": dict(proj_hidden_dim=32, proj_dim=16),
    "clip": dict(n_classes=4, embed_dim=16, text_d_model=16, text_n_layers=1, text_n_heads=2),
    "mae": {},
    "hpm": dict(total_steps=10),
}


def images(batch: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def make(name: str, **overrides):
    obj = objectives.get(name, **{**SMALL_HEADS[name], **overrides}).bind(TINY_VIT)
    torch.manual_seed(0)
    return obj, V.build_model(name, obj.params, TINY_VIT)


# ---------------------------------------------------------------------------------------------------
# Pure-Python references
# ---------------------------------------------------------------------------------------------------


def _norm(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def ref_nt_xent(z1, z2, tau):
    n = len(z1)
    u = [_norm(v) for v in z1 + z2]
    total = 0.0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        denom = sum(math.exp(_dot(u[i], u[k]) / tau) for k in range(2 * n) if k != i)
        total += -_dot(u[i], u[p]) / tau + math.log(denom)
    return total / (2 * n)


def ref_barlow(z1, z2, lambd, eps=1e-5):
    n, d = len(z1), len(z1[0])

    def std(z):
        cols = []
        for j in range(d):
            col = [row[j] for row in z]
            m = sum(col) / n
            var = sum((x - m) ** 2 for x in col) / n
            cols.append([(x - m) / math.sqrt(var + eps) for x in col])
        return cols  # cols[j][row]

    a, b = std(z1), std(z2)
    c = [[sum(a[i][r] * b[j][r] for r in range(n)) / n for j in range(d)] for i in range(d)]
    return sum((1 - c[i][i]) ** 2 for i in range(d)) + lambd * sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)


def ref_clip(img, txt, scale):
    n = len(img)
    a, b = [_norm(v) for v in img], [_norm(v) for v in txt]
    i2t = sum(-scale * _dot(a[i], b[i]) + math.log(sum(math.exp(scale * _dot(a[i], b[j])) for j in range(n))) for i in range(n))
    t2i = sum(-scale * _dot(b[i], a[i]) + math.log(sum(math.exp(scale * _dot(b[i], a[j])) for j in range(n))) for i in range(n))
    return 0.5 * (i2t + t2i) / n


# ---------------------------------------------------------------------------------------------------
# Losses: exact values and optima
# ---------------------------------------------------------------------------------------------------


def test_nt_xent_equals_the_hand_computed_value():
    z1 = [[1.0, 0.0], [0.0, 2.0]]
    z2 = [[1.0, 1.0], [1.0, -1.0]]
    got = VF.nt_xent(torch.tensor(z1), torch.tensor(z2), temperature=0.5).item()
    assert got == pytest.approx(ref_nt_xent(z1, z2, 0.5), rel=1e-6)


def test_nt_xent_optimum_is_identical_orthonormal_views():
    n, tau = 4, 0.2
    z = torch.eye(n)  # identical views, different images orthogonal
    closed_form = math.log(1 + (2 * n - 2) * math.exp(-1 / tau))
    assert VF.nt_xent(z, z, temperature=tau).item() == pytest.approx(closed_form, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        noisy = z + 0.3 * torch.randn(n, n, generator=g)
        assert VF.nt_xent(z, noisy, temperature=tau).item() > closed_form


def test_barlow_twins_equals_the_hand_computed_value_and_is_scale_invariant():
    z1 = [[1.0, 2.0, 0.5], [3.0, 1.0, -1.0], [2.0, 0.0, 1.0], [0.0, 1.5, 2.0]]
    z2 = [[0.5, 1.0, 1.0], [2.0, -1.0, 0.0], [1.0, 1.0, 3.0], [1.0, 0.0, 1.0]]
    a, b = torch.tensor(z1), torch.tensor(z2)
    got = VF.barlow_twins(a, b, lambd=5e-3).item()
    assert got == pytest.approx(ref_barlow(z1, z2, 5e-3), rel=1e-5)
    scaled = VF.barlow_twins(a * torch.tensor([3.0, 0.5, 10.0]) + 7.0, b * 4.0 - 2.0, lambd=5e-3).item()
    assert scaled == pytest.approx(got, rel=1e-4)


def test_barlow_twins_is_zero_for_identical_decorrelated_embeddings():
    # columns with zero mean, equal variance and orthogonal: the standardised cross-correlation is I
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    loss, on, off = VF.barlow_twins(z, z, lambd=5e-3, return_parts=True)
    assert loss.item() == pytest.approx(0.0, abs=1e-8)
    assert off.item() == pytest.approx(0.0, abs=1e-10)
    assert VF.barlow_twins(z, z[[1, 0, 3, 2]]).item() > 1.0  # mismatched rows: not an optimum


def test_clip_loss_equals_the_hand_computed_value():
    img = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    txt = [[1.0, 0.2], [0.5, 1.0], [-1.0, 1.0]]
    got = VF.clip_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(2.0)).item()
    assert got == pytest.approx(ref_clip(img, txt, 2.0), rel=1e-6)


def test_clip_loss_reaches_zero_for_matching_orthogonal_pairs_and_same_caption_positives():
    e = torch.eye(3)
    assert VF.clip_loss(e, e, 100.0).item() == pytest.approx(0.0, abs=1e-6)
    # two images of class 0 share a caption: with caption ids both count as positives
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = img.clone()
    ids = torch.tensor([0, 0, 1])
    with_ids = VF.clip_loss(img, txt, 100.0, caption_ids=ids).item()
    without = VF.clip_loss(img, txt, 100.0).item()
    assert with_ids == pytest.approx(math.log(2) * 2 / 3, rel=1e-4)  # uniform target over 2 identical logits
    assert without == pytest.approx(with_ids, rel=1e-4)  # the cross-entropy of a tie is log 2 either way
    # but the gradient differs: with ids the tie is the optimum
    x = img.clone().requires_grad_()
    VF.clip_loss(x, txt, 100.0, caption_ids=ids).backward()
    assert x.grad[:2].abs().max().item() < 1e-5


def test_mae_loss_counts_only_masked_patches():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 12, generator=g), torch.randn(2, 6, 12, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 1, 1]], dtype=torch.float32)
    plain = VF.mae_loss(pred, target, mask, norm_pix=False).item()
    hand = sum(((pred[b, i] - target[b, i]) ** 2).mean().item() for b in range(2) for i in range(6) if mask[b, i]) / 6
    assert plain == pytest.approx(hand, rel=1e-6)
    base = VF.mae_loss(pred, target, mask).item()
    changed = target.clone()
    changed[0, 0] += 5.0 * torch.randn(12, generator=g)  # a visible patch
    changed[1, 2] *= -3.0
    assert VF.mae_loss(pred, changed, mask).item() == base
    changed[0, 1] += 1.0  # a masked patch
    assert VF.mae_loss(pred, changed, mask).item() != base


def test_mae_norm_pix_target_is_per_patch_standardised():
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    t = target[0, 0]
    z = (t - t.mean()) / (t.var() + 1e-6).sqrt()
    assert VF.mae_patch_loss(z.view(1, 1, 4), target).item() == pytest.approx(0.0, abs=1e-10)


def test_hpm_relative_loss_on_a_tiny_case():
    pred = torch.tensor([[0.0, 1.0, 2.0]])
    target = torch.tensor([[3.0, 1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # only patches 0 and 1 are masked: pairs (0,1), (1,0)
    assert VF.hpm_relative_loss(pred, target, mask).item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    # a predictor that ranks like the target has a lower loss than one that ranks the other way
    good = VF.hpm_relative_loss(10 * target, target, torch.ones(1, 3)).item()
    bad = VF.hpm_relative_loss(-10 * target, target, torch.ones(1, 3)).item()
    assert good < 1e-3 < 5 < bad


def test_amcl_reduces_to_heads_times_nt_xent_with_a_constant_temperature():
    g = torch.Generator().manual_seed(0)
    C, n, d = 3, 5, 4
    z1, z2 = torch.randn(C, n, d, generator=g), torch.randn(C, n, d, generator=g)
    zeros = torch.zeros(C, n, 2)  # φ = 0 -> τ = τ_min + (τ_max − τ_min)/2 everywhere
    loss = VF.amcl_nt_xent(z1, z2, zeros, zeros, tau_min=0.1, tau_max=0.5, beta=0.0, normalizer="softmax")
    expect = sum(VF.nt_xent(z1[c], z2[c], temperature=0.3) for c in range(C))
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)


def test_amcl_regulariser_is_minimal_at_the_gaussian_variance():
    d, s = 16, 0.6  # pair similarity s: the likelihood −s/τ + Ω(τ) is minimal at τ* = 2(1 − s)/d
    taus = torch.linspace(0.01, 0.2, 2000)
    nll = -s / taus + VF.amcl_omega(taus, d)
    assert taus[nll.argmin()].item() == pytest.approx(2 * (1 - s) / d, rel=1e-2)


def test_mixed_barlow_regulariser_vanishes_for_an_unmixed_copy():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    ident = torch.arange(8)
    assert VF.mixed_barlow_regularizer(z1, z2, z1, alpha=1.0, perm=ident).item() == pytest.approx(0.0, abs=1e-10)
    perm = torch.randperm(8, generator=g)
    assert VF.mixed_barlow_regularizer(z1, z2, z2[perm], alpha=0.0, perm=perm).item() == pytest.approx(0.0, abs=1e-10)
    assert VF.mixed_barlow_regularizer(z1, z2, z1, alpha=0.3, perm=perm).item() > 0.1


# ---------------------------------------------------------------------------------------------------
# Masking and preparation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25])
def test_mae_masks_exactly_the_ratio_and_keeps_what_it_says(ratio):
    obj, _ = make("mae", mask_ratio=ratio)
    b = obj.prepare({"images": images(), "labels": torch.zeros(8, dtype=torch.long)}, torch.Generator().manual_seed(1))
    L = TINY_VIT.num_patches
    assert (b["mask"].sum(1) == L * ratio).all()
    kept = torch.zeros_like(b["mask"]).scatter(1, b["ids_keep"], 1.0)
    assert torch.equal(kept, 1 - b["mask"])  # ids_keep are exactly the unmasked patches
    assert len({tuple(r.tolist()) for r in b["mask"]}) > 1  # different masks per image


def test_prepare_is_deterministic_per_seed_and_without_generator():
    obj, _ = make("mae")
    batch = {"images": images(), "labels": torch.zeros(8, dtype=torch.long)}
    a = obj.prepare(batch, torch.Generator().manual_seed(3))
    b = obj.prepare(batch, torch.Generator().manual_seed(3))
    c = obj.prepare(batch, torch.Generator().manual_seed(4))
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["images"], b["images"])
    assert not torch.equal(a["mask"], c["mask"])
    assert torch.equal(obj.prepare(batch, None)["mask"], obj.prepare(batch, None)["mask"])


def test_mask_helpers():
    assert num_visible(64, 0.75) == 16
    with pytest.raises(ValueError, match="visible"):
        num_visible(4, 0.99)
    ids_keep, ids_restore, mask = masks_from_noise(torch.tensor([[0.9, 0.1, 0.5, 0.3]]), 2)
    assert ids_keep.tolist() == [[1, 3]] and mask.tolist() == [[1, 0, 1, 0]]
    assert ids_restore.tolist() == [[3, 0, 2, 1]]


def test_unbound_masking_objective_says_how_to_fix_it():
    obj = objectives.get("mae")
    with pytest.raises(RuntimeError, match="bind"):
        obj.prepare({"images": images()}, None)


def test_hpm_masks_the_hardest_predicted_patches():
    obj, _ = make("hpm", mask_ratio=0.5)
    L = TINY_VIT.num_patches
    scores = torch.arange(L, dtype=torch.float32).repeat(2, 1)  # patch L−1 is predicted hardest
    noise = torch.rand(2, L, generator=torch.Generator().manual_seed(0))
    _, _, full = obj.hard_masks(scores, noise, 1.0)
    assert full[:, L // 2 :].eq(1).all() and full[:, : L // 2].eq(0).all()
    _, _, half = obj.hard_masks(scores, noise, 0.5)
    assert half[:, L - 4 :].eq(1).all() and (half.sum(1) == L // 2).all()  # 4 = round(0.5 · 8) hard ones
    _, _, rand = obj.hard_masks(scores, noise, 0.0)
    assert torch.equal(rand, masks_from_noise(noise, L // 2)[2])
    assert [obj.hard_ratio(t) for t in (0, 5, 10, 50)] == [0.0, 0.25, 0.5, 0.5]


def test_hpm_predictor_gets_gradients_only_from_its_own_loss():
    obj, model = make("hpm")
    batch = obj.prepare({"images": images(), "labels": torch.zeros(8, dtype=torch.long)}, torch.Generator().manual_seed(0))
    terms = obj.loss_terms(model, batch)
    terms["recon"].backward()
    assert all(p.grad is None for p in model.loss_predictor.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    model.zero_grad(set_to_none=True)
    terms = obj.loss_terms(model, batch)
    terms["rank"].backward()
    assert all(p.grad is None for p in model.decoder.parameters())  # targets are detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.loss_predictor.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_hpm_counts_training_steps_unless_set():
    obj, model = make("hpm")
    batch = obj.prepare({"images": images()}, None)
    obj.loss(model, batch)
    obj.loss(model, batch)
    assert obj.step == 2
    model.eval()
    obj.loss(model, batch)
    assert obj.step == 2
    obj.set_step(7)
    model.train()
    _, metrics = obj.loss(model, batch)
    assert obj.step == 7 and metrics["hard_ratio"].item() == pytest.approx(0.35)


def test_clip_captions_tokens_and_capped_scale():
    obj, model = make("clip", logit_scale_max=100.0)
    assert obj.captions()[2] == "a fractal of family 2"
    ids = obj.caption_ids
    assert ids.shape == (4, 5) and len({tuple(r.tolist()) for r in ids}) == 4 and (ids > 0).all()
    names = objectives.get("clip", n_classes=2, class_names=["zero", "one"], caption_template="a photo of the digit {label}")
    assert names.captions() == ["a photo of the digit zero", "a photo of the digit one"]
    b = obj.prepare({"images": images(), "labels": torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])}, None)
    assert torch.equal(b["text_ids"][4], ids[0])
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(math.log(1000.0))
    assert model("logit_scale").item() == pytest.approx(100.0)
    assert model.logit_scale.log_scale.exp().item() > 100  # the parameter is not clipped in place
    assert objectives.get("clip").params.logit_scale_init == pytest.approx(1 / 0.07)
    with pytest.raises(ValueError, match="n_classes"):
        obj.prepare({"images": images(), "labels": torch.full((8,), 4)}, None)
    z = obj.class_text_embeddings(model)
    assert z.shape == (4, 16) and torch.allclose(z.norm(dim=1), torch.ones(4))


# ---------------------------------------------------------------------------------------------------
# The model contract and training
# ---------------------------------------------------------------------------------------------------


def test_build_model_parts_and_errors():
    expect = {
        "mae": ["encoder", "decoder"], "hpm": ["encoder", "decoder", "loss_predictor", "teacher"],
        "simclr": ["encoder", "projector"], "amcl": ["encoder", "projectors", "temperature"],
        "barlow_twins": ["encoder", "projector"], "mixed_barlow_twins": ["encoder", "projector"],
        "clip": ["encoder", "image_proj", "text_encoder", "logit_scale"],
    }
    for name, parts in expect.items():
        assert make(name)[1].part_names == parts
    model = make("mae")[1]
    with pytest.raises(ValueError, match="no part 'projector'"):
        model("projector", torch.zeros(1))
    with pytest.raises(ValueError, match="not a vision objective"):
        V.build_model("causal_lm", {}, TINY_VIT)
    with pytest.raises(ValueError, match="mask_ratio"):
        V.build_model("mae", {"mask_ratio": 1.5}, TINY_VIT)


def test_vision_objectives_are_the_registered_vision_objective_classes():
    assert set(V.VISION_OBJECTIVES) == {"mae", "hpm", "simclr", "amcl", "barlow_twins", "mixed_barlow_twins", "clip"}
    assert V.VISION_OBJECTIVES == tuple(n for n in objectives.available() if n in V.VISION_OBJECTIVES)
    assert "causal_lm" in objectives.available() and "causal_lm" not in V.VISION_OBJECTIVES


@pytest.mark.parametrize("name", V.VISION_OBJECTIVES)
def test_loss_decreases_over_20_adam_steps_with_stable_metric_keys(name):
    torch.set_num_threads(1)
    obj, model = make(name)
    labels = torch.arange(8) % 4
    batch = obj.prepare({"images": images(), "labels": labels}, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, keys = [], None
    for _ in range(20):
        loss, metrics = obj.loss(model, batch)
        assert keys is None or set(metrics) == keys
        keys = set(metrics)
        assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses
    emb = obj.embed(model, images())
    assert emb.shape == (8, TINY_VIT.d_model) and emb.dtype == torch.float32 and model.training


# ---------------------------------------------------------------------------------------------------
# Cross-rank gather: 2 gloo processes vs the single-process loss on the concatenated batch
# ---------------------------------------------------------------------------------------------------


def _losses(inputs: dict[str, torch.Tensor], sl: slice) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Each loss on the rows ``sl`` of ``inputs`` (dim 0, dim 1 for the head-major AMCL tensors), with the
    gradient of that loss w.r.t. those rows."""
    out = {}
    x = {k: v[:, sl] if k.startswith("amcl") else v[sl] for k, v in inputs.items()}
    x = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in x.items()}
    specs = {
        "nt_xent": (lambda: VF.nt_xent(x["z1"], x["z2"], temperature=0.3), ("z1", "z2")),
        "clip": (lambda: VF.clip_loss(x["z1"], x["z2"], torch.tensor(5.0), caption_ids=x["ids"]), ("z1", "z2")),
        "amcl": (
            lambda: VF.amcl_nt_xent(x["amcl_z1"], x["amcl_z2"], x["amcl_p1"], x["amcl_p2"], tau_min=0.1, tau_max=0.6, beta=0.01),
            ("amcl_z1", "amcl_z2", "amcl_p1"),
        ),
    }
    for name, (fn, wrt) in specs.items():
        loss = fn()
        grads = torch.autograd.grad(loss, [x[k] for k in wrt])
        out[name] = (loss.detach(), dict(zip(wrt, grads, strict=True)))
    return out


def _gather_worker(rank: int, world: int, init_file: str, inputs: dict, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = inputs["z1"].shape[0] // world
        torch.save(_losses(inputs, slice(rank * n, (rank + 1) * n)), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gathered_losses_on_2_gloo_ranks_equal_the_single_process_loss(tmp_path):
    g = torch.Generator().manual_seed(0)
    N, C = 6, 2
    inputs = {
        "z1": torch.randn(N, 5, generator=g), "z2": torch.randn(N, 5, generator=g),
        "ids": torch.tensor([0, 1, 0, 2, 1, 1]),
        "amcl_z1": torch.randn(C, N, 4, generator=g), "amcl_z2": torch.randn(C, N, 4, generator=g),
        "amcl_p1": torch.randn(C, N, 3, generator=g), "amcl_p2": torch.randn(C, N, 3, generator=g),
    }
    full = _losses(inputs, slice(0, N))
    out = str(tmp_path / "rank")
    # fork: the children need not re-import torch (seconds each on a busy machine); like DataLoader workers
    # they run single-threaded, which keeps forking after the parent used torch safe
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "pg"), inputs, out), nprocs=2, join=True, start_method=method)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for name, (loss, grads) in full.items():
        mean = sum(r[name][0] for r in ranks) / 2
        assert mean.item() == pytest.approx(loss.item(), rel=1e-5), name
        for key, g_full in grads.items():
            # each rank's rows get the gradient of the SUM of the ranks' losses = 2 × d(full loss)
            dim = 1 if key.startswith("amcl") else 0
            got = torch.cat([r[name][1][key] for r in ranks], dim=dim)
            torch.testing.assert_close(got, 2 * g_full, rtol=1e-4, atol=1e-6, msg=f"{name} d/d{key}")
