"""Conditional mutual information I(X; Y_hat | Y) of a classifier, estimated from class centroids.

Ye, Hamidi, Tan, Yang (2024), "Bayes Conditional Distribution Estimation for Knowledge
Distillation Based on Conditional Mutual Information", ICLR 2024, arXiv:2401.08732 (MCMI); the CMI of a classifier
and its centroid form come from Yang et al. (2023), "Conditional Mutual Information
Constrained Deep Learning for Classification" (CMIC-DL). Equation numbers are not cited: the
paper text was not available to us; the definitions follow the papers' notation and the
authors' released code (iclr2024mcmi/ICLRMCMI: ``centroid.py``, ``losses.py``).

For a classifier with output probability vector P_x = softmax(f(x)) and labels Y, the CMI
between the input and the prediction given the label is

    I(X; Y_hat | Y) = sum_y P(y) E_{X|Y=y}[ KL(P_X || Q_y) ],    Q_y = E_{X|Y=y}[ P_X ]

where Q_y, the mean output of class y, is the class-conditional *centroid*: the CMI is the
average KL spread of the output vectors around their class centroid. The MCMI teacher of Ye et
al. is trained with the maximum-CMI objective  CE - lambda * I(X; Y_hat | Y)  (log-likelihood
and CMI maximised together), which makes the teacher's outputs within a class more diverse, a
better estimate of the Bayes conditional distribution for the student.

Estimators here (conventions of :mod:`distillery.losses.logits`: class dim last, any leading
dims, half inputs upcast, ``-100`` targets left out):

* ``class_centroids`` -- the plug-in centroids of one batch, Q_y = mean of P_x over the rows
  labelled y.
* ``update_centroids`` -- running centroids across batches (exponential moving average, the
  authors' ``Centroid.update_batch`` rule Q_y <- d Q_y + (1 - d) mean_batch(P_x | y)), except
  that a class's first batch sets its centroid instead of averaging it with a uniform start.
* ``cmi`` -- the empirical CMI (1/N) sum_i KL(P_{x_i} || Q_{y_i}) against given centroids (the
  authors' ``F.kl_div(centroids.log(), log_softmax(z), log_target=True, 'batchmean')``).
  Gradients flow through P only: the centroids are data (as in the authors' code, where they
  are computed without gradient). This is also the exact gradient of the CMI: Q_y minimises
  E[KL(P_X || Q) | Y=y] over Q, so its own dependence on the weights contributes nothing
  (envelope theorem).
* ``empirical_cmi`` -- ``cmi`` with the centroids of the same batch (plug-in estimate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import IGNORE_INDEX, _check_number, _check_targets, _mean_over_positions, _upcast

__all__ = ["class_centroids", "cmi", "empirical_cmi", "update_centroids"]

# Floor of a centroid entry inside log Q: a class the centroid has never predicted would make
# KL(P || Q) (and its gradient) unbounded; 1e-8 caps -log Q at ~18.4.
_MIN_CENTROID = 1e-8


def _flat(probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Rows (N, C) and ids (N,) with the ignored (-100) positions removed."""
    p = probs.reshape(-1, probs.shape[-1])
    y = targets.reshape(-1)
    keep = y != IGNORE_INDEX
    return p[keep], y[keep]


