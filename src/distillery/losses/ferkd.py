"""FerKD's pieces as pure tensor functions: random-resized crops, the per-crop label adaptation
and the soft-target loss over the crops that are kept.

Shen (2023), "FerKD: Surgical Label Adaptation for Efficient Distillation", ICCV.  The paper
observes that RandomResizedCrop turns one image into crops of three kinds, which FKD-style
distillation treats alike through the teacher's soft label:

* easy positives -- the teacher is (almost) certain of the ground-truth class: the crop teaches
  little, so FerKD drops it;
* hard positives -- the teacher recognises the object with moderate confidence: its soft label
  is the useful signal and is kept as it is;
* hard negatives -- the crop is mostly background or another object and the teacher gives the
  labelled class a very low probability: its soft label is unreliable, so FerKD "calibrates the
  less-confident regions to be the context using softened hard groundtruth labels", i.e. the
  target becomes the label-smoothed ground truth.

The paper ranks crops by the teacher's predicted probability of the ground-truth class; its exact
cut-offs are not stated in the text we could consult, so :func:`adapt_crop_labels` takes them as
two thresholds on that probability (``easy_threshold``, ``hard_threshold``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

EASY, SOFT, HARD = 0, 1, 2  # crop kinds returned by adapt_crop_labels


def random_resized_boxes(n: int, generator: torch.Generator, *, scale: tuple[float, float] = (0.25, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Crop boxes of torchvision's RandomResizedCrop, one per sample, in fractions of the image:
    ``(n, 4) = (top, left, height, width)``.  The area fraction is uniform in ``scale`` and the
    aspect ratio log-uniform in ``ratio``; a box that does not fit becomes the whole image --
    torchvision's fallback for a square image, which it reaches after ten failed tries; one draw per
    sample here, so a step's crops depend only on the generator."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {ratio}")
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    area = lo + (hi - lo) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)  # width / height
    h, w = torch.sqrt(area / aspect), torch.sqrt(area * aspect)
    fits = (h <= 1) & (w <= 1)
    h, w = torch.where(fits, h, torch.ones_like(h)), torch.where(fits, w, torch.ones_like(w))
    top = (1 - h) * u[:, 2]
    left = (1 - w) * u[:, 3]
    return torch.stack([top, left, h, w], 1).float()


def crop_resize(x: Tensor, boxes: Tensor) -> Tensor:
    """Cut each box out of its image and resize it (bilinear) back to the image's ``H x W``:
    the "resize" of RandomResizedCrop, batched through one ``grid_sample``.  A box ``(0, 0, 1, 1)``
    returns the image unchanged."""
    if x.dim() != 4:
        raise ValueError(f"random-resized crops need image batches (N, C, H, W), got {tuple(x.shape)}")
    if boxes.shape != (x.shape[0], 4):
        raise ValueError(f"boxes must be ({x.shape[0]}, 4) = (top, left, height, width) fractions, got {tuple(boxes.shape)}")
    b = boxes.to(device=x.device, dtype=x.dtype)
    top, left, h, w = b.unbind(1)
    theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates: scale by the box's size,
    # shift to its centre (both in the [-1, 1] frame, hence the factors of 2).
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * left + w - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * top + h - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def adapt_crop_labels(teacher_probs: Tensor, targets: Tensor, *, easy_threshold: float, hard_threshold: float,
                      smoothing: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """FerKD's surgical label adaptation of one batch of crops.

    With ``p = teacher_probs[i, y_i]`` the teacher's probability of crop ``i``'s ground-truth class:

    * ``p >= easy_threshold``: easy positive, dropped (weight 0);
    * ``p <  hard_threshold``: hard negative, target = ``(1 - smoothing) onehot(y) + smoothing / C``;
    * otherwise: target = the teacher's soft label ``teacher_probs[i]``.

    Returns ``(targets (N, C), weights (N,), kind (N,))`` with kind in ``EASY, SOFT, HARD``.
    The targets carry no gradient."""
    if teacher_probs.dim() != 2 or targets.shape != teacher_probs.shape[:1]:
        raise ValueError(f"teacher_probs must be (N, C) and targets (N,); got {tuple(teacher_probs.shape)} and {tuple(targets.shape)}")
    if not 0 <= hard_threshold <= easy_threshold <= 1:
        raise ValueError(f"thresholds must satisfy 0 <= hard_threshold <= easy_threshold <= 1, got "
                         f"hard_threshold={hard_threshold}, easy_threshold={easy_threshold}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    c = teacher_probs.shape[1]
    if bool(((targets < 0) | (targets >= c)).any()):
        raise ValueError(f"targets must be class ids in [0, {c}); FerKD needs a label for every crop")
    probs = teacher_probs.detach()
    p = probs.gather(1, targets[:, None]).squeeze(1)
    easy = p >= easy_threshold
    hard = (p < hard_threshold) & ~easy
    smoothed = (1 - smoothing) * F.one_hot(targets, c).to(probs.dtype) + smoothing / c
    out = torch.where(hard[:, None], smoothed, probs)
    weights = (~easy).to(probs.dtype)
    kind = torch.full_like(targets, SOFT)
    kind[easy], kind[hard] = EASY, HARD
    return out, weights, kind


def ferkd_loss(student_logits: Tensor, soft_targets: Tensor, weights: Tensor) -> Tensor:
    """Soft-target cross-entropy ``-sum_c q_c log softmax(z)_c`` (FKD's ``Soft_CrossEntropy``, at
    temperature 1), averaged over the crops that are kept: ``sum_i w_i CE_i / sum_i w_i``.  A batch
    whose crops were all dropped gives 0 (with a graph, so the step still runs)."""
    if student_logits.shape != soft_targets.shape or weights.shape != student_logits.shape[:1]:
        raise ValueError(f"logits {tuple(student_logits.shape)}, targets {tuple(soft_targets.shape)} and weights "
                         f"{tuple(weights.shape)} must be (N, C), (N, C) and (N,)")
    z = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    per = -(soft_targets.to(z.dtype) * F.log_softmax(z, -1)).sum(-1)
    w = weights.to(z.dtype)
    total = w.sum()
    return (w * per).sum() / torch.where(total > 0, total, torch.ones_like(total))
