"""DisWOT's similarity metrics used as distillation losses, as pure functions of tensors.

Dong, Li, Wei (2023), "DisWOT: Student Architecture Search for Distillation WithOut Training",
CVPR, Sec. 3.2: the semantic-similarity metric (per sample, the C x C inter-class correlation
G = M M^T of the class activation maps M, from the last feature map and the classifier
weights) and the sample-relation metric (the B x B Gram matrix of the flattened last
features), each compared between teacher and student by the L2 distance of the row-normalised
matrices.  The paper scores untrained students with them and notes that they "can be extended
as distillers": here they are losses, added to KD, whose gradient reaches the student's
features and classifier.

The mathematics is that of the search proxies and is imported from them
(:mod:`distillery.search.proxies`: :func:`class_activation_maps`, :func:`semantic_distance`,
:func:`relation_distance`), so the distiller and the proxy cannot drift apart.

A method never holds the teacher (see :mod:`distillery.methods.base`), so the teacher's
classifier, needed for its CAMs, is not at hand.  :func:`recover_linear_head` recovers it from
what the method does see -- the classifier's input and its logits: for a linear head
``t = W x + b`` the least-squares solution over any set of samples whose inputs span the
feature space is exactly (W, b).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distillery.losses.logits import _upcast
from distillery.search.proxies import class_activation_maps, relation_distance, semantic_distance


def semantic_loss(feat_t: Tensor, head_t: Tensor, feat_s: Tensor, head_s: Tensor) -> Tensor:
    """DisWOT semantic-similarity distance between teacher and student, as a loss.

    ``feat_*`` are (B, D, L) last feature maps (L spatial positions or tokens, 1 for vectors),
    ``head_*`` (C, D) the linear classifiers; the CAMs ReLU(W F) (B, C, L) give per-sample C x C
    inter-class Gram matrices that are compared by the mean squared difference of their
    row-normalised forms (:func:`distillery.search.proxies.semantic_distance`).  The teacher side
    is detached; the gradient reaches the student's features and classifier."""
    cam_t = class_activation_maps(_upcast(feat_t.detach()), _upcast(head_t.detach()))
    cam_s = class_activation_maps(_upcast(feat_s), _upcast(head_s))
    return semantic_distance(cam_t, cam_s)


def relation_loss(feat_t: Tensor, feat_s: Tensor) -> Tensor:
    """DisWOT sample-relation distance (the similarity-preserving relation of Tung & Mori 2019):
    row-normalised B x B Gram matrices of the flattened features, mean squared difference
    (:func:`distillery.search.proxies.relation_distance`).  Widths and shapes may differ."""
    return relation_distance(_upcast(feat_t.detach()), _upcast(feat_s))


def head_moments(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sufficient statistics of a least-squares fit ``t ~ W x + b`` over a batch, in float64:
    ``(sum x~ x~^T, sum x~ t^T, sum ||t||^2)`` with x~ = [x, 1].  Sums over batches add up."""
    x = torch.cat([x.detach().double().flatten(1), x.new_ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    t = t.detach().double()
    return x.T @ x, x.T @ t, (t * t).sum()


def recover_linear_head(gram: Tensor, cross: Tensor, t_sq: Tensor) -> tuple[Tensor, Tensor, float]:
    """(W, b, residual) of the least-squares fit ``t ~ W x + b`` from :func:`head_moments`.

    The minimum-norm solution (pseudo-inverse of the Gram matrix): directions the inputs never
    take (e.g. a dead ReLU channel) get zero weight, which changes no output on such inputs.
    ``residual`` is the share of ``sum ||t||^2`` the fit leaves unexplained: ~1e-12 for a linear
    head fed by the tapped feature, clearly above 0 when the tap is not the head's input."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or cross.shape[0] != gram.shape[0]:
        raise ValueError(f"need a square (D+1, D+1) Gram and a (D+1, C) cross moment, got {tuple(gram.shape)}, {tuple(cross.shape)}")
    sol = torch.linalg.pinv(gram, hermitian=True) @ cross  # (D+1, C)
    resid = t_sq - 2 * (sol * cross).sum() + (sol * (gram @ sol)).sum()
    share = float((resid / t_sq.clamp_min(1e-300)).clamp(min=0.0))
    return sol[:-1].T.contiguous(), sol[-1].contiguous(), share
