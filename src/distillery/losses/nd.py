"""The ND loss: regularise the norm and the direction of the student's embedding.

Wang, Cheng, Duan, Wang, Feng, Kong (2023), "Improving Knowledge Distillation via Regularizing
Feature Norm and Direction" (arXiv:2305.17007).  The embedding is the penultimate feature (the
classifier's input).  For a sample of class c with student embedding f_s and teacher
embedding f_t, and e_c the unit vector of the teacher's class-mean embedding of class c,

    L_nd = 1 - <f_s, e_c> / max(||f_s||, ||f_t||).

The direction part: <f_s, e_c> / ||f_s|| is the cosine between the student embedding and the
teacher's class centre.  The norm part: while ||f_s|| < ||f_t|| the denominator is the fixed
||f_t||, so the loss keeps falling as the student's projection on e_c grows -- it pushes the
student's norm up to (at least) the teacher's; once ||f_s|| >= ||f_t|| only the cosine is left.
Added to KD this is the paper's "KD++" (and DKD++, ReviewKD++, ...).

Written after the released code (WangYZ1608/Knowledge-Distillation-via-ND, ``DirectNormLoss``:
per sample ``1 - dot(s, e_c) / max(||s||, ||t||)``, averaged over the batch), vectorised; the
paper's name for the equation is used here because its number could not be checked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nd_loss(student_emb: Tensor, teacher_emb: Tensor, class_centres: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of ``1 - <f_s, e_y> / max(||f_s||, ||f_t||)``.

    ``student_emb`` and ``teacher_emb`` are (N, D) -- the student's already projected to the
    teacher's width D -- ``class_centres`` (C, D) the teacher's class-mean embeddings (need not
    be unit length: they are normalised here), ``targets`` (N,) class ids.  The teacher side is
    a target: no gradient reaches ``teacher_emb`` or ``class_centres``."""
    if student_emb.dim() != 2 or student_emb.shape != teacher_emb.shape:
        raise ValueError(f"student and teacher embeddings must both be (N, D) of one shape; got "
                         f"{tuple(student_emb.shape)} and {tuple(teacher_emb.shape)} (project the student first)")
    if class_centres.dim() != 2 or class_centres.shape[1] != student_emb.shape[1]:
        raise ValueError(f"class_centres must be (C, {student_emb.shape[1]}), got {tuple(class_centres.shape)}")
    if targets.shape != student_emb.shape[:1] or targets.dtype.is_floating_point:
        raise ValueError(f"targets must be (N,) = ({student_emb.shape[0]},) integer class ids, got {tuple(targets.shape)} {targets.dtype}")
    if bool(((targets < 0) | (targets >= class_centres.shape[0])).any()):
        raise ValueError(f"targets must be class ids in [0, {class_centres.shape[0]})")
    s = student_emb.float() if student_emb.dtype in (torch.float16, torch.bfloat16) else student_emb
    t = teacher_emb.detach().to(s.dtype)
    e = F.normalize(class_centres.detach().to(s.dtype), dim=1)[targets]
    # the max is taken per sample, as in the released code; a zero embedding pair gives 0/eps
    denom = torch.maximum(s.norm(dim=1), t.norm(dim=1)).clamp_min(1e-12)
    return (1 - (s * e).sum(dim=1) / denom).mean()


def class_sums(emb: Tensor, targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sum of the rows of ``emb`` (C, D) and per-class counts (C,): the statistics of
    a running class mean ``sum / count``, accumulated batch by batch."""
    sums = emb.new_zeros(num_classes, emb.shape[1]).index_add_(0, targets, emb)
    counts = torch.bincount(targets, minlength=num_classes).to(emb.dtype)
    return sums, counts
