"""Multi-label (sigmoid) losses: every label is its own binary problem.

Conventions as in :mod:`distillery.losses.logits`: pure functions of ``(..., L)`` logits,
fp16/bf16 upcast to float32, mean over positions and labels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import _check_pair, _check_temperature, _upcast


def _check_multi_hot(targets: Tensor, logits: Tensor) -> None:
    if targets.shape != logits.shape:
        raise ValueError(f"multi-label targets {tuple(targets.shape)} must have the logits' shape {tuple(logits.shape)}")
    if not targets.dtype.is_floating_point:
        raise ValueError(f"multi-label targets must be float (multi-hot or soft), got {targets.dtype}")


def binary_cross_entropy(student_logits: Tensor, teacher_logits: Tensor | None = None, targets: Tensor | None = None) -> Tensor:
    """Mean binary cross-entropy with logits against multi-hot (or soft) targets ``(..., L)``."""
    if targets is None:
        raise ValueError("binary_cross_entropy needs multi-hot targets")
    _check_multi_hot(targets, student_logits)
    return F.binary_cross_entropy_with_logits(_upcast(student_logits), targets.to(_upcast(student_logits).dtype))


def binary_kd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None = None, *,
              temperature: float = 1.0) -> Tensor:
    """Per-label binary KD: T^2 * mean over labels of KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T))).

    The multi-label form of Hinton et al. (2015): each label's sigmoid is a two-class softmax
    over (z, 0), so the soft target of label j is Bernoulli(sigmoid(z_t,j / T)); this is the
    label-wise logit distillation of Yang et al. (2023), "Multi-Label Knowledge Distillation"
    (ICCV), eq. (3), averaged rather than summed over labels so its scale does not grow with L.
    Equals ``kd`` on the two logits ``(z, 0)`` per label.  ``targets`` is ignored.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    s = _upcast(student_logits) / temperature
    t = _upcast(teacher_logits) / temperature
    p = torch.sigmoid(t)
    # KL(Bern(p) || Bern(q)) from log-sigmoids: stable for large |logits|
    log_p, log_1p = F.logsigmoid(t), F.logsigmoid(-t)
    log_q, log_1q = F.logsigmoid(s), F.logsigmoid(-s)
    kl = p * (log_p - log_q) + (1 - p) * (log_1p - log_1q)
    return kl.mean() * temperature**2
