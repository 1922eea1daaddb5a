"""USKD: teacher-free self-distillation with customised soft labels (Yang et al. 2023, ICCV).

A weak linear classifier (owned by this method, so trained and checkpointed but not exported)
reads a pooled intermediate feature of the student; its logits help rank the non-target
classes for Zipf's-law soft labels. The mathematics lives in :mod:`distillery.losses.uskd`.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from distillery.losses import logits as L
from distillery.losses import uskd as UL
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params


class USKDParams(Params):
    alpha: float = Field(0.1, ge=0, description="Weight of the soft target-class term (0.1 in the released CIFAR-100 "
                                                "config, 1.0 on ImageNet).")
    beta: float = Field(0.1, ge=0, description="Weight of the Zipf non-target term (0.1 in every released config).")
    mu: float = Field(0.1, ge=0, description="Weight of the weak classifier's label-smoothed CE (0.1 CIFAR-100, "
                                             "0.005 ImageNet).")
    zipf_power: float = Field(1.0, gt=0, description="Exponent of Zipf's law 1/rank^power (1 in the released code).")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the ordinary label cross-entropy, kept beside USKD.")
    feature_layer: str | None = Field(None, description="Student module whose output feeds the weak classifier; default: "
                                                        "the second-deepest of the model's default_feature_layers (the "
                                                        "released code uses the stage before the last).")


def pool(feature: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> global average (N, C); (N, L, D) tokens -> mean token (N, D); (N, D) as is."""
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    if feature.dim() == 3:
        return feature.mean(dim=1)
    return feature.flatten(1)


@register("uskd", params=USKDParams, needs_teacher=False,
          paper="Yang, Zeng, Li, Zhang, Yuan & Li 2023, From Knowledge Distillation to Self-Knowledge Distillation (USKD)")
class USKD(Method):
    """USKD self-KD: label CE + smoothed soft target + Zipf non-target labels + weak intermediate head."""

    def __init__(self, params: USKDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        layer = params.feature_layer
        if layer is None:
            stages = list(getattr(student, "default_feature_layers", []) or [])
            if not stages:
                raise ValueError("the student has no default_feature_layers; set method.params.feature_layer "
                                 "to an intermediate module path")
            layer = stages[-2] if len(stages) >= 2 else stages[-1]
        self.layer = layer
        self.student_taps = [layer]
        self.weak_head: nn.Module | None = None  # built in setup, once the feature width is known

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> None:
        dim = pool(student_out.features[self.layer]).shape[-1]
        self.weak_head = nn.Linear(dim, self.num_classes)

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        logits = student_out.logits
        weak = self.weak_head(pool(student_out.features[self.layer]))
        return {
            "ce": p.ce_weight * L.cross_entropy(logits, None, targets),
            "uskd_target": p.alpha * UL.uskd_target_loss(logits, targets),
            "uskd_non_target": p.beta * UL.uskd_non_target_loss(logits, weak, targets, power=p.zipf_power),
            "uskd_weak": p.mu * UL.uskd_weak_loss(weak, targets),
        }
