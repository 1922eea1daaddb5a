"""Distilling from similar tasks: task similarity, source weights, and the weighted feature loss.

Borup, Phoo & Hariharan (2023), "Distilling from Similar Tasks for Transfer Learning on a Budget"
(arXiv 2304.12314).  Several source models were trained on *other* tasks (other label sets); the
target task has few labels.  Each source's relevance to the target is estimated without
fine-tuning it -- from the source's frozen features of labelled target data -- and the student
learns the target with cross-entropy plus feature distillation from the sources:

    DistillNearest:  only the source with the highest similarity,
    DistillWeighted: every source s, weighted by w = softmax(sim / T),

    L = CE(z, y) + lambda * sum_s w_s * d(P_s h, f_s)

with ``h`` the student's embedding, ``f_s`` source s's embedding of the same input, ``P_s`` a
learned linear map from the student's to source s's embedding space (the spaces differ), and
``d`` a feature distance (cosine distance or mean squared error).

Similarity score implemented here: the leave-one-out k-nearest-neighbour accuracy of the target
labels in the source's feature space (cosine similarity between features).  It needs only a
forward pass of the frozen source, no training, and is bounded in [0, 1] so a softmax
temperature means the same thing for every task.  The paper compares several task-similarity
estimates computed on frozen source features; the body of the paper was not available to us
while writing this, so the choice of the kNN estimate (over, e.g., LogME or a linear probe) is
ours -- see the method's docstring.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_similarity(features: Tensor, labels: Tensor, *, k: int = 5) -> Tensor:
    """Task similarity of one source: leave-one-out kNN accuracy of ``labels`` in its feature space.

    Each sample is classified by a majority vote of the ``k`` other samples whose features have
    the highest cosine similarity to its own (ties in the vote go to the lowest class id); the score
    is the fraction classified correctly, a scalar in [0, 1].  ``features``: (N, D) source
    embeddings of labelled target samples; ``labels``: (N,) target class ids.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D) embeddings, got shape {tuple(features.shape)}; "
                         "pool or flatten feature maps first")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({features.shape[0]},) class ids, got shape {tuple(labels.shape)}")
    n = features.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k={k} nearest neighbours need at least k+1 samples (got {n}); lower k or use a larger batch")
    if labels.unique().numel() < 2:
        raise ValueError("the samples used to estimate task similarity hold only one class, so every source scores 1; "
                         "use a larger (shuffled) batch")
    z = F.normalize(features.detach().double(), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(float("-inf"))  # leave one out: a sample is not its own neighbour
    nearest = sim.topk(k, dim=1).indices  # (N, k)
    labels = labels.long()
    votes = F.one_hot(labels[nearest], int(labels.max()) + 1).sum(1)  # (N, C)
    return (votes.argmax(1) == labels).double().mean()


def source_weights(similarities: Tensor, *, temperature: float | None) -> Tensor:
    """Weights of the sources from their similarities: ``softmax(sim / temperature)``
    (DistillWeighted), or ``temperature=None`` for one-hot on the most similar source
    (DistillNearest; ties go to the first).  Returns a (S,) tensor summing to 1."""
    if similarities.dim() != 1 or similarities.numel() == 0:
        raise ValueError(f"similarities must be a non-empty (S,) vector, got shape {tuple(similarities.shape)}")
    if temperature is None:
        return F.one_hot(similarities.argmax(), similarities.numel()).to(similarities.dtype)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use temperature=None for the nearest source only")
    return torch.softmax(similarities / temperature, dim=0)


def feature_distance(projected: Tensor, source: Tensor, *, kind: Literal["cosine", "mse"] = "cosine") -> Tensor:
    """``d(P h, f)`` averaged over the batch: ``cosine`` = mean of 1 - cos(P h_i, f_i) (insensitive to
    the sources' feature scales, which differ between sources); ``mse`` = mean squared error
    per element.  The source features carry no gradient."""
    if projected.shape != source.shape or projected.dim() != 2:
        raise ValueError(f"projected student and source features must both be (N, D); got {tuple(projected.shape)} "
                         f"and {tuple(source.shape)} -- the projector must map to the source's width")
    source = source.detach().to(projected.dtype)
    if kind == "cosine":
        return (1 - F.cosine_similarity(projected, source, dim=1, eps=1e-8)).mean()
    if kind == "mse":
        return F.mse_loss(projected, source)
    raise ValueError(f"unknown feature distance '{kind}'; use 'cosine' or 'mse'")


def weighted_feature_loss(projected: list[Tensor], sources: list[Tensor], weights: Tensor,
                          *, kind: Literal["cosine", "mse"] = "cosine") -> Tensor:
    """``sum_s w_s * d(P_s h, f_s)``: the feature-distillation term of DistillWeighted (and of
    DistillNearest with one-hot weights).  A source of weight 0 still enters the sum (with a zero
    gradient): every projector then takes part in each step, as distributed training requires."""
    if not (len(projected) == len(sources) == weights.numel()) or not projected:
        raise ValueError(f"got {len(projected)} projected features, {len(sources)} source features and "
                         f"{weights.numel()} weights; give one of each per source (at least one source)")
    terms = [feature_distance(p, f, kind=kind) for p, f in zip(projected, sources)]
    return (weights.detach().to(terms[0].dtype) * torch.stack(terms)).sum()
