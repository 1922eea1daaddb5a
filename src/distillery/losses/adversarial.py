"""Adversarial terms on model outputs (a discriminator telling teacher outputs from student
outputs), as used by MEAL V2 (Shen & Savvides 2020) and earlier by Shen et al. (2019), MEAL.

Pure functions of discriminator logits; the discriminator itself belongs to the method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Binary cross-entropy of the discriminator: teacher outputs are real (1), student outputs
    fake (0); mean of the two halves."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return (real + fake) / 2


def generator_loss(fake_logits: Tensor) -> Tensor:
    """The student's adversarial term: make the discriminator call its outputs real (the
    non-saturating GAN loss, -log D(student))."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
