"""Universal Self-Knowledge Distillation (USKD): the teacher-free half of the NKD paper.

Yang, Zeng, Li, Zhang, Yuan, Li (2023), "From Knowledge Distillation to Self-Knowledge
Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV. The
paper writes KD as a target term plus a *normalised* non-target term (NKD, see
``distillery.losses.logits.nkd``) and, without a teacher, makes up both soft labels itself:

* target class: the student's own target probability, smoothed (squared) and shifted so its
  batch mean is 1 (``uskd_target_label``);
* non-target classes: a Zipf's-law distribution 1 / rank^power over the classes, ranked with
  the help of a weak classifier (a linear layer) on an intermediate feature
  (``zipf_non_target_labels``), itself trained with label-smoothed CE (``uskd_weak_loss``).

Constants and details follow the authors' released code (yzd-v/cls_KD,
``mmcls/models/dis_losses/uskd.py``), where the paper leaves them open; each function says
which. Equation numbers of the paper could not be checked here, so the docstrings cite the
paper's sections and the code. Conventions are those of :mod:`distillery.losses.logits`
(logits ``(..., C)``, class ids ``(...)``, ``-100`` ignored, fp16/bf16 upcast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import (
    IGNORE_INDEX,
    _check_non_negative,
    _check_number,
    _check_pair,
    _check_targets,
    _gather_target,
    _mean_over_positions,
    _non_target_log_probs,
    _target_mask,
    _upcast,
)


def uskd_target_label(student_logits: Tensor, targets: Tensor) -> Tensor:
    """Customised soft target label P_t = S_t^2 + 1 - mean(S_t^2), detached; shape ``(...)``.

    S_t is the student's softmax probability of the target class. Squaring smooths it (sharper
    drop for uncertain samples); the shift makes the mean over the batch exactly 1, the value of
    the one-hot label it replaces, so easy samples get a label above 1 and hard ones below
    (released code; the paper's "soft target label" of its USKD section). The mean runs over
    the positions whose target is not -100, and those positions get 0.
    """
    _check_targets(targets, student_logits, "uskd_target_label", required=True)
    s_t = _gather_target(F.softmax(_upcast(student_logits), dim=-1), targets).detach()
    smoothed = s_t**2
    valid = targets != IGNORE_INDEX
    batch_mean = torch.where(valid, smoothed, torch.zeros_like(smoothed)).sum() / valid.sum().clamp(min=1)
    return torch.where(valid, smoothed + 1 - batch_mean, torch.zeros_like(smoothed))


def zipf_non_target_labels(
    student_logits: Tensor, weak_logits: Tensor, targets: Tensor, *, power: float = 1.0
) -> Tensor:
    """Soft non-target labels from Zipf's law: proportional to 1 / rank^power, 0 at the target.

    As in the released code, every class c (the target included) gets the score

        w_c / (1 - w_t) + log S_c / (1 - log S_t)

    with w = softmax(weak logits) from the intermediate feature and log S the student's final
    log-softmax (the code reuses its log-probability variable here, so the final-logit half is
    in log space and, for a confident student, sets most of the order while the weak logits
    break near-ties). The classes are ranked by score (rank 1 = highest, ties by class index),
    class c gets 1 / rank_c^power, and the target is dropped and the rest normalised to sum to
    1. The target's own rank is kept, so when it is not ranked first the non-target ranks skip
    it (e.g. 1, 3, 4, ...). The ranking is piecewise constant: the labels carry no gradient.
    ``power`` = 1 in the released code.
    """
    _check_pair(student_logits, weak_logits)
    _check_targets(targets, student_logits, "zipf_non_target_labels", required=True)
    _check_number("power", power)
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    with torch.no_grad():
        w = F.softmax(_upcast(weak_logits), dim=-1)
        log_s = F.log_softmax(_upcast(student_logits), dim=-1)
        score = w / (1 - _gather_target(w, targets) + 1e-6).unsqueeze(-1) + log_s / (
            1 - _gather_target(log_s, targets) + 1e-6
        ).unsqueeze(-1)
        order = torch.argsort(score, dim=-1, descending=True, stable=True)  # classes, best first
        rank = torch.argsort(order, dim=-1, stable=True) + 1  # rank of each class, 1-based
        zipf = rank.to(score.dtype) ** -power
        zipf = zipf.masked_fill(_target_mask(targets, student_logits), 0.0)
        return zipf / zipf.sum(dim=-1, keepdim=True)


def uskd_target_loss(student_logits: Tensor, targets: Tensor | None = None) -> Tensor:
    """Target term -P_t log S_t with the customised soft label P_t of ``uskd_target_label``.

    The target half of the NKD loss (paper, NKD section) with the teacher's T_t replaced by P_t;
    P_t is detached, so the gradient is that of a per-sample-weighted cross-entropy.
    """
    _check_targets(targets, student_logits, "uskd_target_loss", required=True)
    log_s_t = _gather_target(F.log_softmax(_upcast(student_logits), dim=-1), targets)
    return _mean_over_positions(-uskd_target_label(student_logits, targets) * log_s_t, targets)


def uskd_non_target_loss(
    student_logits: Tensor, weak_logits: Tensor, targets: Tensor | None = None, *, power: float = 1.0
) -> Tensor:
    """Non-target term -sum_{i != t} Z_i log S_hat_i: normalised non-target KD towards Zipf labels.

    S_hat is the student's softmax over the non-target classes only (NKD's normalisation, at
    temperature 1 as in the released USKD code) and Z the labels of ``zipf_non_target_labels``.
    Gradients reach only ``student_logits`` (the labels are constants).
    """
    _check_targets(targets, student_logits, "uskd_non_target_loss", required=True)
    labels = zipf_non_target_labels(student_logits, weak_logits, targets, power=power)
    log_s_hat = _non_target_log_probs(_upcast(student_logits), _target_mask(targets, student_logits))
    return _mean_over_positions(-(labels * log_s_hat).sum(dim=-1), targets)


def uskd_weak_loss(weak_logits: Tensor, targets: Tensor | None = None, *, smoothing: float = 0.1) -> Tensor:
    """Weak supervision of the intermediate classifier: CE with label smoothing (0.1 in the code).

    Target distribution (1 - smoothing) * one_hot + smoothing / C, i.e. PyTorch's
    ``label_smoothing``. It keeps the weak logits meaningful enough to rank classes while
    being a weak (soft) signal on the intermediate feature.
    """
    _check_targets(targets, weak_logits, "uskd_weak_loss", required=True)
    _check_number("smoothing", smoothing)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    log_w = F.log_softmax(_upcast(weak_logits), dim=-1)
    num_classes = weak_logits.shape[-1]
    per_position = -(1 - smoothing) * _gather_target(log_w, targets) - smoothing / num_classes * log_w.sum(dim=-1)
    return _mean_over_positions(per_position, targets)


def uskd(
    student_logits: Tensor,
    weak_logits: Tensor,
    targets: Tensor | None = None,
    *,
    alpha: float = 0.1,
    beta: float = 0.1,
    mu: float = 0.1,
    power: float = 1.0,
) -> Tensor:
    """The USKD loss alpha * target + beta * non-target + mu * weak (label CE not included).

    As in the released code the student's ordinary label cross-entropy is kept beside it
    (``distillery.methods.uskd`` adds it). Defaults are the released CIFAR-100 config
    (alpha = beta = mu = 0.1); its ImageNet configs use alpha = 1, beta = 0.1, mu = 0.005.
    """
    for name, value in (("alpha", alpha), ("beta", beta), ("mu", mu)):
        _check_non_negative(name, value)
    return (alpha * uskd_target_loss(student_logits, targets)
            + beta * uskd_non_target_loss(student_logits, weak_logits, targets, power=power)
            + mu * uskd_weak_loss(weak_logits, targets))
