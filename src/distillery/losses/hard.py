"""HARD: learned hard augmentations for distillation -- the transform and the min-max terms.

Nix, Burg & Sinz (2023), "HARD: Hard Augmentations for Robust Distillation", arXiv:2305.14890.
An augmentation model ``g`` makes inputs ``x~ = g(x)`` on which teacher and student *disagree*,
while the teacher's own answer should stay what it was on ``x`` (so the augmented sample is still
an instance of the same thing, not noise); the student learns by KD on ``x~``.  With ``D`` the KL
divergence at temperature T:

* student:   minimise  ``D(t(x~) || s(x~))``                                   (:func:`disagreement`)
* augmentor: maximise  ``D(t(x~) || s(x~))  -  w_t D(t(x) || t(x~))``           (:func:`teacher_shift`)

Both players are updated from one backward pass through a gradient-reversal layer
(:func:`reverse_gradient`, Ganin & Lempitsky 2015, "Unsupervised Domain Adaptation by
Backpropagation", ICML, Sec. 3.2): identity forward, ``-scale * grad`` backward, placed so that only
the augmentor's path is reversed (see :mod:`distillery.methods.hard`).  We could read the paper's
abstract but not its equations; the form above is the one the abstract and the issue describe.

The augmentation model here is the paper's spatial variant: a spatial transformer (Jaderberg,
Simonyan, Zisserman & Kavukcuoglu 2015, "Spatial Transformer Networks", NeurIPS, eq. (1)) that
predicts one affine matrix per sample; :func:`apply_affine` warps the images with it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses import logits as L

__all__ = ["apply_affine", "disagreement", "identity_deviation", "reverse_gradient", "teacher_shift"]


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.scale * grad, None


def reverse_gradient(x: Tensor, scale: float = 1.0) -> Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``-scale`` in the backward
    pass, so whatever produced ``x`` ascends the loss that the layers after it descend."""
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    return _ReverseGradient.apply(x, float(scale))


def apply_affine(x: Tensor, theta: Tensor) -> Tensor:
    """Warp image batch ``x`` ``(N, C, H, W)`` by per-sample affine matrices ``theta`` ``(N, 2, 3)``
    (output pixel at normalised position p samples the input at ``theta @ [p, 1]``), bilinear, zeros
    outside the image -- zero is each channel's mean after normalisation.  ``align_corners=False`` makes
    the identity matrix sample every pixel at its own centre, and the warp runs in float64 so that the
    rounding of the grid coordinates cannot leak into the result: ``theta = I`` returns ``x`` bit for bit
    (in float32 the grid is off by ~1e-6 of a pixel, enough to blend neighbours visibly in the last bits)."""
    if x.dim() != 4:
        raise ValueError(f"the spatial augmentor needs image batches (N, C, H, W); got {tuple(x.shape)}")
    if theta.shape != (x.shape[0], 2, 3):
        raise ValueError(f"theta must be ({x.shape[0]}, 2, 3), got {tuple(theta.shape)}")
    grid = F.affine_grid(theta.double(), list(x.shape), align_corners=False)
    return F.grid_sample(x.double(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype)


def identity_deviation(theta: Tensor) -> Tensor:
    """Mean absolute difference between the predicted matrices and the identity, ``mean |A - I|``
    over samples and the six entries: 0 = no augmentation."""
    eye = torch.eye(2, 3, device=theta.device, dtype=theta.dtype)
    return (theta - eye).abs().mean()


def disagreement(student_aug: Tensor, teacher_aug: Tensor, *, temperature: float = 4.0) -> Tensor:
    """``T^2 KL(softmax(t(x~)/T) || softmax(s(x~)/T))``: Hinton KD on the augmented input (the student
    minimises it, the augmentor maximises it).  Gradients flow into both logits."""
    return L.kd(student_aug, teacher_aug, temperature=temperature)


def teacher_shift(teacher_aug: Tensor, teacher_clean: Tensor, *, temperature: float = 4.0) -> Tensor:
    """``T^2 KL(softmax(t(x)/T) || softmax(t(x~)/T))``: how far the augmentation moved the teacher's own
    answer; the augmentor minimises it, which keeps ``x~`` a sample of the class the teacher saw in
    ``x``.  ``teacher_clean`` is a constant target."""
    return L.kd(teacher_aug, teacher_clean.detach(), temperature=temperature)
