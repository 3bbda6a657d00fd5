"""Probe accuracies on hand-made embeddings, where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainers import probes as P


def clusters(n_per: int = 10, noise: float = 0.05, seed: int = 0):
    """Three tight clusters around orthogonal directions in 3-D."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3)
    labels = torch.arange(3).repeat_interleave(n_per)
    emb = centres[labels] + noise * torch.randn(3 * n_per, 3, generator=g)
    return emb, labels


def test_knn_and_ncm_are_perfect_on_separated_clusters():
    tr, ytr = clusters(seed=0)
    te, yte = clusters(seed=1)
    for vote in ("majority", "weighted"):
        assert P.knn_accuracy(tr, ytr, te, yte, k=5, vote=vote) == 1.0
    assert P.ncm_accuracy(tr, ytr, te, yte) == 1.0
    assert P.ncm_accuracy(tr, ytr, te, yte, metric="euclidean") == 1.0
    assert P.probe_metrics(tr, ytr, te, yte, k=5) == {"probe/knn_acc": 1.0, "probe/ncm_acc": 1.0}
    assert P.knn_accuracy(tr, ytr, te, (yte + 1) % 3, k=5) == 0.0


def test_knn_votes_on_an_exact_case():
    # training points on the unit circle at angles (degrees) with labels; the query is at 0°
    angles = torch.tensor([10.0, -12.0, 40.0, 45.0, 50.0])
    labels = torch.tensor([0, 0, 1, 1, 1])
    train = torch.stack((torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))), 1)
    query = torch.tensor([[1.0, 0.0]])
    # k=5 majority: three 1s beat two 0s; weighted with a small temperature: the two close 0s win
    assert P.knn_predict(train, labels, query, k=5, vote="majority").item() == 1
    assert P.knn_predict(train, labels, query, k=5, vote="weighted", temperature=0.05).item() == 0
    assert P.knn_predict(train, labels, query, k=1, vote="majority").item() == 0
    assert P.knn_predict(train, labels, query, k=2, vote="majority").item() == 0
    # a 1-1 tie at k=2 goes to the label with the larger summed similarity (5° beats -30°)
    tie_train = torch.stack((torch.cos(torch.deg2rad(torch.tensor([5.0, -30.0]))),
                             torch.sin(torch.deg2rad(torch.tensor([5.0, -30.0])))), 1)
    assert P.knn_predict(tie_train, torch.tensor([1, 0]), query, k=2, vote="majority").item() == 1
    assert P.knn_predict(train, labels, query, k=100).shape == (1,)  # k capped at the training size


def test_ncm_differs_from_knn_where_class_means_matter():
    # class 0: one point right next to the query and many far away; class 1's mean is closer
    train = torch.tensor([[1.0, 0.02], [-1.0, 0.1], [-1.0, -0.1], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    query, truth = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert P.knn_accuracy(train, labels, query, truth, k=1) == 0.0
    assert P.ncm_accuracy(train, labels, query, truth) == 1.0
    classes, means = P.class_means(train, labels, normalize=False)
    assert classes.tolist() == [0, 1]
    torch.testing.assert_close(means, torch.tensor([[-1 / 3, 0.02 / 3], [0.8, 0.0]]))


def test_zero_shot_accuracy():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    imgs = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, -0.2], [0.0, -1.0]])
    assert P.zero_shot_accuracy(imgs, text, torch.tensor([0, 1, 2, 2])) == pytest.approx(0.75)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="same D"):
        P.knn_accuracy(torch.zeros(3, 2), torch.zeros(3), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="vote"):
        P.knn_predict(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.zeros(1, 2), vote="mode")


def test_probes_on_raw_digit_pixels():
    from data.images import load_digits

    train, test = load_digits().split(0.2, seed=0)
    flat = lambda s: torch.from_numpy(s.images.reshape(len(s), -1).astype(np.float32))  # noqa: E731
    ytr, yte = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    assert P.knn_accuracy(flat(train), ytr, flat(test), yte, k=5) > 0.95  # raw-pixel k-NN on digits is ~98%
    assert P.ncm_accuracy(flat(train), ytr, flat(test), yte) > 0.85
