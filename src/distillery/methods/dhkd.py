"""Dual-Head KD: the label loss on the student's own head, a logit-level KD loss on an auxiliary
head that shares the student's backbone (Yang et al. 2024).

The auxiliary head belongs to this method (so it is trained and checkpointed with the student
but is not part of the exported student): the engine evaluates and saves the student alone, so
only the main head is used at inference, as in the paper.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from distillery.losses import dhkd as DL
from distillery.losses import logits as L
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params


class DHKDParams(Params):
    temperature: float = Field(2.0, gt=0, description="Temperature of the logit-level loss (BinaryKL_T = 2 in the released code).")
    aux_weight: float = Field(1.0, ge=0, description="Weight of the logit-level loss on the auxiliary head "
                                                     "(alpha: 1 on CIFAR-100, 0.1 on ImageNet in the released code).")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy on the student's own head.")
    aux_loss: Literal["binary_kl_norm", "binary_kl"] = Field(
        "binary_kl_norm", description="binary_kl_norm: sigmoid of the logit gap matched to 1/2 (what the released code trains "
                                      "with); binary_kl: the per-class Bernoulli KL first introduced in the paper.")
    aux_head: Literal["linear", "mlp"] = Field(
        "linear", description="linear: a second linear classifier, as in the paper; mlp: Linear-BN-ReLU-Linear, the "
                              "released code's --nonlinear option.")
    aux_hidden: int = Field(200, ge=1, description="Hidden width of the mlp auxiliary head (200 in the released code).")
    feature: str = Field("head:input", description="Tap giving the penultimate features the auxiliary head reads "
                                                   "('head:input' for every zoo model).")


@register("dhkd", params=DHKDParams,
          paper="Yang, Zong, Huang, Feng & An 2024, Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head")
class DualHeadKD(Method):
    """Dual-head KD: label CE on the student's head, BinaryKL(-Norm) to the teacher on an auxiliary head.

    Follows the released recipe (penghui-yang/DHKD, ``helper/loops.py``): the main head gets
    ``ce_weight * CE`` only and the auxiliary head ``aux_weight * BinaryKL-Norm(aux, teacher)``;
    both gradients meet in the backbone, neither reaches the other head. Not implemented: the
    released code's optional gradient alignment (``--ga``, a PCGrad-style projection of the KD
    gradient of all parameters against the CE gradient), which needs one backward pass per loss
    and so a change in the engine, which does a single backward of the summed terms; the
    paper's main method does not need it. The ``mlp`` head leaves out the released head's
    dropout (p = 0.1).
    """

    def __init__(self, params: DHKDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.student_taps = [params.feature]
        self.aux_head: nn.Module | None = None  # built in setup, once the feature width is known

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> None:
        p = self.params
        dim = student_out.features[p.feature].shape[-1]
        if p.aux_head == "linear":
            self.aux_head = nn.Linear(dim, self.num_classes)
        else:
            self.aux_head = nn.Sequential(nn.Linear(dim, p.aux_hidden), nn.BatchNorm1d(p.aux_hidden),
                                          nn.ReLU(inplace=True), nn.Linear(p.aux_hidden, self.num_classes))

    def aux_logits(self, features):
        """The auxiliary head on features ``(..., D)``; leading dims are flattened for BatchNorm."""
        flat = features.reshape(-1, features.shape[-1])
        return self.aux_head(flat).reshape(*features.shape[:-1], self.num_classes)

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        aux = self.aux_logits(student_out.features[p.feature])
        logit_loss = DL.binary_kl_norm if p.aux_loss == "binary_kl_norm" else DL.binary_kl
        return {
            "ce": p.ce_weight * L.cross_entropy(student_out.logits, None, targets),
            p.aux_loss: p.aux_weight * logit_loss(aux, teacher_out.logits, temperature=p.temperature),
        }
