"""Novel class discovery (NCD) losses, written as pure functions of tensors.

Setting: the first ``K`` of a model's ``C`` output slots are the *known* classes, learnt from
labels; the remaining ``C - K`` slots are the *novel* head, learnt without labels (its slot
order is whatever clustering the model finds, matched to the true classes only at evaluation).

* :func:`sinkhorn_knopp` and :func:`ncd_targets` build the training targets of UNO (Fini et
  al. 2021, "A Unified Objective for Novel Class Discovery", ICCV): one-hot labels in the known
  slots for labelled samples, equipartitioned Sinkhorn-Knopp pseudo-labels in the novel slots
  for the unlabelled ones.
* :func:`swapped_prediction` is UNO's objective: each view is trained on the targets of the
  other view, with one cross-entropy over all ``C`` slots (the "unified" objective).
* :func:`crkd` is the class-relation distillation term of Gu et al. 2023 ("Class-relation
  Knowledge Distillation for Novel Class Discovery", ICCV) with its learnable sample weight.

Conventions: logits are ``(N, C)``; half precision is upcast to float32; results are scalar
means over samples; an empty batch gives 0 (with a zero gradient), never NaN.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sinkhorn_knopp", "ncd_targets", "swapped_prediction", "crkd"]


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be (N, C), got shape {tuple(x.shape)}")


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, *, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Soft cluster assignments ``(N, K)`` whose clusters are (near) equally used.

    Cuturi 2013 / SwAV (Caron et al. 2020), as used by UNO (Fini et al. 2021, Sec. 3): start
    from Q = exp(logits / epsilon), then alternately rescale the K cluster columns to mass 1/K
    each and the N sample rows to mass 1/N each; return N * Q, so every row sums to 1 exactly
    and every column sums to ~N/K (exactly in the limit of many iterations).  UNO uses
    epsilon = 0.05 and 3 iterations.  Computed in log space, so logits of any scale (a linear
    head's are unbounded, unlike UNO's cosine logits) cannot overflow.  No gradient: these are
    targets.
    """
    _check_2d("logits", logits)
    _positive("epsilon", epsilon)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    n, k = logits.shape
    if n == 0:
        return logits.new_zeros((0, k))
    log_q = _upcast(logits) / epsilon
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)  # clusters: 1/K each
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)  # samples: 1/N each
    return (log_q + math.log(n)).exp()


@torch.no_grad()
def ncd_targets(
    logits: Tensor,
    labels: Tensor,
    novel: Tensor,
    num_known: int,
    *,
    epsilon: float = 0.05,
    iterations: int = 3,
) -> Tensor:
    """UNO's targets over all ``C`` slots (Fini et al. 2021, Sec. 3.2, "unified objective").

    A labelled sample (``novel`` False) gets the one-hot of its label in the known slots
    ``[0, num_known)``; a novel sample gets :func:`sinkhorn_knopp` of its novel-slot logits
    ``logits[:, num_known:]`` (the batch's novel samples clustered together) in the novel
    slots.  ``labels`` of novel samples are never read, so any value there (a true class id,
    -1, a permuted id) gives the same targets.
    """
    _check_2d("logits", logits)
    n, c = logits.shape
    if not 0 < num_known < c:
        raise ValueError(f"num_known must be in [1, {c - 1}] for {c} slots, got {num_known}")
    novel = novel.bool()
    targets = torch.zeros(n, c, dtype=torch.float32 if logits.dtype != torch.float64 else logits.dtype,
                          device=logits.device)
    known_labels = labels[~novel]
    if known_labels.numel() and (int(known_labels.min()) < 0 or int(known_labels.max()) >= num_known):
        raise ValueError(f"labelled samples must have labels in [0, {num_known}), got {known_labels.unique().tolist()}")
    targets[~novel, :num_known] = F.one_hot(known_labels, num_known).to(targets.dtype)
    targets[novel, num_known:] = sinkhorn_knopp(logits[novel, num_known:], epsilon=epsilon,
                                                iterations=iterations).to(targets.dtype)
    return targets


