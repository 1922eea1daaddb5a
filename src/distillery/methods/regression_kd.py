"""Distillation for regression outputs (continuous targets, ``data.task == "regression"``).

The student's "logits" are its predictions of the standardised targets ``(B, K)``; the
losses live in :mod:`distillery.losses.regression`.

- ``mse``: squared error to the labels only -- the teacher-free baseline, and what trains the
  teachers (the *tolerant* one on ``data.soft_targets``, the *tough* one on the ground truth).
- ``regression_kd``: one teacher; ``alpha * ||s - t||^2 + (1 - alpha) * ||s - y||^2``.
- ``tough_tolerant``: Fard & Mahoor 2022's KD-Loss with two teachers, given in this order::

      teacher: {ensemble: [{run: runs/tolerant}, {run: runs/tough}], combine: mean_logits}

  member 0 is the tolerant teacher (trained on ASM soft targets), member 1 the tough teacher
  (trained on the ground truth); each member's prediction is read by tapping ``members.0`` /
  ``members.1`` (the ensemble's combined output is not used).  ``combine: mean_logits`` only
  makes the ensemble's own reported prediction meaningful (the mean of the two).

Why soft targets are a data option and not a method: the tolerant teacher is an ordinary
regression run whose training targets are the Active Shape Model smoothing of the ground truth,
which needs the principal components of *all* training targets -- data the loader has and a
method (which sees one batch at a time) does not.  ``data.soft_targets: {pca_components: k}``
therefore replaces the training targets once, at load time (validation and test targets stay the
ground truth, so the tolerant teacher is evaluated on the real task); any method, ``mse``
included, then trains on them.
"""
from __future__ import annotations

from pydantic import Field

from distillery.losses import regression as R
from distillery.methods import register
from distillery.methods.base import Method, Params

_KD_LOSS = ("Fard & Mahoor 2022, Facial Landmark Points Detection Using Knowledge Distillation-Based Neural Networks "
            "(CVIU; arXiv 2111.07047)")


def _check_shapes(pred, targets) -> None:
    if targets.dim() != 2 or not targets.is_floating_point() or targets.shape != pred.shape:
        raise ValueError(f"regression methods need float targets shaped like the predictions {tuple(pred.shape)}, "
                         f"got {targets.dtype} {tuple(targets.shape)}; use a regression source (data.name: diabetes "
                         "or fmnist_landmarks)")


class MSEParams(Params):
    pass


@register("mse", params=MSEParams, needs_teacher=False, paper="baseline", regression=True, classification=False)
class MSE(Method):
    """Squared error to the labels only: the regression baseline (also trains both teachers)."""

    def forward(self, student_out, teacher_out, targets, progress):
        _check_shapes(student_out.logits, targets)
        return {"mse": R.mse(student_out.logits, targets)}


class RegressionKDParams(Params):
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the squared error to the teacher's prediction; "
                                                     "the labels get 1 - alpha.")


@register("regression_kd", params=RegressionKDParams, regression=True, classification=False,
          paper="Hinton, Vinyals & Dean 2015 (soft/hard target mix), squared error for regression outputs")
class RegressionKD(Method):
    """One teacher: alpha * ||student - teacher||^2 + (1 - alpha) * ||student - labels||^2."""

    def forward(self, student_out, teacher_out, targets, progress):
        _check_shapes(student_out.logits, targets)
        a = self.params.alpha
        terms = {"kd": a * R.mse(student_out.logits, teacher_out.logits.detach())}
        if a < 1:
            terms["mse"] = (1 - a) * R.mse(student_out.logits, targets)
        return terms


class ToughTolerantParams(Params):
    main_weight: float = Field(1.0, ge=0, description="Weight of the main loss (L1 near the truth, L2 far from it).")
    tough_weight: float = Field(1.0, ge=0, description="Weight of the tough teacher's assistive loss.")
    tolerant_weight: float = Field(1.0, ge=0, description="Weight of the tolerant teacher's assistive loss.")
    alpha_tough: float = Field(0.9, description="Tough teacher: weight where the student lies beyond it (pull).")
    alpha_tough_neg: float = Field(-0.45, description="Tough teacher: weight where the student lies between it and the "
                                                      "truth's neighbourhood (negative: push on towards the truth).")
    alpha_tolerant: float = Field(0.8, description="Tolerant teacher: weight where the student lies beyond it.")
    alpha_tolerant_neg: float = Field(-0.4, description="Tolerant teacher: weight between it and the truth's "
                                                        "neighbourhood.")
    beta: float = Field(0.15, ge=0, lt=1, description="Neighbourhood of the truth with no assistive pull, as a share of "
                                                      "the teacher's error |T - G|.")
    slope: float = Field(3.0, gt=0, description="Main loss: slope of its L1 part, used while the student's error is "
                                                "below the tolerant teacher's.")


@register("tough_tolerant", params=ToughTolerantParams, regression=True, classification=False, num_teachers=2,
          paper=_KD_LOSS)
class ToughTolerant(Method):
    """KD-Loss: main loss plus assistive losses from a tolerant (soft-target) and a tough (ground-truth) teacher."""

    TOLERANT, TOUGH = "members.0", "members.1"

    def __init__(self, params: ToughTolerantParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.teacher_taps = [self.TOLERANT, self.TOUGH]

    def forward(self, student_out, teacher_out, targets, progress):
        _check_shapes(student_out.logits, targets)
        p = self.params
        feats = teacher_out.features
        return R.tough_tolerant(
            student_out.logits.float(), targets, feats[self.TOUGH].float(), feats[self.TOLERANT].float(),
            main_weight=p.main_weight, tough_weight=p.tough_weight, tolerant_weight=p.tolerant_weight,
            alpha_tough=p.alpha_tough, alpha_tough_neg=p.alpha_tough_neg, alpha_tolerant=p.alpha_tolerant,
            alpha_tolerant_neg=p.alpha_tolerant_neg, beta=p.beta, slope=p.slope)
