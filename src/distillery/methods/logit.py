"""Logit-level methods: the student matches the teacher's output distribution.

Each method is a thin wiring of a pure loss from :mod:`distillery.losses.logits` plus the
cross-entropy on labels; the mathematics (and its citation) lives with the loss.
"""
from __future__ import annotations

import torch
from pydantic import Field

from distillery.losses import logits as L
from distillery.losses import multilabel as ML
from distillery.methods import register
from distillery.methods.base import Method, Params, Progress


class CEParams(Params):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


@register("ce", params=CEParams, needs_teacher=False, paper="baseline", multilabel=True)
class CrossEntropy(Method):
    """Cross-entropy on labels only: the from-scratch baseline (also used to train teachers)."""

    def forward(self, student_out, teacher_out, targets, progress):
        if targets.dim() == student_out.logits.dim():  # multi-label: binary CE per label
            eps = self.params.label_smoothing
            return {"ce": ML.binary_cross_entropy(student_out.logits, None, targets * (1 - eps) + eps / 2)}
        return {"ce": torch.nn.functional.cross_entropy(
            student_out.logits.float(), targets, label_smoothing=self.params.label_smoothing)}


class KDParams(Params):
    temperature: float = Field(4.0, gt=0, description="Softmax temperature T (the loss is scaled by T^2).")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the distillation term; labels get 1 - alpha.")


class _WeightedKD(Method):
    """(1 - alpha) * CE(labels) + alpha * divergence(student, teacher)."""

    def divergence(self, s: torch.Tensor, t: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student_out, teacher_out, targets, progress):
        a = self.params.alpha
        terms = {self.term: a * self.divergence(student_out.logits, teacher_out.logits, targets)}
        if a < 1:
            terms["ce"] = (1 - a) * L.cross_entropy(student_out.logits, None, targets)
        return terms


@register("kd", params=KDParams, paper="Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network")
class KD(_WeightedKD):
    """Hinton KD: KL(teacher_T ‖ student_T) * T^2 mixed with label cross-entropy."""

    term = "kd"

    def divergence(self, s, t, targets):
        return L.kd(s, t, temperature=self.params.temperature)


class RKLParams(KDParams):
    temperature: float = Field(1.0, gt=0)


@register("rkl", params=RKLParams, paper="reverse KL, as used in MiniLLM (Gu et al. 2024) and GKD (Agarwal et al. 2024)")
class ReverseKL(_WeightedKD):
    """Reverse KL(student ‖ teacher): mode-seeking distillation, mixed with label CE."""

    term = "rkl"

    def divergence(self, s, t, targets):
        return L.reverse_kl(s, t, temperature=self.params.temperature)


class JSDParams(KDParams):
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.5, ge=0, le=1, description="Mixture weight; 0 = forward KL, 1 = reverse KL.")
    scaled: bool = Field(False, description="Divide by beta*(1-beta) so the limits are continuous.")


@register("jsd", params=JSDParams, paper="Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD)")
class JSD(_WeightedKD):
    """Generalised Jensen-Shannon divergence JSD(beta) of GKD, mixed with label CE."""

    term = "jsd"

    def divergence(self, s, t, targets):
        p = self.params
        return L.jsd(s, t, beta=p.beta, temperature=p.temperature, scaled=p.scaled)


@register("bdkd", params=KDParams, paper="Amara et al. 2023, Balancing the Divergences for Online Knowledge Distillation")
class BDKD(_WeightedKD):
    """BD-KD: per-sample entropy-balanced forward and reverse KL, mixed with label CE."""

    term = "bdkd"

    def divergence(self, s, t, targets):
        return L.bdkd(s, t, temperature=self.params.temperature)


class DKDParams(Params):
    alpha: float = Field(1.0, ge=0, description="Weight of target-class KD (TCKD).")
    beta: float = Field(8.0, ge=0, description="Weight of non-target-class KD (NCKD).")
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    warmup_epochs: float = Field(20.0, ge=0, description="DKD weight ramps linearly from 0 over this many epochs.")


@register("dkd", params=DKDParams, paper="Zhao et al. 2022, Decoupled Knowledge Distillation")
class DKD(Method):
    """Decoupled KD: alpha*TCKD + beta*NCKD with a linear warm-up, plus label CE."""

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        ramp = min(progress.epoch / p.warmup_epochs, 1.0) if p.warmup_epochs > 0 else 1.0
        dkd = L.dkd(student_out.logits, teacher_out.logits, targets, alpha=p.alpha, beta=p.beta, temperature=p.temperature)
        return {"ce": p.ce_weight * L.cross_entropy(student_out.logits, None, targets), "dkd": ramp * dkd}


class NKDParams(Params):
    temperature: float = Field(1.0, gt=0, description="Temperature lambda of the non-target distribution.")
    gamma: float = Field(1.5, ge=0, description="Weight of the non-target term.")
    ce_weight: float = Field(1.0, ge=0)


@register("nkd", params=NKDParams, paper="Yang et al. 2023, From Knowledge Distillation to Self-Knowledge Distillation (NKD)")
class NKD(Method):
    """Normalized KD: teacher-weighted target term + normalised non-target KD, plus label CE."""

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        return {
            "ce": p.ce_weight * L.cross_entropy(student_out.logits, None, targets),
            "nkd": L.nkd(student_out.logits, teacher_out.logits, targets, temperature=p.temperature, gamma=p.gamma),
        }


class MLKDParams(Params):
    temperature: float = Field(2.0, gt=0, description="Temperature of every label's sigmoid (loss scaled by T^2).")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the distillation term; the labels' BCE gets 1 - alpha.")


@register("mlkd", params=MLKDParams, multilabel=True,
          paper="Yang et al. 2023, Multi-Label Knowledge Distillation (label-wise logit distillation)")
class MultiLabelKD(Method):
    """Multi-label KD: per-label binary KL at temperature T, mixed with per-label binary CE."""

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        if targets.dim() != student_out.logits.dim():
            raise ValueError("mlkd needs multi-label data (multi-hot targets, e.g. data.mosaic); use kd for single-label data")
        terms = {"mlkd": p.alpha * ML.binary_kd(student_out.logits, teacher_out.logits, temperature=p.temperature)}
        if p.alpha < 1:
            terms["bce"] = (1 - p.alpha) * ML.binary_cross_entropy(student_out.logits, None, targets)
        return terms
