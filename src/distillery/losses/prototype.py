"""Prototype-guided cross-task distillation: the losses of ProC-KD as pure tensor functions.

Li, Wu, Han & Tian 2022, "Prototype-guided Cross-task Knowledge Distillation for Large-scale
Models" (arXiv 2212.13180; journal version Li, Li, Wu & Han, FITEE 26(6), 2025).

Only the paper's abstract could be read here (no PDF or code was reachable), so the equations
below are this library's formulation of what the abstract describes, not a transcription of the
paper's numbered equations:

* a *prototype learning module* learns ``K`` prototypes ``p_k`` from the teacher's **local**
  features ``t_i`` (one vector per spatial position or patch token: object-part patterns that
  are shared across label sets, unlike the teacher's task-specific logits);
* the student's local features, projected into the teacher's feature space, are expressed
  through the same prototypes and must pick the prototypes the teacher picks at that position;
* a *task-adaptive feature augmentation module* adds the prototype read-out of each student
  position to the student's feature, scaled by a gate learned on the student's own task.

Every local feature is compared with the prototypes by cosine similarity, so the scale of a
feature map never matters (teacher and student maps live on unrelated scales)::

    a_ik = softmax_k( cos(x_i, p_k) / tau )                                  (assignment)
    L_proto = mean_i || t_i/|t_i| - sum_k a^T_ik p_k/|p_k| ||^2              (prototype learning)
    L_assign = mean_i KL( a^T_i || a^S_i )                                   (local-knowledge transfer)
    z_i = s_i + g * sum_k a^S_ik p_k/|p_k|                                   (feature augmentation)

Local features are ``(..., N, C)`` tensors (``N`` positions of ``C`` channels); means run over
every leading axis and the positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_local(x: torch.Tensor, prototypes: torch.Tensor, temperature: float, name: str) -> None:
    if prototypes.dim() != 2 or prototypes.shape[0] < 2:
        raise ValueError(f"prototypes must be a (K, C) tensor with K >= 2, got shape {tuple(prototypes.shape)}; "
                         "use at least two prototypes")
    if x.dim() < 2 or x.shape[-1] != prototypes.shape[1]:
        raise ValueError(f"{name} must be (..., N, C) local features with C = {prototypes.shape[1]} (the prototypes' "
                         f"width), got shape {tuple(x.shape)}; project the features to the prototypes' width first")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def soft_assign(x: torch.Tensor, prototypes: torch.Tensor, *, temperature: float = 0.1) -> torch.Tensor:
    """Soft assignment of each local feature to the prototypes: ``softmax_k(cos(x_i, p_k) / tau)``.

    ``x``: ``(..., N, C)``; ``prototypes``: ``(K, C)``; returns ``(..., N, K)``, rows summing to 1.
    A zero feature has cosine 0 with every prototype, hence the uniform assignment."""
    _check_local(x, prototypes, temperature, "x")
    cos = F.normalize(x, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(0, 1)
    return torch.softmax(cos / temperature, dim=-1)


def prototype_readout(assign: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``sum_k a_ik p_k / |p_k|``: the prototype feature of each position, ``(..., N, C)``."""
    if assign.shape[-1] != prototypes.shape[0]:
        raise ValueError(f"assignment has {assign.shape[-1]} prototype columns but there are "
                         f"{prototypes.shape[0]} prototypes")
    return assign @ F.normalize(prototypes, dim=-1)


def prototype_reconstruction(teacher_local: torch.Tensor, prototypes: torch.Tensor, *,
                             temperature: float = 0.1) -> torch.Tensor:
    """Prototype learning: each normalised teacher local feature is rebuilt from the prototypes it
    is assigned to; ``mean_i || t_i/|t_i| - sum_k a_ik p_k/|p_k| ||^2`` (squared error summed over
    channels, averaged over positions).  A soft, cosine k-means: minimised by prototypes that sit
    on the recurring local patterns of the teacher.  Lies in ``[0, 4]``."""
    _check_local(teacher_local, prototypes, temperature, "teacher_local")
    target = F.normalize(teacher_local, dim=-1)
    recon = prototype_readout(soft_assign(teacher_local, prototypes, temperature=temperature), prototypes)
    return (target - recon).pow(2).sum(-1).mean()


def prototype_assignment_kd(student_local: torch.Tensor, teacher_local: torch.Tensor, prototypes: torch.Tensor, *,
                            temperature: float = 0.1) -> torch.Tensor:
    """Local-knowledge transfer: ``mean_i KL(a^T_i || a^S_i)``, the student's assignment of each
    position to the prototypes against the teacher's at the same position.

    Only *which local pattern* is at a position is transferred, never a class: it needs no shared
    label space.  ``student_local`` and ``teacher_local``: ``(..., N, C)`` of the same shape (the
    student already projected to the teacher's width and grid)."""
    if student_local.shape != teacher_local.shape:
        raise ValueError(f"student and teacher local features differ in shape: {tuple(student_local.shape)} vs "
                         f"{tuple(teacher_local.shape)}; project and resample the student's to the teacher's first")
    _check_local(teacher_local, prototypes, temperature, "teacher_local")
    log_s = torch.log_softmax(F.normalize(student_local, dim=-1) @ F.normalize(prototypes, dim=-1).T / temperature, -1)
    log_t = torch.log_softmax(F.normalize(teacher_local, dim=-1) @ F.normalize(prototypes, dim=-1).T / temperature, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def prototype_augment(student_local: torch.Tensor, assign: torch.Tensor, prototypes: torch.Tensor,
                      gate: torch.Tensor) -> torch.Tensor:
    """Task-adaptive feature augmentation: ``z_i = s_i + g * sum_k a_ik p_k/|p_k|``.

    ``student_local``: ``(B, N, C)``; ``assign``: ``(B, N, K)``; ``gate``: ``(B, C)`` (per sample
    and channel, e.g. a sigmoid of the pooled feature: how much of the prototype knowledge this
    task takes).  A zero gate leaves the features unchanged."""
    if student_local.dim() != 3 or assign.shape[:2] != student_local.shape[:2]:
        raise ValueError(f"student_local must be (B, N, C) and assign (B, N, K) for the same B and N, got "
                         f"{tuple(student_local.shape)} and {tuple(assign.shape)}")
    if gate.shape != (student_local.shape[0], student_local.shape[2]):
        raise ValueError(f"gate must be (B, C) = {(student_local.shape[0], student_local.shape[2])}, got {tuple(gate.shape)}")
    readout = prototype_readout(assign, prototypes)
    if readout.shape != student_local.shape:
        raise ValueError(f"prototypes have width {prototypes.shape[-1]} but the student features {student_local.shape[-1]}")
    return student_local + gate.unsqueeze(1) * readout


__all__ = ["soft_assign", "prototype_readout", "prototype_reconstruction", "prototype_assignment_kd", "prototype_augment"]
