"""Exact values and defining properties of the loss functions in ``objectives.functional``."""

from __future__ import annotations

import math

import pytest
import torch

from objectives import functional as F


def _lse(row: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in row))


LOGITS = [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 2.0]]]  # (1, 3, 3)
TARGETS = [[2, 0, -100]]


def test_z_loss_is_mean_log_z_squared_on_a_fixed_case():
    logits = torch.tensor(LOGITS)
    expect = sum(_lse(r) ** 2 for r in LOGITS[0]) / 3
    assert F.z_loss(logits).item() == pytest.approx(expect, rel=1e-6)
    mask = torch.tensor([[True, True, False]])
    assert F.z_loss(logits, mask).item() == pytest.approx((_lse(LOGITS[0][0]) ** 2 + math.log(3) ** 2) / 2, rel=1e-6)


def test_causal_lm_adds_z_times_mean_log_z_squared_over_positions_with_a_target():
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    rows = LOGITS[0]
    ce = ((_lse(rows[0]) - rows[0][2]) + (_lse(rows[1]) - rows[1][0])) / 2
    zterm = (_lse(rows[0]) ** 2 + _lse(rows[1]) ** 2) / 2
    loss, ce_t, zl = F.causal_lm(logits, targets, z_loss=1e-2, return_parts=True)
    assert ce_t.item() == pytest.approx(ce, rel=1e-6)
    assert zl.item() == pytest.approx(zterm, rel=1e-6)
    assert loss.item() == pytest.approx(ce + 1e-2 * zterm, rel=1e-6)
    assert F.causal_lm(logits, targets).item() == pytest.approx(ce, rel=1e-6)  # no z term by default
    assert (F.causal_lm(logits, targets, z_loss=1e-2) - F.causal_lm(logits, targets)).item() == pytest.approx(
        1e-2 * zterm, rel=1e-5
    )


@pytest.mark.parametrize("offset", [4.0, -6.0])
def test_z_loss_gradient_pushes_log_z_toward_zero(offset):
    logits = (torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) + offset).requires_grad_()
    log_z0 = torch.logsumexp(logits, -1).detach()
    assert bool((log_z0.sign() == math.copysign(1, offset)).all())
    F.z_loss(logits).backward()
    # d/do mean(log²Z) = 2 log Z softmax(o) / N
    torch.testing.assert_close(logits.grad, 2 * log_z0[:, None] * torch.softmax(logits.detach(), -1) / 5)
    stepped = logits.detach() - 0.5 * logits.grad
    log_z1 = torch.logsumexp(stepped, -1)
    assert bool((log_z1.abs() < log_z0.abs()).all())


def test_cross_entropy_without_any_target_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = F.cross_entropy(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and not torch.isnan(logits.grad).any()


def test_focal_with_gamma_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g)
    torch.testing.assert_close(F.focal(logits, targets, gamma=0.0), torch.nn.functional.cross_entropy(logits, targets))


def test_focal_hand_computed_and_downweights_easy_examples():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1])
    p_easy = math.exp(2) / (math.exp(2) + 2)
    p_hard = 1 / 3
    expect = (-((1 - p_easy) ** 2) * math.log(p_easy) - ((1 - p_hard) ** 2) * math.log(p_hard)) / 2
    assert F.focal(logits, targets, gamma=2.0).item() == pytest.approx(expect, rel=1e-6)
    per_ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    per_focal = torch.stack([F.focal(logits[i : i + 1], targets[i : i + 1]) for i in range(2)])
    ratio = per_focal / per_ce
    assert ratio[0] < ratio[1] < 1.0  # the confident example is down-weighted more
    assert F.focal(torch.tensor([[1.0, 2.0]]), torch.tensor([-100])).item() == 0.0  # ignore_index
    with pytest.raises(ValueError, match="gamma"):
        F.focal(logits, targets, gamma=-1.0)


def test_spherical_z_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    # mean 2, population std sqrt(2/3): z of class 2 is sqrt(3/2)
    z_c = 1.0 / math.sqrt(2 / 3)
    a, b = 0.5, 2.0
    expect = math.log1p(math.exp(a * (b - z_c))) / a
    assert F.spherical_z(logits, torch.tensor([2]), a=a, b=b).item() == pytest.approx(expect, rel=1e-6)


