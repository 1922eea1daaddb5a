"""Mixup / CutMix inputs and the losses of mixup knowledge distillation, as pure tensor functions.

Choi, Jeon, Shukla & Turaga (2023), "Understanding the Role of Mixup in Knowledge Distillation:
An Empirical Study", WACV.  The student and the teacher both see the mixed input; the student is
trained with KD towards the teacher's soft targets *on that mixed input* plus cross-entropy with
the mixed labels ``lambda * y_a + (1 - lambda) * y_b``.  The paper's two recommendations are
implemented by its released code (github.com/hchoi71/MIX-KD, ``helper/loops_mixstd.py`` and
``distiller_zoo/MIXSTD.py``), which we follow where the text could not be read:

* partial mixup (PMU): only a fraction of each batch is mixed, the rest is left as it is (the
  code's ``partmixup=0.9`` leaves 90 % unmixed, "PMU 10 %"); the sampling lives in the method;
* a temperature that adapts to the logits: every logit vector is divided by its own standard
  deviation (:func:`standardized_kd`), instead of one fixed, high ``T`` -- mixup already makes the
  teacher's outputs smooth, so a large fixed temperature over-smooths them.

Mixing follows Zhang, Cisse, Dauphin & Lopez-Paz (2018), "mixup: Beyond Empirical Risk
Minimization", ICLR, eq. (1), and CutMix Yun et al. (2019), "CutMix: Regularization Strategy to
Train Strong Classifiers with Localizable Features", ICCV, Sec. 3.1 (box side ``sqrt(1 - lambda)``
of the image side, lambda re-computed from the clipped box's area).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import _check_pair, _kl, _upcast

__all__ = ["cutmix", "cutmix_boxes", "box_mask", "mixed_targets", "mixup", "soft_cross_entropy", "standardized_kd"]


def _check_mixing(x: Tensor, perm: Tensor, lam: Tensor) -> None:
    n = x.shape[0]
    if perm.shape != (n,) or lam.shape != (n,):
        raise ValueError(f"perm and lam must be ({n},) tensors for a batch of {n}; got {tuple(perm.shape)} and {tuple(lam.shape)}")
    if bool(((lam < 0) | (lam > 1)).any()):
        raise ValueError("lam must lie in [0, 1]")


def mixup(x: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    """``x~_i = lam_i * x_i + (1 - lam_i) * x_perm(i)`` (Zhang et al. 2018, eq. (1)), one lambda per
    sample; ``lam_i = 1`` leaves sample ``i`` untouched.  Works for any ``(N, ...)`` float input."""
    _check_mixing(x, perm, lam)
    shape = (-1,) + (1,) * (x.dim() - 1)
    w = lam.to(x.dtype).view(shape)
    return w * x + (1 - w) * x[perm]


def cutmix_boxes(lam: Tensor, centres: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """CutMix boxes (Yun et al. 2019, Sec. 3.1): per sample, a box of sides ``H sqrt(1-lam)`` x
    ``W sqrt(1-lam)`` centred at ``centres`` (``(N, 2)`` fractions of (H, W) in [0, 1)), clipped to
    the image.  Returns integer boxes ``(N, 4) = (top, bottom, left, right)`` (half-open) and the
    lambda that matches what is actually pasted: ``1 - box area / (H W)``."""
    if centres.shape != (lam.shape[0], 2):
        raise ValueError(f"centres must be ({lam.shape[0]}, 2) fractions of the image size, got {tuple(centres.shape)}")
    side = torch.sqrt(1 - lam.double())
    cy, cx = centres[:, 0].double() * height, centres[:, 1].double() * width
    half_h, half_w = side * height / 2, side * width / 2
    top = (cy - half_h).round().clamp(0, height).long()
    bottom = (cy + half_h).round().clamp(0, height).long()
    left = (cx - half_w).round().clamp(0, width).long()
    right = (cx + half_w).round().clamp(0, width).long()
    boxes = torch.stack([top, bottom, left, right], 1)
    area = (bottom - top) * (right - left)
    return boxes, (1 - area.double() / (height * width)).to(lam.dtype)


def box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """``(N, 1, H, W)`` bool mask, True inside each sample's box."""
    rows = torch.arange(height, device=boxes.device)[None, :]
    cols = torch.arange(width, device=boxes.device)[None, :]
    in_rows = (rows >= boxes[:, :1]) & (rows < boxes[:, 1:2])
    in_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])
    return in_rows[:, None, :, None] & in_cols[:, None, None, :]


