"""Mixup / CutMix knowledge distillation with partial mixup and an adapted temperature.

Choi, Jeon, Shukla & Turaga (2023), "Understanding the Role of Mixup in Knowledge Distillation:
An Empirical Study", WACV.  Per step the method mixes the batch, asks the teacher for its soft
targets *on the mixed input* (``Method.teacher_forward``: no cache can hold inputs made during
training, so the method is registered ``live_teacher=True``), runs the student on the same mixed
input and returns

* ``kd``: ``kd_weight`` x the distillation term on the mixed input;
* ``ce``: ``ce_weight`` x cross-entropy with the mixed labels ``lam y_a + (1 - lam) y_b``.

The paper's recommended variants, as its released code implements them (see
:mod:`distillery.losses.mixup`):

* partial mixup (``mix_fraction``): only that share of each batch is mixed (drawn without
  replacement); the other samples are seen as they are.  The authors' default is 10 % mixed
  (their ``partmixup=0.9``); ``mix_fraction: 1.0`` is full mixup (FMU);
* temperature adjustment (``temperature_rule``): ``std`` divides every logit vector by its own
  standard deviation (times ``temperature``, default 1) in both the KD and the CE term, as the
  authors' ``MIXSTDLoss``; ``fixed`` is Hinton KD at one temperature ``T`` (default 4, scaled by T^2)
  with plain CE -- set a lower ``T`` there, since mixed inputs already smooth the teacher.

Defaults follow the authors' code: Beta(1, 1) lambdas, CE weight 0.1 (their gamma), KD weight 0.9
(their alpha).  Differences: lambdas and pairs come from a generator seeded by (seed, step), so a
resumed run replays the same mixes; the unmixed rows reuse the teacher output the engine already
computed on the clean batch (the teacher is in eval mode, so its answer for a row does not depend
on the rest of the batch) and only the mixed rows are sent through ``teacher_forward``; the
student's forward on the engine's clean batch goes unused (the paper trains on the mixed batch
only).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from distillery.losses import logits as L
from distillery.losses.mixup import (
    cutmix,
    cutmix_boxes,
    mixed_targets,
    mixup,
    soft_cross_entropy,
    standardized_kd,
)
from distillery.methods import register
from distillery.methods.base import Method, Params, Progress


class MixupKDParams(Params):
    mode: Literal["mixup", "cutmix"] = Field("mixup", description="mixup: convex combination of two inputs; "
                                             "cutmix: paste a box of one image into another (images only).")
    beta_alpha: float = Field(1.0, gt=0, description="lambda ~ Beta(beta_alpha, beta_alpha) per mixed sample (authors: 1.0).")
    mix_fraction: float = Field(0.1, gt=0, le=1, description="Share of each batch that is mixed: partial mixup (PMU); "
                                                              "0.1 as in the authors' code, 1.0 = full mixup (FMU).")
    temperature_rule: Literal["std", "fixed"] = Field(
        "std", description="std: each logit vector divided by its own standard deviation (the paper's adapted "
                           "temperature); fixed: one temperature T for every sample (Hinton KD, scaled by T^2).")
    temperature: float | None = Field(None, gt=0, description="fixed: T (default 4); std: a factor on each row's "
                                                              "standard deviation (default 1, as the authors).")
    kd_weight: float = Field(0.9, ge=0, description="Weight of the KD term on the mixed input (authors' alpha).")
    ce_weight: float = Field(0.1, ge=0, description="Weight of the CE with mixed labels (authors' gamma).")
    seed: int = Field(0, ge=0, description="Seed of the mixing draws (the mix of step k is drawn from (seed, k)).")


@register("mixup_kd", params=MixupKDParams, live_teacher=True,
          paper="Choi, Jeon, Shukla & Turaga 2023, Understanding the Role of Mixup in Knowledge Distillation: "
                "An Empirical Study (WACV)")
class MixupKD(Method):
    """Mixup/CutMix KD: teacher and student on the mixed input, partial mixup, std-adapted temperature."""

    def _draw(self, n: int, x: torch.Tensor, step: int):
        """Which rows are mixed, with which partner and which lambda; CutMix boxes when asked."""
        p = self.params
        rng = np.random.default_rng([p.seed, step])
        k = int(round(p.mix_fraction * n))
        mixed = np.zeros(n, dtype=bool)
        mixed[rng.permutation(n)[:k]] = True
        lam = np.where(mixed, rng.beta(p.beta_alpha, p.beta_alpha, n), 1.0)
        perm = torch.from_numpy(rng.permutation(n)).to(x.device)
        lam = torch.from_numpy(lam).to(device=x.device, dtype=torch.float32)
        boxes = None
        if p.mode == "cutmix":
            if x.dim() != 4:
                raise ValueError(f"mode: cutmix needs image batches (N, C, H, W); got inputs {tuple(x.shape)}: use mode: mixup")
            centres = torch.from_numpy(rng.random((n, 2))).to(x.device)
            boxes, lam = cutmix_boxes(lam, centres, x.shape[2], x.shape[3])
        return torch.from_numpy(mixed).to(x.device), perm, lam, boxes

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        x = student_out.inputs
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise ValueError("mixup_kd mixes float input tensors (images or tables); text batches cannot be mixed")
        mixed, perm, lam, boxes = self._draw(x.shape[0], x, progress.step)
        x_mix = cutmix(x, perm, boxes) if boxes is not None else mixup(x, perm, lam)
        q = mixed_targets(targets, perm, lam, self.num_classes)

        s = self.student_forward(x_mix)
        # The teacher's soft targets on the mixed input: reuse the clean answer for unmixed rows.
        t = teacher_out.logits.detach().clone()
        if bool(mixed.any()):
            t[mixed] = self.teacher_forward(x_mix[mixed]).logits.to(t.dtype)

        if p.temperature_rule == "std":
            scale = p.temperature if p.temperature is not None else 1.0
            kd = standardized_kd(s, t, scale=scale)
            ce = soft_cross_entropy(s, q, standardize=True)
        else:
            kd = L.kd(s, t, temperature=p.temperature if p.temperature is not None else 4.0)
            ce = soft_cross_entropy(s, q)
        terms = {"kd": p.kd_weight * kd}
        if p.ce_weight > 0:
            terms["ce"] = p.ce_weight * ce
        return terms
