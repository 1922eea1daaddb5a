"""MEAL V2: distil an ensemble of teachers through its averaged soft labels and a discriminator.

Shen & Savvides (2020), "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet
without Tricks", Sec. 3: the target is the average of the teachers' softmax outputs
p_T = 1/K sum_k softmax(z_k); the student minimises the KL similarity loss KL(p_T || p_S) -- no
hard labels, no temperature -- plus an adversarial term from a discriminator D that learns to
tell teacher outputs from student outputs (which the student learns to fool).  The student
starts from pretrained weights when the config gives them (``student.weights``).

With our engine the ensemble is ``teacher: [{run: a}, {run: b}, ...]`` (combine: mean_probs,
the default): the teacher logits the method receives are log p_T, so one teacher works too.

Choices (the paper defers details to its code): D is a 3-layer MLP on the probability vectors
(hidden width ``disc_hidden``, LeakyReLU), trained with binary cross-entropy; the student's
adversarial term is the non-saturating -log D(p_S).  Both players step together: D's loss sees
the student's outputs detached, and the student's adversarial term runs D with its parameters
detached, so each term only moves its own player although the engine sums them.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from distillery.losses import adversarial as ADV
from distillery.losses import logits as L
from distillery.methods import register
from distillery.methods.base import Method, Params


class MEALParams(Params):
    adversarial_weight: float = Field(0.1, ge=0, description="Weight of the student's adversarial term (0 = KL only).")
    disc_hidden: int = Field(128, ge=1, description="Hidden width of the discriminator MLP.")
    disc_weight: float = Field(1.0, ge=0, description="Weight of the discriminator's own loss.")


@register("mealv2", params=MEALParams,
          paper="Shen & Savvides 2020, MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without Tricks")
class MEALV2(Method):
    """MEAL V2: KL to the teachers' averaged softmax (no labels) plus an output discriminator."""

    def __init__(self, params: MEALParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        h = params.disc_hidden
        self.discriminator = nn.Sequential(nn.Linear(num_classes, h), nn.LeakyReLU(0.2), nn.Linear(h, h),
                                           nn.LeakyReLU(0.2), nn.Linear(h, 1))

    def _d(self, probs: torch.Tensor, frozen: bool) -> torch.Tensor:
        if not frozen:
            return self.discriminator(probs).squeeze(-1)
        params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, params, (probs,)).squeeze(-1)

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        s, t = student_out.logits, teacher_out.logits
        terms = {"kl": L.kd(s, t, temperature=1.0)}  # KL(p_T || p_S); labels unused
        if p.adversarial_weight > 0 or p.disc_weight > 0:
            c = s.shape[-1]
            p_s = torch.softmax(s.float(), -1).reshape(-1, c)
            p_t = torch.softmax(t.float(), -1).reshape(-1, c)
            terms["disc"] = p.disc_weight * ADV.discriminator_loss(self._d(p_t, False), self._d(p_s.detach(), False))
            terms["adv"] = p.adversarial_weight * ADV.generator_loss(self._d(p_s, True))
        return terms
