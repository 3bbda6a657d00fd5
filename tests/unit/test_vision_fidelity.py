"""Fidelity of the vision objectives to their papers and the authors' code, against numbers computed here
independently of the implementation:

- HPM (Wang et al., arXiv 2304.05919): the EMA teacher's parameters after N updates equal the closed-form
  momentum mix, the momentum schedules, masks chosen from the teacher's predictions (not the online
  model's), the run-long easy-to-hard ramp, the predictor as deep as the decoder;
- Barlow Twins (Zbontar et al., arXiv 2103.03230) and Mixed Barlow Twins (Bandara et al., arXiv 2312.02151):
  the cross-correlation over the global batch: 2 gloo ranks give the single-process loss and gradients;
  the mixup regulariser against a pure-Python reference; the authors' defaults;
- AMCL (Wang et al., arXiv 2310.05615): the top-k normaliser of the authors' code on a hand-computed example
  and against a pure-Python reference, on one process and split over 2 gloo ranks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import objectives
import objectives.vision as V
from models.vit import ViTConfig
from objectives.vision import functional as VF
from objectives.vision.masked import HPM, ema_update_, teacher_momentum

VIT = ViTConfig(
    preset=None, image_size=16, patch_size=4, d_model=32, n_layers=1, n_heads=2,
    decoder_d_model=16, decoder_n_layers=2, decoder_n_heads=2,
).resolve()


def images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def make_hpm(**params) -> tuple[HPM, nn.Module]:
    obj = objectives.get("hpm", **{"total_steps": 10, **params}).bind(VIT)
    torch.manual_seed(0)
    return obj, V.build_model("hpm", obj.params, VIT)


class Engine(nn.Module):
    """Stands for a DeepSpeed engine: the model is ``.module`` and calls are forwarded to it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# HPM: the EMA teacher
# ---------------------------------------------------------------------------------------------------


def test_teacher_momentum_schedules():
    start, end, T = 0.999, 0.9999, 100
    linear = [teacher_momentum(t, T, start, end, "linear") for t in (0, 25, 50, 100, 150)]
    assert linear == pytest.approx([0.999, 0.999225, 0.99945, 0.9999, 0.9999], abs=1e-12)
    cosine = [teacher_momentum(t, T, start, end, "cosine") for t in (0, 25, 50, 100)]
    quarter = 0.9999 - 0.0009 * (math.cos(math.pi / 4) + 1) / 2
    assert cosine == pytest.approx([0.999, quarter, 0.99945, 0.9999], abs=1e-12)
    obj, _ = make_hpm(total_steps=200)
    assert obj.momentum(0) == pytest.approx(0.999) and obj.momentum(100) == pytest.approx(0.99945)
    assert obj.momentum(400) == pytest.approx(0.9999)


def _closed_form(t0: torch.Tensor, online: list[torch.Tensor], momenta: list[float]) -> torch.Tensor:
    """θ_N = Π_k m_k · θ_0 + Σ_k (1 − m_k) Π_{j>k} m_j · θ_s^k, in float64."""
    out = math.prod(momenta) * t0.double()
    for k, (m, s) in enumerate(zip(momenta, online, strict=True)):
        out = out + (1 - m) * math.prod(momenta[k + 1 :]) * s.double()
    return out


def test_ema_update_equals_the_closed_form_on_a_toy_module():
    g = torch.Generator().manual_seed(0)
    teacher, online = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    momenta = [0.5, 0.7, 0.9, 0.95]
    snaps = []
    for m in momenta:
        with torch.no_grad():  # an optimizer step of the online module
            for p in online.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        snaps.append([p.detach().clone() for p in online.parameters()])
        ema_update_(list(teacher.parameters()), list(online.parameters()), m)
    for i, p in enumerate(teacher.parameters()):
        expect = _closed_form(t0[i], [s[i] for s in snaps], momenta)
        torch.testing.assert_close(p.detach().double(), expect, rtol=1e-6, atol=1e-6)
    # a bf16 online module updates a float32 teacher in float32
    tf = torch.zeros(4)
    ema_update_([tf], [torch.ones(4, dtype=torch.bfloat16)], 0.9999)
    assert tf.dtype == torch.float32 and tf[0].item() == pytest.approx(1e-4, rel=1e-3)