def test_spherical_z_is_invariant_to_shift_and_positive_scale():
    g = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(32, 11, generator=g), torch.randint(0, 11, (32,), generator=g)
    base = F.spherical_z(logits, targets, a=1.0, b=1.0)
    shift = torch.randn(32, 1, generator=g) * 10
    scale = torch.rand(32, 1, generator=g) * 20 + 0.05
    torch.testing.assert_close(F.spherical_z(logits + shift, targets), base)
    torch.testing.assert_close(F.spherical_z(logits * scale, targets), base)
    torch.testing.assert_close(F.spherical_z(logits * scale - shift, targets), base)
    # a negative scale is not a symmetry (it flips the ranking); nor is cross-entropy scale invariant
    assert not torch.allclose(F.spherical_z(-logits, targets), base)
    assert not torch.allclose(
        torch.nn.functional.cross_entropy(logits * 3, targets), torch.nn.functional.cross_entropy(logits, targets)
    )


def test_spherical_z_decreases_as_the_target_score_rises():
    logits = torch.zeros(1, 4)
    logits[0, 1] = 0.1
    values = []
    for v in (0.5, 1.0, 2.0, 4.0):
        x = logits.clone()
        x[0, 0] = v
        values.append(F.spherical_z(x, torch.tensor([0])).item())
    assert values == sorted(values, reverse=True)


# Self-distillation (Lee et al., arXiv 2210.02871, section 3): one feature per example, squared L2 distance
# summed over the hidden dimensions, averaged over the batch (MSE with reduction sum / batch size).
STUDENT = [[[1.0, 2.0], [3.0, 0.0], [2.0, -2.0]], [[0.0, 1.0], [0.5, 0.5], [-1.0, 3.0]]]  # (B=2, T=3, C=2)
TEACHER = [[[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]], [[1.0, 1.0], [1.0, -1.0], [1.0, 0.0]]]


def _hand_distance(s_vecs: list[list[float]], t_vecs: list[list[float]], normalize: bool = False) -> float:
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    total = 0.0
    for s, t in zip(s_vecs, t_vecs, strict=True):
        if normalize:
            s, t = unit(s), unit(t)
        total += sum((a - b) ** 2 for a, b in zip(s, t, strict=True))
    return total / len(s_vecs)


def _hand_pool(h: list[list[list[float]]], how: str) -> list[list[float]]:
    if how == "mean":
        return [[sum(tok[c] for tok in seq) / len(seq) for c in range(len(seq[0]))] for seq in h]
    if how == "last":
        return [seq[-1] for seq in h]
    return [tok for seq in h for tok in seq]


def test_self_distillation_distance_hand_computed():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    # mean pooling: student (2, 0), (-1/6, 3/2); teacher (1, 1), (1, 0): (1 + 1) + (49/36 + 9/4), over B = 2
    assert _hand_distance(_hand_pool(STUDENT, "mean"), _hand_pool(TEACHER, "mean")) == pytest.approx(
        (2.0 + 49 / 36 + 9 / 4) / 2
    )
    for how in ("mean", "last", "all"):
        expected = _hand_distance(_hand_pool(STUDENT, how), _hand_pool(TEACHER, how))
        got = F.squared_distance(F.pool_hidden(s, how), F.pool_hidden(t, how))
        assert got.item() == pytest.approx(expected, rel=1e-6), how
        normed = _hand_distance(_hand_pool(STUDENT, how), _hand_pool(TEACHER, how), normalize=True)
        got = F.squared_distance(F.pool_hidden(s, how), F.pool_hidden(t, how), normalize=True)
        assert got.item() == pytest.approx(normed, rel=1e-6), how
    # the authors' formulation: MSE with reduction "sum" divided by the batch size
    ps, pt = F.pool_hidden(s, "mean"), F.pool_hidden(t, "mean")
    ref = torch.nn.functional.mse_loss(ps, pt, reduction="sum") / ps.shape[0]
    assert F.squared_distance(ps, pt).item() == pytest.approx(ref.item(), rel=1e-6)


def test_self_distillation_distance_properties():
    h = torch.randn(2, 3, 8)
    assert F.squared_distance(h, h.clone()).item() == 0.0
    assert F.squared_distance(h, h + 1.0).item() == pytest.approx(8.0)  # summed over the C = 8 dimensions
    assert F.squared_distance(h, 3 * h, normalize=True).item() == pytest.approx(0.0, abs=1e-6)
    assert F.pool_hidden(h, "mean").shape == (2, 8) and F.pool_hidden(h, "all").shape == (6, 8)
    student, teacher = h.clone().requires_grad_(True), (h + 1.0).requires_grad_(True)
    F.squared_distance(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None  # the teacher side is detached
    with pytest.raises(ValueError, match="same width"):
        F.squared_distance(h, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="how='cls'"):
        F.pool_hidden(h, "cls")
