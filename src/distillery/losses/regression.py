"""Losses for regression outputs: plain and two-teacher (tough / tolerant) distillation.

Every function takes predictions and targets as float tensors of the same shape ``(B, K)``
(K continuous outputs, e.g. landmark coordinates) and compares them elementwise; nothing here
knows where the tensors came from.

The two-teacher losses are those of Fard & Mahoor, "Facial Landmark Points Detection Using
Knowledge Distillation-Based Neural Networks", CVIU 2022 (arXiv 2111.07047), Sec. 3: a *tough*
teacher trained on the ground truth ("hard landmarks"), a *tolerant* teacher trained on targets
smoothed by an Active Shape Model ("soft landmarks"), and a student trained with

    L = w_main * L_main(P, G, T_tol) + w_tough * ALoss(P, G, T_tough) + w_tol * ALoss(P, G, T_tol)

The paper's full text was not reachable while this was written; the formulas follow its
official implementation (github.com/aliprf/KD-Loss, ``custom_Losses.py``, ``kd_loss``), whose
default constants (beta = 0.15, main-loss slope 3, region weights 0.9/-0.45 and 0.8/-0.4 from
``student_train.py``) are the defaults of the method's params.
"""
from __future__ import annotations

import torch


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element."""
    return (pred.float() - target.float()).pow(2).mean()


def regression_kd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Plain distillation for regression: ``alpha * ||s - t||^2 + (1 - alpha) * ||s - y||^2``
    (means over elements): Hinton, Vinyals & Dean 2015's mix of the teacher's and the labels'
    targets (eq. (2) and the weighted average of Sec. 2), with squared error in place of the
    tempered KL, since a regression output is not a distribution.  ``teacher`` carries no
    gradient."""
    return alpha * mse(student, teacher.detach()) + (1 - alpha) * mse(student, target)


# ----------------------------------------------------------------------------------------------
# Soft targets: Active Shape Model smoothing