def _teacher_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for part in ("encoder", "loss_predictor") for p in getattr(model.teacher, part).parameters()]


def _online_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for part in ("encoder", "loss_predictor") for p in getattr(model, part).parameters()]


def test_hpm_teacher_after_n_steps_equals_the_closed_form_through_set_step():
    N = 4
    obj, model = make_hpm(total_steps=N, momentum_start=0.5, momentum_end=0.9)
    engine = Engine(model)
    batch = obj.prepare({"images": images()}, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    obj.set_step(0)  # the loop calls set_step before each step; nothing trained yet: no update
    t0, snaps = None, []
    for k in range(N):
        obj.loss(engine, batch)
        if k == 0:  # the first loss synced the teacher with the online parts
            t0 = [p.detach().clone() for p in _teacher_params(model)]
            assert all(torch.equal(a, b) for a, b in zip(t0, _online_params(model), strict=True))
        with torch.no_grad():  # optimizer step k
            for p in _online_params(model):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        snaps.append([p.detach().clone() for p in _online_params(model)])
        obj.set_step(k + 1)  # the teacher update for step k, momentum m_k = 0.5 + 0.4·k/N
    momenta = [0.5 + 0.4 * k / N for k in range(N)]
    for i, p in enumerate(_teacher_params(model)):
        expect = _closed_form(t0[i], [s[i] for s in snaps], momenta)
        torch.testing.assert_close(p.detach().double(), expect, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in _teacher_params(model)]
    obj.set_step(N + 1)  # no training loss since the last update: no update
    assert all(torch.equal(a, b) for a, b in zip(before, _teacher_params(model), strict=True))
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert not model.teacher.training and model.training


def _online_masks(obj: HPM, model: nn.Module, batch: dict, alpha: float) -> torch.Tensor:
    with torch.no_grad():
        L = VIT.num_patches
        identity = torch.arange(L).expand(batch["images"].shape[0], L)
        scores = model.loss_predictor(model.encoder(batch["images"]), identity)[..., 0]
    return obj.hard_masks(scores, batch["noise"], alpha)[2]


def test_hpm_masks_come_from_the_teacher_until_the_ema_update():
    obj, model = make_hpm(hard_ratio_end=1.0, momentum_start=0.0, momentum_end=0.0)  # m = 0: teacher := online
    batch = obj.prepare({"images": images(8)}, torch.Generator().manual_seed(0))
    obj.set_step(10)  # α = 1: every masked patch is a predicted-hard one
    model.eval()
    first = obj.loss_terms(model, batch)["mask"]
    with torch.no_grad():  # the online predictor changes (an optimizer step) ...
        model.loss_predictor.head.weight.mul_(-50.0).add_(1.0)
    online = _online_masks(obj, model, batch, 1.0)
    assert not torch.equal(online, first)  # ... and would now choose other patches
    assert torch.equal(obj.loss_terms(model, batch)["mask"], first)  # the teacher's choice is unchanged
    model.train()
    obj.loss(model, batch)  # a training step ...
    obj.set_step(11)  # ... then the EMA update with m = 0 copies the online parts
    model.eval()
    assert torch.equal(obj.loss_terms(model, batch)["mask"], online)


def test_hpm_teacher_syncs_on_first_use_and_keeps_a_restored_one():
    obj, model = make_hpm()
    batch = obj.prepare({"images": images()}, None)
    with torch.no_grad():  # the encoder loaded from elsewhere (encoder-only init) after the model was built
        for p in model.encoder.parameters():
            p.add_(1.0)
    obj.loss(model, batch)
    assert model.teacher.synced.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(_teacher_params(model), _online_params(model), strict=True))
    # a teacher restored from a checkpoint (synced = 1) is kept as it is
    obj2, model2 = make_hpm()
    state = model.state_dict()
    with torch.no_grad():
        state["teacher.encoder.norm.weight"] = state["teacher.encoder.norm.weight"] * 3.0
    model2.load_state_dict(state)
    obj2.loss(model2, batch)
    torch.testing.assert_close(model2.teacher.encoder.norm.weight, model.encoder.norm.weight * 3.0)


