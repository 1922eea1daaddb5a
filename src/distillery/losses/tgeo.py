"""TGeo-KD: a sample-wise fusion ratio between KD and CE, learnt from trilateral geometry.

Hu, Wu, Li, Ma, Chen, Yan, Wang, Liu (2024), "Less or More From Teacher: Exploiting Trilateral
Geometry For Knowledge Distillation", ICLR (arXiv:2312.15112). Per sample i the student loss is

    r_i * KD_i + (1 - r_i) * CE_i,

with the fusion ratio r_i in (0, 1) predicted by a small network from the geometry of the
student prediction S, the teacher prediction T and the ground truth G (intra-sample), and of
the teacher's average prediction T_bar over the samples of the same class (inter-sample). The
ratio network is trained bilevel: the ratio should make the student's update good for held-out
data. The pieces here are pure functions of tensors; :mod:`distillery.methods.tgeo_kd` wires
them (and the class means, which are state) into training. Only the paper's abstract could be
read here and no released code was found, so equation numbers are not cited and the details
marked "our reading" are choices, explained where they are made.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import (
    IGNORE_INDEX,
    _check_pair,
    _check_targets,
    _check_temperature,
    _gather_target,
    _kl,
    _log_probs,
    _mean_over_positions,
    _upcast,
)


def tgeo_relations(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, teacher_class_mean: Tensor
) -> Tensor:
    """Relation features ``(..., 6C)``: the six edges between S, T, G and T_bar, concatenated.

    S = softmax(student), T = softmax(teacher) (temperature 1), G = one-hot label, T_bar =
    ``teacher_class_mean[target]`` (``teacher_class_mean`` is ``(C, C)``, row c the mean teacher
    prediction over samples of class c). Returned in this order:

        S - T, S - G, T - G          (intra-sample triangle: does the student mimic the
                                      teacher, is each of them right)
        S - T_bar, T - T_bar, G - T_bar   (inter-sample: how far this sample sits from its
                                      class's typical teacher prediction; damps outliers)

    The paper (method section: intra- and inter-sample relations) builds the ratio network's input
    from these relations; taking the edge *vectors* (from which the network can form lengths
    and angles) and all three edges to T_bar is our reading. Positions whose target is -100
    get G = 0 and row 0 of the class means (their ratio is never used).
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "tgeo_relations", required=True)
    num_classes = student_logits.shape[-1]
    if teacher_class_mean.shape != (num_classes, num_classes):
        raise ValueError(f"teacher_class_mean must be ({num_classes}, {num_classes}), got {tuple(teacher_class_mean.shape)}")
    s = F.softmax(_upcast(student_logits), dim=-1)
    t = F.softmax(_upcast(teacher_logits), dim=-1).to(s.dtype)
    valid = (targets != IGNORE_INDEX).unsqueeze(-1)
    g = F.one_hot(targets.clamp(min=0), num_classes).to(s.dtype) * valid
    t_bar = teacher_class_mean.to(s.dtype)[targets.clamp(min=0)]
    return torch.cat([s - t, s - g, t - g, s - t_bar, t - t_bar, g - t_bar], dim=-1)


def fusion_terms(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *, temperature: float = 4.0
) -> tuple[Tensor, Tensor]:
    """Per-position (KD_i, CE_i), each of shape ``(...)``: the two losses the ratio blends.

    KD_i = T^2 KL(softmax(t/T) || softmax(s/T)) (Hinton et al. 2015, as ``kd``) and CE_i =
    -log softmax(s)[y]. Values at -100 positions are meaningless; callers mask them.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "fusion_terms", required=True)
    _check_temperature(temperature)
    kd_i = _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)) * temperature**2
    ce_i = -_gather_target(F.log_softmax(_upcast(student_logits), dim=-1), targets)
    return kd_i, ce_i


def tgeo_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    ratio: Tensor,
    *,
    temperature: float = 4.0,
) -> Tensor:
    """mean_i [ r_i KD_i + (1 - r_i) CE_i ]: the TGeo-KD student loss for given ratios r.

    The sample-wise fused objective of the paper (method section, knowledge fusion ratio). ``ratio``
    has the targets' shape, values in [0, 1]; r = 1 is pure KD (``kd``), r = 0 pure label CE.
    Gradients flow into ``ratio`` too; the method detaches it for the student's update.
    """
    _check_targets(targets, student_logits, "tgeo_kd", required=True)
    if ratio.shape != targets.shape:
        raise ValueError(f"ratio {tuple(ratio.shape)} must have the targets' shape {tuple(targets.shape)}")
    with torch.no_grad():
        if bool(((ratio < 0) | (ratio > 1)).any()):
            raise ValueError("ratio must lie in [0, 1]")
    kd_i, ce_i = fusion_terms(student_logits, teacher_logits, targets, temperature=temperature)
    return _mean_over_positions(ratio * kd_i + (1 - ratio) * ce_i, targets)


def lookahead_alignment(per_sample: Tensor, outer: Tensor, params: Sequence[Tensor]) -> Tensor:
    """<grad_params outer, grad_params per_sample[j]> for every j, shape ``per_sample.shape``.

    The hypergradient of a one-step look-ahead, to first order: after a virtual SGD step
    theta' = theta - eta * grad sum_j w_j l_j, the outer loss changes by
    -eta * sum_j w_j <grad outer, grad l_j> + O(eta^2), so d outer(theta') / d w_j =
    -eta * <grad outer, grad l_j>. This is the first-order form of the look-ahead of
    Meta-Weight-Net (Shu et al. 2019) and Learning to Reweight (Ren et al. 2018).

    All the per-sample dot products come from one double backward, without per-sample
    gradients: h(e) = <grad outer, grad sum_j e_j l_j> is linear in e, and dh/de_j is the j-th
    product. ``per_sample`` and ``outer`` must both have autograd graphs reaching ``params``;
    their graphs are kept (a caller may still backpropagate through them). The result is
    detached.
    """
    params = [p for p in params if p.requires_grad]
    e = torch.ones_like(per_sample, requires_grad=True)
    inner_grads = torch.autograd.grad((e * per_sample).sum(), params, create_graph=True, allow_unused=True)
    outer_grads = torch.autograd.grad(outer, params, retain_graph=True, allow_unused=True)
    dot = sum((gi * go.detach()).sum() for gi, go in zip(inner_grads, outer_grads) if gi is not None and go is not None)
    if not isinstance(dot, Tensor) or not dot.requires_grad:  # nothing reaches the parameters
        return torch.zeros_like(per_sample).detach()
    (alignment,) = torch.autograd.grad(dot, e, retain_graph=True, allow_unused=True)
    return torch.zeros_like(per_sample) if alignment is None else alignment.detach()