def class_centroids(probs: Tensor, targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Centroids Q_y = mean of the probability vectors labelled y, and the row count per class.

    ``probs`` (..., C) are probability vectors (not logits), ``targets`` (...) class ids in
    [0, num_classes) or -100. Returns ``(centroids (num_classes, C), counts (num_classes,))``;
    the row of a class absent from the batch is zero (its count is 0).
    """
    if probs.dim() < 1:
        raise ValueError("probs must have a class dimension (shape (..., C))")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    # a (..., num_classes) view only for the shape / id-range checks of the shared helper
    _check_targets(targets, probs[..., :1].expand(*probs.shape[:-1], num_classes), "class_centroids", required=True)
    p, y = _flat(_upcast(probs), targets)
    sums = torch.zeros(num_classes, p.shape[-1], dtype=p.dtype, device=p.device).index_add_(0, y, p)
    counts = torch.bincount(y, minlength=num_classes).to(p.dtype)
    return sums / counts.clamp(min=1).unsqueeze(-1), counts


def update_centroids(
    centroids: Tensor, seen: Tensor, probs: Tensor, targets: Tensor, *, decay: float
) -> tuple[Tensor, Tensor]:
    """One moving-average step of the running centroids with a batch: returns new (centroids, seen).

    For every class y present in the batch, Q_y <- decay * Q_y + (1 - decay) * mean(P_x | y), or
    Q_y <- mean(P_x | y) if the class was never seen (``seen[y] == 0``); rows are then
    renormalised to sum to 1 (as the authors' code does). Absent classes keep their centroid.
    ``seen`` counts the batches each class has appeared in. ``probs`` are detached.
    """
    _check_number("decay", decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if centroids.dim() != 2 or seen.shape != centroids.shape[:1]:
        raise ValueError(f"centroids must be (K, C) and seen (K,), got {tuple(centroids.shape)} and {tuple(seen.shape)}")
    batch, counts = class_centroids(probs.detach(), targets, centroids.shape[0])
    batch = batch.to(centroids.dtype)
    present = (counts > 0).unsqueeze(-1)
    first = present & (seen == 0).unsqueeze(-1)
    mixed = decay * centroids + (1.0 - decay) * batch
    new = torch.where(first, batch, torch.where(present, mixed, centroids))
    new = torch.where(present, new / new.sum(-1, keepdim=True).clamp(min=torch.finfo(new.dtype).tiny), new)
    return new, seen + (counts > 0).to(seen.dtype)


def cmi(logits: Tensor, targets: Tensor, centroids: Tensor) -> Tensor:
    """Empirical CMI (1/N) sum_i KL(P_{x_i} || Q_{y_i}), P = softmax(logits), Q = ``centroids``.

    Ye et al. (2024), ICLR, the CMI I(X; Y_hat | Y) of the model's outputs (module docstring),
    against centroids ``(K, C)`` given as probability rows. Averaged over positions whose target
    is not -100. Centroid entries are floored at 1e-8 inside the log. Gradients flow into the
    logits only; the centroids are treated as constants (detached).
    """
    if logits.dim() < 1:
        raise ValueError("logits must have a class dimension (shape (..., C))")
    if centroids.dim() != 2 or centroids.shape[-1] != logits.shape[-1]:
        raise ValueError(f"centroids must be (K, {logits.shape[-1]}), got {tuple(centroids.shape)}")
    _check_targets(targets, logits[..., :1].expand(*logits.shape[:-1], centroids.shape[0]), "cmi", required=True)
    log_p = F.log_softmax(_upcast(logits), dim=-1)
    log_q = centroids.detach().to(log_p.dtype).clamp(min=_MIN_CENTROID).log()
    log_q_y = log_q[targets.clamp(min=0)]  # (..., C); -100 rows are dropped by the mean
    per_position = (log_p.exp() * (log_p - log_q_y)).sum(dim=-1)
    return _mean_over_positions(per_position, targets)


def empirical_cmi(logits: Tensor, targets: Tensor, num_classes: int | None = None) -> Tensor:
    """Plug-in CMI of one batch: ``cmi`` with the centroids of the same batch (detached).

    With hard (one-hot) predictions this is the conditional entropy H(Y_hat | Y) of the
    predictions given the labels; it is 0 when every row of a class has the same output.
    ``num_classes`` defaults to the class dim of ``logits``.
    """
    k = logits.shape[-1] if num_classes is None else num_classes
    with torch.no_grad():
        centroids, _ = class_centroids(F.softmax(_upcast(logits), dim=-1), targets, k)
    return cmi(logits, targets, centroids)
