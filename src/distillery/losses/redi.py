"""REDI: Reinforcement Distillation from positive *and negative* teacher traces.

Xu, Peng, Long, Xu, Chu and Qi, 2025, "Harnessing Negative Signals: Reinforcement Distillation
from Teacher Data for LLM Reasoning" (arXiv:2505.24850), the REDI objective of stage 2: for a
problem x with a verified-correct trace y+ and an incorrect trace y- of the teacher,

    L_REDI(θ) = -(1/|y+|) log π_θ(y+|x)  +  α (1/|y-|) log π_θ(y-|x)

Both terms are length-normalised (mean token log-probability) and the negative term is
down-weighted, α < 1 (the paper's recommended α = 0.8; α = 0 is SFT on the positives with a
per-sequence mean, α = 1 the symmetric REINFORCE-style objective that the paper finds unstable).
No reference model and no KL term: the paper's point is that this asymmetric REINFORCE loss beats
DPO/SimPO in the offline distillation setting.  The reference implementation
(``loss_type: reinforce`` in the authors' TRL fork) has the same form with coefficients
``reinforce_chosen_coef: 1.0`` and ``reinforce_rejected_coef: 0.8``.

Tensors follow ``distillery.losses.lm``: ``targets`` are aligned with the logits (position t is
scored against ``targets[t]``) and -100 marks positions that are not part of the trace.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(y|x) over each row's scored positions, and their number.

    ``logits`` (B, T, V), ``targets`` (B, T) with -100 outside y.  Returns (B,) log-probs and
    (B,) token counts."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on (batch, time)")
    valid = targets != IGNORE
    lp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return (lp * valid).sum(-1), valid.sum(-1)


def redi_loss(pos_logprob: torch.Tensor, pos_tokens: torch.Tensor, neg_logprob: torch.Tensor,
              neg_tokens: torch.Tensor, *, alpha: float = 0.8, pos_weight: float = 1.0) -> torch.Tensor:
    """The REDI objective, averaged over pairs (Xu et al., 2025, the stage-2 loss).

    ``pos_logprob``/``neg_logprob``: (B,) summed log-probabilities of the positive/negative trace
    of the same problem; ``*_tokens``: their lengths.  ``alpha``: weight of the negative term
    (0 <= alpha; the paper uses 0.8 and warns that alpha -> 1 collapses training)."""
    if alpha < 0 or pos_weight <= 0:
        raise ValueError(f"REDI needs alpha >= 0 and pos_weight > 0 (got alpha={alpha}, pos_weight={pos_weight})")
    if not (pos_logprob.shape == neg_logprob.shape == pos_tokens.shape == neg_tokens.shape):
        raise ValueError("positive and negative traces must come in pairs: the four tensors need one shape (B,)")
    if bool((pos_tokens <= 0).any()) or bool((neg_tokens <= 0).any()):
        raise ValueError("a trace without scored tokens cannot be length-normalised: drop empty traces first")
    pos = pos_logprob / pos_tokens
    neg = neg_logprob / neg_tokens
    return (-pos_weight * pos + alpha * neg).mean()


def redi_loss_from_logits(pos_logits: torch.Tensor, pos_targets: torch.Tensor, neg_logits: torch.Tensor,
                          neg_targets: torch.Tensor, *, alpha: float = 0.8, pos_weight: float = 1.0) -> torch.Tensor:
    """:func:`redi_loss` on the student's logits of the paired traces."""
    p_lp, p_n = sequence_logprobs(pos_logits, pos_targets)
    n_lp, n_n = sequence_logprobs(neg_logits, neg_targets)
    return redi_loss(p_lp, p_n, n_lp, n_n, alpha=alpha, pos_weight=pos_weight)
