"""Self-distillation with ground-truth weighting (Borup & Andersen 2021).

One round of their iterative self-distillation: the teacher is the previous round's model
(same architecture) and the student fits ``alpha * onehot(y) + (1 - alpha) * softmax(teacher)``.
``alpha`` is fixed here; :func:`distillery.recipes.self_distillation.run_rounds` runs the
rounds and sets ``alpha`` per round from the paper's estimate of the optimal weight.
"""
from __future__ import annotations

from pydantic import Field

from distillery.losses.self_distillation import self_distillation_loss
from distillery.methods import register
from distillery.methods.base import Method, Params


class SelfDistillParams(Params):
    alpha: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Weight of the ground-truth labels in the target; the previous round's softmax gets 1 - alpha "
                    "(1 = labels only, 0 = pure self-distillation). `distillery self-distill` sets it per round.")


@register("selfdistill", params=SelfDistillParams,
          paper="Borup & Andersen 2021, Even your Teacher Needs Guidance: Ground-Truth Targets Dampen "
                "Regularization Imposed by Self-Distillation")
class SelfDistill(Method):
    """Self-distillation round: CE against alpha*onehot(y) + (1-alpha)*softmax(previous round)."""

    def forward(self, student_out, teacher_out, targets, progress):
        return {"selfdistill": self_distillation_loss(student_out.logits, teacher_out.logits, targets,
                                                      alpha=self.params.alpha)}
