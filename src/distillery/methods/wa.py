"""Class-incremental KD, the training half of Weight Aligning (WA).

Zhao, Xiao, Gan, Zhang & Xia (2020), "Maintaining Discrimination and Fairness in Class
Incremental Learning", CVPR.  When task t adds new classes, the student (the previous model with
its classifier extended by rows for the new classes) learns

    L = (1 - λ) CE(z, y) + λ T² KL(softmax(ẑ_old / T) || softmax(z_old / T)),   λ = C_old / C_total

where ``z_old`` are the student's logits of the old classes and ``ẑ_old`` the previous model's
(the teacher, which predicts only the old classes): KD keeps the old classes discriminable among
themselves.  The other half of the paper -- *weight aligning*, rescaling the new classes'
classifier weights so their norms match the old ones' -- is a post-processing of the trained
model and lives in :func:`distillery.recipes.class_incremental.align_weights`, run by the
``distillery incremental`` recipe after each task.

Differences from the paper: the paper also clips the classifier weights to be non-negative after
every step (its features follow a ReLU); an in-place clip inside a method would break the
engine's autograd graph, so it is left out.  Exemplars are chosen at random per class (the paper
uses iCaRL's herding); see the recipe.
"""
from __future__ import annotations

from pydantic import Field

from distillery.errors import ConfigError
from distillery.losses import logits as L
from distillery.methods import register
from distillery.methods.base import Method, Params


class WAParams(Params):
    temperature: float = Field(2.0, gt=0, description="KD temperature (the paper uses 2).")
    kd_weight: float | None = Field(None, ge=0, le=1, description="λ; None: C_old / C_total as in the paper.")


@register("wa", params=WAParams, teacher_same_classes=False,
          paper="Zhao et al. 2020, Maintaining Discrimination and Fairness in Class Incremental Learning")
class WeightAligningKD(Method):
    """Class-incremental KD on the old classes' logits (WA's training loss)."""

    def forward(self, student_out, teacher_out, targets, progress):
        s, t = student_out.logits, teacher_out.logits
        c_old, c_all = t.shape[-1], s.shape[-1]
        if c_old >= c_all:
            raise ConfigError(f"wa distils a teacher over the OLD classes into a student with more classes; the teacher "
                              f"predicts {c_old} and the student {c_all}. Use `distillery incremental`, which builds "
                              "each task's teacher and student")
        lam = self.params.kd_weight if self.params.kd_weight is not None else c_old / c_all
        return {"ce": (1 - lam) * L.cross_entropy(s, None, targets),
                "kd": lam * L.kd(s[:, :c_old], t, temperature=self.params.temperature)}
