"""FerKD: distil on random-resized crops whose soft labels are adapted by the teacher's confidence.

Shen (2023), "FerKD: Surgical Label Adaptation for Efficient Distillation", ICCV (Sec. 3; the
label rule and the crops live in :mod:`distillery.losses.ferkd`).  Per step the method

1. draws one RandomResizedCrop per image (area fraction in ``crop_scale``, aspect in [3/4, 4/3])
   and resizes it back to the image size;
2. SelfMix (the paper's "stabilized SelfMix"): for a ``selfmix`` share of the images, a CutMix
   box from a *second* crop of the same image is pasted into the first -- mixing two regions of
   one image keeps the mixed input, and so its soft label, close to the original (the point of
   the paper over mixing two different images);
3. asks the teacher for its soft label on exactly that view (``Method.teacher_forward``);
4. adapts the label by the teacher's probability ``p`` of the ground-truth class: drops the view
   when ``p >= easy_threshold`` (easy positive), replaces the soft label by the label-smoothed
   ground truth when ``p < hard_threshold`` (hard negative / background), keeps it otherwise;
5. trains the student with the soft-target cross-entropy over the kept views.

How this sits on our engine -- "on top of the reinforced-dataset cache" in the issue: FKD/FerKD
pre-compute soft labels per crop *offline*, keyed by the crop coordinates.  Our teacher cache
(``distillery.cache``) stores, per sample and view, the engine's own augmentation parameters
``(dy, dx, flip)`` of a pad-and-crop -- not random-resized crops, and not the SelfMix views --
so it cannot serve these labels.  The method therefore runs the teacher live on the views it
makes (registered ``live_teacher=True``, like ``mixup_kd``; a ``teacher.cache`` is refused).
Because the crops of step ``k`` are drawn from a generator seeded by ``(seed, k)``, the views are
reproducible -- the property the reinforced cache provides -- and a resumed run replays them.

Differences from the paper: FerKD samples its crop pool offline and reads the labels from disk;
here each step draws fresh crops.  The cut-offs between easy / kept / hard are thresholds on the
teacher's ground-truth probability (defaults 0.99 / 0.1, ours; the paper's own values are not in
the text we could consult).  The engine's forward of the student on the un-cropped batch goes
unused: the student trains on the crops only, as in FKD.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, model_validator

from distillery.losses import ferkd as FK
from distillery.losses.mixup import box_mask, cutmix_boxes
from distillery.methods import register
from distillery.methods.base import Method, Params, Progress


class FerKDParams(Params):
    easy_threshold: float = Field(0.99, gt=0, le=1, description="Views whose teacher probability of the true class "
                                                               "is at least this are dropped (easy positives).")
    hard_threshold: float = Field(0.1, ge=0, lt=1, description="Views below this get the label-smoothed ground truth "
                                                              "instead of the teacher's soft label (hard negatives).")
    smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the hard negatives' ground-truth target.")
    crop_scale: tuple[float, float] = Field((0.25, 1.0), description="RandomResizedCrop area fraction range "
                                                                     "(ImageNet uses (0.08, 1); small images need larger crops).")
    selfmix: float = Field(0.5, ge=0, le=1, description="Share of views that paste a CutMix box from a second crop of "
                                                        "the same image (SelfMix); 0 turns it off.")
    seed: int = Field(0, ge=0, description="Seed of the crops and mixes (step k draws from (seed, k)).")

    @model_validator(mode="after")
    def _ordered(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(self.crop_scale)}")
        if self.hard_threshold > self.easy_threshold:
            raise ValueError(f"hard_threshold ({self.hard_threshold}) must not exceed easy_threshold ({self.easy_threshold})")
        return self


@register("ferkd", params=FerKDParams, live_teacher=True,
          paper="Shen 2023, FerKD: Surgical Label Adaptation for Efficient Distillation (ICCV)")
class FerKD(Method):
    """FerKD: random-resized crops (+ SelfMix), drop easy views, smooth-label hard ones, soft CE on the rest."""

    def __init__(self, params: FerKDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        # Views seen since the last log_values() by kind (easy, soft, hard): a buffer, so a resumed
        # run reports the same shares.
        self.register_buffer("kind_counts", torch.zeros(3, dtype=torch.float64))

    def views(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The crops (and SelfMix views) of step ``step``: a function of (seed, step) and ``x`` only."""
        p = self.params
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.dtype.is_floating_point:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ferkd crops images (N, C, H, W float batches), got {shape}; for tables or text use kd")
        n, _, h, w = x.shape
        seed = int(np.random.SeedSequence([p.seed, step]).generate_state(1)[0])
        g = torch.Generator().manual_seed(seed)
        view = FK.crop_resize(x, FK.random_resized_boxes(n, g, scale=p.crop_scale))
        if p.selfmix > 0:
            second = FK.crop_resize(x, FK.random_resized_boxes(n, g, scale=p.crop_scale))
            mixed = torch.rand(n, generator=g) < p.selfmix
            lam = torch.where(mixed, torch.rand(n, generator=g), torch.ones(n))
            boxes, _ = cutmix_boxes(lam, torch.rand(n, 2, generator=g), h, w)
            view = torch.where(box_mask(boxes.to(x.device), h, w), second, view)
        return view

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        view = self.views(student_out.inputs, progress.step)
        t_probs = torch.softmax(self.teacher_forward(view).logits.float(), -1)
        q, weights, kind = FK.adapt_crop_labels(t_probs, targets, easy_threshold=p.easy_threshold,
                                                hard_threshold=p.hard_threshold, smoothing=p.smoothing)
        with torch.no_grad():
            self.kind_counts += torch.bincount(kind.cpu(), minlength=3).to(self.kind_counts)
        s = self.student_forward(view)
        return {"ferkd": FK.ferkd_loss(s, q, weights)}

    def log_values(self) -> dict[str, float]:
        total = float(self.kind_counts.sum())
        if total == 0:
            return {}
        shares = (self.kind_counts / total).tolist()
        self.kind_counts.zero_()
        return {"easy_dropped": shares[FK.EASY], "soft_kept": shares[FK.SOFT], "hard_smoothed": shares[FK.HARD]}