def test_hpm_defaults_ramp_over_the_run_and_predictor_as_deep_as_the_decoder():
    obj, model = make_hpm(total_steps=200)
    assert [obj.hard_ratio(t) for t in (0, 100, 200, 300)] == pytest.approx([0.0, 0.25, 0.5, 0.5])
    assert len(model.loss_predictor.blocks) == VIT.decoder_n_layers == 2
    assert len(make_hpm(predictor_layers=1)[1].loss_predictor.blocks) == 1
    short, _ = make_hpm(total_steps=200, ramp_steps=50)
    assert short.hard_ratio(25) == pytest.approx(0.25) and short.momentum(100) == pytest.approx(0.99945)
    unset = objectives.get("hpm")
    with pytest.raises(ValueError, match="total_steps"):
        unset.check_data({})
    with pytest.raises(ValueError, match="total_steps"):
        unset.hard_ratio(1)
    p = objectives.get("hpm").params
    assert (p.momentum_start, p.momentum_end, p.momentum_schedule) == (0.999, 0.9999, "linear")


# ---------------------------------------------------------------------------------------------------
# Barlow Twins and Mixed Barlow Twins
# ---------------------------------------------------------------------------------------------------


def _std_cols(z: list[list[float]], eps: float = 1e-5) -> list[list[float]]:
    """Columns of z standardised with the biased batch variance: cols[j][row]."""
    n, d = len(z), len(z[0])
    cols = []
    for j in range(d):
        col = [row[j] for row in z]
        m = sum(col) / n
        var = sum((x - m) ** 2 for x in col) / n
        cols.append([(x - m) / math.sqrt(var + eps) for x in col])
    return cols


def ref_mixed_regularizer(z1, z2, zm, alpha, perm):
    """Σ_k ‖C(zm, zk) − α·C(z1, zk) − (1 − α)·C(z2[perm], zk)‖²_F, k = 1, 2 (the authors' form)."""
    n, d = len(z1), len(z1[0])
    a1, a2, am = _std_cols(z1), _std_cols(z2), _std_cols(zm)
    a2p = [[col[perm[r]] for r in range(n)] for col in a2]

    def c(a, b, i, j):
        return sum(a[i][r] * b[j][r] for r in range(n)) / n

    total = 0.0
    for ak in (a1, a2):
        for i in range(d):
            for j in range(d):
                gt = alpha * c(a1, ak, i, j) + (1 - alpha) * c(a2p, ak, i, j)
                total += (c(am, ak, i, j) - gt) ** 2
    return total


def test_mixed_barlow_regularizer_equals_the_reference():
    g = torch.Generator().manual_seed(0)
    z1, z2, zm = (torch.randn(6, 3, generator=g) for _ in range(3))
    perm = torch.randperm(6, generator=g)
    got = VF.mixed_barlow_regularizer(z1, z2, zm, alpha=0.3, perm=perm).item()
    ref = ref_mixed_regularizer(z1.tolist(), z2.tolist(), zm.tolist(), 0.3, perm.tolist())
    assert got == pytest.approx(ref, rel=1e-5)


def test_global_standardize_without_a_process_group_is_the_local_batch_norm():
    z = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    (a,), total = VF.global_standardize(z)
    torch.testing.assert_close(a, VF.batch_standardize(z))
    assert total.item() == 7


def test_mixed_barlow_twins_defaults_are_the_authors():
    obj = objectives.get("mixed_barlow_twins", proj_dim=256)
    assert obj.params.mix_scale == 4.0 and obj.lambd == pytest.approx(1 / 256)
    assert objectives.get("mixed_barlow_twins", lambd=5e-3).lambd == 5e-3
    assert objectives.get("barlow_twins").lambd == 5e-3


# ---------------------------------------------------------------------------------------------------
# AMCL: the top-k normaliser
# ---------------------------------------------------------------------------------------------------


