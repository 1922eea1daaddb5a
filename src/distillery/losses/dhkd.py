"""Logit-level losses of Dual-Head Knowledge Distillation, as pure functions of tensors.

Yang, Zong, Huang, Feng, An (2024), "Dual-Head Knowledge Distillation: Enhancing Logits
Utilization with an Auxiliary Head" (arXiv:2411.08937). A softmax throws away one degree of
freedom of the logits (adding a constant to all of them changes nothing); these losses compare
each logit through a sigmoid instead, so that information reaches the student. The paper shows
that such a loss fights the label cross-entropy inside a shared linear classifier (the head
collapses) but not inside the backbone, hence it is put on an auxiliary head: see
:mod:`distillery.methods.dhkd`. Equation numbers of the paper could not be checked here (only
its abstract and the authors' released code, penghui-yang/DHKD, were read), so the docstrings
cite the losses by the paper's names.

Conventions are those of :mod:`distillery.losses.logits`: logits ``(..., C)``, the per-position
loss is summed over classes and averaged over positions, ``-100`` targets are left out of the
mean, fp16/bf16 are upcast, float64 stays float64. Sigmoid log-probabilities are computed with
``softplus`` (log sigmoid(x) = -softplus(-x)), so no clamping is needed and very large logits
give finite values and gradients (the released code clamps probabilities to [1e-8, 1 - 1e-8],
which zeroes the gradient of saturated logits).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import _check_pair, _check_targets, _check_temperature, _mean_over_positions, _upcast

_LOG_2 = 0.6931471805599453


def binary_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 2.0,
) -> Tensor:
    """BinaryKL: T^2 * sum_c KL(Bernoulli(sigmoid(t_c/T)) || Bernoulli(sigmoid(s_c/T))).

    The logit-level loss the DHKD paper introduces ("BinaryKL"): every class is
    treated as an independent binary problem whose probability is the sigmoid of the logit, and
    the student's Bernoulli is matched to the teacher's with a KL divergence. Unlike ``kd`` it is
    not invariant to adding a constant to all student logits. The T^2 factor follows the
    released code (penghui-yang/DHKD, ``distiller_zoo/BinaryKL.py``). Zero iff the logits are
    equal.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "binary_kl", required=False)
    _check_temperature(temperature)
    s = _upcast(student_logits) / temperature
    t = _upcast(teacher_logits) / temperature
    p_t = t.sigmoid()
    # log sigmoid(x) = -softplus(-x) and log(1 - sigmoid(x)) = -softplus(x)
    per_class = p_t * (F.softplus(-s) - F.softplus(-t)) + (1 - p_t) * (F.softplus(s) - F.softplus(t))
    return _mean_over_positions(per_class.sum(dim=-1) * temperature**2, targets)


def binary_kl_norm(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 2.0,
) -> Tensor:
    """BinaryKL-Norm: T^2 * sum_c KL(Bernoulli(1/2) || Bernoulli(sigmoid((s_c - t_c)/T))).

    The stabilised logit-level loss of DHKD (the version the released code trains with,
    penghui-yang/DHKD ``distiller_zoo/BinaryKLNorm.py``): instead of matching two Bernoullis it
    asks the sigmoid of the logit *difference* to be 1/2. Per class the KL has the closed form

        KL(Bern(1/2) || Bern(sigmoid(d))) = (softplus(d) + softplus(-d)) / 2 - log 2
                                           = log cosh(d / 2),      d = (s_c - t_c) / T,

    i.e. a smooth, symmetric logit-matching loss: ~ d^2 / 8 near 0 and ~ |d| / 2 - log 2 for
    large |d|, so its gradient per logit is bounded by 1 / (2T) (times T^2), whatever the gap.
    Depends on ``s - t`` only: zero iff the logits are equal.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "binary_kl_norm", required=False)
    _check_temperature(temperature)
    d = (_upcast(student_logits) - _upcast(teacher_logits)) / temperature
    per_class = 0.5 * (F.softplus(d) + F.softplus(-d)) - _LOG_2
    return _mean_over_positions(per_class.sum(dim=-1) * temperature**2, targets)