def fit_shape_model(train_targets: torch.Tensor, components: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of the training target vectors, as an Active Shape Model builds it (Cootes, Taylor,
    Cooper & Graham 1995, "Active Shape Models -- Their Training and Application", eq. (2)-(5)):
    returns ``(mean (K,), V (K, k) orthonormal columns = top-k eigenvectors of the covariance,
    eigenvalues (k,))``, computed in float64 with an SVD of the centred targets."""
    x = train_targets.to(torch.float64)
    n, dim = x.shape
    if not 1 <= components <= dim:
        raise ValueError(f"pca_components must be between 1 and the target dimension {dim}, got {components}")
    if n < 2:
        raise ValueError(f"a shape model needs at least 2 training targets, got {n}")
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    eigenvalues = s.pow(2) / (n - 1)
    return mean, vh[:components].T.contiguous(), eigenvalues[:components].contiguous()


def asm_project(targets: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, eigenvalues: torch.Tensor,
                *, clip: float | None = 3.0) -> torch.Tensor:
    """Soft targets: ``mean + V b~`` with ``b = V^T (y - mean)`` and, when ``clip`` is set,
    ``b~_i = clamp(b_i, -clip sqrt(lambda_i), clip sqrt(lambda_i))`` -- the ASM constraint that
    keeps a shape plausible (Cootes et al. 1995; Fard & Mahoor's "soft landmarks").  Returns the
    targets' dtype."""
    y = targets.to(torch.float64)
    b = (y - mean) @ basis
    if clip is not None:
        bound = clip * eigenvalues.clamp_min(0).sqrt()
        b = torch.maximum(torch.minimum(b, bound), -bound)
    return (mean + b @ basis.T).to(targets.dtype)


# ----------------------------------------------------------------------------------------------
# Two teachers: the main loss and the assistive losses


def reflect(teacher: torch.Tensor, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The teacher's prediction mirrored onto the student's side of the ground truth:
    ``T^ = G + sign(P - G) |T - G|``.  Only the teacher's *distance* to the ground truth is
    trusted, not its direction, so the student is never pulled across the ground truth."""
    return target + torch.sign(student - target) * (teacher - target).abs()


def assistive_weights(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *,
                      alpha: float, alpha_neg: float, beta: float = 0.15) -> torch.Tensor:
    """Per-element weight of an assistive loss, by the region the student's prediction P lies in
    relative to the reflected teacher T^ and the boundary ``B = G + sign(P - G) beta |T - G|``:

    * positive region, P beyond the teacher (``(P - T^)(T^ - G) > 0``): ``alpha`` -- the
      teacher is closer to the truth, so pull P towards it;
    * negative region, P between B and T^ (``(T^ - P)(P - B) >= 0``): ``alpha_neg`` (< 0 in
      the paper) -- P is already better than the teacher, so push it away from the teacher,
      i.e. on towards the truth;
    * P between G and B: 0 -- close enough to the truth, the main loss alone acts.

    The regions are decided on detached values: the weight is piecewise constant."""
    p, t, g = student.detach(), teacher.detach(), target.detach()
    side = torch.sign(p - g)
    t_hat = g + side * (t - g).abs()
    bound = g + side * (t - g).abs() * beta
    positive = torch.sign(p - t_hat) * torch.sign(t_hat - g) > 0
    negative = torch.sign(t_hat - p) * torch.sign(p - bound) >= 0
    zero = torch.zeros_like(p)
    return torch.where(positive, zero + alpha, zero) + torch.where(negative, zero + alpha_neg, zero)


def assistive_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *,
                   alpha: float, alpha_neg: float, beta: float = 0.15) -> torch.Tensor:
    """ALoss of one teacher: ``mean(w * |T^ - P|)`` with ``T^`` the reflected teacher and ``w``
    from :func:`assistive_weights`.  Gradient in P: ``-w sign(T^ - P)`` (towards the teacher
    for ``w > 0``, away from it for ``w < 0``)."""
    w = assistive_weights(student, teacher, target, alpha=alpha, alpha_neg=alpha_neg, beta=beta)
    t_hat = reflect(teacher.detach(), student.detach(), target)
    return (w * (t_hat - student).abs()).mean()


def main_loss(student: torch.Tensor, target: torch.Tensor, tolerant: torch.Tensor, *, slope: float = 3.0) -> torch.Tensor:
    """The student's main loss, L1 near the truth and L2 far from it, with the switch at the
    tolerant teacher's error ``d_tol = |G - T_tol|`` (per element, ``d = |G - P|``)::

        slope * d                              if d <= d_tol
        d^2 + slope * d_tol - d_tol^2           otherwise   (continuous at d = d_tol)

    Small errors -- the ones a smoothed target cannot tell apart -- get a constant pull; large
    ones a quadratic one."""
    d = (target - student).abs()
    d_tol = (target - tolerant.detach()).abs()
    low = slope * d
    high = d.pow(2) + slope * d_tol - d_tol.pow(2)
    return torch.where(d <= d_tol, low, high).mean()


def tough_tolerant(student: torch.Tensor, target: torch.Tensor, tough: torch.Tensor, tolerant: torch.Tensor, *,
                   main_weight: float = 1.0, tough_weight: float = 1.0, tolerant_weight: float = 1.0,
                   alpha_tough: float = 0.9, alpha_tough_neg: float = -0.45, alpha_tolerant: float = 0.8,
                   alpha_tolerant_neg: float = -0.4, beta: float = 0.15, slope: float = 3.0) -> dict[str, torch.Tensor]:
    """KD-Loss of Fard & Mahoor (2022): the weighted main loss and the two assistive losses, as
    named terms (their sum is the loss)."""
    return {
        "main": main_weight * main_loss(student, target, tolerant, slope=slope),
        "tough": tough_weight * assistive_loss(student, tough, target, alpha=alpha_tough,
                                               alpha_neg=alpha_tough_neg, beta=beta),
        "tolerant": tolerant_weight * assistive_loss(student, tolerant, target, alpha=alpha_tolerant,
                                                     alpha_neg=alpha_tolerant_neg, beta=beta),
    }
