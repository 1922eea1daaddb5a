"""Extra objective terms of ``distill_lm``: losses that own parameters or need the tokenizer.

A token loss of ``loss.name`` is a pure function; some methods add terms that are not: DAC-KL
learns its clipping limits with a small network, span correlation needs the tokenizer's word
boundaries.  Such a term is an ``nn.Module`` registered here by name and listed in the config::

    loss: {name: forward_kl, weight: 0}              # DAC-KL replaces the plain KL
    extra_terms:
      - {name: dac_kl, params: {features: 32, sharpness: 0.5, coverage_weight: 1.0}, lr: 1.0e-3}
      - {name: span_correlation, weight: 1.0}

The trainer builds each as ``TERMS[name](tokenizer, **params)``, puts it in the module Accelerate
wraps (so its parameters are optimised -- at ``lr`` if given -- checkpointed and resumed with the
student), and adds ``weight x`` each value of ``term(student_logits, teacher_logits, targets)``
(a dict of named losses) to the step's loss.  The mathematics is in ``distillery.losses.mgsr``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillery.losses.mgsr import clip_coverage, dac_kl, span_correlation_loss, span_ids_from_starts

TERMS: dict[str, type[nn.Module]] = {}


def register_term(name: str):
    def deco(cls):
        TERMS[name] = cls
        return cls

    return deco


class ClipLimits(nn.Module):
    """DAC-KL's sub-network: the teacher's top-N sorted probabilities -> (lower, upper) limits.

    log u = log σ(a) and log l = log u - softplus(b), so 0 < l < u < 1; initialised near
    u ≈ 1, l ≈ 1e-4 u (almost nothing clipped at the start)."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.features = features
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, 2))
        with torch.no_grad():
            self.net[-1].weight.mul_(0.01)
            self.net[-1].bias.copy_(torch.tensor([4.0, 9.2]))

    def forward(self, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = F.softmax(teacher_logits.detach().float(), -1).topk(self.features, -1).values
        a, b = self.net(top).unbind(-1)
        log_u = F.logsigmoid(a)
        return (log_u - F.softplus(b)).exp(), log_u.exp()


@register_term("dac_kl")
class DACKL(nn.Module):
    """DAC-KL (Liu et al. 2024, MGSR token level) with learned limits, plus the coverage term
    ``coverage_weight x (1 - kept teacher mass)`` that keeps the limits from shrinking the kept
    set to nothing."""

    def __init__(self, tokenizer=None, *, features: int = 32, hidden: int = 64, sharpness: float = 0.5,
                 coverage_weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        if features < 2 or hidden < 1 or sharpness <= 0 or coverage_weight < 0 or temperature <= 0:
            raise ValueError("dac_kl needs features >= 2, hidden >= 1, sharpness > 0, coverage_weight >= 0, temperature > 0")
        if tokenizer is not None and features > len(tokenizer):
            raise ValueError(f"dac_kl reads the teacher's top-{features} probabilities, more than the {len(tokenizer)} tokens")
        self.limits = ClipLimits(features, hidden)
        self.sharpness, self.coverage_weight, self.temperature = sharpness, coverage_weight, temperature

    def forward(self, student_logits, teacher_logits, targets) -> dict[str, torch.Tensor]:
        lower, upper = self.limits(teacher_logits)
        kw = dict(sharpness=self.sharpness, temperature=self.temperature)
        out = {"dac_kl": dac_kl(student_logits, teacher_logits, targets, lower, upper, **kw)}
        if self.coverage_weight:
            out["coverage"] = self.coverage_weight * (1 - clip_coverage(teacher_logits, targets, lower, upper, **kw))
        return out


def word_starts(tok) -> torch.Tensor:
    """(V,) True for tokens that begin a word: byte-level BPE's space/newline/tab markers, or a
    first character that is not a letter, digit or underscore."""
    out = torch.zeros(len(tok), dtype=torch.bool)
    for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        piece = piece or ""
        out[i] = piece[:1] in ("Ġ", "Ċ", "ĉ", "▁") or not (piece[:1].isalnum() or piece[:1] == "_")
    return out


@register_term("span_correlation")
class SpanCorrelation(nn.Module):
    """MGSR span level: the student's span-to-span probability correlations match the teacher's;
    spans start at the tokenizer's word boundaries."""

    def __init__(self, tokenizer, *, temperature: float = 1.0):
        super().__init__()
        if tokenizer is None:
            raise ValueError("span_correlation needs the tokenizer (its word boundaries make the spans)")
        self.register_buffer("starts", word_starts(tokenizer), persistent=False)
        self.temperature = temperature

    def forward(self, student_logits, teacher_logits, targets) -> dict[str, torch.Tensor]:
        valid = targets != -100
        spans = span_ids_from_starts(self.starts[targets.clamp_min(0)], valid)
        return {"span": span_correlation_loss(student_logits, teacher_logits, spans, temperature=self.temperature)}