def _soft_ce(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Mean over rows of -sum_c targets_c log softmax(logits / T)_c."""
    per_row = -(targets * F.log_softmax(_upcast(logits) / temperature, dim=-1)).sum(-1)
    return per_row.sum() / max(1, per_row.numel())


def swapped_prediction(
    logits_a: Tensor, logits_b: Tensor, targets_a: Tensor, targets_b: Tensor, *, temperature: float = 0.1
) -> Tensor:
    """UNO's swapped prediction over two views: 0.5 * (CE(b, targets_a) + CE(a, targets_b)).

    Fini et al. 2021, Sec. 3.2: each view's logits (divided by ``temperature``; UNO uses 0.1
    on cosine-similarity logits) are trained on the targets built from the *other* view, so
    the model must predict the same cluster for two augmentations of a sample.  Targets are
    soft distributions over all ``C`` slots (see :func:`ncd_targets`) and get no gradient.
    """
    for name, x in (("logits_a", logits_a), ("logits_b", logits_b), ("targets_a", targets_a), ("targets_b", targets_b)):
        _check_2d(name, x)
    if not logits_a.shape == logits_b.shape == targets_a.shape == targets_b.shape:
        raise ValueError("the two views' logits and targets must all have the same shape (N, C)")
    _positive("temperature", temperature)
    ta, tb = targets_a.detach(), targets_b.detach()
    return 0.5 * (_soft_ce(logits_b, ta, temperature) + _soft_ce(logits_a, tb, temperature))


def crkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 4.0,
    weighting: Literal["learnable", "uniform"] = "learnable",
) -> Tensor:
    """Class-relation distillation on novel samples, with the learnable sample weight.

    Gu, Zhang, Xu, He (2023), "Class-relation Knowledge Distillation for Novel Class
    Discovery", ICCV, Sec. 3 (class-relation representation; distillation loss with a
    learnable weighting function).  For the ``N`` novel samples of a batch, with ``K`` the
    teacher's (known) classes and ``C >= K`` the student's slots, known ones first:

        p_i = softmax(teacher_i / T)                  the known-class model's class relation
        q_i = softmax(student_i[:K] / T)              the student's known head, same sample
        w_i = sum_{c < K} softmax(student_i / T)_c    how "known-like" the student finds it
        L   = T^2 * mean_i (w_i / mean_j w_j) * KL(p_i || q_i)

    The weight is *learnable* in the paper's sense: it is a function of the student's own
    outputs and gradients flow through it (nothing is detached), and the mean-normalisation
    keeps its batch average at 1, so the model can only move weight between samples -- towards
    those whose relation to the known classes it can keep consistent, away from novel samples
    that resemble no known class.  ``weighting="uniform"`` sets w_i = 1 (the ablation).
    The teacher is detached (it is the frozen known-class model).

    Differences from the authors' code (kleinzcy/Cr-KD-NCD, ``model/losses.py``): there the
    logits are cosine similarities divided by 0.1 and then by T (= 4), and the per-sample term
    is the cross-entropy -sum p log q instead of KL(p || q).  Both have the same gradient with
    respect to q, but through the learnable weight the cross-entropy adds w_i * H(p_i), which
    also pushes weight away from samples where the teacher is uncertain; we keep the KL form
    of the paper's distillation framing.  The paper's equation numbers are not cited because we
    could read only the code and the abstract, not the method section.
    """
    _check_2d("student_logits", student_logits)
    _check_2d("teacher_logits", teacher_logits)
    n, c = student_logits.shape
    k = teacher_logits.shape[1]
    if teacher_logits.shape[0] != n or k > c:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} must be (N, K) with K <= C for student logits {tuple(student_logits.shape)}"
        )
    _positive("temperature", temperature)
    if weighting not in ("learnable", "uniform"):
        raise ValueError(f"weighting must be 'learnable' or 'uniform', got {weighting!r}")
    if n == 0:
        return _upcast(student_logits).sum() * 0.0
    s = _upcast(student_logits) / temperature
    log_p = F.log_softmax(_upcast(teacher_logits).detach() / temperature, dim=-1)
    log_q = F.log_softmax(s[:, :k], dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if weighting == "learnable":
        w = F.softmax(s, dim=-1)[:, :k].sum(-1)
        w = w / w.mean().clamp_min(1e-30)  # clamp: all-zero weights (underflow) give 0, not NaN
    else:
        w = torch.ones_like(kl)
    return (w * kl).mean() * temperature**2
