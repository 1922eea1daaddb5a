"""MDCS: diversity loss over experts and consistency self-distillation with confident sampling.

Zhao, Jiang, Hu, Zhang, Liu (2023), "MDCS: More Diverse Experts with Consistency
Self-distillation for Long-tailed Recognition", ICCV.  Two components:

* Diversity loss (DL): expert ``i`` is trained with cross-entropy on its logits shifted by the
  label prior raised to its own exponent, ``z_i + lambda_i * log(pi)``.  Different exponents
  make the experts' raw logits fit different label distributions (``lambda = 0``: the training
  distribution, ``1``: balanced, as in logit adjustment / balanced softmax; ``> 1``: tilted
  towards the tail; ``< 0``: towards the head), so the experts disagree where the data is rare.
* Consistency self-distillation (CS): each expert's prediction on a strongly augmented view is
  pulled, by ``KL(p_weak || p_strong)``, towards its own (detached) prediction on the weakly
  augmented view of the same image, only for the instances selected by confident instance
  sampling (CIS): those the expert classifies correctly in the weak view.

The exact form follows the authors' released code (github.com/fistyee/MDCS, ``model/loss.py``,
``MDCSLoss``), which we could read; we could not read the paper's equations, so equation
numbers are not cited.  Conventions as in :mod:`distillery.losses.logits`: logits ``(..., C)``,
int64 targets ``(...)``, ``-100`` positions left out, fp16/bf16 upcast.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import (
    IGNORE_INDEX,
    _check_number,
    _check_pair,
    _check_targets,
    _check_temperature,
    _gather_target,
    _kl,
    _log_probs,
    _mean_over_positions,
    _upcast,
)

__all__ = ["confident_instance_mask", "consistency_self_distillation", "distribution_shifted_logits", "diversity_loss"]


def _check_prior(prior: Tensor, logits: Tensor) -> None:
    if prior.dim() != 1 or prior.shape[0] != logits.shape[-1]:
        raise ValueError(f"prior must be a ({logits.shape[-1]},) tensor of class frequencies, got shape {tuple(prior.shape)}")
    if not bool((prior > 0).all()):
        raise ValueError("prior must be positive for every class (counts or probabilities; smooth zero counts)")


def distribution_shifted_logits(logits: Tensor, prior: Tensor, exponent: float) -> Tensor:
    """``z + exponent * log(prior)``: the logits an expert is trained through.

    ``prior`` holds class frequencies of any positive scale (counts or probabilities): a
    constant factor only adds the same constant to every class, which no softmax sees.
    """
    _check_prior(prior, logits)
    _check_number("exponent", exponent)
    return _upcast(logits) + exponent * torch.log(prior.to(device=logits.device, dtype=_upcast(logits).dtype))


def diversity_loss(
    expert_logits: Sequence[Tensor], targets: Tensor, *, prior: Tensor, exponents: Sequence[float]
) -> Tensor:
    """MDCS diversity loss: ``sum_i CE(z_i + lambda_i * log(pi), y)`` over the experts.

    Summed, not averaged, over experts (as in the authors' code): each expert's head gets the
    gradient of its own CE and the shared backbone their sum.  With a uniform prior every shift
    is a constant, so the loss is the plain sum of the experts' CE whatever the exponents; with
    one expert and exponent 0 it is the label CE.
    """
    if len(expert_logits) == 0 or len(expert_logits) != len(exponents):
        raise ValueError(f"need one exponent per expert; got {len(expert_logits)} experts and {len(exponents)} exponents")
    total = None
    for z, lam in zip(expert_logits, exponents):
        _check_targets(targets, z, "mdcs_diversity", required=True)
        log_q = F.log_softmax(distribution_shifted_logits(z, prior, lam), dim=-1)
        ce = _mean_over_positions(-_gather_target(log_q, targets), targets)
        total = ce if total is None else total + ce
    return total


def confident_instance_mask(weak_logits: Tensor, targets: Tensor, *, confidence: float = 0.0) -> Tensor:
    """Confident instance sampling: True where the weak view is classified correctly.

    ``confidence > 0`` also requires the predicted class's probability to reach it (the
    authors' code uses correctness alone, i.e. ``confidence = 0``).  Positions whose target is
    ``-100`` are never selected.  Computed without gradient; returns a bool tensor ``(...)``.
    """
    _check_targets(targets, weak_logits, "mdcs_cis", required=True)
    _check_number("confidence", confidence)
    with torch.no_grad():
        p = F.softmax(_upcast(weak_logits), dim=-1)
        top_p, top_class = p.max(dim=-1)
        return (top_class == targets) & (targets != IGNORE_INDEX) & (top_p >= confidence)


def consistency_self_distillation(
    strong_logits: Tensor,
    weak_logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    confidence: float = 0.0,
) -> Tensor:
    """MDCS consistency self-distillation: ``T^2 * KL(p_weak || p_strong)`` over confident instances.

    ``p = softmax(logits / T)``.  The weak view's prediction is the teacher and is detached
    (stop-gradient: nothing flows into ``weak_logits``); the mean is over the instances that
    :func:`confident_instance_mask` selects (0, with a zero gradient, when none is).
    """
    _check_pair(strong_logits, weak_logits)
    _check_temperature(temperature)
    mask = confident_instance_mask(weak_logits, targets, confidence=confidence)
    log_p_weak = _log_probs(weak_logits.detach(), temperature)
    log_q_strong = _log_probs(strong_logits, temperature)
    per_position = _kl(log_p_weak, log_q_strong) * temperature**2
    # Unselected positions are marked -100 so the shared mean leaves them out.
    return _mean_over_positions(per_position, torch.where(mask, targets, torch.full_like(targets, IGNORE_INDEX)))
