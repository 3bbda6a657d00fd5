"""Representation probes on frozen embeddings: k-NN, nearest class mean, CLIP zero-shot. Pure torch.

Inputs are embeddings already computed by the encoder (``objective.embed(model, images)``) and int
class labels; every function returns the accuracy as a float in [0, 1]. Logged as ``probe/knn_acc``,
``probe/ncm_acc`` and ``probe/zero_shot_acc`` (:func:`probe_metrics`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def _check(train_emb: torch.Tensor, train_labels: torch.Tensor, test_emb: torch.Tensor, test_labels: torch.Tensor) -> None:
    if train_emb.dim() != 2 or test_emb.dim() != 2 or train_emb.shape[1] != test_emb.shape[1]:
        raise ValueError(
            f"embeddings must be (N, D) with the same D; got train {tuple(train_emb.shape)}, test {tuple(test_emb.shape)}"
        )
    if train_labels.shape != (train_emb.shape[0],) or test_labels.shape != (test_emb.shape[0],):
        raise ValueError("labels must be (N,), one per embedding row")
    if train_emb.shape[0] == 0:
        raise ValueError("the probe needs at least one training embedding")


def knn_predict(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    test_emb: torch.Tensor,
    *,
    k: int = 20,
    vote: Literal["majority", "weighted"] = "weighted",
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted labels (M,) of the test rows by their k nearest training rows under cosine similarity.

    ``vote="majority"``: the most frequent label among the k neighbours; ties go to the tied label with the
    larger summed similarity. ``vote="weighted"``: each neighbour votes exp(similarity / temperature), the
    rule of Wu et al. (arXiv 1805.01978) used by DINO's k-NN evaluation. k is capped at the training size.
    """
    if vote not in ("majority", "weighted"):
        raise ValueError(f"vote={vote!r} is not allowed; allowed: 'majority', 'weighted'")
    if k < 1:
        raise ValueError(f"k={k} is not allowed; allowed: >= 1")
    train = F.normalize(train_emb.float(), dim=-1)
    labels = train_labels.long().to(train.device)
    C = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test_emb.shape[0], chunk_size):
        test = F.normalize(test_emb[start : start + chunk_size].float().to(train.device), dim=-1)
        sim, idx = (test @ train.T).topk(k, dim=1)  # (m, k)
        neigh = labels[idx]  # (m, k)
        weights = (sim / temperature).exp() if vote == "weighted" else torch.ones_like(sim)
        votes = torch.zeros(test.shape[0], C, device=train.device).scatter_add_(1, neigh, weights)  # (m, C)
        if vote == "majority":
            # tie-break by summed similarity: scaled below the resolution of one vote
            tie = torch.zeros_like(votes).scatter_add_(1, neigh, sim + 1.0)  # positive, <= 2k
            votes = votes + tie / (2 * k + 1)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=train.device)


def knn_accuracy(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    test_emb: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    vote: Literal["majority", "weighted"] = "weighted",
    temperature: float = 0.07,
) -> float:
    """Accuracy of :func:`knn_predict` on ``test_labels``."""
    _check(train_emb, train_labels, test_emb, test_labels)
    C = int(max(int(train_labels.max()), int(test_labels.max()) if test_labels.numel() else 0)) + 1
    pred = knn_predict(train_emb, train_labels, test_emb, k=k, vote=vote, temperature=temperature, num_classes=C)
    return _accuracy(pred, test_labels)


def class_means(emb: torch.Tensor, labels: torch.Tensor, *, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(class ids present (C,), mean embedding per class (C, D)); rows are L2-normalised first if ``normalize``."""
    x = F.normalize(emb.float(), dim=-1) if normalize else emb.float()
    classes, inverse = torch.unique(labels.long().to(x.device), return_inverse=True)
    sums = torch.zeros(len(classes), x.shape[1], device=x.device).index_add_(0, inverse, x)
    counts = torch.bincount(inverse, minlength=len(classes)).clamp(min=1).to(x.dtype)
    return classes, sums / counts[:, None]


def ncm_accuracy(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    test_emb: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    metric: Literal["cosine", "euclidean"] = "cosine",
) -> float:
    """Nearest-class-mean accuracy: each test row takes the label of the closest training class mean.

    The nearest-mean classifier on frozen pre-trained features of Janson et al., "A Simple Baseline that
    Questions the Use of Pretrained-Models in Continual Learning" (arXiv 2210.04428). ``cosine``: means of
    L2-normalised embeddings compared by cosine similarity; ``euclidean``: raw means, L2 distance.
    """
    _check(train_emb, train_labels, test_emb, test_labels)
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric={metric!r} is not allowed; allowed: 'cosine', 'euclidean'")
    classes, means = class_means(train_emb, train_labels, normalize=metric == "cosine")
    test = test_emb.float().to(means.device)
    if metric == "cosine":
        score = F.normalize(test, dim=-1) @ F.normalize(means, dim=-1).T  # (M, C)
    else:
        score = -torch.cdist(test, means)
    return _accuracy(classes[score.argmax(dim=1)], test_labels)


def zero_shot_accuracy(image_emb: torch.Tensor, class_text_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """CLIP zero-shot accuracy: each image takes the class whose caption embedding is most cosine-similar.

    image_emb: (N, E); class_text_emb: (C, E), row c = the prompt of class c; labels: (N,).
    """
    if image_emb.dim() != 2 or class_text_emb.dim() != 2 or image_emb.shape[1] != class_text_emb.shape[1]:
        raise ValueError(
            f"image {tuple(image_emb.shape)} and class text {tuple(class_text_emb.shape)} embeddings must be (N, E), (C, E)"
        )
    score = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_text_emb.float(), dim=-1).T.to(image_emb.device)
    return _accuracy(score.argmax(dim=1), labels)


def probe_metrics(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    test_emb: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    vote: Literal["majority", "weighted"] = "weighted",
) -> dict[str, float]:
    """``{"probe/knn_acc", "probe/ncm_acc"}`` on one split of held-out embeddings."""
    return {
        "probe/knn_acc": knn_accuracy(train_emb, train_labels, test_emb, test_labels, k=k, vote=vote),
        "probe/ncm_acc": ncm_accuracy(train_emb, train_labels, test_emb, test_labels),
    }


def _accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.numel() == 0:
        return 0.0
    return float((pred.cpu() == labels.long().cpu()).float().mean())
