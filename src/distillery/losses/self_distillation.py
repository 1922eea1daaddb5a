"""Self-distillation with ground-truth weighting: the mixed target and the optimal weight.

Borup & Andersen (2021), "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen
Regularization Imposed by Self-Distillation", NeurIPS.  Step ``t`` of their iterative
self-distillation fits a model of the same architecture to a weighted objective

    alpha * ||y - f(X)||^2 + (1 - alpha) * ||f_{t-1}(X) - f(X)||^2   (+ l2 regularisation)

which, up to a constant, is fitting the mixed target ``alpha * y + (1 - alpha) * f_{t-1}(X)``.
``alpha = 1`` is plain training on the labels, ``alpha = 0`` pure self-distillation (which, in
their kernel analysis, amplifies the regularisation at every step until the fit collapses).

The paper's analysis uses the squared error; here the student fits the same mixed target with
cross-entropy (which is linear in its target, so CE(mixed) is also the alpha-weighted sum of
CE(labels) and CE(teacher)).  Conventions as in :mod:`distillery.losses.logits`: logits
``(..., C)``, int64 targets ``(...)`` with ``-100`` left out of the mean, fp16/bf16 upcast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import (
    IGNORE_INDEX,
    _check_number,
    _check_pair,
    _check_targets,
    _mean_over_positions,
    _upcast,
)

__all__ = ["ground_truth_mixed_target", "optimal_alpha", "self_distillation_loss"]


def _check_alpha(alpha: float) -> None:
    _check_number("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (a mixing weight), got {alpha}")


def ground_truth_mixed_target(teacher_logits: Tensor, targets: Tensor, *, alpha: float) -> Tensor:
    """The target of one self-distillation step: ``alpha * onehot(y) + (1 - alpha) * softmax(t)``.

    Returns probabilities of the teacher's shape ``(..., C)``.  Positions whose target is
    ``-100`` get the teacher's distribution alone (they are left out of any loss anyway).
    """
    _check_alpha(alpha)
    _check_targets(targets, teacher_logits, "self_distillation", required=True)
    p_teacher = F.softmax(_upcast(teacher_logits), dim=-1)
    onehot = F.one_hot(targets.clamp(min=0), teacher_logits.shape[-1]).to(p_teacher.dtype)
    valid = (targets != IGNORE_INDEX).unsqueeze(-1)
    mixed = alpha * onehot + (1.0 - alpha) * p_teacher
    return torch.where(valid, mixed, p_teacher)


def self_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    alpha: float = 0.5,
) -> Tensor:
    """Cross-entropy of the student against ``alpha * onehot(y) + (1 - alpha) * softmax(t)``.

    Borup & Andersen (2021), the per-step objective above with CE in place of the squared
    error.  ``alpha = 1`` is label CE (the teacher is ignored), ``alpha = 0`` is
    ``CE(softmax(t), softmax(s)) = KL(t || s) + H(t)``: the KL of Hinton KD at temperature 1
    plus the teacher's entropy, a constant for the student.  Unlike a divergence the loss is
    not zero when student and teacher agree.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "self_distillation", required=True)
    target = ground_truth_mixed_target(teacher_logits, targets, alpha=alpha)
    log_q = F.log_softmax(_upcast(student_logits), dim=-1)
    return _mean_over_positions(-(target * log_q).sum(dim=-1), targets)


def optimal_alpha(label_fit: Tensor, distill_fit: Tensor, reference: Tensor, *, clip: bool = True) -> Tensor:
    """Weight ``alpha`` of the next step whose fit is closest to ``reference``, given the two extremes.

    In the kernel (linearised) setting of Borup & Andersen (2021) the fit of a step is a fixed
    linear map of its target, so the fit with weight ``alpha`` is exactly

        f_alpha = alpha * f_1 + (1 - alpha) * f_0

    where ``f_1`` (``label_fit``) is the fit to the labels alone and ``f_0`` (``distill_fit``)
    the fit to the previous step's outputs alone.  The squared distance to the reference
    ``||r - f_alpha||^2`` is a parabola in ``alpha`` whose minimum is the closed form

        alpha* = <r - f_0, f_1 - f_0> / ||f_1 - f_0||^2

    This is how the paper avoids a grid search over ``alpha``: two fits per step instead of
    one per grid point.  ``reference`` is a tensor of the fits' shape ``(..., C)``, or class
    ids ``(...)`` (one-hot; ``-100`` positions are left out).  With ``clip`` the result is
    clipped to ``[0, 1]`` (a target must stay a distribution for CE); if ``f_1 == f_0`` every
    ``alpha`` gives the same fit and 1 (the labels) is returned.  Returns a 0-dim float64 tensor.
    """
    if label_fit.shape != distill_fit.shape:
        raise ValueError(f"label_fit {tuple(label_fit.shape)} and distill_fit {tuple(distill_fit.shape)} must have the same shape")
    f1, f0 = label_fit.double(), distill_fit.double()
    if reference.shape == label_fit.shape and reference.dtype.is_floating_point:
        r, keep = reference.double(), torch.ones(label_fit.shape[:-1], dtype=torch.bool, device=label_fit.device)
    else:
        _check_targets(reference, label_fit, "optimal_alpha", required=True)
        keep = reference != IGNORE_INDEX
        r = F.one_hot(reference.clamp(min=0), label_fit.shape[-1]).double()
    keep = keep.unsqueeze(-1)
    d = torch.where(keep, f1 - f0, torch.zeros_like(f1))
    num = (torch.where(keep, r - f0, torch.zeros_like(f1)) * d).sum()
    den = (d * d).sum()
    if den <= 0:
        return torch.ones((), dtype=torch.float64, device=label_fit.device)
    alpha = num / den
    return alpha.clamp(0.0, 1.0) if clip else alpha