def test_amcl_topk_on_a_hand_computed_example():
    # one head, two images, d' = 2; φ = 0 gives τ = (0.1 + 0.5)/2 = 0.3 for every pair.
    # rows a0 = (1, 0), a1 = (0, 1) (view 1), b0 = (0.6, 0.8), b1 = (0.8, −0.6) (view 2); positives (a_i, b_i).
    # Similarities: s(a0,b0) = 0.6, s(a1,b1) = −0.6; negatives of each anchor: {0, 0.8}.
    z1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    z2 = torch.tensor([[[0.6, 0.8], [0.8, -0.6]]])
    phi = torch.zeros(1, 2, 3)
    kw = dict(tau_min=0.1, tau_max=0.5, beta=0.1, normalizer="topk")
    # K = 1: the hardest negative (s = 0.8) for every anchor; with d' = 2, Ω(τ) = log τ + 1/τ, so the
    # positive's +βΩ(τ) and the negative's −β(log τ + 1/τ) cancel: mean_a (−s_pos + 0.8)/τ = 0.8/0.3
    one = VF.amcl_nt_xent(z1, z2, phi, phi, topk=1, **kw).item()
    assert one == pytest.approx(0.8 / 0.3, rel=1e-6)
    # K = 2: both negatives, mean s = 0.4; the positives' s average to 0; regulariser βΩ(τ) − 2β(log τ + 1/τ)
    two = VF.amcl_nt_xent(z1, z2, phi, phi, topk=2, **kw).item()
    assert two == pytest.approx(0.4 / 0.3 - 0.1 * (math.log(0.3) + 1 / 0.3), rel=1e-6)
    # K beyond the 2M − 2 = 2 negatives uses them all
    assert VF.amcl_nt_xent(z1, z2, phi, phi, topk=100, **kw).item() == pytest.approx(two, rel=1e-6)


def _ref_amcl_head(u, ph, tau_min, tau_max, beta, k):
    """One head of the authors' top-k AMCL loss: u the 2N unit rows (view 1 then view 2), ph their φ."""
    n2, d = len(u), len(u[0])

    def tau(a, b):
        score = sum(x * y for x, y in zip(ph[a], ph[b], strict=True))
        return tau_min + (tau_max - tau_min) / (1 + math.exp(score))

    def sim(a, b):
        return sum(x * y for x, y in zip(u[a], u[b], strict=True))

    head = 0.0
    for a in range(n2):
        p = (a + n2 // 2) % n2
        negs = sorted((j for j in range(n2) if j not in (a, p)), key=lambda j: -sim(a, j))[:k]
        tp = tau(a, p)
        head += -sim(a, p) / tp + beta * (0.5 * d * math.log(tp) + 1 / tp)
        head += sum(sim(a, j) / tau(a, j) for j in negs) / len(negs)
        head -= beta * sum(math.log(tau(a, j)) + 1 / tau(a, j) for j in negs)
    return head / n2


def ref_amcl_topk(z1, z2, p1, p2, tau_min, tau_max, beta, k):
    """The authors' top-k AMCL loss in plain Python: per head, mean over the 2N anchors of
    −s_p/τ_p + βΩ(τ_p) + mean_{top-k by s} s/τ − β Σ_{top-k} (log τ + 1/τ); summed over heads."""
    total = 0.0
    for c in range(len(z1)):
        u = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in z1[c] + z2[c]]
        total += _ref_amcl_head(u, p1[c] + p2[c], tau_min, tau_max, beta, k)
    return total


def test_amcl_topk_equals_the_reference_and_is_the_objective_default():
    g = torch.Generator().manual_seed(0)
    C, n, d = 2, 4, 3
    z1, z2 = torch.randn(C, n, d, generator=g), torch.randn(C, n, d, generator=g)
    p1, p2 = torch.randn(C, n, 5, generator=g), torch.randn(C, n, 5, generator=g)
    got = VF.amcl_nt_xent(z1, z2, p1, p2, tau_min=0.05, tau_max=1.5, beta=0.01, topk=3).item()
    ref = ref_amcl_topk(z1.tolist(), z2.tolist(), p1.tolist(), p2.tolist(), 0.05, 1.5, 0.01, 3)
    assert got == pytest.approx(ref, rel=1e-5)
    p = objectives.get("amcl").params
    assert (p.normalizer, p.topk, p.tau_min, p.tau_max) == ("topk", 100, 1e-5, 2.0)
    with pytest.raises(ValueError, match="normalizer"):
        VF.amcl_nt_xent(z1, z2, p1, p2, tau_min=0.1, tau_max=1.0, beta=0.0, normalizer="exact")


