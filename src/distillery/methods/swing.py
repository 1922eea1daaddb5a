"""Swing distillation: privacy-adaptive per-sample temperature and noisy soft targets.

Li et al. (2022), "Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework".
The loss and every choice made where the paper could not be followed to the letter (how the
private information of a sample is estimated, the temperature map, the noise, the scale) are in
:mod:`distillery.losses.swing`. This module mixes it with label CE like KD::

    L = (1 - alpha) * CE(labels) + alpha * swing_kd

Noise is drawn from a generator seeded with (seed, step), so a resumed run draws the same noise.
Note that the label term is a direct channel for the labels of the training set: when the
student's training set holds private labels, set ``alpha = 1`` (distillation only).
"""
from __future__ import annotations

import torch
from typing import Literal

from pydantic import Field, model_validator

from distillery.losses import logits as L
from distillery.losses.swing import swing_kd, swing_privacy_score, swing_temperature
from distillery.methods import register
from distillery.methods.base import Method, Params, Progress


class SwingParams(Params):
    t_min: float = Field(4.0, gt=0, description="Temperature of a sample with no estimated private information (plain KD's T).")
    t_max: float = Field(8.0, gt=0, description="Temperature of a sample estimated fully private (higher: more privacy, less accuracy).")
    noise_scale: float = Field(0.02, ge=0, description="Laplace scale b of the noise added to the tempered soft targets (0 = no noise).")
    privacy_estimate: Literal["relative", "absolute"] = Field(
        "relative", description="Private information of a sample: its teacher/student gap (total variation) relative to the "
                                "batch median (relative) or as it is (absolute).")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the swing term; labels get 1 - alpha.")
    seed: int = Field(0, ge=0, description="Seed of the noise (the noise of step k is drawn from (seed, k)).")

    @model_validator(mode="after")
    def _order(self) -> "SwingParams":
        if self.t_max < self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be >= t_min ({self.t_min})")
        return self


@register("swing", params=SwingParams,
          paper="Li et al. 2022, Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework")
class Swing(Method):
    """Swing distillation: per-sample temperature from estimated private information + noisy soft targets."""

    def temperatures(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The per-sample temperatures this step uses (for inspection; detached)."""
        p = self.params
        privacy = swing_privacy_score(student_logits, teacher_logits, relative=p.privacy_estimate == "relative")
        return swing_temperature(privacy, t_min=p.t_min, t_max=p.t_max)

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        generator = torch.Generator().manual_seed(p.seed * 2**32 + progress.step) if p.noise_scale > 0 else None
        s, t = student_out.logits, teacher_out.logits
        terms = {"swing": p.alpha * swing_kd(s, t, targets, t_min=p.t_min, t_max=p.t_max, noise_scale=p.noise_scale,
                                            generator=generator, relative=p.privacy_estimate == "relative")}
        if p.alpha < 1:
            terms["ce"] = (1 - p.alpha) * L.cross_entropy(s, None, targets)
        return terms
