"""General knowledge transfer between pretrained models: KL distillation with data partitioning.

Roth, Thede, Koepke, Vinyals, Hénaff & Akata (2024), "Fantastic Gains and Where to Find Them: On
the Existence and Prospect of General Knowledge Transfer between Any Pretrained Model", ICLR,
Sec. 4 ("KL+DP", Eq. 4).  The student is already trained and the teacher may be weaker than it;
plain KD then makes the student forget what it knew.  The paper treats transfer as continual
learning and partitions every batch by confidence: a sample is taught by the teacher ``f_t``
where the teacher is more confident than a *frozen copy of the initial student* ``f_st``, and by
``f_st`` elsewhere -- so the student keeps its own answers where it was the better model:

    m_t = 1[ sigma_j(z_t) > sigma_j(z_st) ],   m_st = 1 - m_t
    L   = sum_i m_t^i KL(sigma(z_t^i / T) || sigma(z_s^i / T)) + m_st^i KL(sigma(z_st^i / T) || sigma(z_s^i / T))

with ``j`` the ground-truth class (``partition: label``, the supervised variant) or each model's
top-1 probability (``partition: top1``, the paper's unsupervised variant, which needs no
labels).  The KL terms are our ``losses.logits.kd`` (scaled by T^2, mean over the batch); there is
no label cross-entropy in KL+DP (``ce_weight`` adds one if wanted).

The registry name, ``kt_partition``: "knowledge transfer with data partitioning" -- the one thing
that separates it from ``kd`` is the per-sample choice of target, and "general transfer" alone
would not say which of the paper's variants this is.

The student should start from its own pretrained weights (``student.weights`` in the run
config): the frozen initial copy is taken in ``setup``, before the first step.  From a random
initialisation the copy is confident nowhere, so the rule sends (almost) every sample to the
teacher and the method reduces to KD at temperature T.  The copy is not checkpointed: a resumed
run rebuilds it from the same initial weights.  ``benchmarks/general_transfer.py`` measures the
positive-transfer rate (share of teacher/student pairs whose student ends above its initial
accuracy), against plain KD.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from distillery.losses import logits as L
from distillery.methods import register
from distillery.methods.base import Method, Params, Progress


def partition_mask(teacher_logits: Tensor, initial_logits: Tensor, targets: Tensor | None = None) -> Tensor:
    """``m_t`` of Eq. 4: True where the teacher is strictly more confident than the frozen initial
    student -- in the true class when ``targets`` are given, else in each model's top-1 class."""
    if teacher_logits.shape != initial_logits.shape or teacher_logits.dim() != 2:
        raise ValueError(f"teacher and initial-student logits must both be (N, C); got {tuple(teacher_logits.shape)} "
                         f"and {tuple(initial_logits.shape)}")
    p_t = torch.softmax(teacher_logits.detach().float(), -1)
    p_st = torch.softmax(initial_logits.detach().float(), -1)
    if targets is None:
        return p_t.max(-1).values > p_st.max(-1).values
    if targets.shape != teacher_logits.shape[:1] or bool(((targets < 0) | (targets >= teacher_logits.shape[1])).any()):
        raise ValueError(f"targets must be (N,) class ids in [0, {teacher_logits.shape[1]}); got shape {tuple(targets.shape)}. "
                         "Without labels use partition: top1")
    idx = targets[:, None]
    return p_t.gather(1, idx).squeeze(1) > p_st.gather(1, idx).squeeze(1)


def partitioned_kd(student_logits: Tensor, teacher_logits: Tensor, initial_logits: Tensor, mask: Tensor,
                   *, temperature: float = 1.0) -> Tensor:
    """Eq. 4: KD towards the teacher on ``mask`` and towards the initial student elsewhere, i.e.
    Hinton KD against the per-sample merged target (mean over the batch, scaled by T^2)."""
    if mask.shape != student_logits.shape[:1] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool (N,) tensor for {student_logits.shape[0]} samples, got {mask.dtype} {tuple(mask.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    target = torch.where(mask[:, None], teacher_logits.detach().to(dtype), initial_logits.detach().to(dtype))
    return L.kd(student_logits, target, temperature=temperature)


class KTPartitionParams(Params):
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both KL terms (scaled by T^2).")
    partition: Literal["label", "top1"] = Field("label", description="label: compare confidences in the true class "
                                                "(supervised); top1: in each model's top prediction (unsupervised).")
    ce_weight: float = Field(0.0, ge=0, description="Weight of an optional label cross-entropy (KL+DP has none).")


@register("kt_partition", params=KTPartitionParams,
          paper="Roth, Thede, Koepke, Vinyals, Hénaff & Akata 2024, Fantastic Gains and Where to Find Them: On the "
                "Existence and Prospect of General Knowledge Transfer between Any Pretrained Model (ICLR)")
class KTPartition(Method):
    """KL+DP transfer: distil from the teacher where it beats the frozen initial student, else from that copy."""

    def __init__(self, params: KTPartitionParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        # Samples sent to the teacher / seen since the last log_values() (buffers: resumable).
        self.register_buffer("routed", torch.zeros(2, dtype=torch.float64))

    def setup(self, student_out, teacher_out) -> None:
        initial = copy.deepcopy(self._student).eval().requires_grad_(False)
        for m in initial.modules():  # hooks of feature taps must not fire for the copy
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        # A plain attribute: not trained, not checkpointed (rebuilt from the same weights on resume).
        object.__setattr__(self, "_initial", initial)

    def initial_forward(self, inputs) -> Tensor:
        from distillery.models import forward_logits

        initial: nn.Module | None = getattr(self, "_initial", None)
        if initial is None:
            raise RuntimeError("kt_partition's frozen initial student is missing: setup() runs before the first step")
        with torch.no_grad():
            return forward_logits(initial, inputs)

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        s, t = student_out.logits, teacher_out.logits
        st = self.initial_forward(student_out.inputs).to(s.dtype)
        mask = partition_mask(t, st, targets if p.partition == "label" else None)
        with torch.no_grad():
            self.routed += torch.tensor([float(mask.sum()), float(mask.numel())], dtype=self.routed.dtype,
                                        device=self.routed.device)
        terms = {"kl_dp": partitioned_kd(s, t, st, mask, temperature=p.temperature)}
        if p.ce_weight > 0:
            terms["ce"] = p.ce_weight * L.cross_entropy(s, None, targets)
        return terms

    def log_values(self) -> dict[str, float]:
        if float(self.routed[1]) == 0:
            return {}
        share = float(self.routed[0] / self.routed[1])
        self.routed.zero_()
        return {"teacher_share": share}