def cutmix(x: Tensor, perm: Tensor, boxes: Tensor) -> Tensor:
    """Paste the box of ``x_perm(i)`` into ``x_i`` (Yun et al. 2019, eq. (1) with M = 1 outside the box)."""
    if x.dim() != 4:
        raise ValueError(f"cutmix needs image batches (N, C, H, W); got {tuple(x.shape)} (use mode: mixup for other inputs)")
    hole = box_mask(boxes.to(x.device), x.shape[2], x.shape[3])
    return torch.where(hole, x[perm], x)


def mixed_targets(targets: Tensor, perm: Tensor, lam: Tensor, num_classes: int) -> Tensor:
    """Soft labels ``lam * onehot(y) + (1 - lam) * onehot(y_perm)`` of shape ``(N, C)``."""
    if targets.dim() != 1 or targets.dtype.is_floating_point:
        raise ValueError(f"mixup needs class-id targets of shape (N,), got {tuple(targets.shape)} {targets.dtype}")
    if bool(((targets < 0) | (targets >= num_classes)).any()):
        raise ValueError(f"targets must be class ids in [0, {num_classes}); mixup cannot mix ignored (-100) rows")
    onehot = F.one_hot(targets, num_classes).to(lam.dtype if lam.dtype.is_floating_point else torch.float32)
    w = lam.to(onehot.dtype)[:, None]
    return w * onehot + (1 - w) * onehot[perm]


def _row_std(logits: Tensor) -> Tensor:
    # torch.std (unbiased) as in the authors' MIXSTDLoss; the clamp keeps a constant row finite.
    return logits.std(dim=-1, keepdim=True).clamp_min(1e-6)


def soft_cross_entropy(logits: Tensor, soft_targets: Tensor, *, standardize: bool = False) -> Tensor:
    """``-sum_c q_c log softmax(z)_c``, mean over the batch.  ``standardize=True`` divides each logit
    vector by its own standard deviation first, as the authors' code does for the CE term of their
    std-temperature loss (``-log_softmax(z_s / std(z_s)) * target``)."""
    if logits.shape != soft_targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and soft targets {tuple(soft_targets.shape)} must have the same shape")
    z = _upcast(logits)
    if standardize:
        z = z / _row_std(z)
    return -(soft_targets.to(z.dtype) * F.log_softmax(z, -1)).sum(-1).mean()


def standardized_kd(student_logits: Tensor, teacher_logits: Tensor, *, scale: float = 1.0) -> Tensor:
    """``KL(softmax(z_t / (s sigma_t)) || softmax(z_s / (s sigma_s)))``, mean over rows, where
    ``sigma`` is each row's own standard deviation and ``s = scale``.

    The temperature adjustment of Choi et al. (2023) as released (``MIXSTDLoss``): each network's
    logits are put on a common scale by their own spread, i.e. a per-sample temperature equal to
    ``sigma``, typically far below the usual fixed T = 4 (mixed inputs already give smooth teacher
    outputs).  The authors use ``scale = 1`` and no ``T^2`` factor; neither is added here.
    Gradients flow into the student's logits through ``sigma_s`` too (as in the authors' code).
    """
    _check_pair(student_logits, teacher_logits)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    s, t = _upcast(student_logits), _upcast(teacher_logits)
    log_p_t = F.log_softmax(t / (scale * _row_std(t)), -1)
    log_q_s = F.log_softmax(s / (scale * _row_std(s)), -1)
    return _kl(log_p_t, log_q_s).mean()