# ---------------------------------------------------------------------------------------------------
# 2 gloo ranks vs one process on the concatenated batch
# ---------------------------------------------------------------------------------------------------


def _rank_terms(inputs: dict[str, torch.Tensor], rows: slice) -> dict[str, tuple]:
    """On the rows ``rows`` of the global batch: Barlow Twins + Mixed Barlow Twins' regulariser of a shared
    linear map of the inputs (loss, d/d inputs, d/d weight), and AMCL top-k (loss, d/d embeddings)."""
    out = {}
    w = inputs["w"].clone().requires_grad_()
    x = {k: inputs[k][rows].clone().requires_grad_() for k in ("x1", "x2", "xm")}
    perm = inputs["perm"][rows] - rows.start  # each rank permutes its own rows
    z1, z2, zm = x["x1"] @ w, x["x2"] @ w, x["xm"] @ w
    bt = VF.barlow_twins(z1, z2, lambd=0.01)
    mix = VF.mixed_barlow_regularizer(z1, z2, zm, alpha=inputs["alpha"], perm=perm)
    loss = bt + 0.04 * mix
    grads = torch.autograd.grad(loss, [x["x1"], x["x2"], x["xm"], w])
    out["barlow"] = (loss.detach(), torch.cat(grads[:3], dim=1), grads[3])
    a = {k: inputs[k][:, rows].clone().requires_grad_() for k in ("a1", "a2", "ap1", "ap2")}
    amcl = VF.amcl_nt_xent(a["a1"], a["a2"], a["ap1"], a["ap2"], tau_min=0.05, tau_max=1.5, beta=0.01, topk=3)
    ga = torch.autograd.grad(amcl, [a["a1"], a["a2"], a["ap1"]])
    out["amcl"] = (amcl.detach(), torch.cat(ga, dim=2), None)
    return out


def _worker(rank: int, world: int, init_file: str, inputs: dict, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = inputs["x1"].shape[0] // world
        torch.save(_rank_terms(inputs, slice(rank * n, (rank + 1) * n)), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_barlow_twins_and_amcl_on_2_gloo_ranks_equal_the_single_process_loss(tmp_path):
    g = torch.Generator().manual_seed(0)
    N, D_in, D, C = 8, 6, 4, 2
    half = N // 2
    local = [torch.randperm(half, generator=g) for _ in range(2)]
    inputs = {
        "x1": torch.randn(N, D_in, generator=g), "x2": torch.randn(N, D_in, generator=g),
        "xm": torch.randn(N, D_in, generator=g), "w": torch.randn(D_in, D, generator=g),
        "alpha": torch.tensor([0.3]),
        "perm": torch.cat([local[0], local[1] + half]),  # within each rank's rows, as prepare draws it
        "a1": torch.randn(C, N, 3, generator=g), "a2": torch.randn(C, N, 3, generator=g),
        "ap1": torch.randn(C, N, 5, generator=g), "ap2": torch.randn(C, N, 5, generator=g),
    }
    full = _rank_terms(inputs, slice(0, N))
    out = str(tmp_path / "rank")
    # fork: the children need not re-import torch (seconds each on a busy machine); single-threaded children
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(2, str(tmp_path / "pg"), inputs, out), nprocs=2, join=True, start_method=method)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]

    loss, dx, dw = full["barlow"]
    for r in ranks:  # every rank computes the loss of the whole global batch
        assert abs(r["barlow"][0].item() - loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
    # each rank's rows get the gradient of the sum of the 2 ranks' (equal) losses: 2 × d(full loss) ...
    torch.testing.assert_close(torch.cat([r["barlow"][1] for r in ranks]), 2 * dx, rtol=1e-4, atol=1e-6)
    # ... so the data-parallel mean of the parameter gradients (DDP, DeepSpeed) is the single-process gradient
    torch.testing.assert_close((ranks[0]["barlow"][2] + ranks[1]["barlow"][2]) / 2, dw, rtol=1e-4, atol=1e-6)

    loss, da, _ = full["amcl"]
    mean = sum(r["amcl"][0] for r in ranks) / 2  # AMCL: local anchors, so the mean of the ranks' losses
    assert mean.item() == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([r["amcl"][1] for r in ranks], dim=1), 2 * da, rtol=1e-4, atol=1e-6)
